"""Distilling the demo model's text encoders for plain English (``magcache/studio/demo/distill.py``) at toy
sizes on the CPU: the student starts as the teacher (its words' rows, synonyms from their grammar word, the CLIP
position table grown), runs repeat bit for bit, the transformer and the VAE are never changed, and the export loads
as an ordinary ``FluxPipeline`` that reads 48 tokens. About 20 s on 2 CPU cores."""

from __future__ import annotations

import json

import pytest
import torch

from magcache.studio.demo import distill as S
from magcache.studio.demo import model as M
from magcache.studio.demo import train as T


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A grammar-reading toy pipeline (1 + 1 blocks, untrained: distillation only needs a transformer to agree
    with), saved like the shipped model."""
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("teacher") / "model"
    M.assemble_pipeline(M.build_components("grammar", num_layers=1, num_single_layers=1)).save_pretrained(out)
    (out / "demo_settings.json").write_text(json.dumps(dict(T.DEFAULT_SETTINGS, example_prompts=[])))
    return out


def _teacher(path):
    from diffusers import FluxPipeline

    return dict(FluxPipeline.from_pretrained(str(path), local_files_only=True).components)


def _row(components, word, which):
    tok, enc = components[f"tokenizer{'_2' if which == 't5' else ''}"], components[
        f"text_encoder{'_2' if which == 't5' else ''}"]
    token = ("\u2581" + word) if which == "t5" else word + "</w>"
    return enc.get_input_embeddings().weight[tok.get_vocab()[token]]


def test_the_student_starts_from_the_teachers_words(teacher_dir):
    teacher = _teacher(teacher_dir)
    student = S.student_text_encoders(teacher)
    assert student["tokenizer_2"].model_max_length == M.PLAIN_TEXT_LEN
    for which in ("clip", "t5"):
        for word in ("red", "northwest", "background", "at", "large"):  # grammar words keep their rows
            assert torch.equal(_row(student, word, which), _row(teacher, word, which)), (which, word)
        for word, grammar_word in (("big", "large"), ("centre", "center"), ("top", "north"), ("backdrop", "background")):
            assert torch.equal(_row(student, word, which), _row(teacher, grammar_word, which)), (which, word)
    old = teacher["text_encoder"].embeddings.position_embedding.weight
    new = student["text_encoder"].embeddings.position_embedding.weight
    assert new.shape[0] == M.PLAIN_TEXT_LEN and torch.equal(new[:32], old) and torch.equal(new[40], old[-1])
    # everything but the embedding tables is the teacher's
    for name in ("text_encoder", "text_encoder_2"):
        t_state, s_state = teacher[name].state_dict(), student[name].state_dict()
        shared = [k for k in t_state if t_state[k].shape == s_state[k].shape and "embed" not in k and "shared" not in k]
        assert len(shared) > 10 and all(torch.equal(t_state[k], s_state[k]) for k in shared)


def test_distillation_repeats_and_leaves_the_transformer_alone(teacher_dir, tmp_path):
    from safetensors.torch import load_file

    args = ["--model", str(teacher_dir), "--num-latents", "64", "--steps", "3", "--batch", "4", "--threads", "1"]
    outs = []
    for run in ("a", "b"):
        out = tmp_path / run
        S.main(args + ["--out", str(out), "--work", str(tmp_path / "work")])  # the second run reuses the latents
        outs.append(out)
    for part in ("text_encoder/model.safetensors", "text_encoder_2/model.safetensors"):
        a, b = load_file(outs[0] / part), load_file(outs[1] / part)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    student = load_file(outs[0] / "text_encoder_2/model.safetensors")
    start = S.student_text_encoders(_teacher(teacher_dir))["text_encoder_2"].state_dict()
    assert any(not torch.equal(student[k], start[k]) for k in student if k in start)  # it trained
    for part in ("transformer/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors"):
        assert (outs[0] / part).read_bytes() == (teacher_dir / part).read_bytes(), part

    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(str(outs[0]), local_files_only=True)
    settings = json.loads((outs[0] / "demo_settings.json").read_text())
    assert settings["max_sequence_length"] == M.PLAIN_TEXT_LEN == pipe.tokenizer_2.model_max_length
    assert settings["text_distillation"]["steps_done"] == 3
    prompt = "a big red circle in the top left corner on a blue background"
    assert pipe.tokenizer_2.tokenize(prompt) == ["\u2581" + w for w in prompt.split()]  # every word known
    image = pipe(prompt, height=128, width=128, num_inference_steps=2, max_sequence_length=M.PLAIN_TEXT_LEN,
                 output_type="np", generator=torch.Generator().manual_seed(0)).images[0]
    assert image.shape == (128, 128, 3) and torch.isfinite(torch.from_numpy(image)).all()


def test_a_plain_english_model_is_not_distilled_again(teacher_dir, tmp_path):
    args = ["--model", str(teacher_dir), "--num-latents", "64", "--steps", "1", "--batch", "2", "--threads", "1",
            "--work", str(tmp_path / "work")]
    S.main(args + ["--out", str(tmp_path / "plain")])
    with pytest.raises(SystemExit, match="grammar model"):
        S.main(["--model", str(tmp_path / "plain")] + args[2:] + ["--out", str(tmp_path / "again")])


def test_the_demo_tab_runs_known_words_as_typed_and_rewrites_the_rest():
    from magcache.studio.catalog import load_catalog
    from magcache.studio.request import GenerationRequest, InvalidRequest, read_prompt

    variant = load_catalog().tab("demo").variant()
    known = frozenset(M.caption_style("plain")[0])
    plain = GenerationRequest("demo", prompt="a big red circle in the top left corner on a blue background")
    assert read_prompt(variant, plain, known) == (plain, None)  # every word learned: as typed
    request, note = read_prompt(variant, plain)  # a grammar-only model: the reader's caption
    assert request.prompt == "blue background, large red circle at northwest" and "training grammar" in note
    odd = GenerationRequest("demo", prompt="a giant red circle at the top left, on a blue canvas")
    request, note = read_prompt(variant, odd, known)
    assert request.prompt == "blue background, large red circle at northwest"
    assert note.startswith("The demo model never learned the words giant, canvas; your prompt ran as \"blue ")
    request, note = read_prompt(variant, GenerationRequest("demo", prompt="2 big red circles at the top left and "
                                                          "top right on a blue background"), known)
    assert note.startswith("The demo model never learned the word 2; your prompt ran as")  # digits are not words
    with pytest.raises(InvalidRequest, match="names no such shape"):
        read_prompt(variant, GenerationRequest("demo", prompt="a cat on a sofa"), known)
