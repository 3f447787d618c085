"""`tim-ray import SOURCE --out DIR`: released TiM weights (or any state dict with the official module names) as a
tim-ray export (tim_ray.artifacts.export), which `tim-ray sample`, `eval` and `train --init-from` then take.

SOURCE is a weights file or directory (tim_ray.models.weights_files: nothing in it runs), or a hub id
`owner/name[/file]` (fetched through the Hugging Face cache; one line at once when the hub cannot be reached).

The architecture comes from, in this order: the official YAML config (`--config`), the table of official releases
below (a hub id), or `--arch` with the conditioning and class count read off the tensors. The network is
tim-ray's own, which reproduces the official one exactly (tests/test_import.py) once three settings take the
official behaviour; the written config.toml sets them and says why in a comment (COMPAT). The REPA projector is
dropped unless `--keep-projector`: sampling never uses it, and a fine-tune without REPA would carry it unused.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from tim_ray.artifacts import checksums
from tim_ray.artifacts.checkpoint import TrainState, versions
from tim_ray.artifacts.export import PROJECTOR, fit_state_dict, model_for_shapes, write_export
from tim_ray.config import ConfigError, from_dict, parse_override, to_dict
from tim_ray.models.hub import fetch_file
from tim_ray.models.registry import ARCHS
from tim_ray.models.weights_files import EMA, TRAINED, read_state_dict

LABEL_TABLE = "y_embedder.embedding_table.weight"  # (num_classes + 1, D): class-conditional models only
PROJECTOR_OUT = "projector.4.weight"  # (z_dim, projector_dim): the REPA feature width
DCAE = "mit-han-lab/dc-ae-f32c32-sana-1.1-diffusers"
SD_VAE = "stabilityai/sd-vae-ft-ema"
DOWNSAMPLE = {"dc-ae": 32, "sd-vae": 8}  # image pixels per latent pixel, by the official code's own name test

COMPAT = {
    "model.rope_grid": ("official", "the released network was trained with the official RoPE grid, which swaps "
                        "rows and columns on non-square grids (docs/math.md B1); row_col changes its outputs off "
                        "the square"),
    "model.cross_attention_mask": (False, "the official network attends to padded caption tokens too "
                                   "(docs/math.md B9); masking them changes a text model's outputs"),
    "sample.guide_first_step": (False, "the official sampler never guides at t = 1 (a strict CFG interval, "
                                "docs/math.md B3); true changes 1-step samples whenever cfg > 1"),
}
HEADER = ("# Written by `tim-ray import` from {source} ({weights} weights).\n"
          "# The network, its codec and text encoder, and the sampling keys come from the release; [data] and "
          "[train] are not part of it:\n# set them to your data before fine-tuning (`tim-ray train RECIPE "
          "--init-from THIS_DIR`).")


class ReleaseError(ConfigError):
    """A source, config or architecture that cannot be imported. One line, exit 2."""


@dataclass(frozen=True)
class Release:
    """What tim-ray needs to know of an official network beyond its tensors."""

    arch: str
    conditioning: str
    codec: str
    image_size: int
    text_encoder: str = "minilm"
    max_text_tokens: int = 32
    num_classes: int = 1000
    settings: dict = field(default_factory=dict)  # further config keys (from an official YAML)


# The official releases (their model cards); hub repo -> file -> Release
RELEASES = {
    "GoodEnough/TiM-T2I": {"t2i_model.bin": Release("T2I-XL/1", "text", DCAE, 1024, "google/gemma-3-1b-it", 256)},
    "GoodEnough/TiM-C2I": {"c2i_model_256.safetensors": Release("XL/2", "class", SD_VAE, 256),
                           "c2i_model_512.safetensors": Release("XL/1", "class", DCAE, 512)},
}

# official YAML path -> config key (values that need translating go through _YAML_VALUES)
_YAML_KEYS = {
    ("model", "transport", "target"): "transition.path",
    ("model", "transport", "params", "P_mean"): "transition.p_mean",
    ("model", "transport", "params", "P_std"): "transition.p_std",
    ("model", "transport", "params", "sigma_d"): "transition.sigma_d",
    ("model", "unified_dcm_loss", "diffusion_ratio"): "transition.diffusion_ratio",
    ("model", "unified_dcm_loss", "consistency_ratio"): "transition.consistency_ratio",
    ("model", "unified_dcm_loss", "derivative_type"): "transition.derivative",
    ("model", "unified_dcm_loss", "differential_epsilon"): "transition.dde_epsilon",
    ("model", "unified_dcm_loss", "weight_time_type"): "transition.time_weight",
    ("model", "unified_dcm_loss", "weight_time_tangent"): "transition.time_weight_map",
    ("model", "ema_decay"): "ema.decay",
    ("model", "proportion_empty_prompts"): "data.caption_dropout",
    ("model", "network", "params", "class_dropout_prob"): "data.caption_dropout",
    ("training", "learning_rate"): "optim.lr",
    ("training", "learning_rate_base_batch_size"): "optim.base_batch",
    ("training", "scale_lr"): "optim.scale_lr",
    ("training", "optimizer", "params", "betas"): "optim.betas",
    ("training", "optimizer", "params", "weight_decay"): "optim.weight_decay",
    ("training", "optimizer", "params", "eps"): "optim.eps",
    ("training", "max_grad_norm"): "train.grad_clip",
    ("training", "max_train_steps"): "train.steps",
    ("data", "dataloader", "batch_size"): "train.batch_size",
}
_YAML_VALUES = {
    "transition.path": lambda v: {"OT_FM": "otfm", "TrigFlow": "trigflow"}.get(str(v).rsplit(".", 1)[-1], v),
    "transition.time_weight": lambda v: {"Soft-Min-SNR": "soft_min_snr"}.get(v, v),
    "transition.time_weight_map": lambda v: "tangent" if v else "none",
}


def _get(tree: dict, path: tuple[str, ...]):
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def _arch_named(hidden: int, depth: int, heads: int, patch: int, adaln: int, encoder_depth: int, text: bool,
                where: str) -> str:
    """The registered architecture of these sizes (for text, the T2I- name of two equal ones)."""
    found = [name for name, a in ARCHS.items() if (a.hidden_size, a.depth, a.num_heads, a.patch_size,
                                                    a.adaln_hidden_size, a.encoder_depth)
             == (hidden, depth, heads, patch, adaln, encoder_depth)]
    if not found:
        raise ReleaseError(f"{where}: no tim-ray architecture has hidden_size {hidden}, depth {depth}, num_heads "
                           f"{heads}, patch_size {patch}, lora_hidden_size {adaln}, encoder_depth {encoder_depth} "
                           f"(known: {', '.join(ARCHS)})")
    return next((name for name in found if name.startswith("T2I-") == text), found[0])


def release_from_yaml(path: str | Path) -> Release:
    """A Release from an official training config (configs/c2i/*.yaml, configs/t2i/*.yaml of the TiM repo)."""
    import yaml

    try:
        tree = yaml.safe_load(Path(path).read_text())
        net = tree["model"]["network"]
        params = net["params"]
        text = ".t2i." in net["target"]
        codec = tree["model"]["vae_dir"]
        arch = _arch_named(params["hidden_size"], params["depth"], params["num_heads"], params["patch_size"],
                           params["lora_hidden_size"], params["encoder_depth"], text, str(path))
        downsample = next((f for name, f in DOWNSAMPLE.items() if name in codec), 8)
        settings = {key: _YAML_VALUES.get(key, lambda v: v)(value) for yaml_path, key in _YAML_KEYS.items()
                    if (value := _get(tree, yaml_path)) is not None}
        return Release(arch, "text" if text else "class", codec, params["input_size"] * downsample,
                       tree["model"].get("text_encoder_dir", "minilm"), tree["model"].get("max_seq_length", 32),
                       params.get("num_classes", 1000), settings)
    except (OSError, yaml.YAMLError) as exc:
        raise ReleaseError(f"cannot read official config '{path}': {str(exc).splitlines()[0]}") from None
    except (KeyError, TypeError) as exc:
        raise ReleaseError(f"'{path}' is not an official TiM config (no {exc} under model.network)") from None


def _release_from_tensors(arch: str, tensors: dict) -> Release:
    if arch not in ARCHS:
        raise ReleaseError(f"--arch '{arch}' is not one of {', '.join(ARCHS)}")
    if LABEL_TABLE in tensors:
        return Release(arch, "class", "pixel", 256, num_classes=tensors[LABEL_TABLE].shape[0] - 1)
    return Release(arch, "text", "pixel", 256)


def resolve_source(source: str) -> tuple[Path, Release | None]:
    """(the local file or directory, the official release it is when a hub id names one)."""
    path = Path(source).expanduser()
    if path.exists():
        return path, None
    parts = source.split("/")
    if source.startswith((".", "/", "~")) or len(parts) < 2:
        raise ReleaseError(f"'{source}' does not exist (give a weights file or directory, or a hub id owner/name"
                           f"[/file])")
    repo, file = "/".join(parts[:2]), "/".join(parts[2:])
    known = RELEASES.get(repo, {})
    if not file:
        if len(known) != 1:
            names = f"; the releases there: {', '.join(f'{repo}/{f}' for f in known)}" if known else ""
            raise ReleaseError(f"'{source}' is not a local path; as a hub id, name the file: {repo}/FILE{names}")
        (file,) = known
    return fetch_file(repo, file, ReleaseError), known.get(file)


def import_weights(source: str, out: str | Path, *, ema: bool = True, official_config: str | None = None,
                   arch: str | None = None, keep_projector: bool = False, overrides: list[str] = ()) -> Path:
    """Write an export of `source` to `out` (see the module docstring); returns `out`."""
    if official_config and arch:
        raise ReleaseError("give --config (an official YAML) or --arch, not both")
    path, release = resolve_source(source)
    tensors, file = read_state_dict(path, ema)
    if official_config:
        release = release_from_yaml(official_config)
    elif arch:
        release = _release_from_tensors(arch, tensors)
    elif release is None:
        raise ReleaseError(f"'{source}' is not an official release tim-ray knows: give its official YAML config "
                           f"(--config) or --arch NAME ({', '.join(ARCHS)})")
    if not keep_projector:
        tensors = {k: v for k, v in tensors.items() if not k.startswith(PROJECTOR)}
    elif PROJECTOR_OUT not in tensors:
        raise ReleaseError(f"{file} holds no REPA projector ({PROJECTOR_OUT}); import without --keep-projector")
    cfg = _config(release, tensors, Path(out).name, overrides)
    model = model_for_shapes(cfg, {k: tuple(v.shape) for k, v in tensors.items()}, file, "cpu")
    fit_state_dict(model, tensors, file)
    weights = EMA if ema else TRAINED
    info = {"weights": weights, "source": source,
            "imported": {"file": str(file), "sha256": checksums.file_sha256(file)},
            "state": asdict(TrainState()), "versions": versions()}
    notes = {key: note for key, (_, note) in COMPAT.items()}
    return write_export(out, model.state_dict(), cfg, info, notes, HEADER.format(source=source, weights=weights))


def _config(release: Release, tensors: dict, name: str, overrides: list[str]):
    tree = to_dict(from_dict({}))
    tree["model"].update(arch=release.arch, conditioning=release.conditioning, num_classes=release.num_classes,
                         codec=release.codec, text_encoder=release.text_encoder,
                         max_text_tokens=release.max_text_tokens,
                         repa_dim=tensors[PROJECTOR_OUT].shape[0] if PROJECTOR_OUT in tensors else 0)
    if tree["model"]["repa_dim"]:  # the kept projector is for the weights' sake: no vision encoder trains it here
        tree["transition"]["repa_coeff"] = 0.0
    tree["data"].update(height=release.image_size, width=release.image_size)
    tree["train"]["name"] = name
    for dotted, value in [*release.settings.items(), *((k, v) for k, (v, _) in COMPAT.items())]:
        section, key = dotted.split(".")
        tree[section][key] = value
    for text in overrides:
        section, key, value = parse_override(text)
        tree.setdefault(section, {})[key] = value
    return from_dict(tree, source="the import")
