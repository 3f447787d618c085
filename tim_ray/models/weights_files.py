"""State dicts from files that tim-ray did not write (released TiM weights, other trainers' checkpoints), read
without running any code from them.

- `.safetensors`: safetensors (tensors only, by construction).
- `.pt` / `.pth` / `.bin` / `.ckpt`: torch.load(weights_only=True), whose unpickler admits only tensors and plain
  containers; a pickle that asks for anything else (a crafted `__reduce__`) is refused before it runs, one line.
- a directory: the official trainer's checkpoint (accelerate's save_state: the EMA network, prepared first, in
  model.safetensors and the trained one in model_1.safetensors), else its one weights file.

A file holds one weight set (a flat {name: tensor}) or both, as sub-dicts under the usual names ("ema"/"model",
...). `ema` picks among both; for a file with one set it only says which set it is (released checkpoints are
EMA weights by custom; the official code does not record it).
"""
from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path

import torch

from tim_ray.config import ConfigError

SAFETENSORS = (".safetensors",)
PICKLED = (".pt", ".pth", ".bin", ".ckpt")
EMA, TRAINED = "ema", "model"  # the names export.json gives the two weight sets
SUBDICTS = {EMA: ("ema", "ema_model", "ema_state_dict"), TRAINED: ("model", "state_dict", "model_state_dict")}
ACCELERATE_FILES = {EMA: "model.safetensors", TRAINED: "model_1.safetensors"}


class WeightsError(ConfigError):
    """A weights file that cannot be read, would run code, or lacks the weight set asked for. One line."""


def _load_file(path: Path) -> object:
    if path.suffix in SAFETENSORS:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except (SafetensorError, OSError) as exc:
            raise WeightsError(f"cannot read {path} as safetensors: {str(exc).splitlines()[0]}") from None
    if path.suffix not in PICKLED:
        raise WeightsError(f"{path}: unknown weights format '{path.suffix}'; give {', '.join(SAFETENSORS + PICKLED)}")
    try:
        with warnings.catch_warnings():  # protocol notes about pickles that are refused anyway, or fine
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's message spans many lines; what it names is "GLOBAL <module.name>", or an opcode it refuses
        asked = re.search(r"GLOBAL (\S+)", str(exc))
        what = f"asks for {asked.group(1)}" if asked else "holds more than tensors and plain containers"
        raise WeightsError(f"refusing {path}: its pickle {what}, which could run code; only plain state dicts "
                           f"load") from None
    except (OSError, RuntimeError, EOFError, ValueError) as exc:
        raise WeightsError(f"cannot read {path} as a torch file: {str(exc).splitlines()[0]}") from None


def _is_state_dict(obj: object) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(torch.is_tensor(v) for v in obj.values())


def _pick_set(obj: object, ema: bool, where: Path) -> dict[str, torch.Tensor]:
    if _is_state_dict(obj):
        return obj
    wanted, other = (EMA, TRAINED) if ema else (TRAINED, EMA)
    if isinstance(obj, dict):
        for name in SUBDICTS[wanted]:
            if _is_state_dict(obj.get(name)):
                return obj[name]
        if any(_is_state_dict(obj.get(name)) for name in SUBDICTS[other]):
            raise WeightsError(f"{where} holds no {wanted} weights, only {other} ones; "
                               f"{'drop --no-ema' if ema else 'leave out --no-ema'} to import those")
    raise WeightsError(f"{where} holds no state dict (a mapping of names to tensors, at the top or under "
                       f"{', '.join(SUBDICTS[wanted])})")


def _weights_file(directory: Path, ema: bool) -> Path:
    if all((directory / name).is_file() for name in ACCELERATE_FILES.values()):
        return directory / ACCELERATE_FILES[EMA if ema else TRAINED]
    files = sorted(p for p in directory.iterdir() if p.suffix in SAFETENSORS + PICKLED)
    if len(files) != 1:
        found = ", ".join(p.name for p in files) or "none"
        raise WeightsError(f"{directory}: expected one weights file ({', '.join(SAFETENSORS + PICKLED)}), found "
                           f"{found}; give the file")
    return files[0]


def read_state_dict(path: str | Path, ema: bool = True) -> tuple[dict[str, torch.Tensor], Path]:
    """({name: tensor}, the file read) of a weights file or directory; `ema` picks the EMA set where both are
    stored. WeightsError (one line) for anything else."""
    path = Path(path).expanduser()
    file = _weights_file(path, ema) if path.is_dir() else path
    return _pick_set(_load_file(file), ema, file), file
