"""The Demo tab's prompt reader: plain English -> the demo model's caption grammar, naming what it ignored."""

import json

import pytest

from magcache.studio.demo import data as D
from magcache.studio.demo.evaluate import PLAIN_ENGLISH_HELD_OUT, PLAIN_ENGLISH_TUNING, same_scene, scene_from_annotation
from magcache.studio.demo.prompts import understand


@pytest.mark.parametrize("prompt, caption", [
    ("a red circle on a blue background", "blue background, large red circle at center"),
    ("a big yellow square in the middle of a green background", "green background, large yellow square at center"),
    ("Upper-left: tiny orange diamond. Lower right: big white triangle. Backdrop is purple.",
     "purple background, small orange diamond at northwest, large white triangle at southeast"),
    ("two small red squares, one top left and one bottom right on black",
     "black background, small red square at northwest, small red square at southeast"),
    ("a circle coloured red on a green background", "green background, large red circle at center"),
    ("white backdrop with a green triangle on the right side and a small blue circle at the top",
     "white background, large green triangle at east, small blue circle at north"),
])
def test_plain_english_is_read_into_the_grammar(prompt, caption):
    reading = understand(prompt)
    assert reading.caption == caption
    assert reading.ignored_words == []


def test_grammar_captions_are_read_unchanged():
    for scene in D.held_out_scenes():
        reading = understand(scene.caption)
        assert reading.caption == scene.caption and reading.in_grammar and not reading.notes


def test_words_it_cannot_draw_are_named():
    reading = understand("a cat sitting on a sofa")
    assert reading.scene is None and reading.ignored_words == ["cat", "sofa"]
    assert "no shape" in reading.notes[0]
    grey = understand("a grey dog next to a red square")
    assert grey.ignored_words == ["dog"] and any("grey" in n for n in grey.notes)
    assert grey.caption == "white background, large red square at center"


def test_assumptions_are_noted():
    reading = understand("a blue triangle")
    assert reading.caption == "white background, large blue triangle at center"
    assert reading.notes == ["no position for a triangle: center", "no background colour given: white"]


@pytest.mark.parametrize("path", [PLAIN_ENGLISH_TUNING, PLAIN_ENGLISH_HELD_OUT], ids=["tuning", "held-out"])
def test_annotated_prompt_sets_are_read_right(path):
    """The shipped prompt sets (each written blind, with the scene each prompt describes): the reader must recover
    at least 90% of the plain-English scenes and every grammar caption."""
    items = json.loads(path.read_text())
    assert len(items) >= 50
    for kind, floor in (("plain", 0.9), ("grammar", 1.0)):
        sel = [it for it in items if it.get("kind", "plain") == kind]
        right = sum(same_scene(understand(it["prompt"]).scene, scene_from_annotation(it)) for it in sel)
        assert right >= floor * len(sel), f"{kind}: {right}/{len(sel)}"
