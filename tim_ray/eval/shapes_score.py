"""The `shapes` metric: a deterministic detector for the synthetic shapes set, scored like GenEval.

Detection (no learned parts): every pixel takes the nearest colour of the set's palette (white background, red,
green, blue, yellow); each colour's 8-connected components larger than MIN_OBJECT_SHARE of the short side squared
are objects. An object's shape is the template (circle, square, triangle, diamond, rendered by the source's own
renderer at the object's size) with the highest IoU against its mask.

Scoring (GenEval's rules, on the `include` ground truth of each caption, tim_ray.data.sources.shapes):
- every entry needs at least `count` objects of its shape (and colour, when the entry names one);
- counting: exactly `count` objects of the shape (GenEval excludes count + 1);
- position: the largest matching object of the entry lies `relation` the largest one of entry j, its bounding box
  apart along that axis (POSITION_TOLERANCE pixels of overlap allowed for anti-aliased edges).
An image is correct when all of this holds; the score is the mean of the per-category accuracies, as GenEval's.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tim_ray.data.sources.shapes import BACKGROUND, COLORS, RELATIONS, SHAPES, TAGS, render

PALETTE_NAMES = ("background", *COLORS)
PALETTE = np.array([BACKGROUND, *COLORS.values()], dtype=np.float32)
MIN_OBJECT_SHARE = 0.008  # a third of the smallest object the source draws (a triangle of side 0.22)
MAX_BLEND_RESIDUAL = 40.0  # RMS over channels, in 0..255 units: farther from every colour blend = background
IDEAL_FILL = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5, "diamond": 0.5}  # area / bounding square
POSITION_TOLERANCE = 1.0  # pixels


@dataclass(frozen=True)
class DetectedObject:
    shape: str
    color: str
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels, x1/y1 exclusive
    area: int


def blend_fit(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Explain each pixel of an (H, W, 3) uint8 image as a blend α·colour + (1 - α)·background, which is what
    anti-aliased edges are. Returns (index into PALETTE_NAMES of the colour whose blend fits best, its α), both
    (H, W); pixels that no blend explains get index 0 (background) and α 0."""
    pixels = image[..., None, :].astype(np.float32) - PALETTE[0]  # (H, W, 1, 3), relative to the background
    directions = PALETTE[1:] - PALETTE[0]  # (K, 3)
    alpha = np.clip((pixels * directions).sum(-1) / (directions ** 2).sum(-1), 0.0, 1.0)  # (H, W, K)
    residual = ((pixels - alpha[..., None] * directions) ** 2).mean(-1)
    best = residual.argmin(-1)
    fits = residual.min(-1) <= MAX_BLEND_RESIDUAL ** 2
    best_alpha = np.take_along_axis(alpha, best[..., None], -1)[..., 0]
    return np.where(fits, best + 1, 0), np.where(fits, best_alpha, 0.0)


def _coverage(shape: str, centre: tuple[float, float], size: float, height: int, width: int) -> np.ndarray:
    """How much of each pixel of a height x width canvas the ideal `shape` covers, drawn by the source's renderer."""
    spec = {"height": height, "width": width, "objects": [
        {"shape": shape, "color": "red", "x": centre[0] / width, "y": centre[1] / height,
         "size": size / min(height, width)}]}
    red, white = COLORS["red"][1], BACKGROUND[1]
    return (white - render(spec)[..., 1].astype(np.float32)) / (white - red)


def _classify(coverage: np.ndarray) -> str:
    """The shape whose ideal drawing best explains an object's coverage map (its α over its box plus a pixel of
    margin): each candidate is placed at the coverage's centroid with the size its area implies, rendered, and
    compared by squared error. Coverage keeps the sub-pixel edges, so this works down to ~6-pixel objects."""
    height, width = coverage.shape
    area = coverage.sum()
    ys, xs = np.mgrid[0:height, 0:width] + 0.5
    cx, cy = (coverage * xs).sum() / area, (coverage * ys).sum() / area

    def error(shape: str) -> float:
        size = float(np.sqrt(area / IDEAL_FILL[shape]))
        # A triangle (apex up) has its centroid size/6 below its box centre; the others at the centre.
        centre = (cx, cy - size / 6 if shape == "triangle" else cy)
        return float(((_coverage(shape, centre, size, height, width) - coverage) ** 2).sum())

    return min(SHAPES, key=error)


def detect(image: np.ndarray) -> list[DetectedObject]:
    """The objects in an (H, W, 3) uint8 image."""
    from scipy import ndimage

    colours, alpha = blend_fit(image)
    min_area = max(3, MIN_OBJECT_SHARE * min(image.shape[:2]) ** 2)
    objects = []
    for colour_index, colour in enumerate(PALETTE_NAMES[1:], start=1):
        # An object is a connected region of pixels this colour covers by at least half.
        labels, _ = ndimage.label((colours == colour_index) & (alpha >= 0.5), structure=np.ones((3, 3)))
        for k, (ys, xs) in enumerate(ndimage.find_objects(labels), start=1):
            area = int((labels[ys, xs] == k).sum())
            if area < min_area:
                continue
            # One pixel of margin takes in the edge pixels this colour covers by less than half.
            y0, y1 = max(ys.start - 1, 0), min(ys.stop + 1, image.shape[0])
            x0, x1 = max(xs.start - 1, 0), min(xs.stop + 1, image.shape[1])
            mine = (colours[y0:y1, x0:x1] == colour_index) & np.isin(labels[y0:y1, x0:x1], (0, k))
            coverage = np.where(mine, alpha[y0:y1, x0:x1], 0.0)
            objects.append(DetectedObject(_classify(coverage), colour, (xs.start, ys.start, xs.stop, ys.stop), area))
    return objects


def _holds(a: DetectedObject, relation: str, b: DetectedObject) -> bool:
    """a `relation` b with the boxes apart along the relation's axis (RELATIONS: axis 0 = x, sign -1 = a first)."""
    axis, sign = RELATIONS[relation]
    first, second = (a, b) if sign < 0 else (b, a)
    return first.box[axis + 2] <= second.box[axis] + POSITION_TOLERANCE


def judge(objects: list[DetectedObject], tag: str, include: list[dict]) -> tuple[bool, str]:
    """(correct, reason) of one image against its caption's `include` entries."""
    chosen = []
    for entry in include:
        same_shape = [o for o in objects if o.shape == entry["shape"]]
        matching = [o for o in same_shape if entry.get("color") in (None, o.color)]
        what = f"{entry.get('color', '')} {entry['shape']}".strip()
        if len(matching) < entry["count"]:
            return False, f"expected {entry['count']} {what}, found {len(matching)}"
        if tag == "counting" and len(same_shape) != entry["count"]:
            return False, f"expected exactly {entry['count']} {entry['shape']}, found {len(same_shape)}"
        chosen.append(sorted(matching, key=lambda o: -o.area)[:entry["count"]])
    for entry, objs in zip(include, chosen):
        if "position" in entry:
            relation, target = entry["position"]
            if not all(_holds(a, relation, b) for a in objs for b in chosen[target]):
                return False, f"{entry['shape']} not {relation} {include[target]['shape']}"
    return True, "ok"


def shapes_scores(images: np.ndarray, scenes: list[dict]) -> dict[str, float]:
    """{"shapes": mean of per-category accuracies, "shapes.<tag>": accuracy of each category present} for
    (N, H, W, 3) uint8 images and the scenes (tag, include) their captions came from."""
    per_tag: dict[str, list[bool]] = {}
    for image, scene in zip(images, scenes):
        correct, _ = judge(detect(image), scene["tag"], scene["include"])
        per_tag.setdefault(scene["tag"], []).append(correct)
    scores = {f"shapes.{tag}": float(np.mean(per_tag[tag])) for tag in TAGS if tag in per_tag}
    return {"shapes": float(np.mean(list(scores.values()))), **scores}
