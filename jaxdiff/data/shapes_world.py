"""The shapes world v1 (`../shared/shapes_world.md`): scenes, captions, the caption parser, the renderer.

Pure numpy. An example is a pure function of (split, index, seed): its random numbers come only
from `np.random.default_rng([seed, split_id, index]).random()` (PCG64 doubles, a stream numpy keeps
stable), and the renderer uses only +, -, * and comparisons (the star's trigonometry is written
out as literals), so every machine produces the same bytes.
"""

from __future__ import annotations

import dataclasses

import numpy as np

# ---- The world (spec: Canvas, Objects) ----------------------------------------------------------
BACKGROUNDS = {"black": (0, 0, 0), "gray": (128, 128, 128), "white": (255, 255, 255)}
COLOURS = {
    "red": (230, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 40),
    "green": (40, 180, 70),
    "cyan": (40, 200, 220),
    "blue": (40, 80, 230),
    "purple": (150, 60, 210),
    "pink": (245, 130, 200),
}
SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross")
SIZES = {"small": 0.18, "large": 0.30}  # extent e in units of S, before the +-5 % jitter
SIZE_THRESHOLD = 0.24  # scoring: small below, large at or above (units of S)
CELL_CENTRES = (0.2, 0.5, 0.8)  # per axis, units of S; cell = 3 * row + column
BANDS = (0.35, 0.65)  # reading a centroid back into a column / row
CELLS = (
    "top left",
    "top",
    "top right",
    "left",
    "center",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
)
POSITION_PHRASES = (
    "in the top left",
    "at the top",
    "in the top right",
    "on the left",
    "in the center",
    "on the right",
    "in the bottom left",
    "at the bottom",
    "in the bottom right",
)
RELATIONS = ("to the left of", "to the right of", "above", "below")
KINDS = ("single", "relation", "count", "background")
COUNT_WORDS = {"two": 2, "three": 3}
HELDOUT_PAIRS = frozenset(
    {
        ("red", "star"),
        ("orange", "circle"),
        ("yellow", "cross"),
        ("green", "diamond"),
        ("cyan", "triangle"),
        ("blue", "square"),
        ("purple", "cross"),
        ("pink", "triangle"),
    }
)
ALL_PAIRS = tuple((c, s) for c in COLOURS for s in SHAPES)
SEEN_PAIRS = tuple(
    p for p in ALL_PAIRS if p not in HELDOUT_PAIRS
)  # the 40 pairs of train/validation
UNSEEN_PAIRS = tuple(p for p in ALL_PAIRS if p in HELDOUT_PAIRS)  # the 8 held-out pairs
SPLITS = {"train": 0, "validation": 1, "heldout": 2}
MAX_OBJECTS = 3
RESOLUTIONS = (32, 64, 128)

# Area of each shape as a fraction of e^2, and the offset of its centroid below the box centre
# (as a fraction of e): the scorer uses these to read extent and centre back from pixels.
SHAPE_AREA = {
    "circle": np.pi / 4,
    "square": 1.0,
    "triangle": 0.5,
    "diamond": 0.5,
    "star": 5 * 0.5 * 0.2 * 0.5877852522924731,
    "cross": 5 / 9,
}
SHAPE_CENTROID_DY = {"triangle": 1 / 6}


@dataclasses.dataclass(frozen=True)
class Object:
    """One drawn object; `centre` (x, y) and `extent` are in units of the image side S."""

    colour: str
    shape: str
    size: str
    cell: int
    centre: tuple[float, float]
    extent: float


@dataclasses.dataclass(frozen=True)
class Scene:
    kind: str
    background: str
    objects: tuple[Object, ...]
    caption: str
    relation: str | None = None


# ---- Sampling (spec: Scenes and captions, Splits) -----------------------------------------------
def _pick(rng, options):
    return options[min(int(rng.random() * len(options)), len(options) - 1)]


def _object(rng, colour, shape, size, cell):
    e = SIZES[size] * (1 + 0.05 * (2 * rng.random() - 1))
    row, col = divmod(cell, 3)
    x = CELL_CENTRES[col] + 0.02 * (2 * rng.random() - 1)
    y = CELL_CENTRES[row] + 0.02 * (2 * rng.random() - 1)
    return Object(colour, shape, size, cell, (x, y), e)


def _article(word):
    return "an" if word[0] in "aeiou" else "a"


def object_phrase(colour, shape, size=None):
    words = [w for w in (size, colour, shape) if w]
    return f"{_article(words[0])} {' '.join(words)}"


def plural(shape):
    return shape + ("es" if shape.endswith("s") else "s")


def vocabulary() -> tuple[str, ...]:
    """Every word a caption can use, sorted (what a shapes-world tokenizer must know)."""
    phrases = (
        *SIZES,
        *COLOURS,
        *SHAPES,
        *map(plural, SHAPES),
        *POSITION_PHRASES,
        *RELATIONS,
        *COUNT_WORDS,
        *BACKGROUNDS,
        "a an on background",
    )
    return tuple(sorted({w for p in phrases for w in p.split()}))


def _relation_cells(rng, relation, canonical=False):
    """Cells for A and B that make `A relation B` true: uniform over all such (cell A, cell B) pairs.

    Left/right: A's and B's columns are an ordered pair drawn from (0,1), (0,2), (1,2); their rows
    are drawn independently (any rows). Above/below: the same with rows and columns swapped. Cells
    are then distinct because the columns (rows) differ. ``canonical``: the columns (rows) are always
    the outer ones, (0, 2), so that `A above B` puts A in the top row and B in the bottom one (a
    training-data option; such scenes still satisfy their captions).
    """
    if canonical:
        lo, hi = 0, 2
    else:
        lo, hi = _pick(rng, ((0, 1), (0, 2), (1, 2)))
    first, second = (lo, hi) if relation in ("to the left of", "above") else (hi, lo)
    other_a, other_b = _pick(rng, (0, 1, 2)), _pick(rng, (0, 1, 2))
    if relation in ("to the left of", "to the right of"):  # cell = 3 * row + column
        return 3 * other_a + first, 3 * other_b + second
    return 3 * first + other_a, 3 * second + other_b


def sample_scene(
    split: str, index: int, seed: int = 0, canonical: bool = False, shared: float = 0.0
) -> Scene:
    """The scene (labels and caption) of example `index` of `split`; a pure function of its arguments.

    ``canonical``: relation scenes in their canonical layout (`_relation_cells`), an option for training
    data, not part of the data set's spec: the caption is the spec's; a relation scene's cells and jitter
    differ, other kinds are unchanged. ``shared`` (in [0, 1]), another training-data option: that fraction
    of relation scenes redraw B, among the split's pairs, to share A's colour or its shape (and still
    differ from A), the pairs whose attributes a model most easily swaps or copies. A stays; with shared > 0
    every relation scene draws one more random number, so its relation word and cells (and the chosen ones'
    B) differ from the spec's. 0 (the spec's sampling) draws none: every scene stays the spec's."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: expected one of {sorted(SPLITS)}")
    if index < 0 or seed < 0:
        raise ValueError(f"index and seed must be >= 0, got index={index}, seed={seed}")
    if not 0 <= shared <= 1:
        raise ValueError(f"shared must lie in [0, 1], got {shared}")
    rng = np.random.default_rng([seed, SPLITS[split], index])
    heldout = split == "heldout"
    pairs = UNSEEN_PAIRS if heldout else SEEN_PAIRS
    kind = _pick(rng, KINDS)
    background = _pick(rng, tuple(BACKGROUNDS))

    if kind in ("single", "background"):
        colour, shape = _pick(rng, pairs)
        size = _pick(rng, tuple(SIZES))
        obj = _object(rng, colour, shape, size, _pick(rng, range(9)))
        name_size, name_position = rng.random() < 0.5, rng.random() < 0.5
        caption = object_phrase(colour, shape, size if name_size else None)
        if name_position:
            caption += " " + POSITION_PHRASES[obj.cell]
        if kind == "background":
            caption += f" on a {background} background"
        return Scene(kind, background, (obj,), caption)

    if kind == "relation":
        while True:  # A and B differ in colour or shape; heldout: at least one is a held-out pair
            a = _pick(rng, ALL_PAIRS if heldout else pairs)
            b = _pick(rng, ALL_PAIRS if heldout else pairs)
            if a != b and (not heldout or a in HELDOUT_PAIRS or b in HELDOUT_PAIRS):
                break
        if shared and rng.random() < shared:
            while True:
                b = _pick(rng, ALL_PAIRS if heldout else pairs)
                if (
                    b != a
                    and (b[0] == a[0] or b[1] == a[1])
                    and (not heldout or a in HELDOUT_PAIRS or b in HELDOUT_PAIRS)
                ):
                    break
        relation = _pick(rng, RELATIONS)
        cell_a, cell_b = _relation_cells(rng, relation, canonical)
        objs = (_object(rng, *a, "small", cell_a), _object(rng, *b, "small", cell_b))
        caption = f"{object_phrase(*a)} {relation} {object_phrase(*b)}"
        return Scene(kind, background, objs, caption, relation)

    n = _pick(rng, (2, 3))
    colour, shape = _pick(rng, pairs)
    free = list(range(9))
    cells = [free.pop(min(int(rng.random() * len(free)), len(free) - 1)) for _ in range(n)]
    objs = tuple(_object(rng, colour, shape, "small", c) for c in cells)
    word = {2: "two", 3: "three"}[n]
    return Scene(kind, background, objs, f"{word} {colour} {plural(shape)}")


def labels(scene: Scene) -> dict:
    """The structured labels as fixed-size arrays (objects padded to MAX_OBJECTS with -1 / 0)."""
    n = len(scene.objects)
    out = {
        "kind": np.int32(KINDS.index(scene.kind)),
        "background": np.int32(list(BACKGROUNDS).index(scene.background)),
        "relation": np.int32(RELATIONS.index(scene.relation) if scene.relation else -1),
        "num_objects": np.int32(n),
        "colour": np.full(MAX_OBJECTS, -1, np.int32),
        "shape": np.full(MAX_OBJECTS, -1, np.int32),
        "size": np.full(MAX_OBJECTS, -1, np.int32),
        "cell": np.full(MAX_OBJECTS, -1, np.int32),
        "centre": np.zeros((MAX_OBJECTS, 2), np.float32),
        "extent": np.zeros(MAX_OBJECTS, np.float32),
    }
    for i, o in enumerate(scene.objects):
        out["colour"][i] = list(COLOURS).index(o.colour)
        out["shape"][i] = SHAPES.index(o.shape)
        out["size"][i] = list(SIZES).index(o.size)
        out["cell"][i] = o.cell
        out["centre"][i] = o.centre
        out["extent"][i] = o.extent
    return out


def example(split: str, index: int, seed: int = 0, resolution: int = 64) -> dict:
    """One example: image uint8 [S, S, 3], caption, and the labels of `labels`."""
    scene = sample_scene(split, index, seed)
    return {"image": render(scene, resolution), "caption": scene.caption, **labels(scene)}


# ---- Rendering ----------------------------------------------------------------------------------
# Unit star (outer radius 1, y down, one point straight up); inner radius 0.4. Written as literals
# so that no platform's sin/cos can change a pixel.
_S72, _C72, _S36, _C36 = (
    0.9510565162951535,
    0.30901699437494745,
    0.5877852522924731,
    0.8090169943749475,
)
_STAR_OUTER = ((0.0, -1.0), (_S72, -_C72), (_S36, _C36), (-_S36, _C36), (-_S72, -_C72))
_STAR_INNER = tuple(
    (0.4 * x, 0.4 * y)
    for x, y in ((_S36, -_C36), (_S72, _C72), (0.0, 1.0), (-_S72, _C72), (-_S36, -_C36))
)


def _in_convex(x, y, poly):
    """x, y broadcastable point arrays; poly vertices clockwise on screen (y down)."""
    inside = None
    for (ax, ay), (bx, by) in zip(poly, poly[1:] + poly[:1]):
        side = (bx - ax) * (y - ay) - (by - ay) * (x - ax) >= 0
        inside = side if inside is None else inside & side
    return inside


def inside(shape: str, x, y, e):
    """Boolean mask of points (x, y) (relative to the box centre, y down) inside `shape` of extent e."""
    h = e / 2
    if shape == "circle":
        return x * x + y * y <= h * h
    if shape == "square":
        return (np.abs(x) <= h) & (np.abs(y) <= h)
    if shape == "triangle":  # apex at top centre, base along the bottom edge
        return (y <= h) & (2 * np.abs(x) <= y + h)
    if shape == "diamond":
        return np.abs(x) + np.abs(y) <= h
    if shape == "cross":  # arms e/3 wide spanning the whole box
        ax, ay = np.abs(x), np.abs(y)
        return ((ax <= e / 6) & (ay <= h)) | ((ay <= e / 6) & (ax <= h))
    if shape == "star":  # inner pentagon plus five spike triangles
        outer = [(h * px, h * py) for px, py in _STAR_OUTER]
        inner = [(h * px, h * py) for px, py in _STAR_INNER]
        mask = _in_convex(x, y, inner)
        for k in range(5):
            mask = mask | _in_convex(x, y, [inner[k - 1], outer[k], inner[k]])
        return mask
    raise ValueError(f"unknown shape {shape!r}: expected one of {SHAPES}")


def coverage(
    shape: str, cx: float, cy: float, e: float, x0: int, y0: int, w: int, h: int, ss: int = 4
):
    """Fraction of ss x ss subsamples inside `shape`, float64 [h, w], for output pixels
    [y0, y0 + h) x [x0, x0 + w); centre and extent in output-pixel units."""
    sub = (np.arange(w * ss) + 0.5) / ss
    xs = x0 + sub - cx
    ys = y0 + (np.arange(h * ss) + 0.5) / ss - cy
    m = inside(shape, xs[None, :], ys[:, None], e)
    return m.reshape(h, ss, w, ss).sum((1, 3)) / (ss * ss)


def render(scene: Scene, size: int = 64, ss: int = 4) -> np.ndarray:
    """uint8 [S, S, 3]; anti-aliased by `ss` x `ss` supersampling and box downscaling."""
    if size not in RESOLUTIONS:
        raise ValueError(
            f"resolution {size} is not a shapes-world size: expected one of {RESOLUTIONS}"
        )
    img = np.empty((size, size, 3), np.uint8)
    bg = np.array(BACKGROUNDS[scene.background], np.float64)
    img[:] = bg.astype(np.uint8)
    for o in scene.objects:
        cx, cy, e = o.centre[0] * size, o.centre[1] * size, o.extent * size
        x0, y0 = max(int(np.floor(cx - e / 2)), 0), max(int(np.floor(cy - e / 2)), 0)
        x1, y1 = min(int(np.ceil(cx + e / 2)), size), min(int(np.ceil(cy + e / 2)), size)
        cov = coverage(o.shape, cx, cy, e, x0, y0, x1 - x0, y1 - y0, ss)[..., None]
        # Objects never overlap, so blending each into the background is exact.
        col = np.array(COLOURS[o.colour], np.float64)
        img[y0:y1, x0:x1] = np.rint(bg + (col - bg) * cov).astype(np.uint8)
    return img


# ---- Parsing captions back (spec: Scoring) ------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Wanted:
    """An object a caption asks for; size / cell are None when the caption does not name them."""

    colour: str
    shape: str
    size: str | None = None
    cell: int | None = None


@dataclasses.dataclass(frozen=True)
class Prompt:
    """What a caption requires. Relation: objects (A, B); count: one object and `count`."""

    text: str
    kind: str
    objects: tuple[Wanted, ...]
    relation: str | None = None
    count: int | None = None
    background: str | None = None


class _Words:
    def __init__(self, text):
        self.text, self.words, self.i = text, text.split(" "), 0

    def error(self, expected):
        rest = " ".join(self.words[self.i :])
        got = f"{rest!r}" if rest else "the end of the caption"
        return ValueError(
            f"caption {self.text!r} is outside the shapes-world grammar: expected "
            f"{expected} at word {self.i + 1}, got {got}"
        )

    def at_end(self):
        return self.i == len(self.words)

    def take(self, phrases, expected, required=True):
        """Consume the longest of `phrases` found here; return its index, or None if not required."""
        best = None
        for k, p in enumerate(phrases):
            n = len(p.split(" "))
            if self.words[self.i : self.i + n] == p.split(" ") and (best is None or n > best[1]):
                best = (k, n)
        if best is None:
            if required:
                raise self.error(expected)
            return None
        self.i += best[1]
        return best[0]

    def article_for(self, word_index, article):
        want = _article(self.words[word_index])
        if article != want:
            self.i = word_index - 1
            raise self.error(f"the article {want!r} before {self.words[word_index]!r}")


def _listing(options):
    return "one of " + ", ".join(repr(o) for o in options)


def _parse_object(words, allow_size):
    art_at = words.i
    article = ("a", "an")[words.take(("a", "an"), "an article 'a' or 'an'")]
    size = words.take(tuple(SIZES), "", required=False) if allow_size else None
    if art_at + 1 < len(words.words):
        words.article_for(art_at + 1, article)
    colour = list(COLOURS)[words.take(tuple(COLOURS), "a colour, " + _listing(COLOURS))]
    shape = SHAPES[words.take(SHAPES, "a shape, " + _listing(SHAPES))]
    return colour, shape, (list(SIZES)[size] if size is not None else None)


def parse_caption(text: str) -> Prompt:
    """What a shapes-world caption requires; a ValueError naming the text if it is outside the grammar."""
    if not isinstance(text, str):
        raise ValueError(f"caption must be a string, got {type(text).__name__}: {text!r}")
    text = text.strip()
    if not text or text != text.lower() or "  " in text or text.endswith("."):
        raise ValueError(
            f"caption {text!r} is outside the shapes-world grammar: captions are non-empty, "
            "lower case, single-spaced, with no final full stop"
        )
    w = _Words(text)
    bg_phrases = tuple(f"on a {b} background" for b in BACKGROUNDS)
    if w.words[0] not in COUNT_WORDS and w.words[0] not in ("a", "an"):
        raise w.error("'a', 'an', 'two' or 'three'")
    if w.words[0] in COUNT_WORDS:
        n = COUNT_WORDS[w.words[0]]
        w.i = 1
        colour = list(COLOURS)[w.take(tuple(COLOURS), "a colour, " + _listing(COLOURS))]
        shape = SHAPES[
            w.take(
                tuple(plural(s) for s in SHAPES),
                "a plural shape, " + _listing([plural(s) for s in SHAPES]),
            )
        ]
        if not w.at_end():
            raise w.error("the end of the caption")
        return Prompt(text, "count", (Wanted(colour, shape),), count=n)

    colour, shape, size = _parse_object(w, allow_size=True)
    if w.at_end():
        return Prompt(text, "single", (Wanted(colour, shape, size),))
    relation = w.take(RELATIONS, "", required=False)
    if relation is not None:
        if size is not None:
            w.i = 0
            raise w.error("no SIZE in a relation caption ('a COLOR SHAPE RELATION a COLOR SHAPE')")
        b = _parse_object(w, allow_size=False)
        if not w.at_end():
            raise w.error("the end of the caption")
        return Prompt(
            text, "relation", (Wanted(colour, shape), Wanted(*b[:2])), relation=RELATIONS[relation]
        )
    cell = w.take(POSITION_PHRASES, "", required=False)
    if w.at_end():
        return Prompt(text, "single", (Wanted(colour, shape, size, cell),))
    bg = w.take(
        bg_phrases,
        (
            "a position, relation or background phrase: "
            + _listing(POSITION_PHRASES + RELATIONS + bg_phrases)
        )
        if cell is None
        else "a background phrase (" + _listing(bg_phrases) + ") or the end of the caption",
    )
    if not w.at_end():
        raise w.error("the end of the caption")
    return Prompt(
        text, "background", (Wanted(colour, shape, size, cell),), background=list(BACKGROUNDS)[bg]
    )
