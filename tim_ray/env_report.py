"""The `tim-ray env` block: versions, devices and the Ray cluster a run would use, for bug reports."""
from __future__ import annotations

import importlib.metadata
import os
import platform
import sys

_PACKAGES = ["tim-ray", "torch", "ray", "mlflow", "transformers", "diffusers", "pyarrow", "flash-attn"]


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _devices() -> list[str]:
    import torch

    lines = [f"cpu: {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"cuda:{i}: {p.name}, {p.total_memory / 2**30:.1f} GiB, capability {p.major}.{p.minor}")
    else:
        lines.append("cuda: not available")
    return lines


def _ray_target(address: str | None) -> str:
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        return f"join the cluster at {address}"
    return "start a local Ray on this machine (ray.local_num_cpus logical CPUs; see `tim-ray config show`)"


def environment_report(address: str | None = None) -> str:
    lines = [f"python: {sys.version.split()[0]} ({platform.platform()})"]
    lines += [f"{name}: {_version(name)}" for name in _PACKAGES]
    lines += _devices()
    lines.append(f"ray cluster: {_ray_target(address)}")
    return "\n".join(lines)
