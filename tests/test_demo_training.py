"""The demo model's training script end to end at toy sizes on the CPU: every stage runs, the export
loads with the ordinary ``FluxPipeline.from_pretrained``, ``--fit-minutes`` fixes a step count that a resumed run
keeps, and ``--export-only`` rebuilds the same pipeline from the lean ``ema.pt``. About 30 s on 2 CPU cores."""

from __future__ import annotations

import json

import pytest
import torch

from magcache.studio.demo import train as T

TOY = ["--recipe", "gpu", "--device", "cpu", "--vae-steps", "3", "--vae-batch", "4", "--num-latents", "96",
       "--double-blocks", "1", "--single-blocks", "1", "--batch", "4", "--checkpoint-every", "5"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo_train")
    work, out = root / "work", root / "model"
    T.main(TOY + ["--work", str(work), "--out", str(out), "--steps", "6", "--render-workers", "2"])
    return work, out


def test_every_stage_runs_and_the_export_loads(trained):
    from diffusers import FluxPipeline

    work, out = trained
    for name in ("vae_final.pt", "latents.pt", "transformer_ckpt.pt", "ema.pt", "train_meta.json"):
        assert (work / name).exists(), name
    meta = json.loads((work / "train_meta.json").read_text())
    assert meta["transformer_steps"] == 6 and meta["args"]["recipe"] == "gpu" and not meta["vae_reused"]
    pipe = FluxPipeline.from_pretrained(out, local_files_only=True)
    assert (pipe.transformer.config.num_layers, pipe.transformer.config.num_single_layers) == (1, 1)
    assert pipe.vae.config.shift_factor == round(torch.load(work / "latents.pt")["shift_factor"], 5)
    image = pipe("red background, small blue circle at center", height=128, width=128, num_inference_steps=2,
                 max_sequence_length=32, output_type="np", generator=torch.Generator().manual_seed(0)).images[0]
    assert image.shape == (128, 128, 3) and torch.isfinite(torch.from_numpy(image)).all()


def test_rendering_workers_do_not_change_the_latents(trained, tmp_path):
    work, _ = trained
    vae = T.train_vae(work, 0, 0, 1, None)  # loads vae_final.pt
    one_process = T.encode_latents(tmp_path, vae, 0, 96, workers=1)
    assert torch.equal(one_process["latents"], torch.load(work / "latents.pt")["latents"])


def test_export_only_rebuilds_the_pipeline_from_ema(trained, tmp_path):
    from safetensors.torch import load_file

    work, out = trained
    (tmp_path / "work").mkdir()
    for name in ("ema.pt", "vae_final.pt"):  # what bench/demo_gpu.sh brings back, no latents
        (tmp_path / "work" / name).write_bytes((work / name).read_bytes())
    T.main(TOY + ["--work", str(tmp_path / "work"), "--out", str(tmp_path / "model"), "--export-only"])
    weights = "transformer/diffusion_pytorch_model.safetensors"
    a, b = load_file(out / weights), load_file(tmp_path / "model" / weights)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "model" / "vae" / "config.json").read_text())["shift_factor"] == \
        json.loads((out / "vae" / "config.json").read_text())["shift_factor"]


def test_fit_minutes_fixes_the_step_count_and_a_resume_keeps_it(tmp_path, monkeypatch):
    monkeypatch.setattr(T, "FIT_WINDOW", (2, 4))
    work = tmp_path / "work"
    args = TOY + ["--work", str(work), "--out", str(tmp_path / "model"), "--num-latents", "32"]
    T.main(args + ["--fit-minutes", "0.05", "--steps", "1000"])
    steps = json.loads((work / "train_meta.json").read_text())["transformer_steps"]
    assert 4 <= steps < 1000
    assert torch.load(work / "ema.pt")["step"] == steps
    T.main(args + ["--fit-minutes", "0.05", "--steps", "1000"])  # resumed: already done, same total
    assert json.loads((work / "train_meta.json").read_text())["transformer_steps"] == steps


def test_smoke_test_runs_the_training_step(capsys):
    T.main(TOY + ["--smoke", "--batch", "2"])
    assert "smoke test: 3 steps at batch 2, fp32 on cpu: ok" in capsys.readouterr().out


def test_plain_english_captions_train_and_export(tmp_path):
    # --captions plain: paraphrased captions (several per scene), scenes with repeated objects, tokenizers over the
    # paraphrases' words and 48 text tokens; the export and --export-only carry the style
    import random

    from diffusers import FluxPipeline

    from magcache.studio.demo import data as D
    from magcache.studio.demo import model as M

    work, out = tmp_path / "work", tmp_path / "model"
    T.main(TOY + ["--work", str(work), "--out", str(out), "--steps", "3", "--num-latents", "64", "--captions", "plain"])
    lat = torch.load(work / "latents.pt")
    assert lat["copy_share"] == T.COPY_SHARE and len(lat["caption_variants"]) == T.CAPTION_VARIANTS
    variants = lat["caption_variants"]
    assert variants[0] != variants[1] and any(c != g for c, g in zip(variants[0], lat["captions"]))
    assert torch.load(work / "ema.pt")["captions"] == "plain"
    pipe = FluxPipeline.from_pretrained(out, local_files_only=True)
    settings = json.loads((out / "demo_settings.json").read_text())
    assert settings["max_sequence_length"] == M.PLAIN_TEXT_LEN == pipe.text_encoder.config.max_position_embeddings
    assert settings["prompt_words"] == list(D.paraphrase_vocabulary("train"))  # the Demo tab runs these as typed
    rng = random.Random(0)
    caption = D.paraphrase(D.scene_with_copies(rng), rng)
    assert M.one_token_per_word(pipe.tokenizer_2, caption) and M.one_token_per_word(pipe.tokenizer, caption)
    image = pipe(caption, height=128, width=128, num_inference_steps=2, max_sequence_length=M.PLAIN_TEXT_LEN,
                 output_type="np", generator=torch.Generator().manual_seed(0)).images[0]
    assert torch.isfinite(torch.from_numpy(image)).all()
    # --export-only rebuilds the plain-English text encoders from ema.pt (the grammar's would not load them)
    T.main(TOY + ["--work", str(work), "--out", str(tmp_path / "again"), "--export-only"])
    again = FluxPipeline.from_pretrained(tmp_path / "again", local_files_only=True)
    assert again.tokenizer_2.get_vocab() == pipe.tokenizer_2.get_vocab()
