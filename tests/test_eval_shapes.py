"""The shapes detector and GenEval-style scorer, validated on the source's own renders: true captions score ~100% at
every size, the same images with other captions score at chance, and each rule (count, colour, position) can fail."""
import copy

import numpy as np
import pytest

from tim_ray.data.sources.shapes import TAGS, render, scene
from tim_ray.eval.shapes_score import detect, judge, shapes_scores

SEED = 11


def scenes_and_images(count, sizes):
    scenes = [scene(SEED, i, sizes) for i in range(count)]
    return scenes, [render(s) for s in scenes]


@pytest.mark.parametrize("sizes", [((32, 32),), ((24, 40), (40, 24)), ((64, 64),)])
def test_true_captions_score_full_marks_in_every_category(sizes):
    scenes, images = scenes_and_images(120, sizes)
    scores = shapes_scores(images, scenes)
    assert set(scores) == {"shapes", *(f"shapes.{tag}" for tag in TAGS)}
    assert scores["shapes"] >= 0.98, scores
    assert min(scores.values()) >= 0.95, scores


def test_other_captions_for_the_same_images_score_low():
    scenes, images = scenes_and_images(120, ((32, 32),))
    for shift in (1, 6):  # 6 keeps each image's category, so only the caption's content is wrong
        wrong = scenes[shift:] + scenes[:shift]
        assert shapes_scores(images, wrong)["shapes"] < 0.2


def test_detections_match_what_was_drawn():
    for i in range(60):
        spec = scene(SEED, i, ((32, 32),))
        found = sorted((o.shape, o.color) for o in detect(render(spec)))
        assert found == sorted((o["shape"], o["color"]) for o in spec["objects"]), spec


def test_scores_survive_pixel_noise():
    scenes, images = scenes_and_images(120, ((32, 32),))
    images = np.stack(images)
    noisy = np.clip(images + np.random.default_rng(0).normal(0, 10, images.shape), 0, 255).astype(np.uint8)
    assert shapes_scores(noisy, scenes)["shapes"] >= 0.95


def _first(tag):
    return next(s for s in (scene(SEED, i, ((32, 32),)) for i in range(60)) if s["tag"] == tag)


def test_each_rule_can_fail():
    position = _first("position")
    objects = detect(render(position))
    assert judge(objects, "position", position["include"])[0]
    flipped = copy.deepcopy(position["include"])
    opposite = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
    flipped[0]["position"][0] = opposite[flipped[0]["position"][0]]
    assert judge(objects, "position", flipped) == (False, f"{flipped[0]['shape']} not {flipped[0]['position'][0]} "
                                                          f"{flipped[1]['shape']}")

    counting = _first("counting")
    objects = detect(render(counting))
    more = copy.deepcopy(counting["include"])
    more[0]["count"] += 1
    assert not judge(objects, "counting", more)[0]
    fewer = copy.deepcopy(counting["include"])
    fewer[0]["count"] -= 1  # GenEval's counting is exact: one object too many fails as well
    assert judge(objects, "counting", fewer)[1].startswith("expected exactly")

    colors = _first("colors")
    objects = detect(render(colors))
    recoloured = copy.deepcopy(colors["include"])
    recoloured[0]["color"] = next(c for c in ("red", "green", "blue", "yellow") if c != recoloured[0]["color"])
    assert not judge(objects, "colors", recoloured)[0]


def test_a_blank_image_has_no_objects():
    assert detect(np.full((32, 32, 3), 255, np.uint8)) == []
    spec = _first("single_object")
    assert shapes_scores(np.full((1, 32, 32, 3), 255, np.uint8), [spec])["shapes"] == 0.0
