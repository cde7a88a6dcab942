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
import re
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


def training_scenes(n: int, seed: int, copy_share: float = 0.0) -> list[Scene]:
    """``n`` random scenes, none of them with a held-out caption; with ``copy_share`` > 0, scenes from
    :func:`scene_with_copies` (for captions with counts and plurals)."""
    rng = random.Random(seed)
    banned = _held_out_captions()
    out: list[Scene] = []
    while len(out) < n:
        scene = scene_with_copies(rng, copy_share=copy_share) if copy_share else random_scene(rng)
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


# --------------------------------------------------------------------------------------------------
# Plain-English paraphrases (training captions for a model that reads plain English)
# --------------------------------------------------------------------------------------------------
# A paraphrase is put together from three kinds of template: a sentence frame (where the background goes, how the
# objects are listed), an object template (article, size, colour, shape and position in some order) and a position
# template (a name of the cell in some style). Every kind has templates for training and templates held out for
# evaluation. ``split="heldout"`` always uses a held-out frame, so no held-out caption can come out of
# ``split="train"``. The held-out templates use only words that the training templates use too: a model cannot
# learn a word it never saw, but it should follow a new order or combination of words it knows.
SIZE_SYNONYMS: dict[str, tuple[str, ...]] = {"small": ("small", "tiny", "little"), "large": ("large", "big", "huge")}
CENTRE_NAMES = ("middle", "centre", "center")
COUNT_NAMES = {2: "two", 3: "three"}
# Names of the cells by kind. Corners: row word + column word, joined or not, or the compass name; edges: the side
# alone or with a centre word; the centre: a centre word. The prompt reader (prompts.py) reads all of them.
_CORNER_ROWS = {0: ("top", "upper"), 2: ("bottom", "lower")}
_CORNER_COLUMNS = {0: "left", 2: "right"}
_EDGE_NAMES = {(0, 1): "top", (2, 1): "bottom", (1, 0): "left", (1, 2): "right"}

# Position templates: (id, kind of cell it suits, format; {name} = a cell name, {compass} = the grammar's name).
POSITION_TEMPLATES: dict[str, tuple[tuple[str, str, str], ...]] = {
    "train": (
        ("at", "any", "at the {name}"),
        ("in", "any", "in the {name}"),
        ("bare", "any", "{name}"),
        ("corner", "corner", "in the {name} corner"),
        ("side", "side", "on the {name}"),
        ("grammar", "any", "at {compass}"),
    ),
    "heldout": (
        ("middle_of", "edge", "in the middle of the {edge}"),
        ("corner_at", "corner", "at the {name} corner"),
    ),
}
# Object templates: {a} article, {size}, {colour}, {shape}, {pos} position phrase, {compass} / {gsize}: the
# grammar's words. A position first needs a preposition ("in the top left a ..."), so "bare" positions are not used
# there.
OBJECT_TEMPLATES: dict[str, tuple[tuple[str, str], ...]] = {
    "train": (
        ("plain", "{a}{size} {colour} {shape} {pos}"),
        ("position_first", "{pos} {a}{size} {colour} {shape}"),
        ("coloured", "{a}{size} {shape} coloured {colour} {pos}"),
        ("grammar", "{gsize} {colour} {shape} at {compass}"),
    ),
    "heldout": (
        ("in_colour", "{a}{size} {shape} in {colour} {pos}"),
    ),
}
# Several objects of the same size, colour and shape: {count} {size} {colour} {shape}s, then their positions.
GROUP_TEMPLATES: dict[str, tuple[tuple[str, str], ...]] = {
    "train": (
        ("one_each", "{count} {size} {colour} {shapes}, {ones}"),
        ("positions", "{count} {size} {colour} {shapes} {positions}"),
    ),
    "heldout": (
        ("in_colour", "{count} {size} {shapes} in {colour}, {ones}"),
    ),
}
# Sentence frames: {L} the object list, {B} the background colour, {A} its article.
FRAME_TEMPLATES: dict[str, tuple[tuple[str, str], ...]] = {
    "train": (
        ("on_background", "{L} on {A} {B} background"),
        ("against_backdrop", "{L} against {A} {B} backdrop"),
        ("background_first", "{B} background, {L}"),
        ("background_with", "{A} {B} background with {L}"),
        ("backdrop_first", "{B} backdrop, {L}"),
        ("please_draw", "please draw {L} on {A} {B} background"),
        ("background_last", "{L}, {B} background"),
        ("background_is", "{L}. the background is {B}"),
        ("there_is", "there is {L} on {A} {B} backdrop"),
        ("picture_of", "a picture of {L} on {A} {B} background"),
        # the background phrases above that end a caption, also opening one: word order must not decide which
        # colour is the background
        ("on_background_first", "on {A} {B} background, {L}"),
        ("against_backdrop_first", "against {A} {B} backdrop, {L}"),
        ("background_is_opening", "the background is {B}. {L}"),
    ),
    "heldout": (
        ("on_backdrop_first", "on {A} {B} backdrop, {L}"),
        ("backdrop_with", "{A} {B} backdrop with {L}"),
        ("background_is_first", "the background is {B}, {L}"),
        ("draw_against", "draw {L} against {A} {B} background"),
    ),
}
_JOINERS = (", ", " and ", ", and ")
SPLITS = ("train", "heldout")


def _cell_kind(cell: tuple[int, int]) -> str:
    if cell == (1, 1):
        return "centre"
    return "corner" if cell[0] != 1 and cell[1] != 1 else "edge"


def cell_names(cell: tuple[int, int]) -> list[str]:
    """The names of a cell the paraphrases use: ``top left``, ``upper-left``, ``north-west``, ``left side``,
    ``top middle``, ``centre``..."""
    kind, compass = _cell_kind(cell), POSITIONS[cell]
    if kind == "centre":
        return list(CENTRE_NAMES)
    if kind == "corner":
        rows, col = _CORNER_ROWS[cell[0]], _CORNER_COLUMNS[cell[1]]
        return ([f"{r} {col}" for r in rows] + [f"{r}-{col}" for r in rows]
                + [compass, f"{compass[:5]}-{compass[5:]}"])
    edge = _EDGE_NAMES[cell]
    names = [edge] + [f"{c} {edge}" if cell[0] == 1 else f"{edge} {c}" for c in CENTRE_NAMES] + [compass]
    return names + ([f"{edge} side"] if cell[0] == 1 else [])


def _suits(kind: str, cell: tuple[int, int]) -> bool:
    return kind == "any" or kind == _cell_kind(cell) or (kind == "side" and cell in ((1, 0), (1, 2)))


def _position(cell: tuple[int, int], rng: random.Random, templates, bare: bool = True) -> str:
    options = [t for _, kind, t in templates if _suits(kind, cell) and (bare or not t.startswith("{"))]
    template = rng.choice(options)
    name = rng.choice(cell_names(cell))
    edge = _EDGE_NAMES.get(cell, "")
    return template.format(name=name, compass=POSITIONS[cell],
                           edge=f"{edge} side" if cell[0] == 1 else edge)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _templates(table: dict, split: str) -> tuple:
    """Training templates for ``train``; every template for ``heldout`` (its frame is held out, see below)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose train or heldout")
    return table["train"] + (table["heldout"] if split == "heldout" else ())


def _object_phrase(obj: SceneObject, rng: random.Random, split: str) -> str:
    _, template = rng.choice(_templates(OBJECT_TEMPLATES, split))
    pos = _position(obj.cell, rng, _templates(POSITION_TEMPLATES, split), bare=not template.startswith("{pos}"))
    size = rng.choice(SIZE_SYNONYMS[obj.size])
    return template.format(a=rng.choice(("a ", "a ", "")), size=size, colour=obj.colour, shape=obj.shape, pos=pos,
                           gsize=obj.size, compass=POSITIONS[obj.cell])


def _group_phrase(objs: list[SceneObject], rng: random.Random, split: str) -> str:
    _, template = rng.choice(_templates(GROUP_TEMPLATES, split))
    positions = [_position(o.cell, rng, _templates(POSITION_TEMPLATES, split)) for o in objs]
    first = objs[0]
    return template.format(
        count=COUNT_NAMES[len(objs)], size=rng.choice(SIZE_SYNONYMS[first.size]), colour=first.colour,
        shapes=first.shape + "s", ones=" and ".join(f"one {p}" for p in positions),
        positions=", ".join(positions[:-1]) + " and " + positions[-1])


def paraphrase(scene: Scene, rng: random.Random, split: str = "train",
               frames: tuple[tuple[str, str], ...] | None = None) -> str:
    """A plain-English caption of ``scene``: background first or last, objects in random order, synonyms for sizes
    and positions, ``backdrop``, articles and fillers; objects of the same size, colour and shape are counted
    ("two small red squares, one top left and one bottom right"). ``split="heldout"`` draws its frame from the
    held-out frames and its other templates from all (see the comment above ``SIZE_SYNONYMS``). ``frames``: other
    sentence frames (``(id, template)`` pairs, as in ``FRAME_TEMPLATES``) instead of the split's."""
    groups: dict[tuple[str, str, str], list[SceneObject]] = {}
    for obj in scene.objects:
        groups.setdefault((obj.size, obj.colour, obj.shape), []).append(obj)
    parts = []
    for objs in groups.values():
        if len(objs) > 1 and rng.random() < 0.8:
            parts.append(_group_phrase(objs, rng, split))
        else:
            parts.extend(_object_phrase(o, rng, split) for o in objs)
    rng.shuffle(parts)
    joiner = rng.choice(_JOINERS)
    listed = parts[0] if len(parts) == 1 else (", ".join(parts[:-1]) + joiner + parts[-1] if joiner != ", "
                                                 else ", ".join(parts))
    _, frame = rng.choice(frames or FRAME_TEMPLATES["heldout" if split == "heldout" else "train"])
    return frame.format(L=listed, B=scene.background, A=_article(scene.background))


def frame_split(caption: str) -> str | None:
    """The split ("train" or "heldout") whose sentence frames ``caption`` fits, None when it fits neither or both: how
    an evaluation shows that its prompts are phrased as training never was. (The grammar's own captions fit the
    training frame ``{B} background, {L}``.)"""
    colours = "|".join(COLOURS)

    def fits(frame: str) -> bool:
        pattern = (re.escape(frame).replace(re.escape("{L}"), ".+").replace(re.escape("{A}"), "an?")
                   .replace(re.escape("{B}"), f"(?:{colours})"))
        return re.fullmatch(pattern, caption) is not None

    splits = [split for split in SPLITS if any(fits(frame) for _, frame in FRAME_TEMPLATES[split])]
    return splits[0] if len(splits) == 1 else None


def training_caption(scene: Scene, rng: random.Random, grammar_share: float = 0.25) -> str:
    """A caption for training a model that reads plain English: the grammar's caption with probability
    ``grammar_share`` (the grammar keeps working), else a training paraphrase."""
    return scene.caption if rng.random() < grammar_share else paraphrase(scene, rng, "train")


def scene_with_copies(rng: random.Random, num_objects: int | None = None, copy_share: float = 0.3) -> Scene:
    """A random scene whose objects, with probability ``copy_share``, all share the first one's size, colour and
    shape (other cells): the scenes counts and plurals describe ("three small red squares ..."), which
    :func:`random_scene` draws only by chance."""
    scene = random_scene(rng, num_objects)
    if len(scene.objects) < 2 or rng.random() >= copy_share:
        return scene
    first = scene.objects[0]
    return Scene(scene.background, tuple(SceneObject(first.size, first.colour, first.shape, o.cell)
                                         for o in scene.objects))


def paraphrase_vocabulary(split: str = "train") -> tuple[str, ...]:
    """Every word a paraphrase of ``split`` can contain (a tokenizer for a plain-English model is built from the
    training split's)."""
    texts = [t for *_, t in _templates(POSITION_TEMPLATES, split)]
    texts += [t for _, t in _templates(OBJECT_TEMPLATES, split) + _templates(GROUP_TEMPLATES, split)]
    texts += [t for _, t in FRAME_TEMPLATES["train"] + (FRAME_TEMPLATES["heldout"] if split == "heldout" else ())]
    texts += [n for cell in POSITIONS for n in cell_names(cell)] + list(_EDGE_NAMES.values()) + ["side"]
    texts += [w for ws in SIZE_SYNONYMS.values() for w in ws] + list(COLOURS) + list(SHAPES)
    texts += [s + "s" for s in SHAPES] + list(COUNT_NAMES.values()) + ["a", "an", "one"] + list(VOCABULARY)
    texts += list(_JOINERS)
    words = {w for t in texts for w in re.findall(r"[a-z]+", re.sub(r"\{[a-zA-Z]+\}", " ", t))}
    return tuple(sorted(words))
