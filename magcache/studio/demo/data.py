"""Procedural training data for the demo model: flat shapes on a flat background, with captions.

A scene is a background colour and 1-3 objects (size x colour x shape), each in its own cell of a 3x3 grid.
Captions name the background first, then every object with its position, in random order, e.g.
``"yellow background, large red circle at northwest, small blue diamond at center"`` (positions are compass
names of the 3x3 cells: northwest, north, northeast, west, center, east, southwest, south, southeast).

The same module holds the held-out prompts (never used in training) and the automatic adherence checker: a prompt
is followed when, in the generated image, the named colour dominates the centre of every named cell and the
background colour dominates the empty cells.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 128
GRID = 3
CELL = IMAGE_SIZE / GRID

# Well separated in RGB so that the checker can classify pixels by their nearest palette colour.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 50),
    "green": (40, 170, 70),
    "blue": (40, 80, 220),
    "purple": (140, 60, 190),
    "white": (240, 240, 240),
    "black": (25, 25, 25),
}
COLOURS = tuple(PALETTE)
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = {"small": 20, "large": 34}  # side of the shape's bounding box in pixels
# Training-data jitter (render with an rng): relative size, position offset in pixels, colour per channel.
SIZE_JITTER = 0.1
POSITION_JITTER = 3.0
COLOUR_JITTER = 12
# (row, col) in the 3x3 grid -> words
# One word per cell (compass names). Two-word names made the model confuse cells that share a word: with
# "left" next to "top left", and then with "<row> <column>" ("top left" / "bottom left"), colours were swapped
# between objects and objects drawn in every cell sharing a word (docs/demo_model.md, "what did not work").
POSITIONS: dict[tuple[int, int], str] = {
    (0, 0): "northwest", (0, 1): "north", (0, 2): "northeast",
    (1, 0): "west", (1, 1): "center", (1, 2): "east",
    (2, 0): "southwest", (2, 1): "south", (2, 2): "southeast",
}
MAX_OBJECTS = 3
HELD_OUT_SEED = 20_250_609
NUM_HELD_OUT = 50

# Every word a caption can contain (the word-level tokenizers are built from this list).
VOCABULARY: tuple[str, ...] = tuple(
    dict.fromkeys(
        list(COLOURS) + list(SHAPES) + list(SIZES) + ["at", "background"]
        + [w for p in POSITIONS.values() for w in p.split()]
    )
)
PUNCTUATION = (",",)


@dataclass(frozen=True)
class SceneObject:
    size: str
    colour: str
    shape: str
    cell: tuple[int, int]

    @property
    def phrase(self) -> str:
        return f"{self.size} {self.colour} {self.shape} at {POSITIONS[self.cell]}"


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[SceneObject, ...]

    @property
    def caption(self) -> str:
        return ", ".join([f"{self.background} background"] + [o.phrase for o in self.objects])


def random_scene(rng: random.Random, num_objects: int | None = None) -> Scene:
    n = num_objects or rng.randint(1, MAX_OBJECTS)
    background = rng.choice(COLOURS)
    cells = rng.sample(sorted(POSITIONS), n)
    objects = tuple(
        SceneObject(rng.choice(tuple(SIZES)), rng.choice([c for c in COLOURS if c != background]), rng.choice(SHAPES), cell)
        for cell in cells
    )
    return Scene(background, objects)


def _shape_polygon(shape: str, cx: float, cy: float, side: float) -> list[tuple[float, float]] | None:
    h = side / 2
    if shape == "triangle":  # isosceles, pointing up, its centroid at the centre (keeps the centre patch inside)
        return [(cx, cy - 4 * h / 3), (cx + h, cy + 2 * h / 3), (cx - h, cy + 2 * h / 3)]
    if shape == "diamond":
        return [(cx, cy - h), (cx + h, cy), (cx, cy + h), (cx - h, cy)]
    return None


def render(scene: Scene, rng: random.Random | None = None, size: int = IMAGE_SIZE, supersample: int = 2) -> np.ndarray:
    """Draw ``scene`` as an ``(size, size, 3)`` uint8 image. With ``rng``, colours and positions get a small
    jitter (training data); without it the drawing is canonical."""
    s = size * supersample
    scale = s / IMAGE_SIZE

    def jitter_colour(name: str) -> tuple[int, int, int]:
        base = PALETTE[name]
        if rng is None:
            return base
        return tuple(int(min(255, max(0, c + rng.randint(-COLOUR_JITTER, COLOUR_JITTER)))) for c in base)

    img = Image.new("RGB", (s, s), jitter_colour(scene.background))
    draw = ImageDraw.Draw(img)
    for obj in scene.objects:
        side = SIZES[obj.size] * (rng.uniform(1 - SIZE_JITTER, 1 + SIZE_JITTER) if rng else 1.0)
        dx, dy = ((rng.uniform(-POSITION_JITTER, POSITION_JITTER), rng.uniform(-POSITION_JITTER, POSITION_JITTER))
                  if rng else (0.0, 0.0))
        cx, cy = (obj.cell[1] + 0.5) * CELL + dx, (obj.cell[0] + 0.5) * CELL + dy
        fill = jitter_colour(obj.colour)
        poly = _shape_polygon(obj.shape, cx * scale, cy * scale, side * scale)
        if poly is not None:
            draw.polygon(poly, fill=fill)
        else:
            h = side * scale / 2
            box = [cx * scale - h, cy * scale - h, cx * scale + h, cy * scale + h]
            (draw.ellipse if obj.shape == "circle" else draw.rectangle)(box, fill=fill)
    if supersample > 1:
        img = img.resize((size, size), Image.Resampling.BOX)
    return np.asarray(img, dtype=np.uint8)


# --------------------------------------------------------------------------------------------------
# Held-out prompts and training scenes
# --------------------------------------------------------------------------------------------------
@lru_cache(maxsize=None)
def held_out_scenes(n: int = NUM_HELD_OUT) -> tuple[Scene, ...]:
    """Fixed evaluation scenes (1, 2 and 3 objects in turn); their captions never occur in training."""
    rng = random.Random(HELD_OUT_SEED)
    scenes: list[Scene] = []
    seen: set[str] = set()
    while len(scenes) < n:
        scene = random_scene(rng, num_objects=len(scenes) % MAX_OBJECTS + 1)
        if scene.caption not in seen:
            seen.add(scene.caption)
            scenes.append(scene)
    return tuple(scenes)


@lru_cache(maxsize=1)
def _held_out_captions() -> frozenset[str]:
    return frozenset(s.caption for s in held_out_scenes(NUM_HELD_OUT))


def training_scenes(n: int, seed: int) -> list[Scene]:
    """``n`` random scenes, none of them with a held-out caption."""
    rng = random.Random(seed)
    banned = _held_out_captions()
    out: list[Scene] = []
    while len(out) < n:
        scene = random_scene(rng)
        if scene.caption not in banned:
            out.append(scene)
    return out


def render_batch(scenes: list[Scene], seed: int) -> np.ndarray:
    """Render scenes with jitter -> ``(N, H, W, 3)`` uint8; deterministic for a seed."""
    rng = random.Random(seed)
    return np.stack([render(s, rng) for s in scenes])


def render_batch_job(job: tuple[list[Scene], int]) -> np.ndarray:
    """``render_batch`` for a process pool (one picklable argument)."""
    return render_batch(*job)


# --------------------------------------------------------------------------------------------------
# Automatic adherence checker
# --------------------------------------------------------------------------------------------------
_PALETTE_ARRAY = np.array([PALETTE[c] for c in COLOURS], dtype=np.float32)


def colour_classes(image: np.ndarray) -> np.ndarray:
    """Index (into ``COLOURS``) of the nearest palette colour of every pixel of an ``(H, W, 3)`` image
    (uint8, or float in [0, 1])."""
    img = np.asarray(image, dtype=np.float32)
    if img.max() <= 1.0 + 1e-6:
        img = img * 255.0
    d = ((img[..., None, :] - _PALETTE_ARRAY) ** 2).sum(-1)
    return d.argmin(-1)


def _dominant(classes: np.ndarray) -> tuple[str, float]:
    counts = np.bincount(classes.ravel(), minlength=len(COLOURS))
    i = int(counts.argmax())
    return COLOURS[i], float(counts[i] / max(1, classes.size))


def _cell_centre_patch(classes: np.ndarray, cell: tuple[int, int], half: int) -> np.ndarray:
    scale = classes.shape[0] / IMAGE_SIZE
    cy, cx = (cell[0] + 0.5) * CELL * scale, (cell[1] + 0.5) * CELL * scale
    h = max(1, round(half * scale))
    return classes[int(cy) - h: int(cy) + h, int(cx) - h: int(cx) + h]


def check_adherence(image: np.ndarray, scene: Scene) -> dict:
    """Does ``image`` follow ``scene``'s caption? Each object: its colour must be the majority colour of an
    8x8 patch at its cell's centre (inside every shape at both sizes, despite the +-3 px jitter). Background:
    its colour must be the majority colour of the empty cells (the outer 4 px of each are left out).
    Returns per-part verdicts and ``correct`` (all parts right)."""
    classes = colour_classes(image)
    objects = []
    for obj in scene.objects:
        found, share = _dominant(_cell_centre_patch(classes, obj.cell, half=4))
        objects.append({"phrase": obj.phrase, "expected": obj.colour, "found": found, "share": round(share, 3),
                        "ok": found == obj.colour and share > 0.5})
    occupied = {o.cell for o in scene.objects}
    empty = [c for c in POSITIONS if c not in occupied]
    patches = [_cell_centre_patch(classes, c, half=int(CELL / 2) - 4).ravel() for c in empty]
    bg_found, bg_share = _dominant(np.concatenate(patches))
    background = {"expected": scene.background, "found": bg_found, "share": round(bg_share, 3),
                  "ok": bg_found == scene.background and bg_share > 0.5}
    return {
        "caption": scene.caption,
        "objects": objects,
        "background": background,
        "objects_ok": all(o["ok"] for o in objects),
        "correct": background["ok"] and all(o["ok"] for o in objects),
    }


def prompt_set(name: str, prompts: int | None = None, seeds: int | None = None) -> list[tuple[str, int]]:
    """``(prompt, seed)`` items of a fixed prompt set: ``"tuning"`` (settings and error models are chosen on it) or
    ``"heldout"`` (disjoint scenes, for reporting); the first ``prompts`` prompts, each with its first ``seeds``
    seeds, prompt by prompt."""
    import json
    from pathlib import Path

    if name not in ("tuning", "heldout"):
        raise ValueError(f"unknown prompt set {name!r}; choose tuning or heldout")
    entries = json.loads((Path(__file__).with_name(f"prompts_{name}.json")).read_text())["prompts"][:prompts]
    return [(e["prompt"], seed) for e in entries for seed in e["seeds"][:seeds]]
