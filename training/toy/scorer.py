"""A deterministic scorer for toy-world images (no learning): colour match and position match.

Every pixel is classified to its nearest named colour of the palette (RGB distance). The background is
estimated from the image itself (most common class on the 1-pixel border), so a generated image is not
penalised for a background the caption did not ask for, and background pixels are ignored.

- colour: the dominant non-background class inside the main object's box (grown by `margin` pixels) must
  be the described colour, with at least `min_pixels` such pixels. For a plain-background caption the
  dominant class of the whole image must be the described background colour.
- grids (world v2, `cells` in the description): colour = every cell's dominant class (inside the cell,
  `margin` pixels in from its edges) is the cell's named colour; position None.
- position: the centroid of all pixels of the main object's colour must lie in the described region
  (left: x < 13, right: x > 19, top: y < 13, bottom: y > 19, center: 11 <= x, y <= 21); for a relation,
  the subject's colour centroid must be above / left of the object's colour centroid by >= 3 pixels.
  None when the caption says nothing about position (counts, plain backgrounds).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .world import PALETTE, SIZE, grid_edges

_NAMES = tuple(PALETTE)
_RGB = np.array([PALETTE[n] for n in _NAMES], dtype=np.float32)  # [C, 3]


@dataclass
class Score:
    colour: bool
    position: bool | None  # None = the caption does not constrain position


def classify(image: np.ndarray) -> np.ndarray:
    """Nearest palette colour index per pixel. image uint8 [H, W, 3] -> int [H, W] (index into PALETTE)."""
    x = np.asarray(image, dtype=np.float32)[..., None, :]  # [H, W, 1, 3]
    return np.argmin(((x - _RGB) ** 2).sum(-1), axis=-1)


def _mode(values: np.ndarray) -> int:
    return int(np.bincount(values.ravel(), minlength=len(_NAMES)).argmax())


def _centroid(mask: np.ndarray) -> tuple[float, float] | None:
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    return float(xs.mean()) + 0.5, float(ys.mean()) + 0.5


def _in_region(c: tuple[float, float], position: str) -> bool:
    x, y = c
    return {"left": x < 13, "right": x > 19, "top": y < 13, "bottom": y > 19,
            "center": 11 <= x <= 21 and 11 <= y <= 21}[position]


def score(image: np.ndarray, description: dict, margin: int = 2, min_pixels: int = 4) -> Score:
    """Score one uint8 [H, W, 3] image against its toy-world description."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected an [H, W, 3] image, got shape {image.shape}")
    cls = classify(image)
    if description.get("cells"):
        return Score(colour=_grid_ok(cls, description["cells"], margin), position=None)
    objects = description["objects"]
    if not objects:  # plain background
        return Score(colour=_NAMES[_mode(cls)] == description["background"], position=None)

    border = np.concatenate([cls[0], cls[-1], cls[1:-1, 0], cls[1:-1, -1]])
    bg = _mode(border)
    main = objects[0]
    want = _NAMES.index(main["colour"])
    h, w = cls.shape
    x0, y0, x1, y1 = main["bbox"]
    box = cls[max(0, y0 - margin):min(h, y1 + margin), max(0, x0 - margin):min(w, x1 + margin)]
    fg = box[box != bg]
    colour_ok = bool(fg.size >= min_pixels and _mode(fg) == want
                     and np.count_nonzero(fg == want) >= min_pixels)

    relation = description.get("relation")
    if relation is not None:
        sub = _centroid((cls == want) & (cls != bg))
        other_colour = _NAMES.index(objects[relation["object"]]["colour"])
        obj = _centroid((cls == other_colour) & (cls != bg))
        if sub is None or obj is None:
            position_ok = False
        elif relation["type"] == "above":
            position_ok = sub[1] <= obj[1] - 3
        else:
            position_ok = sub[0] <= obj[0] - 3
    elif main.get("position"):
        c = _centroid((cls == want) & (cls != bg))
        position_ok = c is not None and _in_region(c, main["position"])
    else:
        position_ok = None
    return Score(colour=colour_ok, position=position_ok)


def _grid_ok(cls: np.ndarray, cells: list[list[str]], margin: int) -> bool:
    n = len(cells)
    e = [round(v * cls.shape[0] / SIZE) for v in grid_edges(n)]
    for r in range(n):
        for c in range(n):
            inner = cls[e[r] + margin:e[r + 1] - margin, e[c] + margin:e[c + 1] - margin]
            if _mode(inner) != _NAMES.index(cells[r][c]):
                return False
    return True


def score_many(images, descriptions) -> dict:
    """Rates over a batch: {"colour": float, "position": float | None, "n": int, "n_position": int}."""
    scores = [score(im, d) for im, d in zip(images, descriptions, strict=True)]
    pos = [s.position for s in scores if s.position is not None]
    return {"colour": float(np.mean([s.colour for s in scores])) if scores else float("nan"),
            "position": float(np.mean(pos)) if pos else None,
            "n": len(scores), "n_position": len(pos)}
