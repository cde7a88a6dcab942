"""A third held-out set for the demo model's plain English, written after the distilled text encoders were
shipped and measured once: the 50 held-out scenes, each in one of five sentence frames that neither the training
nor the held-out paraphrase frames contain (only words the model learned), objects and positions from the training
templates. Writes ``bench/results/fresh_frames.json`` (annotated prompts) for

    python -m bench.fresh_frames
    python -m magcache.studio.demo.evaluate --plain-english bench/results/fresh_frames.json --out-dir bench/results
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from magcache.studio.demo import data as D
from magcache.studio.demo.evaluate import scene_annotation

FRESH_FRAMES = (
    ("there_is_background_with", "there is {A} {B} background with {L}"),
    ("list_and_backdrop", "{L} and {A} {B} backdrop"),
    ("draw_background_and", "please draw {A} {B} background and {L}"),
    ("picture_of_backdrop_with", "a picture of {A} {B} backdrop with {L}"),
    ("with_background_first", "with {A} {B} background, {L}"),
)
SEED = 2026_11_26
OUT = Path(__file__).resolve().parent / "results" / "fresh_frames.json"


def fresh_prompts() -> list[dict]:
    """One prompt per held-out scene, the frames in turn; deterministic."""
    rng = random.Random(SEED)
    return [{"prompt": D.paraphrase(scene, rng, "train", frames=(FRESH_FRAMES[i % len(FRESH_FRAMES)],)),
             "kind": "plain", "seed": i, **scene_annotation(scene)} for i, scene in enumerate(D.held_out_scenes())]


def main() -> None:
    items = fresh_prompts()
    learned = set(D.paraphrase_vocabulary("train"))
    assert all(D.frame_split(it["prompt"]) is None for it in items)  # no training or held-out frame fits
    assert all(set(re.findall(r"[a-z]+", it["prompt"])) <= learned for it in items)  # only words it learned
    OUT.write_text(json.dumps(items, indent=1) + "\n")
    print(f"wrote {len(items)} prompts to {OUT}")


if __name__ == "__main__":
    main()
