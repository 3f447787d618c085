"""Shapes: a procedural compositional image-text set, deterministic by (seed, index), at any size and aspect ratio.

Each scene holds 1-4 flat shapes of a few colours on white, in one of GenEval's six categories (single object, two
objects, counting, colours, position, colour attribution). The `scene` column is the exact ground truth, as JSON:

    {"tag": "position", "height": 32, "width": 32,
     "objects": [{"shape": "circle", "color": "red", "x": 0.3, "y": 0.25, "size": 0.3}, ...],
     "include": [{"shape": "circle", "color": "red", "count": 1, "position": ["above", 1]},
                 {"shape": "square", "color": "blue", "count": 1}]}

- objects: what was drawn. x, y: the centre as fractions of width and height; size: the side of the object's
  bounding square as a fraction of min(height, width). Circles, squares, triangles (apex up) and diamonds fill
  that square. Colours are exactly `COLORS[name]` inside each shape.
- include: what the caption asserts, in GenEval's form: each entry needs `count` objects of that shape (and colour,
  when given); `"position": [relation, j]` says every such object lies `relation` the objects of entry j, with
  the bounding boxes strictly apart along that axis (so the relation holds for boxes, not only for centres).

Images are rendered at one of the configured sizes (the fixed size, or a bucket), so resizing never crops and the
fractions stay exact. Horizontal flips would break "left of"/"right of", so configs refuse data.hflip here.
"""
from __future__ import annotations

import json
from collections.abc import Iterator

import numpy as np
from PIL import Image, ImageDraw

from tim_ray.data.records import DataError, RawSample

SHAPES = ("circle", "square", "triangle", "diamond")
COLORS = {"red": (220, 38, 38), "green": (22, 163, 74), "blue": (37, 99, 235), "yellow": (234, 179, 8)}
BACKGROUND = (255, 255, 255)
TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
RELATIONS = {"left of": (0, -1), "right of": (0, 1), "above": (1, -1), "below": (1, 1)}  # (axis, sign) vs other
NUMBER_WORDS = {1: "a", 2: "two", 3: "three", 4: "four"}
DEFAULT_COUNT = 10_000  # rows when data.max_samples is 0: the set is infinite
ROWS_PER_UNIT = 1000
SIZE_RANGE = (0.22, 0.34)  # object side, as a fraction of the canvas' short side
GAP = 0.03  # minimum space between bounding boxes, same unit
SUPERSAMPLE = 4  # render larger and downsample: anti-aliased edges, exact colours inside


def _phrase(entry: dict) -> str:
    count = entry["count"]
    noun = entry["shape"] + ("s" if count > 1 else "")
    words = [NUMBER_WORDS[count]] + ([entry["color"]] if "color" in entry else []) + [noun]
    return " ".join(words)


def caption_of(include: list[dict]) -> str:
    """The caption a scene's `include` asserts, e.g. 'a red circle above a blue square'."""
    first = _phrase(include[0])
    if "position" in include[0]:
        return f"{first} {include[0]['position'][0]} {_phrase(include[1])}"
    return " and ".join([first] + [_phrase(e) for e in include[1:]])


def captions_of(scene: dict) -> list[str]:
    caption = caption_of(scene["include"])
    return [f"a photo of {caption}", caption]


def _include(tag: str, rng: np.random.Generator) -> list[dict]:
    """What the caption will assert, per GenEval category."""
    colors = list(COLORS)
    shapes = [str(s) for s in rng.choice(SHAPES, size=2, replace=False)]
    pair = [str(c) for c in rng.choice(colors, size=2, replace=False)]
    if tag == "single_object":
        return [{"shape": shapes[0], "count": 1}]
    if tag == "two_object":
        return [{"shape": shapes[0], "count": 1}, {"shape": shapes[1], "count": 1}]
    if tag == "counting":
        return [{"shape": shapes[0], "color": pair[0], "count": int(rng.integers(2, 5))}]
    if tag == "colors":
        return [{"shape": shapes[0], "color": pair[0], "count": 1}]
    first = {"shape": shapes[0], "color": pair[0], "count": 1}
    second = {"shape": shapes[1], "color": pair[1], "count": 1}
    if tag == "position":
        first["position"] = [str(rng.choice(list(RELATIONS))), 1]
    return [first, second]


def _boxes_apart(a: dict, b: dict, axis: int, gap: float, aspect: tuple[float, float]) -> float:
    """Signed free space between two boxes along `axis` (positive: b is after a), in short-side units."""
    centre = "xy"[axis]
    half_a, half_b = a["size"] / 2, b["size"] / 2
    return (b[centre] - a[centre]) * aspect[axis] - half_a - half_b - gap


def _placement_ok(objects: list[dict], include: list[dict], aspect: tuple[float, float]) -> bool:
    for i, a in enumerate(objects):
        for b in objects[i + 1:]:
            if max(_boxes_apart(a, b, 0, GAP, aspect), _boxes_apart(b, a, 0, GAP, aspect),
                   _boxes_apart(a, b, 1, GAP, aspect), _boxes_apart(b, a, 1, GAP, aspect)) < 0:
                return False
    if "position" in include[0]:
        relation, _ = include[0]["position"]
        axis, sign = RELATIONS[relation]
        first, second = objects[0], objects[1]
        return _boxes_apart(*((first, second) if sign < 0 else (second, first)), axis, GAP, aspect) >= 0
    return True


def _place(include: list[dict], height: int, width: int, rng: np.random.Generator) -> list[dict]:
    """Objects for `include`, non-overlapping, positions on a 1e-4 grid (what the JSON stores exactly)."""
    short = min(height, width)
    aspect = (width / short, height / short)  # canvas extent in short-side units, per axis (x, y)
    kinds = [{k: e[k] for k in ("shape", "color") if k in e} for e in include for _ in range(e["count"])]
    scale = 1.0
    while True:  # shrink until it fits; four objects always fit at the smallest scale
        for _ in range(200):
            objects = []
            for kind in kinds:
                size = round(float(rng.uniform(*SIZE_RANGE)) * scale, 4)
                x, y = (round(float(rng.uniform(size / 2 / a, 1 - size / 2 / a)), 4) for a in aspect)
                color = kind.get("color") or str(rng.choice(list(COLORS)))
                objects.append({"shape": kind["shape"], "color": color, "x": x, "y": y, "size": size})
            if _placement_ok(objects, include, aspect):
                return objects
        scale *= 0.8


def scene(seed: int, index: int, sizes: tuple[tuple[int, int], ...]) -> dict:
    """Scene `index` of the set with this `seed`; the category cycles so every category has the same share."""
    rng = np.random.default_rng([seed, index])
    tag = TAGS[index % len(TAGS)]
    height, width = sizes[int(rng.integers(len(sizes)))]
    include = _include(tag, rng)
    objects = _place(include, height, width, rng)
    return {"tag": tag, "height": height, "width": width, "objects": objects, "include": include}


def _outline(shape: str, box: tuple[float, float, float, float]) -> list[tuple[float, float]]:
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if shape == "triangle":
        return [(cx, y0), (x1, y1), (x0, y1)]
    return [(cx, y0), (x1, cy), (cx, y1), (x0, cy)]  # diamond


def render(spec: dict) -> np.ndarray:
    """uint8 (height, width, 3) image of a scene."""
    s = SUPERSAMPLE
    height, width = spec["height"], spec["width"]
    canvas = Image.new("RGB", (width * s, height * s), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    short = min(height, width) * s
    for obj in spec["objects"]:
        cx, cy, half = obj["x"] * width * s, obj["y"] * height * s, obj["size"] * short / 2
        box = (cx - half, cy - half, cx + half, cy + half)
        fill = COLORS[obj["color"]]
        if obj["shape"] == "circle":
            draw.ellipse(box, fill=fill)
        elif obj["shape"] == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon(_outline(obj["shape"], box), fill=fill)
    return np.asarray(canvas.resize((width, height), Image.Resampling.BOX))


class ShapesSource:
    """The procedural shapes set: reading (rendering), its settings, its metric (every caption checked)."""

    name = "shapes"
    needs_path = False
    grey = False
    num_classes = None
    metrics = ("shapes",)  # needs text conditioning: it scores how well images follow their captions

    @staticmethod
    def check(cfg) -> None:
        if cfg.data.hflip:
            raise DataError("data.hflip would mirror the left/right relations that shapes captions state; "
                            "set data.hflip = false")

    def __init__(self, seed: int, sizes: tuple[tuple[int, int], ...], max_samples: int):
        self.seed, self.sizes = seed, sizes
        self.count = max_samples or DEFAULT_COUNT

    def units(self) -> list[dict]:
        return [{"name": f"shapes/{self.seed}", "first_row": s, "rows": min(ROWS_PER_UNIT, self.count - s)}
                for s in range(0, self.count, ROWS_PER_UNIT)]

    def read(self, unit: dict) -> Iterator[RawSample]:
        for index in range(unit["first_row"], unit["first_row"] + unit["rows"]):
            spec = scene(self.seed, index, self.sizes)
            yield RawSample(sample_id=index, key=f"shapes/{self.seed}/{index}", image=render(spec),
                            captions=captions_of(spec), scene=json.dumps(spec, sort_keys=True))
