"""One-file exports of a checkpoint, and the one loader that sampling and evaluation use.

`tim-ray export CKPT --out DIR` gathers the DCP shards of a checkpoint (any world size) into
    DIR/model.safetensors   the trained weights, or the EMA weights with --ema
    DIR/config.toml         the resolved training config (tim_ray.config.dump_toml)
    DIR/export.json         which weights, the training state (step, data position) and the library versions
    DIR/checksums.json      size and sha256 of the three files above, written last (tim_ray.artifacts.checksums)

`load_for_inference(path)` takes an export directory, a checkpoint directory, or a run directory (its newest
complete and verified checkpoint: tim_ray.artifacts.checkpoints_on_disk) and returns the model with its config. EMA
weights are used by default when the source has them. Every source is verified against its checksums before it is
read; a mismatch is a CheckpointError (exit 1) naming the file.

Exports are self-contained: a codec or text encoder that the config names by a local directory is copied into the
export (DIR/codec/, DIR/text_encoder/) and config.toml names it by a path relative to the export, which the loader
resolves against the export directory. Hub ids, "pixel" and "minilm" stay as they are. So an export still samples
after it, or the directory the codec came from, is moved.

Safety: exports are read with safetensors only. A DCP checkpoint keeps its index in a pickle (`dcp/.metadata`);
before torch.distributed.checkpoint reads it, it is opened (tim_ray.artifacts.checkpoint.read_index) with an unpickler
that admits only the DCP metadata classes, so a crafted checkpoint cannot run code, and every entry we load must
be a plain tensor.
"""
from __future__ import annotations

import json
import sys
import warnings
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from tim_ray.artifacts import checksums
from tim_ray.artifacts.checkpoint import (DCP_DIR, INDEX_FILE, STATE_FILE, CheckpointError, TrainState,
                                          load_weights, read_index, read_state)
from tim_ray.artifacts.checkpoints_on_disk import checkpoint_dirs, require_newest_verified, verify_checkpoint
from tim_ray.config import Config, ConfigError, dump_toml, from_dict, load_config
from tim_ray.models.hub import SAVED_DIR
from tim_ray.models.registry import build_model

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.toml"
INFO_FILE = "export.json"
EMA, TRAINED = "ema", "model"  # the two weight sets of a checkpoint, named by their DCP prefix
PATCH_WEIGHT = "x_embedder.proj.weight"  # (hidden, in_channels, p, p): tells the input channels
CAPTION_NORM_WEIGHT = "y_embedder.norm.weight"  # (text_dim,): present only in text-conditional models
PROJECTOR = "projector."  # the REPA projector's parameters: used by training only, never by sampling
# Config keys that may name a local directory, and where an export keeps its copy of it
BUNDLED = {"codec": "codec", "text_encoder": "text_encoder"}
BUILT_IN = {"pixel", "minilm"}  # values of those keys that name no file


class ExportError(ConfigError):
    """A path that is not a usable checkpoint, export or run directory, or a weight set it does not hold."""


@dataclass
class InferenceModel:
    """A model in eval mode with what was loaded: `weights` is "ema" or "model"; `source` the checkpoint or
    export directory; `run_dir` the training run's directory when the source lies inside one."""

    model: torch.nn.Module
    config: Config
    weights: str
    state: TrainState
    source: Path
    kind: str  # "checkpoint" | "export"

    @property
    def run_dir(self) -> Path | None:
        return self.source.parent if self.kind == "checkpoint" else None


# ---------------------------------------------------------------------------------------------------------------
# Finding what a path points at


def _is_checkpoint(path: Path) -> bool:
    return (path / STATE_FILE).is_file() and (path / DCP_DIR).is_dir()


def _is_export(path: Path) -> bool:
    return (path / WEIGHTS_FILE).is_file() and (path / CONFIG_FILE).is_file()


def _say(line: str) -> None:
    print(f"tim-ray: {line}", file=sys.stderr, flush=True)


def locate(path: str | Path, note=_say) -> tuple[str, Path]:
    """("checkpoint" | "export", directory) for a checkpoint, an export, or a run directory (its newest complete
    and verified checkpoint; each newer one that is damaged or incomplete is named in one line through `note`).
    The directory returned has been verified against its checksums; CheckpointError if it does not verify."""
    text = str(path)
    if "://" in text:
        raise ExportError(f"'{text}' is remote storage; copy the checkpoint to a local directory first")
    path = Path(path).expanduser()
    if not path.exists():
        raise ExportError(f"'{text}' does not exist")
    if _is_export(path):
        checksums.verify(path)
        return "export", path.resolve()
    if _is_checkpoint(path):
        return "checkpoint", verify_checkpoint(path).resolve()
    if path.is_dir() and checkpoint_dirs(path):
        return "checkpoint", require_newest_verified(path, note).resolve()
    raise ExportError(f"'{text}' is not a tim-ray checkpoint ({STATE_FILE} + {DCP_DIR}/), export ({WEIGHTS_FILE} + "
                      f"{CONFIG_FILE}) or run directory (checkpoint_* inside)")


# ---------------------------------------------------------------------------------------------------------------
def stored_tensor_shapes(checkpoint: Path) -> dict[str, dict[str, tuple[int, ...]]]:
    """{"model": {name: shape}, "ema": {name: shape}} of a DCP checkpoint's weight sets ("ema" empty when it has
    none), read with an unpickler that admits only DCP's metadata classes. Raises ExportError if the index asks for
    anything else or stores a non-tensor in a weight set (DCP would unpickle that one without restrictions)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    index = checkpoint / DCP_DIR / INDEX_FILE
    try:
        entries = read_index(str(checkpoint)).state_dict_metadata
    except CheckpointError as exc:
        raise ExportError(str(exc)) from None
    shapes: dict[str, dict[str, tuple[int, ...]]] = {TRAINED: {}, EMA: {}}
    for key, entry in entries.items():
        prefix, _, name = key.partition(".")
        if prefix not in shapes:
            continue
        if not isinstance(entry, TensorStorageMetadata):
            raise ExportError(f"{index}: '{key}' is not a tensor; refusing to load it")
        shapes[prefix][name] = tuple(entry.size)
    return shapes


# ---------------------------------------------------------------------------------------------------------------
# Loading


def model_for_shapes(cfg: Config, shapes: dict[str, tuple[int, ...]], where: Path, device) -> torch.nn.Module:
    """The config's architecture with the input channels and text width that the stored tensors have (so no data
    or text encoder has to be opened to find them)."""
    if PATCH_WEIGHT not in shapes:
        raise ExportError(f"{where} holds no '{PATCH_WEIGHT}'; it is not a TiM checkpoint")
    in_channels = shapes[PATCH_WEIGHT][1]
    text_dim = shapes[CAPTION_NORM_WEIGHT][0] if CAPTION_NORM_WEIGHT in shapes else None
    if cfg.model.conditioning == "text" and text_dim is None:
        raise ExportError(f"{where}: the config says text conditioning but no caption embedder is stored")
    return build_model(cfg.model, in_channels=in_channels, text_dim=text_dim, device=device)


def _few(names: list[str]) -> str:
    return ", ".join(names[:4]) + (f" (+{len(names) - 4} more)" if len(names) > 4 else "")


def check_state_dict(model: torch.nn.Module, tensors: dict[str, torch.Tensor], where, optional: tuple[str, ...] = ()
                     ) -> None:
    """ExportError, one line naming the missing and unexpected keys and the shape mismatches, unless `tensors` has
    every key of `model` (those under an `optional` prefix may be absent) at its shape and no other. `model` may
    live on the meta device. (torch's own message starts with a line that names none of them.)"""
    expected = model.state_dict()
    missing = [k for k in expected if k not in tensors and not k.startswith(optional)]
    unexpected = [k for k in tensors if k not in expected]
    mismatched = [f"{k} {tuple(tensors[k].shape)} (model: {tuple(v.shape)})" for k, v in expected.items()
                  if k in tensors and tensors[k].shape != v.shape]
    problems = [f"{what}: {_few(keys)}" for what, keys in
                [("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)] if keys]
    if problems:
        raise ExportError(f"{where} does not fit the model ({model.__class__.__name__} of its config): "
                          f"{'; '.join(problems)}")


def fit_state_dict(model: torch.nn.Module, tensors: dict[str, torch.Tensor], where, optional: tuple[str, ...] = ()
                   ) -> None:
    """Load `tensors` into `model` after check_state_dict; parameters under an `optional` prefix that `tensors`
    lacks keep their initialisation."""
    check_state_dict(model, tensors, where, optional)
    model.load_state_dict(tensors, strict=not optional)


def _pick(ema: bool | None, has_ema: bool, where: Path) -> str:
    if ema and not has_ema:
        raise ExportError(f"{where} holds no EMA weights (ema.enabled was false, or it was exported without "
                          "--ema); use the trained weights")
    return EMA if (has_ema if ema is None else ema) else TRAINED


def _load_checkpoint(directory: Path, ema: bool | None, device) -> InferenceModel:
    state, saved = read_state(str(directory))
    cfg = from_dict(saved, source=f"{directory / STATE_FILE}")
    shapes = stored_tensor_shapes(directory)
    weights = _pick(ema, bool(shapes[EMA]), directory)
    model = model_for_shapes(cfg, shapes[weights], directory, "cpu")
    with warnings.catch_warnings():  # DCP warns that it reads in one process, which is the point here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        load_weights(str(directory), model, use_ema=weights == EMA)  # CheckpointError (exit 1) if it fails
    return InferenceModel(model.to(device).eval(), cfg, weights, state, directory, "checkpoint")


def read_export_info(directory: Path) -> dict:
    """The export.json of an export directory: weights, source, state, versions."""
    try:
        return json.loads((directory / INFO_FILE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ExportError(f"{directory / INFO_FILE} is missing or corrupt ({exc})") from None


def _load_export(directory: Path, ema: bool | None, device) -> InferenceModel:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    checksums.verify(directory)
    info = read_export_info(directory)
    cfg = _with_bundled_paths(load_config(directory / CONFIG_FILE), directory)
    held = info.get("weights")
    wanted = _pick(ema, held == EMA, directory)
    if wanted != held:
        raise ExportError(f"{directory} holds the {held} weights only; export again "
                          f"{'with' if wanted == EMA else 'without'} --ema")
    try:
        tensors = load_file(directory / WEIGHTS_FILE)
    except (SafetensorError, OSError) as exc:
        raise ExportError(f"cannot read {directory / WEIGHTS_FILE}: {exc}") from None
    model = model_for_shapes(cfg, {k: tuple(v.shape) for k, v in tensors.items()}, directory, "cpu")
    fit_state_dict(model, tensors, directory / WEIGHTS_FILE)
    try:
        state = TrainState(**info.get("state", {}))
    except TypeError as exc:
        raise ExportError(f"{directory / INFO_FILE} has an unexpected state ({exc})") from None
    return InferenceModel(model.to(device).eval(), cfg, wanted, state, directory, "export")


def load_for_inference(path: str | Path, ema: bool | None = None, device="cpu") -> InferenceModel:
    """The model of a checkpoint, export or run directory in eval mode on `device`, with its config.
    ema: None = the EMA weights when the source has them, else the trained ones; True/False insists."""
    kind, directory = locate(path)
    loader = _load_export if kind == "export" else _load_checkpoint
    return loader(directory, ema, device)


# ---------------------------------------------------------------------------------------------------------------
# Exporting


def _with_bundled_paths(cfg: Config, directory: Path) -> Config:
    """An export's config with its bundled codec / text encoder named by absolute path (config.toml names them
    relative to the export directory, so that the directory can move)."""
    found = {}
    for key in BUNDLED:
        value = getattr(cfg.model, key)
        if value not in BUILT_IN and not Path(value).is_absolute() and (directory / value).is_dir():
            found[key] = str(directory / value)
    return replace(cfg, model=replace(cfg.model, **found)) if found else cfg


def _bundle(cfg: Config, out: Path) -> Config:
    """Copy each codec / text encoder that `cfg` names by a local directory into `out`; return the config that names
    the copies relative to `out`. A name that looks like a path but is none here is an ExportError: the export
    would not sample anywhere else either."""
    bundled = {}
    for key, folder in BUNDLED.items():
        value = getattr(cfg.model, key)
        path = Path(value).expanduser()
        if value in BUILT_IN or not (path.exists() or value.startswith((".", "/", "~"))):
            continue  # a built-in or a hub id: the name is enough
        if not path.is_dir():
            raise ExportError(f"model.{key} = '{value}' is not {SAVED_DIR} here; run the export where it is, or set "
                              f"model.{key} to a hub id")
        shutil.copytree(path, out / folder)
        bundled[key] = f"./{folder}"
    return replace(cfg, model=replace(cfg.model, **bundled)) if bundled else cfg


def annotated_toml(cfg: Config, notes: dict[str, str], header: str = "") -> str:
    """dump_toml(cfg) with `header` (comment lines) on top and notes[section.key] as a comment after that key."""
    lines, section = [header] if header else [], ""
    for line in dump_toml(cfg).splitlines():
        if line.startswith("["):
            section = line.strip("[]")
        key = line.split(" = ", 1)[0]
        note = notes.get(f"{section}.{key}") if " = " in line else None
        lines.append(f"{line}  # {note}" if note else line)
    return "\n".join(lines) + "\n"


def _check_written(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """ExportError unless `path` has the size a safetensors file of `tensors` has (8-byte header length, the
    header, the data): safetensors' save_file returned without an error on a full disk, leaving a cut file that
    the checksum manifest would then have sealed as it was."""
    with open(path, "rb") as file:
        prefix = file.read(8)
    size = path.stat().st_size
    expected = (8 + int.from_bytes(prefix, "little") + sum(t.numel() * t.element_size() for t in tensors.values())
                if len(prefix) == 8 else None)
    if size != expected:
        raise ExportError(f"{path}: {size} bytes on disk, {expected or 'more'} expected: the write was cut short "
                          f"(disk full?)")


def write_export(out: str | Path, tensors: dict[str, torch.Tensor], cfg: Config, info: dict,
                 notes: dict[str, str] | None = None, header: str = "") -> Path:
    """Write an export directory: model.safetensors (`tensors`), config.toml (`cfg`, its local codec / text encoder
    copied in, `notes` as comments), export.json (`info`), then checksums.json over all of them, last. Refuses a
    directory that already holds an export."""
    from safetensors.torch import save_file

    out = Path(out).expanduser()
    if (out / WEIGHTS_FILE).exists() or (out / checksums.MANIFEST).exists():
        raise ExportError(f"'{out}' already holds an export; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    cfg = _bundle(cfg, out)
    tensors = {name: t.detach().contiguous() for name, t in tensors.items()}
    save_file(tensors, out / WEIGHTS_FILE, metadata={"format": "pt", "weights": info["weights"]})
    _check_written(out / WEIGHTS_FILE, tensors)
    (out / CONFIG_FILE).write_text(annotated_toml(cfg, notes or {}, header))
    (out / INFO_FILE).write_text(json.dumps(info, indent=1) + "\n")
    files = [WEIGHTS_FILE, CONFIG_FILE, INFO_FILE]
    files += [f"{folder}/{rel}" for folder in BUNDLED.values() if (out / folder).is_dir()
              for rel in checksums.files_under(out / folder)]
    checksums.write_atomically(out / checksums.MANIFEST, checksums.manifest_bytes(checksums.describe(out, files)))
    return out


def export_checkpoint(path: str | Path, out: str | Path, ema: bool = False) -> Path:
    """Write an export (write_export) of a checkpoint or run directory: the trained weights, or the EMA weights
    when `ema`."""
    kind, directory = locate(path)
    if kind == "export":
        raise ExportError(f"'{path}' is already an export")
    loaded = _load_checkpoint(directory, ema, "cpu")
    saved = json.loads((directory / STATE_FILE).read_text())
    info = {"weights": loaded.weights, "source": str(directory), "state": asdict(loaded.state),
            "versions": saved.get("versions", {})}
    return write_export(out, loaded.model.state_dict(), loaded.config, info)
