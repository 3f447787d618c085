"""Shapes: deterministic by seed; what the caption says is exactly what the ground truth holds and what is drawn."""
import re
from collections import Counter

import numpy as np

from tim_ray.data.geometry import bucket_sizes
from tim_ray.data.sources.shapes import COLORS, RELATIONS, SHAPES, TAGS, captions_of, render, scene

SIZES = bucket_sizes(64, 64, 8, 3.0)
NUMBERS = {"a": 1, "two": 2, "three": 3, "four": 4}
PHRASE = (rf"(?P<n{{i}}>a|two|three|four) (?:(?P<c{{i}}>{'|'.join(COLORS)}) )?"
          rf"(?P<s{{i}}>{'|'.join(SHAPES)})s?")
RELATION = "|".join(RELATIONS)
GRAMMAR = re.compile(rf"a photo of {PHRASE.format(i=0)}(?:(?: and | (?P<rel>{RELATION}) ){PHRASE.format(i=1)})?")


def parse(caption: str) -> tuple[list[dict], str | None]:
    """Independent reading of a caption: ([{count, shape, color?}], relation of the first group to the second)."""
    match = GRAMMAR.fullmatch(caption)
    assert match, caption
    groups = [{"count": NUMBERS[match[f"n{i}"]], "shape": match[f"s{i}"], "color": match[f"c{i}"]}
              for i in (0, 1) if match[f"s{i}"]]
    return groups, match["rel"]


def box(obj: dict, spec: dict) -> tuple[float, float, float, float]:
    """Pixel bounding box (x0, y0, x1, y1)."""
    half = obj["size"] * min(spec["height"], spec["width"]) / 2
    cx, cy = obj["x"] * spec["width"], obj["y"] * spec["height"]
    return cx - half, cy - half, cx + half, cy + half


def holds(relation: str, a: tuple, b: tuple) -> bool:
    return {"left of": a[2] < b[0], "right of": a[0] > b[2], "above": a[3] < b[1], "below": a[1] > b[3]}[relation]


def test_scenes_are_deterministic_by_seed():
    assert scene(5, 17, SIZES) == scene(5, 17, SIZES)
    assert np.array_equal(render(scene(5, 17, SIZES)), render(scene(5, 17, SIZES)))
    assert [scene(5, i, SIZES) for i in range(20)] != [scene(6, i, SIZES) for i in range(20)]


def check_against_caption(spec: dict) -> None:
    groups, relation = parse(captions_of(spec)[0])
    assert captions_of(spec)[1] == captions_of(spec)[0].removeprefix("a photo of ")
    objects = spec["objects"]
    assert len(objects) == sum(g["count"] for g in groups) and 1 <= len(objects) <= 4
    for group in groups:  # exactly `count` objects of that shape (and colour, when the caption names one)
        matching = [o for o in objects if o["shape"] == group["shape"]
                    and (group["color"] is None or o["color"] == group["color"])]
        assert len(matching) == group["count"]
    boxes = [box(o, spec) for o in objects]
    for i, a in enumerate(boxes):  # inside the canvas, never overlapping
        assert a[0] >= 0 and a[1] >= 0 and a[2] <= spec["width"] + 1e-9 and a[3] <= spec["height"] + 1e-9
        for b in boxes[i + 1:]:
            assert any(holds(r, a, b) for r in RELATIONS)
    if relation:
        first, second = (next(boxes[i] for i, o in enumerate(objects) if o["shape"] == g["shape"]) for g in groups)
        assert holds(relation, first, second)


def test_the_caption_matches_the_ground_truth():
    for index in range(300):
        spec = scene(0, index, SIZES)
        assert spec["tag"] == TAGS[index % len(TAGS)] and (spec["height"], spec["width"]) in SIZES
        check_against_caption(spec)


def test_categories_come_in_equal_shares_and_include_states_the_caption():
    specs = [scene(1, i, SIZES) for i in range(600)]
    assert Counter(s["tag"] for s in specs) == Counter({tag: 100 for tag in TAGS})
    position = next(s for s in specs if s["tag"] == "position")
    assert position["include"][0]["position"][1] == 1


def test_rendered_pixels_match_the_spec():
    for index in range(60):
        spec = scene(2, index, SIZES)
        image = render(spec)
        assert image.shape == (spec["height"], spec["width"], 3)
        for obj in spec["objects"]:
            x, y = int(obj["x"] * spec["width"]), int(obj["y"] * spec["height"])
            assert tuple(image[y, x]) == COLORS[obj["color"]], (index, obj)
        drawn = (image != 255).any(-1).sum()
        assert drawn < 0.6 * image.shape[0] * image.shape[1]  # the rest is white background
