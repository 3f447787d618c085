"""`tim-ray sample`: one PNG per image, a grid (one column per prompt or label, one row per image of it) and
samples.json saying how every image was made. The same request and seed give the same bytes."""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image

from tim_ray.config import Config, ConfigError, SampleConfig
from tim_ray.eval.generate import ConditionError, ImagePipeline
from tim_ray.eval.grid import grid_image, to_uint8

MANIFEST = "samples.json"
GRID = "grid.png"


@dataclass
class SampleRequest:
    prompts: list[str]  # text models; empty for class models
    labels: list[int]  # class models; empty for text models
    per_condition: int
    height: int
    width: int
    config: SampleConfig  # nfe, cfg_scale, cfg_interval, stochasticity, seed, ...
    batch_size: int = 16


def default_conditions(cfg: Config) -> tuple[list[str], list[int]]:
    """(prompts, labels) when the command line gives none: every class of a class-conditional model; for a text
    model eval.prompts, else one prompt per class of Fashion-MNIST when it was trained on that."""
    if cfg.model.conditioning == "class":
        return [], list(range(cfg.model.num_classes))
    if cfg.eval.prompts:
        return list(cfg.eval.prompts), []
    if cfg.data.source == "fashion-mnist":
        from tim_ray.data.sources.fashion_mnist import class_prompts  # here: tim_ray.data loads Ray Data

        return class_prompts(range(10)), []
    raise ConditionError("this checkpoint is text-conditional and its config has no eval.prompts: give --prompt "
                         "or --prompts")


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "empty"


def save_png(image: torch.Tensor, path: Path) -> None:
    """One (C, H, W) image in [-1, 1] as a PNG: grey for one channel, RGB for three."""
    pixels = to_uint8(image)
    Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(path)


def write_samples(pipeline: ImagePipeline, request: SampleRequest, out: str | Path) -> dict:
    """Draw per_condition images of every prompt/label and write them under `out`; returns the manifest."""
    out = Path(out)
    if (out / MANIFEST).exists():
        raise ConfigError(f"'{out}' already holds samples ({MANIFEST}); choose another --out")
    names = request.prompts or [f"class {label}" for label in request.labels]
    count = len(names) * request.per_condition
    # Row-major: image i is copy i // n of condition i % n, so the grid has one column per condition.
    cond, uncond = pipeline.conditions(request.prompts * request.per_condition,
                                       request.labels * request.per_condition)
    noise = pipeline.noise(count, request.height, request.width, request.config.seed)
    images = pipeline.generate(cond, uncond, noise, request.config.nfe, request.config, request.batch_size)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for i, image in enumerate(images):
        name = f"{i:03d}_{_slug(names[i % len(names)])}.png"
        save_png(image, out / name)
        files.append({"file": name, "condition": names[i % len(names)], "copy": i // len(names)})
    rows = images.reshape(request.per_condition, len(names), *images.shape[1:])
    grid_image(rows, [f"#{k + 1}" for k in range(request.per_condition)], margin=24).save(out / GRID)
    loaded = pipeline.loaded
    manifest = {"checkpoint": str(loaded.source), "step": loaded.state.step, "weights": loaded.weights,
                "height": request.height, "width": request.width, "sample": asdict(request.config),
                "batch_size": request.batch_size, "images": files, "grid": GRID}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest
