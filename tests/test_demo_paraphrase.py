"""Plain-English paraphrases of demo scenes (training captions for a model that reads plain English): seeded,
varied, read back to the same scene by the Demo tab's reader, and with held-out phrasings training never produces."""

import random
import re

import pytest

from magcache.studio.demo import data as D
from magcache.studio.demo.evaluate import same_scene
from magcache.studio.demo.prompts import understand


def _captions(split: str, seed: int, n: int = 300) -> list[tuple[D.Scene, str]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        scene = D.scene_with_copies(rng)
        out.append((scene, D.paraphrase(scene, rng, split)))
    return out


def test_paraphrases_are_deterministic_per_seed():
    assert _captions("train", 3, 50) == _captions("train", 3, 50)
    assert _captions("train", 3, 50) != _captions("train", 4, 50)
    assert _captions("heldout", 3, 50) == _captions("heldout", 3, 50)


@pytest.mark.parametrize("split", D.SPLITS)
def test_every_paraphrase_reads_back_to_its_scene(split):
    # the strongest check available without a model: the Demo tab's reader recovers the scene (background, every
    # object's size, colour, shape and cell) from each paraphrase, and understands every word of it
    for scene, caption in _captions(split, seed=11, n=600):
        reading = understand(caption)
        assert same_scene(reading.scene, scene), (caption, reading.caption, scene.caption)
        assert reading.ignored_words == [], caption


def test_paraphrases_vary_the_way_people_write():
    rng = random.Random(0)
    scene = D.Scene("orange", (D.SceneObject("small", "red", "circle", (0, 0)),
                               D.SceneObject("large", "blue", "square", (1, 1))))
    captions = {D.paraphrase(scene, rng) for _ in range(400)}
    assert len(captions) > 300
    words = {w for c in captions for w in re.findall(r"[a-z]+", c)}
    assert {"tiny", "little", "big", "huge", "backdrop", "an", "the", "corner", "upper", "centre"} <= words
    assert any(c.startswith("orange back") for c in captions)  # background first ...
    assert any(c.endswith("background") or c.endswith("backdrop") for c in captions)  # ... or last
    firsts = {"circle" if c.find("circle") < c.find("square") else "square" for c in captions}
    assert firsts == {"circle", "square"}  # objects in either order
    # objects of one size, colour and shape are counted, where the scene has them
    pair = D.Scene("white", (D.SceneObject("small", "red", "square", (0, 0)),
                             D.SceneObject("small", "red", "square", (2, 2))))
    assert any(c.startswith("two ") or " two " in c for c in {D.paraphrase(pair, rng) for _ in range(50)})
    assert not any(" two " in c or c.startswith("two") for c in captions)


def test_held_out_phrasings_never_come_out_of_training():
    train = {c for _, c in _captions("train", seed=1, n=2000)}
    held = {c for _, c in _captions("heldout", seed=1, n=2000)}
    assert not train & held
    # no held-out caption has a training frame (nor the other way round): its phrasing is new, not just its words
    assert {D.frame_split(c) for c in held} == {"heldout"}
    assert {D.frame_split(c) for c in train} == {"train"}
    # ... yet they use only words the training split uses (a model cannot read a word it never saw)
    vocabulary = set(D.paraphrase_vocabulary("train"))
    assert {w for c in held for w in re.findall(r"[a-z]+", c)} <= vocabulary
    assert {w for c in train for w in re.findall(r"[a-z]+", c)} <= vocabulary
    assert set(D.VOCABULARY) <= vocabulary  # the grammar's words stay


def test_training_captions_keep_the_grammar():
    rng = random.Random(2)
    scenes = D.training_scenes(400, seed=5)
    captions = [D.training_caption(s, rng, grammar_share=0.25) for s in scenes]
    grammar = sum(c == s.caption for c, s in zip(captions, scenes))
    assert 60 < grammar < 140
    with pytest.raises(ValueError, match="split"):
        D.paraphrase(scenes[0], rng, "test")


def test_paraphrase_evaluation_runs_on_held_out_phrasings_only(monkeypatch, tmp_path):
    # `evaluate --paraphrases` on the shipped model, 2 prompts at 2 steps: the prompts are paraphrases with held-out
    # frames of held-out scenes, each paired with that scene's grammar caption and seed, and the report counts both
    import json

    from magcache.studio.demo import evaluate as E

    items = E.held_out_paraphrases(60)
    paraphrases = [it for it in items if it["kind"] == "paraphrase"]
    assert len(paraphrases) == 60 and items == E.held_out_paraphrases(60)  # fixed prompts, judged the same every time
    assert {D.frame_split(it["prompt"]) for it in paraphrases} == {"heldout"}
    scenes = [E.scene_from_annotation(it) for it in paraphrases]
    assert scenes[:D.NUM_HELD_OUT] == list(D.held_out_scenes()) and scenes[D.NUM_HELD_OUT:] == scenes[:10]
    assert [(it["kind"], it["prompt"], it["seed"]) for it in items[1:4:2]] == [
        ("grammar", scenes[0].caption, 0), ("grammar", scenes[1].caption, 1)]

    load = E.load_pipeline

    def few_steps(path):
        pipe, settings = load(path)
        return pipe, dict(settings, num_inference_steps=2)

    monkeypatch.setattr(E, "load_pipeline", few_steps)
    E.main(["--paraphrases", "--count", "2", "--threads", "1", "--out-dir", str(tmp_path)])
    report = json.loads((tmp_path / "demo_paraphrases_heldout.json").read_text())
    assert [(r["prompt"], r["seed"]) for r in report["rows"]] == [(it["prompt"], it["seed"])
                                                                  for it in E.held_out_paraphrases(2)]
    assert set(report["summary"]) == {"paraphrase", "grammar"}
    assert report["summary"]["paraphrase"]["read_right"] == "2/2"
    assert report["paraphrases"]["split"] == "heldout" and report["num_inference_steps"] == 2
    from PIL import Image

    grid = Image.open(tmp_path / "demo_paraphrases_heldout.png")  # the two paraphrases: as typed over as read
    assert grid.size == (2 * (128 + 4), 2 * (128 + 4))
