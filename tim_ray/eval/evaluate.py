"""`tim-ray eval`: score one checkpoint at several step counts.

Every NFE starts from the same noise and the same conditions, so the rows differ only by the number of steps.
Conditions come from what the checkpoint was trained on: Fashion-MNIST → prompts (or labels) cycling over the ten
classes; shapes → captions of fresh scenes (their ground truth scores the images); any other source → eval.prompts.
Metrics (docs/evaluation.md says how each was validated):
  fid, kid            Fashion-MNIST test split vs samples, features of our trained classifier (tim_ray.eval.fashion)
  class_agreement     share of samples the classifier assigns to the class they were asked for
  fid_inception, kid_inception   the same with a user-supplied TorchScript Inception (--inception PATH)
  shapes              GenEval-style detector score on the shapes set (tim_ray.eval.shapes_score)
  consistency         one jump vs two jumps (tim_ray.eval.consistency); independent of NFE, computed once
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from tim_ray.config import ConfigError, SampleConfig
from tim_ray.data.sources import check_metric, source_class
from tim_ray.data.sources.fashion_mnist import class_prompts
from tim_ray.eval.generate import ImagePipeline, slice_conditions

FASHION_METRICS = ("fid", "kid", "class_agreement")
INCEPTION_METRICS = ("fid_inception", "kid_inception")
METRICS = (*FASHION_METRICS, *INCEPTION_METRICS, "shapes", "consistency")
LOWER_IS_BETTER = {"fid", "kid", "fid_inception", "kid_inception", "consistency"}
EVAL_SCENE_SEED = 1_000_003  # shapes scenes for evaluation: a seed no default training run uses
REFERENCE_IMAGES = 10_000  # the whole Fashion-MNIST test split
CONSISTENCY_SAMPLES = 64
GRID_COLUMNS = 10


@dataclass
class EvalRequest:
    nfe: list[int]
    metrics: list[str]
    num_samples: int
    seed: int
    sample: SampleConfig
    batch_size: int = 16
    inception: str | None = None  # a TorchScript feature network for fid_inception / kid_inception
    feature_cache: str | None = None  # where the Fashion-MNIST feature network is cached (default: user cache)


@dataclass
class EvalTargets:
    """The conditions of the samples and what scores them."""

    prompts: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)  # conditioning labels of a class model
    classes: list[int] = field(default_factory=list)  # Fashion-MNIST class each sample should show
    scenes: list[dict] = field(default_factory=list)  # shapes ground truth per sample


def check_request(request: EvalRequest, cfg) -> None:
    unknown = [m for m in request.metrics if m not in METRICS]
    if unknown:
        raise ConfigError(f"unknown metric {', '.join(unknown)}; choose from {', '.join(METRICS)}")
    if not request.nfe or any(n <= 0 for n in request.nfe):
        raise ConfigError(f"--nfe needs positive step counts, got {request.nfe}")
    if request.num_samples < 2:
        raise ConfigError(f"--num-samples must be at least 2, got {request.num_samples}")
    for metric in request.metrics:
        if metric != "consistency":  # the one metric of the model alone, whatever its data
            check_metric(cfg, metric, "metric")
    if any(m in INCEPTION_METRICS for m in request.metrics) and not request.inception:
        raise ConfigError("fid_inception/kid_inception need --inception PATH (a TorchScript Inception)")
    classes = source_class(cfg.data.source).num_classes  # scoring compares with the source's own classes
    if cfg.model.conditioning == "class" and classes and cfg.model.num_classes != classes:
        raise ConfigError(f"a class-conditional {cfg.data.source} model must have {classes} classes, got "
                          f"{cfg.model.num_classes}")


def eval_targets(cfg, count: int) -> EvalTargets:
    if cfg.data.source == "fashion-mnist":
        classes = [i % 10 for i in range(count)]
        if cfg.model.conditioning == "class":
            return EvalTargets(labels=classes, classes=classes)
        return EvalTargets(prompts=class_prompts(classes), classes=classes)
    if cfg.data.source == "shapes" and cfg.model.conditioning == "text":
        from tim_ray.data.sources.shapes import captions_of, scene

        scenes = [scene(EVAL_SCENE_SEED, i, ((cfg.data.height, cfg.data.width),)) for i in range(count)]
        return EvalTargets(prompts=[captions_of(s)[0] for s in scenes], scenes=scenes)
    if cfg.model.conditioning == "class":
        return EvalTargets(labels=[i % cfg.model.num_classes for i in range(count)])
    if not cfg.eval.prompts:
        raise ConfigError(f"no prompts to evaluate a model trained on {cfg.data.source}: set eval.prompts")
    return EvalTargets(prompts=[cfg.eval.prompts[i % len(cfg.eval.prompts)] for i in range(count)])


class _FashionJudge:
    """The feature networks and the real reference features, computed once for every NFE."""

    def __init__(self, request: EvalRequest, height: int, width: int):
        from tim_ray.eval.distances import TorchScriptFeatures, extract_features
        from tim_ray.eval.fashion import load_feature_net, reference_images

        self.metrics = request.metrics
        self.net = load_feature_net(cache_dir=request.feature_cache)
        real, _ = reference_images("test", REFERENCE_IMAGES, height, width)
        self.real = extract_features(self.net, real)
        self.inception = None
        if any(m in INCEPTION_METRICS for m in self.metrics):
            self.inception = TorchScriptFeatures(request.inception)
            self.real_inception = extract_features(self.inception, real, batch_size=32)

    def __call__(self, images: torch.Tensor, classes: list[int], seed: int) -> dict[str, float]:
        from tim_ray.eval.distances import extract_features, feature_distances
        from tim_ray.eval.fashion import class_agreement

        scores = {}
        wanted = tuple(m for m in ("fid", "kid") if m in self.metrics)
        if wanted:
            scores.update(feature_distances(self.real, extract_features(self.net, images), wanted, seed))
        if "class_agreement" in self.metrics:
            scores["class_agreement"] = class_agreement(self.net, images, classes)
        if self.inception is not None:
            wanted = tuple(m.split("_")[0] for m in self.metrics if m in INCEPTION_METRICS)
            fake = extract_features(self.inception, images, batch_size=32)
            scores.update({f"{k}_inception": v for k, v in
                           feature_distances(self.real_inception, fake, wanted, seed).items()})
        return scores


def evaluate(pipeline: ImagePipeline, request: EvalRequest, progress=None) -> tuple[dict, torch.Tensor]:
    """(results, grid rows (len(nfe), ≤GRID_COLUMNS, C, H, W)) of one checkpoint; see the module docstring.
    `progress` (e.g. print) gets a line per finished NFE."""
    from tim_ray.eval.grid import to_uint8

    cfg = pipeline.config
    check_request(request, cfg)
    height, width = cfg.data.height, cfg.data.width
    targets = eval_targets(cfg, request.num_samples)
    cond, uncond = pipeline.conditions(targets.prompts, targets.labels)
    noise = pipeline.noise(request.num_samples, height, width, request.seed)
    fashion = (_FashionJudge(request, height, width)
               if any(m in FASHION_METRICS + INCEPTION_METRICS for m in request.metrics) else None)
    by_nfe, rows = {}, []
    for nfe in request.nfe:
        start = time.perf_counter()
        images = pipeline.generate(cond, uncond, noise, nfe, request.sample, request.batch_size)
        seconds = time.perf_counter() - start
        scores = {}
        if fashion is not None:
            scores.update(fashion(images, targets.classes, request.seed))
        if "shapes" in request.metrics:
            from tim_ray.eval.shapes_score import shapes_scores

            pixels = to_uint8(images)
            scores.update(shapes_scores(pixels if pixels.shape[-1] == 3 else pixels.repeat(3, -1), targets.scenes))
        by_nfe[nfe] = {**scores, "seconds_per_image": seconds / request.num_samples}
        rows.append(images[:GRID_COLUMNS])
        if progress:
            progress(f"  NFE {nfe}: sampled in {seconds:.1f} s; " +
                     ", ".join(f"{k} {v:.4g}" for k, v in scores.items() if "." not in k))
    once = {}
    if "consistency" in request.metrics:
        from tim_ray.eval.consistency import composition_error

        count = min(CONSISTENCY_SAMPLES, request.num_samples)
        once = composition_error(pipeline.model, pipeline.path, noise[:count].to(pipeline.device),
                                 slice_conditions(cond, 0, count))
    loaded = pipeline.loaded
    results = {"checkpoint": str(loaded.source), "step": loaded.state.step, "weights": loaded.weights,
               "height": height, "width": width, "num_samples": request.num_samples, "seed": request.seed,
               "metrics": list(request.metrics), "nfe": list(request.nfe),
               "sample": {k: getattr(request.sample, k) for k in ("cfg_scale", "cfg_interval", "guide_first_step",
                                                                  "mode", "stochasticity")},
               "by_nfe": {str(n): s for n, s in by_nfe.items()}, "nfe_independent": once}
    return results, torch.stack(rows)
