"""Plain-English prompts for the demo model: read a description into a scene, and say what was not understood.

The demo model was trained on one caption grammar (``"blue background, large red circle at center"``, see
:mod:`.data`); its tokenizers know only that grammar's words. People write "a big red circle in the middle of a blue
backdrop". :func:`understand` reads such a prompt into a :class:`~.data.Scene` (background, and each object's size,
colour, shape and cell), so the Demo tab can run the model on the scene's caption and show the user exactly how
their words were read, naming every word it ignored. It is a small rule-based reader, not a language model:

* an object is a shape word (circle, squares, triangle, diamond and their synonyms), with the size and colour words
  before it in the same clause; a count (``two``, ``a pair of``) or a plural makes several objects;
* a position is a row word (top / upper / north, middle / centre / center, bottom / lower / south) and a column word
  (left / west, middle, right / east), in either order, also joined (``top-left``, ``northwest``); a missing row or
  column means the middle; it belongs to the object of its clause, else to the objects before it that have none;
* the background is the colour next to ``background`` / ``backdrop`` (``a blue background``, ``background is
  blue``), or a colour after ``on`` / ``against`` that no shape follows (``a red circle on blue``); a colour after
  its shape (``a circle coloured red``) belongs to that shape.

Whatever the prompt does not fix gets the training data's most neutral choice and a note: no size -> large, no
position -> the free cells of the middle row first, no background -> white (black if an object is white).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .data import COLOURS, GRID, MAX_OBJECTS, POSITIONS, SHAPES, Scene, SceneObject

COLOUR_WORDS: dict[str, str] = {c: c for c in COLOURS} | {
    "violet": "purple", "lilac": "purple", "magenta": "purple", "navy": "blue", "azure": "blue", "cyan": "blue",
    "lime": "green", "gold": "yellow", "golden": "yellow", "crimson": "red", "scarlet": "red", "grey": None,
    "gray": None, "pink": None, "brown": None,
}
SHAPE_WORDS: dict[str, str] = {s: s for s in SHAPES} | {
    "circles": "circle", "disc": "circle", "discs": "circle", "disk": "circle", "disks": "circle", "dot": "circle",
    "dots": "circle", "ball": "circle", "balls": "circle", "ring": "circle", "round": "circle",
    "squares": "square", "box": "square", "boxes": "square", "block": "square", "blocks": "square",
    "rectangle": "square", "rectangles": "square", "cube": "square",
    "triangles": "triangle", "pyramid": "triangle", "diamonds": "diamond", "rhombus": "diamond", "lozenge": "diamond",
}
PLURAL_SHAPES = frozenset(w for w in SHAPE_WORDS if w.endswith("s") and w not in ("cross",))
SIZE_WORDS: dict[str, str] = {
    "small": "small", "tiny": "small", "little": "small", "smaller": "small", "mini": "small", "short": "small",
    "large": "large", "big": "large", "huge": "large", "giant": "large", "bigger": "large", "larger": "large",
    "massive": "large", "enormous": "large",
}
COUNT_WORDS: dict[str, int] = {"one": 1, "single": 1, "two": 2, "three": 3, "pair": 2, "couple": 2, "1": 1, "2": 2,
                               "3": 3}
ROW_WORDS: dict[str, int] = {"top": 0, "upper": 0, "north": 0, "middle": 1, "centre": 1,
                             "center": 1, "central": 1, "centered": 1, "centred": 1, "mid": 1, "bottom": 2,
                             "lower": 2, "south": 2}
COLUMN_WORDS: dict[str, int] = {"left": 0, "west": 0, "middle": 1, "centre": 1, "center": 1, "central": 1,
                                "centered": 1, "centred": 1, "mid": 1, "right": 2, "east": 2}
COMPASS: dict[str, tuple[int, int]] = {name: cell for cell, name in POSITIONS.items()}
# One-word names of corner cells; "north", "west", "center"... are read as row or column words, so that
# "top center" and "center left" work too.
_DIAGONALS = frozenset({"northwest", "northeast", "southwest", "southeast"})
# Nouns for "some object": "three tiny shapes: ..." sets the size for the objects listed after it.
GENERIC_NOUNS = frozenset({"shape", "shapes", "object", "objects", "thing", "things", "figure", "figures", "items"})
BACKGROUND_WORDS = frozenset({"background", "backdrop", "bg", "backround", "canvas"})
# Words that carry no scene information; they are read silently.
FILLERS = frozenset("""
a an the with on in of and at is are there to its it this that draw please picture image show make paint put me
i want would like some placed sitting side corner edge half part area one's each other another plus also over
against onto into has have having set positioned located coloured colored color colour shaped shape shapes object
objects thing things for by near next from being be as just solid flat plain simple nice cell row column which
spot region quadrant whole full entire field space rendered drawn depicted filled fill very really could can
you hello hi love i'd i'm let's give create generate get need see looking look both all each every them they
""".split())
_SPLIT = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
_BACKGROUND_PREPOSITIONS = frozenset({"on", "against", "over", "onto"})
# "1)", "(2)", "3." at the start of a list item: a separator, not a count
_LIST_MARKER = re.compile(r"(?:^|(?<=[\s:;,]))\(?[0-9]\)|(?:^|(?<=[\s:;,]))[0-9]\.(?=\s)")
# "both small", "all red": a size or colour for every object named so far
_FOR_ALL = frozenset({"both", "all", "each", "every"})
_CLAUSE_BREAKS = frozenset({"and", "with", "plus", "while", "whereas", "then", ";", ",", "."})


@dataclass
class Understanding:
    """How a prompt was read: the scene (None if nothing drawable was found), its caption in the model's own
    grammar, the words that were ignored, and notes on what was assumed."""

    prompt: str
    scene: Scene | None
    ignored_words: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def caption(self) -> str | None:
        return self.scene.caption if self.scene else None

    @property
    def in_grammar(self) -> bool:
        """The prompt is already a caption of the training grammar (the model runs on it unchanged)."""
        return self.scene is not None and _normalise(self.prompt) == _normalise(self.scene.caption)


def _normalise(text: str) -> str:
    return " ".join(_SPLIT.findall(text.lower()))


def _tokens(prompt: str) -> list[str]:
    text = _LIST_MARKER.sub(" , ", prompt.lower()).replace("-", " ").replace("/", " ")
    tokens = re.findall(r"[a-z0-9]+(?:'[a-z]+)?|[,;.]", text)
    # "right in the middle", "right at the top": "right" only stresses the position that follows
    return [t for k, t in enumerate(tokens)
            if not (t == "right" and k + 1 < len(tokens) and tokens[k + 1] in ("in", "at")
                    and not (k and tokens[k - 1] in ROW_WORDS))]


def prompt_words(prompt: str) -> list[str]:
    """The words of a prompt as a word-level tokenizer sees them: lower case, runs of letters or of digits
    ("bottom-left" is two words, "2" one)."""
    return re.findall(r"[a-z]+|[0-9]+", prompt.lower())


@dataclass
class _Mention:
    shape: str
    count: int
    colour: str | None
    size: str | None
    clause: int
    cells: list[tuple[int, int]] = field(default_factory=list)
    spread: bool = False  # a plural whose objects are listed one by one ("a red one, a green one")


def _position_in(words: list[str]) -> tuple[tuple[int, int] | None, set[int]]:
    """The cell named by a run of words (``top left``, ``upper-left``, ``northwest``, ``middle``), and the indices
    of the words used."""
    row = col = None
    used: set[int] = set()
    for i, w in enumerate(words):
        if w in _DIAGONALS:
            return COMPASS[w], {i}
    for i, w in enumerate(words):
        if w in ("left", "west", "right", "east") and col is None:
            col, _ = COLUMN_WORDS[w], used.add(i)
        elif w in ("top", "upper", "north", "bottom", "lower", "south") and row is None:
            row, _ = ROW_WORDS[w], used.add(i)
    for i, w in enumerate(words):
        if w in ("middle", "centre", "center", "central", "centered", "centred", "mid"):
            used.add(i)
            if row is None:
                row = 1
            elif col is None:
                col = 1
    if row is None and col is None:
        return None, used
    return (1 if row is None else row, 1 if col is None else col), used


def understand(prompt: str) -> Understanding:
    """Read ``prompt`` into a demo scene (see the module docstring for the rules)."""
    tokens = _tokens(prompt)
    notes: list[str] = []
    ignored: list[str] = []
    # Clauses: the object phrase and its position usually share one ("a red circle at the top left").
    clauses: list[list[tuple[int, str]]] = [[]]
    for i, t in enumerate(tokens):
        if t in _CLAUSE_BREAKS:
            if clauses[-1]:
                clauses.append([])
            continue
        clauses[-1].append((i, t))
    clauses = [c for c in clauses if c]

    background: str | None = None
    default_size = default_colour = None
    mentions: list[_Mention] = []
    clause_positions: list[tuple[int, tuple[int, int], list[str]]] = []
    understood: set[int] = set()
    for ci, clause in enumerate(clauses):
        words = [w for _, w in clause]
        idx = [i for i, _ in clause]
        # background: a colour next to a background word, or "background (is) <colour>"
        for k, w in enumerate(words):
            if w in BACKGROUND_WORDS:
                understood.add(idx[k])
                before = [j for j in range(k - 1, max(-1, k - 4), -1) if words[j] in COLOUR_WORDS]
                after = [j for j in range(k + 1, min(len(words), k + 4)) if words[j] in COLOUR_WORDS]
                pick = before[0] if before else (after[0] if after else None)
                if pick is not None:
                    background = _colour(words[pick], notes) or background
                    understood.add(idx[pick])
        pending_colour = pending_size = pending_count = None
        for k, w in enumerate(words):
            if idx[k] in understood:
                continue
            if w in COLOUR_WORDS:
                colour = _colour(w, notes)
                understood.add(idx[k])
                if k and words[k - 1] in _BACKGROUND_PREPOSITIONS and not _describes_next(words, k):
                    background = background or colour  # "a red circle on blue"
                elif not _attached_after(words, k, mentions, "colour", colour):
                    pending_colour = colour
            elif w in SIZE_WORDS:
                size = SIZE_WORDS[w]
                understood.add(idx[k])
                if not _attached_after(words, k, mentions, "size", size):
                    pending_size = size
            elif w in ("one", "ones") and (pending_colour or pending_size) and mentions:
                # "three circles: a red one top left, ...": one of the last plural's objects
                parent = next((m for m in reversed(mentions) if m.count > 1 or m.spread), mentions[-1])
                if parent.count > 1 or parent.spread:
                    parent.spread = True
                    parent.count = max(0, parent.count - 1)
                mentions.append(_Mention(parent.shape, 1, pending_colour or parent.colour,
                                         pending_size or parent.size, ci))
                understood.add(idx[k])
                pending_colour = pending_size = pending_count = None
            elif w in COUNT_WORDS and not (w == "one" and pending_count is not None):
                pending_count = COUNT_WORDS[w]
                understood.add(idx[k])
            elif w in GENERIC_NOUNS:
                # "three tiny shapes:" -> the listed objects are small; the count is theirs, not a shape's
                default_size = pending_size or default_size
                default_colour = pending_colour or default_colour
                understood.add(idx[k])
                pending_colour = pending_size = pending_count = None
            elif w in SHAPE_WORDS:
                count = pending_count or (2 if w in PLURAL_SHAPES else 1)
                mentions.append(_Mention(SHAPE_WORDS[w], count, pending_colour or default_colour,
                                         pending_size or default_size, ci))
                understood.add(idx[k])
                pending_colour = pending_size = pending_count = None
        rest = [(i, w) for i, w in clause if i not in understood]
        cell, used = _position_in([w for _, w in rest])
        if cell is not None:
            clause_positions.append((ci, cell, [rest[j][1] for j in sorted(used)]))
            understood.update(rest[j][0] for j in used)

    for i, t in enumerate(tokens):
        if i not in understood and t not in FILLERS and t not in _CLAUSE_BREAKS and t not in COUNT_WORDS:
            ignored.append(t)

    if not mentions:
        return Understanding(prompt, None, ignored, notes + ["no shape found (circle, square, triangle or diamond)"])

    # Positions: a clause's own position goes to its objects; clauses with only a position ("one in the top-left
    # corner") go to the objects before them still short of one. A plural followed by enough of those takes them
    # and not its own ("two squares at the top, one top-left and one top-right": "at the top" names the group).
    own: dict[int, list[tuple[int, int]]] = {}
    for ci, cell, _ in clause_positions:
        own.setdefault(ci, []).append(cell)
    with_objects = {m.clause for m in mentions}
    position_only = [(ci, cells) for ci, cells in sorted(own.items()) if ci not in with_objects]
    for m in mentions:
        following = [cell for ci, cells in position_only if ci > m.clause for cell in cells]
        if m.count > 1 and len(following) >= m.count:
            taken = following[: m.count]
        else:
            taken = (own.get(m.clause, []) + following)[: m.count] if m.clause in own else following[: m.count]
        for cell in taken:
            m.cells.append(cell)
            if m.clause in own and cell in own[m.clause]:
                own[m.clause].remove(cell)
            else:
                for _, cells in position_only:
                    if cell in cells:
                        cells.remove(cell)
                        break
    leftover = [cell for _, cells in position_only for cell in cells]
    for m in mentions:
        while leftover and len(m.cells) < m.count:
            m.cells.append(leftover.pop(0))

    objects: list[SceneObject] = []
    taken = {c for m in mentions for c in m.cells}
    free = [c for c in _PLACEMENT_ORDER if c not in taken]
    for m in mentions:
        colour = m.colour
        if colour is None:
            notes.append(f"no colour for the {m.shape}: red")
            colour = "red"
        size = m.size or "large"
        while len(m.cells) < m.count and free:
            m.cells.append(free.pop(0))
            notes.append(f"no position for a {m.shape}: {POSITIONS[m.cells[-1]]}")
        for cell in m.cells:
            objects.append(SceneObject(size, colour, m.shape, cell))
    if len({o.cell for o in objects}) < len(objects):
        seen: set[tuple[int, int]] = set()
        unique = []
        for o in objects:
            if o.cell in seen:
                notes.append(f"two objects at {POSITIONS[o.cell]}: the later one was left out")
                continue
            seen.add(o.cell)
            unique.append(o)
        objects = unique
    if len(objects) > MAX_OBJECTS:
        notes.append(f"the demo model draws at most {MAX_OBJECTS} objects: the rest were left out")
        objects = objects[:MAX_OBJECTS]
    if background is None:
        background = "black" if any(o.colour == "white" for o in objects) else "white"
        notes.append(f"no background colour given: {background}")
    clashing = [o for o in objects if o.colour == background]
    if clashing:
        notes.append(f"a {background} object on a {background} background would be invisible")
    return Understanding(prompt, Scene(background, tuple(objects)), ignored, notes)


# The Demo tab's example chips, before two captions of the grammar (train.py writes them to demo_settings.json):
# plain-English prompts from the tuning set that the reader reads right and the shipped model draws right.
PLAIN_ENGLISH_EXAMPLES = (
    "a big red circle in the top left corner on a blue background",
    "two small red squares, one top left and one bottom right, on a white background",
    "blue background, tiny white triangle top middle, huge yellow circle center",
    "please draw a tiny green triangle in the center of a white background",
)

# Where objects without a position go: the middle row first, then the corners.
_PLACEMENT_ORDER: tuple[tuple[int, int], ...] = (
    (1, 1), (1, 0), (1, 2), (0, 1), (2, 1), (0, 0), (0, 2), (2, 0), (2, 2),
)
assert len(_PLACEMENT_ORDER) == GRID * GRID


def _attached_after(words: list[str], k: int, mentions: list[_Mention], attribute: str, value: str) -> bool:
    """An adjective that follows what it describes: after ``both`` / ``all`` it goes to every object named so far
    ("..., both small"), else to the last object if that has none yet ("a circle coloured red", "green circle,
    small, on the left"). False when it describes something later in its clause."""
    if _describes_next(words, k) or not mentions:
        return False
    if k and words[k - 1] in _FOR_ALL:
        for m in mentions:
            setattr(m, attribute, getattr(m, attribute) or value)
        return True
    if getattr(mentions[-1], attribute):
        return False
    setattr(mentions[-1], attribute, value)
    return True


def _describes_next(words: list[str], k: int) -> bool:
    """The adjective at ``k`` describes something later in its clause: a shape, ``one`` or a generic noun."""
    return any(w in SHAPE_WORDS or w in GENERIC_NOUNS or w in ("one", "ones") for w in words[k + 1:])


def _colour(word: str, notes: list[str]) -> str | None:
    colour = COLOUR_WORDS[word]
    if colour is None:
        notes.append(f"the demo model has no {word}: it knows " + ", ".join(COLOURS))
    return colour
