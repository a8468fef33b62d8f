"""The toy world: a deterministic procedural generator of 32x32 RGB captioned images.

Every sample has an image (uint8 [32, 32, 3]), a caption, a structured description and a difficulty:

- easy:   a plain background ("a blue background") or one large centred shape ("a large red circle").
- medium: positioned shapes ("a small blue square on the left"), two related shapes
          ("a red circle above a green triangle"), counts ("three yellow diamonds").
- hard:   a letter or digit from a 5x7 bitmap font ("the letter K in red"), alone or with a shape
          ("the letter K in red above a small green square").

Worlds
------
`world="v1"` (the default; the shipped teacher was trained on it) is the mix above. `world="v2"` keeps v1's
templates and adds content whose every pixel is named by the caption, so that a network needs capacity in
proportion to how much the caption says (issue 20: v1 has no prompt category that a pruned network finds
harder than another):

- easy:   flat colour fields in six phrasings ("a plain blue background", "an empty gray canvas", ...),
          so that held-out flat fields exist (v1's nine background captions all hash to "train"), and
          v1's large centred shape.
- medium: v1's positioned, relation and count templates, one glyph ("the letter K in red"), and a 2x2 grid
          of named colours ("a grid of four: red blue green white", reading order).
- hard:   a 3x3 grid of named colours ("a grid of nine: red blue ... orange"), three glyphs side by side
          ("the text K 7 A in red") and v1's glyph-with-shape relation.

Determinism and hold-out convention
-----------------------------------
Sample `i` of the stream with seed `s` is drawn from `np.random.default_rng([s, i, attempt])`, so any
sample can be regenerated alone. Captions are split into a training and a held-out set by a stable hash
(`caption_split`: sha1 of the lower-cased caption, first byte mod 10 == 0 -> "eval", about 10 %).
Seeds below `EVAL_SEED` (= 1_000_000) draw only "train" captions, seeds >= `EVAL_SEED` only "eval"
captions (rejection sampling, `attempt` counts the rejections). So training (seed 0, 1, ...) never sees a
held-out caption, and `captions(64, seed=EVAL_SEED)` gives captions the teacher never trained on.

The description dict (JSON-serialisable):
    {"difficulty": str, "template": str, "background": colour name,
     "objects": [{"kind": "circle"|"square"|"triangle"|"diamond"|"cross"|"letter"|"digit",
                  "char": str|None, "colour": name, "size": "small"|"large",
                  "position": "left"|"right"|"top"|"bottom"|"center"|None,
                  "bbox": [x0, y0, x1, y1]}],        # pixel box, exclusive ends; objects[0] = main object
     "relation": {"type": "above"|"left of", "subject": 0, "object": 1} | None,
     "count": int|None,
     "cells": [[colour name]] | None}     # v2 grids: rows of cell colours (objects is then empty)
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from .font import DIGITS, GLYPH_H, GLYPH_W, LETTERS, glyph

SIZE = 32
EVAL_SEED = 1_000_000
DIFFICULTIES = ("easy", "medium", "hard")

# Clearly distinct named colours (RGB). Objects use OBJECT_COLOURS; "gray" is a background only.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 230),
    "yellow": (245, 220, 30),
    "purple": (140, 50, 190),
    "orange": (250, 130, 20),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
}
OBJECT_COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
SCENE_BACKGROUNDS = ("black", "white", "gray")
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles", "diamond": "diamonds",
          "cross": "crosses"}
POSITIONS = ("left", "right", "top", "bottom", "center")
POSITION_PHRASE = {"left": "on the left", "right": "on the right", "top": "at the top",
                   "bottom": "at the bottom", "center": "in the center"}
_POSITION_XY = {"left": (9.0, 16.0), "right": (23.0, 16.0), "top": (16.0, 9.0), "bottom": (16.0, 23.0),
                "center": (16.0, 16.0)}
NUMBER_WORDS = {2: "two", 3: "three"}

# template -> (difficulty, weight); weights give about 30 % easy, 40 % medium, 30 % hard.
TEMPLATES: dict[str, tuple[str, float]] = {
    "background": ("easy", 0.08),
    "single": ("easy", 0.22),
    "positioned": ("medium", 0.16),
    "relation": ("medium", 0.14),
    "count": ("medium", 0.10),
    "glyph": ("hard", 0.15),
    "glyph_relation": ("hard", 0.15),
}
# world v2 (see the module docstring): about 20 % easy, 40 % medium, 40 % hard.
TEMPLATES_V2: dict[str, tuple[str, float]] = {
    "background": ("easy", 0.10),
    "single": ("easy", 0.10),
    "positioned": ("medium", 0.10),
    "relation": ("medium", 0.08),
    "count": ("medium", 0.06),
    "glyph": ("medium", 0.08),
    "grid2": ("medium", 0.08),
    "grid3": ("hard", 0.16),
    "text3": ("hard", 0.16),
    "glyph_relation": ("hard", 0.08),
}
WORLDS: dict[str, dict[str, tuple[str, float]]] = {"v1": TEMPLATES, "v2": TEMPLATES_V2}
_CHOICE = {w: (tuple(t), np.array([p for _, p in t.values()]) / sum(p for _, p in t.values()))
           for w, t in WORLDS.items()}
BACKGROUND_PHRASES_V2 = ("{a} background", "a plain {c} background", "a solid {c} image", "an empty {c} canvas",
                         "a flat {c} field", "nothing but {c}")
GRID_WORDS = {2: "four", 3: "nine"}

_YY, _XX = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) + 0.5  # pixel centres


@dataclass
class Sample:
    """One toy-world sample. `image` is uint8 [32, 32, 3] RGB."""

    image: np.ndarray
    caption: str
    description: dict
    difficulty: str


def caption_split(caption: str) -> str:
    """'eval' for the ~10 % held-out captions, else 'train' (stable across runs and machines)."""
    return "eval" if hashlib.sha1(caption.lower().encode()).digest()[0] % 10 == 0 else "train"


def shape_mask(kind: str, cx: float, cy: float, r: float) -> np.ndarray:
    """Bool mask [32, 32] of a shape of half-extent `r` pixels centred at (cx, cy)."""
    dx, dy = _XX - cx, _YY - cy
    if kind == "circle":
        return dx * dx + dy * dy <= r * r
    if kind == "square":
        return (np.abs(dx) <= r * 0.9) & (np.abs(dy) <= r * 0.9)
    if kind == "diamond":
        return np.abs(dx) + np.abs(dy) <= r * 1.15
    if kind == "triangle":  # apex up
        t = (dy + r) / (2 * r)  # 0 at apex, 1 at base
        return (t >= 0) & (t <= 1) & (np.abs(dx) <= t * r)
    if kind == "cross":
        w = max(r / 2.6, 1.0)
        return ((np.abs(dx) <= w) & (np.abs(dy) <= r)) | ((np.abs(dy) <= w) & (np.abs(dx) <= r))
    raise ValueError(f"unknown shape {kind!r}")


def glyph_mask(ch: str, x0: int, y0: int, scale: int) -> np.ndarray:
    """Bool mask [32, 32] of a glyph scaled by `scale`, top-left corner at integer (x0, y0)."""
    g = np.kron(glyph(ch), np.ones((scale, scale), dtype=bool))
    m = np.zeros((SIZE, SIZE), dtype=bool)
    m[y0:y0 + g.shape[0], x0:x0 + g.shape[1]] = g
    return m


def _bbox(mask: np.ndarray) -> list[int]:
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def _obj(kind, colour, size, position, mask, char=None) -> dict:
    return {"kind": kind, "char": char, "colour": colour, "size": size, "position": position,
            "bbox": _bbox(mask)}


def _a(word: str) -> str:
    """'a red', 'an orange'."""
    return ("an " if word[0] in "aeiou" else "a ") + word


def _pick(rng, seq, exclude=()):
    options = [s for s in seq if s not in exclude]
    return options[int(rng.integers(len(options)))]


def _render(background: str, layers: list[tuple[np.ndarray, str]]) -> np.ndarray:
    img = np.empty((SIZE, SIZE, 3), dtype=np.uint8)
    img[:] = PALETTE[background]
    for mask, colour in layers:
        img[mask] = PALETTE[colour]
    return img


def _glyph_pick(rng) -> tuple[str, str]:
    if rng.random() < 0.6:
        return "letter", LETTERS[int(rng.integers(len(LETTERS)))]
    return "digit", DIGITS[int(rng.integers(len(DIGITS)))]


def grid_edges(n: int) -> list[int]:
    """Cell edges of an n x n grid over the 32-pixel image (3 -> 0, 11, 22, 32)."""
    return [round(i * SIZE / n + (0.49 if n == 3 else 0)) for i in range(n + 1)]


def check_world(world: str) -> str:
    if world not in WORLDS:
        raise ValueError(f"unknown toy world {world!r}; expected one of {', '.join(WORLDS)}")
    return world


_V2_ONLY = ("grid2", "grid3", "text3")


def _v2_content(template: str, rng: np.random.Generator):
    """(background, caption, objects, layers, cells) of world v2's own templates."""
    objects, layers, cells = [], [], None
    if template == "background":
        bg = _pick(rng, tuple(PALETTE))
        phrase = BACKGROUND_PHRASES_V2[int(rng.integers(len(BACKGROUND_PHRASES_V2)))]
        caption = phrase.format(a=_a(bg), c=bg)
    elif template in ("grid2", "grid3"):
        n = 2 if template == "grid2" else 3
        names_ = tuple(PALETTE)
        cells = [[names_[int(rng.integers(len(names_)))] for _ in range(n)] for _ in range(n)]
        bg = cells[0][0]
        e = grid_edges(n)
        for r in range(n):
            for c in range(n):
                m = np.zeros((SIZE, SIZE), dtype=bool)
                m[e[r]:e[r + 1], e[c]:e[c + 1]] = True
                layers.append((m, cells[r][c]))
        caption = f"a grid of {GRID_WORDS[n]}: " + " ".join(c for row in cells for c in row)
    else:  # text3
        bg = _pick(rng, SCENE_BACKGROUNDS)
        c = _pick(rng, OBJECT_COLOURS, (bg,))
        chars = [_glyph_pick(rng)[1] for _ in range(3)]
        y0 = 9 + int(rng.integers(-1, 2))
        for i, ch in enumerate(chars):
            m = glyph_mask(ch, 11 * i, y0, 2)
            objects.append(_obj("digit" if ch.isdigit() else "letter", c, "small", None, m, char=ch))
            layers.append((m, c))
        caption = f"the text {' '.join(chars)} in {c}"
        if rng.random() < 0.3:
            caption += f" on {_a(bg)} background"
    return bg, caption, objects, layers, cells


def _generate(rng: np.random.Generator, world: str = "v1") -> Sample:
    names, p = _CHOICE[world]
    template = names[int(rng.choice(len(names), p=p))]
    difficulty = WORLDS[world][template][0]
    jit = lambda a=1.5: float(rng.uniform(-a, a))  # noqa: E731
    objects, layers, relation, count, cells = [], [], None, None, None

    if template in _V2_ONLY or (template == "background" and world == "v2"):
        bg, caption, objects, layers, cells = _v2_content(template, rng)
    elif template == "background":
        bg = _pick(rng, tuple(PALETTE))
        caption = f"{_a(bg)} background"
    elif template == "single":
        bg = _pick(rng, SCENE_BACKGROUNDS)
        c, kind = _pick(rng, OBJECT_COLOURS, (bg,)), _pick(rng, SHAPES)
        m = shape_mask(kind, 16 + jit(), 16 + jit(), float(rng.uniform(9.0, 11.0)))
        objects.append(_obj(kind, c, "large", "center", m))
        layers.append((m, c))
        caption = f"a large {c} {kind}" if rng.random() < 0.5 else f"{_a(c)} {kind} on {_a(bg)} background"
    elif template == "positioned":
        bg = _pick(rng, SCENE_BACKGROUNDS)
        c, kind, pos = _pick(rng, OBJECT_COLOURS, (bg,)), _pick(rng, SHAPES), _pick(rng, POSITIONS)
        size = "small" if rng.random() < 0.5 else "large"
        r = float(rng.uniform(3.5, 4.5) if size == "small" else rng.uniform(6.5, 7.5))
        x, y = _POSITION_XY[pos]
        m = shape_mask(kind, x + jit(), y + jit(), r)
        objects.append(_obj(kind, c, size, pos, m))
        layers.append((m, c))
        caption = f"a {size} {c} {kind} {POSITION_PHRASE[pos]}"
    elif template == "relation":
        bg = _pick(rng, SCENE_BACKGROUNDS)
        c1 = _pick(rng, OBJECT_COLOURS, (bg,))
        c2 = _pick(rng, OBJECT_COLOURS, (bg, c1))
        k1, k2 = _pick(rng, SHAPES), _pick(rng, SHAPES)
        rel = "above" if rng.random() < 0.5 else "left of"
        (p1, p2) = ("top", "bottom") if rel == "above" else ("left", "right")
        for kind, c, p in ((k1, c1, p1), (k2, c2, p2)):
            r = float(rng.uniform(4.0, 6.0))
            x, y = _POSITION_XY[p]
            m = shape_mask(kind, x + jit(2.5), y + jit(1.0), r)
            objects.append(_obj(kind, c, "small" if r < 5 else "large", p, m))
            layers.append((m, c))
        relation = {"type": rel, "subject": 0, "object": 1}
        caption = f"{_a(c1)} {k1} {rel} {_a(c2)} {k2}"
    elif template == "count":
        bg = _pick(rng, SCENE_BACKGROUNDS)
        c, kind = _pick(rng, OBJECT_COLOURS, (bg,)), _pick(rng, SHAPES)
        count = int(rng.integers(2, 4))
        centres: list[tuple[float, float]] = []
        while len(centres) < count:  # non-overlapping small shapes
            r = 4.0
            x, y = float(rng.uniform(r + 1, SIZE - r - 1)), float(rng.uniform(r + 1, SIZE - r - 1))
            if all((x - a) ** 2 + (y - b) ** 2 >= (2 * r + 2.5) ** 2 for a, b in centres):
                centres.append((x, y))
        for x, y in centres:
            m = shape_mask(kind, x, y, float(rng.uniform(3.5, 4.0)))
            objects.append(_obj(kind, c, "small", None, m))
            layers.append((m, c))
        caption = f"{NUMBER_WORDS[count]} {c} {PLURAL[kind]}"
    elif template == "glyph":
        bg = _pick(rng, SCENE_BACKGROUNDS)
        c = _pick(rng, OBJECT_COLOURS, (bg,))
        kind, ch = _glyph_pick(rng)
        s = 3
        x0 = (SIZE - GLYPH_W * s) // 2 + int(rng.integers(-1, 2))
        y0 = (SIZE - GLYPH_H * s) // 2 + int(rng.integers(-1, 2))
        m = glyph_mask(ch, x0, y0, s)
        objects.append(_obj(kind, c, "large", "center", m, char=ch))
        layers.append((m, c))
        caption = f"the {kind} {ch} in {c}"
        if rng.random() < 0.3:
            caption += f" on {_a(bg)} background"
    elif template == "glyph_relation":
        bg = _pick(rng, SCENE_BACKGROUNDS)
        c1 = _pick(rng, OBJECT_COLOURS, (bg,))
        c2 = _pick(rng, OBJECT_COLOURS, (bg, c1))
        kind, ch = _glyph_pick(rng)
        k2 = _pick(rng, SHAPES)
        rel = "above" if rng.random() < 0.5 else "left of"
        s, r = 2, float(rng.uniform(3.5, 4.5))
        if rel == "above":  # glyph 10x14 in the top half, shape centred near y = 24
            x0, y0 = 11 + int(rng.integers(-2, 3)), 1 + int(rng.integers(0, 2))
            sx, sy = 16 + jit(2.0), 24 + jit(1.0)
            p1, p2 = "top", "bottom"
        else:  # glyph in the left half, shape centred near x = 24
            x0, y0 = 2 + int(rng.integers(0, 3)), 9 + int(rng.integers(-2, 3))
            sx, sy = 24 + jit(1.0), 16 + jit(2.0)
            p1, p2 = "left", "right"
        gm = glyph_mask(ch, x0, y0, s)
        sm = shape_mask(k2, sx, sy, r)
        objects.append(_obj(kind, c1, "small", p1, gm, char=ch))
        objects.append(_obj(k2, c2, "small", p2, sm))
        layers += [(gm, c1), (sm, c2)]
        relation = {"type": rel, "subject": 0, "object": 1}
        caption = f"the {kind} {ch} in {c1} {rel} a small {c2} {k2}"
    else:  # pragma: no cover
        raise AssertionError(template)

    description = {"difficulty": difficulty, "template": template, "background": bg, "objects": objects,
                   "relation": relation, "count": count}
    if cells is not None:
        description["cells"] = cells
    return Sample(_render(bg, layers), caption, description, difficulty)


def sample_at(seed: int, index: int, world: str = "v1") -> Sample:
    """Sample `index` of the stream with `seed` (see the module docstring for the hold-out rule)."""
    if seed < 0 or index < 0:
        raise ValueError("seed and index must be >= 0")
    check_world(world)
    want = "eval" if seed >= EVAL_SEED else "train"
    attempt = 0
    while True:
        s = _generate(np.random.default_rng([seed, index, attempt]), world)
        if caption_split(s.caption) == want:
            return s
        attempt += 1


def stream(seed: int = 0, start: int = 0, world: str = "v1") -> Iterator[Sample]:
    """Endless deterministic stream of samples `start, start+1, ...` for `seed`."""
    i = start
    while True:
        yield sample_at(seed, i, world)
        i += 1


def samples(n: int, seed: int = 0, world: str = "v1") -> list[Sample]:
    """The first `n` samples of the stream for `seed`."""
    if n < 0:
        raise ValueError("n must be >= 0")
    return [sample_at(seed, i, world) for i in range(n)]


def captions(n: int, seed: int = 0, world: str = "v1") -> list[tuple[str, str]]:
    """(caption, difficulty) of the first `n` samples for `seed`; seed >= EVAL_SEED gives held-out captions."""
    return [(s.caption, s.difficulty) for s in samples(n, seed, world)]
