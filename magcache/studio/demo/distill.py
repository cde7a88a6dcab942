"""Teach the trained demo model plain English on a CPU: new text encoders, distilled from the old ones.

    python -m magcache.studio.demo.distill --out out/demo_plain --minutes 60      # 2 CPU cores
    python -m magcache.studio.demo.evaluate --paraphrases --weights out/demo_plain  # held-out phrasings

Retraining the whole model on paraphrases (``train.py --captions plain``) needs a GPU: 2 cores train a far weaker
transformer in 90 minutes. But the transformer already draws every scene the grammar can name; what it lacks is a
text encoder that turns *a big red circle in the top left on a blue background* into the conditioning the grammar's
*blue background, large red circle at northwest* gets. So the transformer and the VAE stay frozen, and only new
tokenizers and text encoders (0.6 M parameters, over the paraphrases' 62 words and 48 tokens: ``model.caption_style
("plain")``) are trained, by distillation:

* teacher: the saved pipeline's text encoders on a scene's **grammar caption**, then its transformer;
* student: the new text encoders on a **paraphrase** of the same scene (``data.training_caption``: a quarter of them
  the grammar caption itself, so the grammar keeps working), then the same frozen transformer;
* loss: the squared difference of the two velocity predictions at the same noisy latent ``x_t`` of that scene
  (logit-normal t, object tokens weighted as in training), plus the squared difference of the pooled CLIP outputs;
  10 % of the samples pair the empty caption with the empty caption, so that true CFG's negative branch keeps its
  conditioning.

The student starts as a copy of the teacher: every word the grammar has keeps its embedding rows, a synonym starts
from its grammar word's rows (*big* from *large*, *centre* from *center*, *top* from *north*, ...), other words from
the mean row; the CLIP position table grows from 32 to 48 rows by repeating its last row.

Scenes and paraphrases never include the held-out scenes or the held-out sentence frames (``data.training_scenes``,
``data.training_caption``), so ``evaluate --paraphrases`` and ``--plain-english`` measure held-out prompts.
Every random draw comes from a generator seeded by (seed, step): runs repeat bit for bit on a CPU.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads sleep (see train.py)

import torch

from . import data as D
from . import model as M
from . import train as T

DEFAULT_MODEL = Path(__file__).resolve().parents[3] / "assets" / "demo_model"
POOLED_LOSS_WEIGHT = 1.0
EMPTY_SHARE = 0.1
# A word the grammar does not have starts from the embedding of the grammar word it means (most of them); row
# words start from the compass word of that row's middle cell, column words from that column's.
SYNONYM_INIT = {
    "big": "large", "huge": "large", "tiny": "small", "little": "small",
    "centre": "center", "middle": "center",
    "top": "north", "upper": "north", "bottom": "south", "lower": "south", "left": "west", "right": "east",
    "circles": "circle", "squares": "square", "triangles": "triangle", "diamonds": "diamond",
    "backdrop": "background",
}


def _embedding_rows(student_tok, teacher_tok, word_token) -> list[tuple[int, int | None]]:
    """(student id, teacher id or None) for every student token: the same token string, else the token of the
    grammar word a synonym stands for, else None."""
    teacher_vocab = teacher_tok.get_vocab()
    synonyms = {word_token(word): word_token(grammar_word) for word, grammar_word in SYNONYM_INIT.items()}
    return [(sid, teacher_vocab.get(token, teacher_vocab.get(synonyms.get(token))))
            for token, sid in student_tok.get_vocab().items()]


@torch.no_grad()
def _copy_embeddings(student: torch.nn.Embedding, teacher: torch.nn.Embedding, rows) -> int:
    """Student rows from the teacher's (mean row where there is none). Returns how many had a teacher row."""
    student.weight[:] = teacher.weight.mean(0)  # also rows no token string maps to (a piece listed twice)
    found = 0
    for sid, tid in rows:
        if tid is not None:
            student.weight[sid] = teacher.weight[tid]
            found += 1
    return found


def student_text_encoders(teacher: dict) -> dict:
    """Tokenizers and text encoders for plain English (``model.caption_style("plain")``), initialised from the
    teacher's ``tokenizer``, ``tokenizer_2``, ``text_encoder`` and ``text_encoder_2`` (see the module text)."""
    from transformers import CLIPTextModel, T5EncoderModel

    vocabulary, text_len = M.caption_style("plain")
    clip_tok, t5_tok = M.build_clip_tokenizer(vocabulary, text_len), M.build_t5_tokenizer(vocabulary, text_len)
    clip_config = copy.deepcopy(teacher["text_encoder"].config)
    clip_config.update(dict(vocab_size=len(clip_tok), max_position_embeddings=text_len,
                            bos_token_id=clip_tok.bos_token_id, eos_token_id=clip_tok.eos_token_id,
                            pad_token_id=clip_tok.eos_token_id))
    t5_config = copy.deepcopy(teacher["text_encoder_2"].config)
    t5_config.update(dict(vocab_size=len(t5_tok)))  # relative attention as the teacher's: same buckets, same rows
    clip, t5 = CLIPTextModel(clip_config), T5EncoderModel(t5_config)

    clip_state = {k: v for k, v in teacher["text_encoder"].state_dict().items()
                  if "token_embedding" not in k and "position_embedding" not in k and "position_ids" not in k}
    clip.load_state_dict(clip_state, strict=False)
    t5.load_state_dict({k: v for k, v in teacher["text_encoder_2"].state_dict().items() if "shared" not in k
                        and "embed_tokens" not in k}, strict=False)
    with torch.no_grad():
        old = teacher["text_encoder"].embeddings.position_embedding.weight
        new = clip.embeddings.position_embedding.weight
        new[: old.shape[0]] = old
        new[old.shape[0]:] = old[-1]
    clip_found = _copy_embeddings(clip.get_input_embeddings(), teacher["text_encoder"].get_input_embeddings(),
                                  _embedding_rows(clip_tok, teacher["tokenizer"], lambda w: w + "</w>"))
    t5_found = _copy_embeddings(t5.get_input_embeddings(), teacher["text_encoder_2"].get_input_embeddings(),
                                _embedding_rows(t5_tok, teacher["tokenizer_2"], lambda w: "\u2581" + w))
    T.log(f"student text encoders: {clip_found}/{len(clip_tok)} CLIP and {t5_found}/{len(t5_tok)} T5 embedding rows "
          f"from the teacher, {text_len} tokens")
    return dict(tokenizer=clip_tok, tokenizer_2=t5_tok, text_encoder=clip, text_encoder_2=t5)


class Students(torch.nn.Module):
    """The two trained text encoders in one module (for the optimiser and the EMA copy)."""

    def __init__(self, text_encoder, text_encoder_2):
        super().__init__()
        self.text_encoder, self.text_encoder_2 = text_encoder, text_encoder_2


def distill(teacher: dict, student: dict, lat: dict, seed: int, steps: int, batch: int, lr: float,
            deadline: float | None = None, log_every: int = T.LOG_EVERY) -> tuple[Students, int, list[float]]:
    """Train ``student``'s text encoders against ``teacher`` (both dicts of pipeline components; the teacher's
    transformer is shared and frozen). ``lat``: ``train.encode_latents(..., captions="plain")``'s output, packed
    with the teacher VAE's factors. Returns the EMA students, the steps done and the logged mean losses."""
    from diffusers import FluxPipeline

    transformer = teacher["transformer"].eval().requires_grad_(False)
    for name in ("text_encoder", "text_encoder_2"):
        teacher[name].eval().requires_grad_(False)
    torch.manual_seed(seed + 3)
    net = Students(student["text_encoder"], student["text_encoder_2"]).train()
    ema = copy.deepcopy(net).requires_grad_(False).eval()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.99))
    vae = teacher["vae"].config
    x0_all = T.pack(lat["latents"], vae.shift_factor, vae.scaling_factor)
    teacher_ids = T._tokenize(teacher, lat["captions"])
    student_ids = [T._tokenize(student, v) for v in lat["caption_variants"]]
    clip_all = torch.stack([c for c, _ in student_ids])
    t5_all = torch.stack([t for _, t in student_ids])
    teacher_empty, student_empty = T._tokenize(teacher, [""]), T._tokenize(student, [""])
    sample_weights = lat["num_objects"].float()
    object_tokens = lat["object_tokens"]
    side = int(math.isqrt(x0_all.shape[1]))
    img_ids = FluxPipeline._prepare_latent_image_ids(batch, side, side, "cpu", torch.float32)
    teacher_txt_ids = torch.zeros(teacher_ids[1].shape[1], 3)  # text tokens sit at RoPE position 0
    student_txt_ids = torch.zeros(t5_all.shape[-1], 3)
    ema_params, net_params = list(ema.parameters()), list(net.parameters())
    t0, running, losses, step = time.time(), [], [], 0
    T.log(f"distilling: {sum(p.numel() for p in net_params) / 1e6:.2f}M trained parameters, {x0_all.shape[0]} "
          f"scenes x {len(student_ids)} paraphrases, batch {batch}, {steps} steps")
    while step < steps:
        for g in opt.param_groups:
            g["lr"] = T._lr(step, steps, lr, min(T.WARMUP_STEPS, steps // 10))
        gen = torch.Generator().manual_seed(seed * 1_000_003 + 23 + step)
        idx = torch.multinomial(sample_weights, batch, replacement=True, generator=gen)
        variant = torch.randint(len(student_ids), (batch,), generator=gen)
        s_clip, s_t5 = clip_all[variant, idx].clone(), t5_all[variant, idx].clone()
        t_clip, t_t5 = teacher_ids[0][idx].clone(), teacher_ids[1][idx].clone()
        empty = torch.rand(batch, generator=gen) < EMPTY_SHARE
        s_clip[empty], s_t5[empty] = student_empty
        t_clip[empty], t_t5[empty] = teacher_empty
        t = torch.sigmoid(torch.randn(batch, generator=gen))
        x0 = x0_all[idx]
        x_t = T.noisy_latents(x0, torch.randn(x0.shape, generator=gen), t)
        weights = 1.0 + T.OBJECT_LOSS_WEIGHT * object_tokens[idx].float()
        with torch.no_grad():
            pooled_target, states_target = T.encode_text(teacher["text_encoder"], teacher["text_encoder_2"], t_clip,
                                                         t_t5)
            target = T.predict_velocity(transformer, x_t, t, pooled_target, states_target, img_ids, teacher_txt_ids)
        pooled, states = T.encode_text(net.text_encoder, net.text_encoder_2, s_clip, s_t5)
        pred = T.predict_velocity(transformer, x_t, t, pooled, states, img_ids, student_txt_ids)
        loss = ((pred - target).pow(2).mean(-1) * weights).sum() / weights.sum()
        loss = loss + POOLED_LOSS_WEIGHT * (pooled - pooled_target).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net_params, 1.0)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, net_params, 1 - min(0.999, (1 + step) / (10 + step)))
        running.append(loss.item())
        step += 1
        if step % log_every == 0 or step == steps:
            losses.append(sum(running) / len(running))
            elapsed = time.time() - t0
            T.log(f"distill step {step}/{steps} loss {losses[-1]:.5f} lr {opt.param_groups[0]['lr']:.2e} "
                  f"{step / elapsed:.2f} steps/s, {elapsed / 60:.1f} min")
            running = []
        if deadline is not None and time.time() > deadline:
            T.log(f"distill: time budget reached at step {step}")
            break
    return ema, step, losses


def export(source: Path, out: Path, student: dict, meta: dict) -> None:
    """The source pipeline with the student's tokenizers and text encoders, and ``demo_settings.json`` saying so
    (48 text tokens, the distillation's settings); transformer, VAE and scheduler files are copied unchanged."""
    if out.resolve() != source.resolve():
        shutil.copytree(source, out, dirs_exist_ok=True)
    for name in ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2"):
        shutil.rmtree(out / name, ignore_errors=True)
        kwargs = {"safe_serialization": True} if name.startswith("text_encoder") else {}
        student[name].save_pretrained(out / name, **kwargs)
    settings_path = out / "demo_settings.json"
    settings = json.loads(settings_path.read_text())
    settings["max_sequence_length"] = student["tokenizer_2"].model_max_length
    settings["notes"] = (
        "Transformer and VAE trained on captions of one grammar ('<colour> background, <size> <colour> <shape> at "
        "<position>, ...', up to 3 objects); the text encoders were then distilled to read plain-English "
        "paraphrases of the same scenes (magcache/studio/demo/distill.py), a quarter still in the grammar. The last "
        "two example prompts are held-out captions never seen in training.")
    settings["prompt_words"] = list(M.caption_style("plain")[0])  # the Demo tab runs prompts of these words as typed
    settings["text_distillation"] = meta
    settings_path.write_text(json.dumps(settings, indent=2) + "\n")
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    T.log(f"exported FluxPipeline to {out} ({size / 1e6:.1f} MB)")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", "--weights", default=str(DEFAULT_MODEL), help="the trained (grammar) pipeline")
    ap.add_argument("--out", required=True, help="where the pipeline with the new text encoders is saved")
    ap.add_argument("--work", default="out/demo_distill", help="cached latents of the training scenes")
    ap.add_argument("--init", default=None, help="start from this plain-English pipeline's text encoders instead "
                    "of the teacher's")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num-latents", type=int, default=6000, help="training scenes (rendered and encoded once)")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=48)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--minutes", type=float, default=None, help="stop training after this many minutes (then export)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from diffusers import FluxPipeline

    source, out, work = Path(args.model), Path(args.out), Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    pipe = FluxPipeline.from_pretrained(str(source), local_files_only=True)
    teacher = dict(pipe.components)
    if teacher["tokenizer_2"].model_max_length != M.TEXT_LEN:
        raise SystemExit(f"{source} already reads {teacher['tokenizer_2'].model_max_length} tokens: distil from the "
                         "grammar model")
    if args.init:  # go on from an earlier student (its tokenizers and text encoders)
        init = FluxPipeline.from_pretrained(str(args.init), local_files_only=True)
        student = {name: getattr(init, name) for name in ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2")}
        T.log(f"student text encoders from {args.init}")
    else:
        student = student_text_encoders(teacher)
    t = time.time()
    lat = T.encode_latents(work, teacher["vae"], args.seed, args.num_latents, captions="plain")
    latents_minutes = (time.time() - t) / 60
    deadline = time.time() + 60 * args.minutes if args.minutes else None
    t = time.time()
    ema, done, losses = distill(teacher, student, lat, args.seed, args.steps, args.batch, args.lr, deadline)
    student.update(text_encoder=ema.text_encoder, text_encoder_2=ema.text_encoder_2)
    meta = dict(args=dict(vars(args)), steps_done=done, device="cpu",
                torch_threads=args.threads, latents_minutes=round(latents_minutes, 2),
                distill_minutes=round((time.time() - t) / 60, 2), first_loss=losses[0] if losses else None,
                last_loss=losses[-1] if losses else None)
    export(source, out, student, meta)


if __name__ == "__main__":
    main()
