"""Scaled dot-product attention with three interchangeable backends.

- `flash`: flash-attn's kernel (CUDA, bf16/fp16 only). Imported lazily, so the package never needs flash-attn.
- `sdpa`: `torch.nn.functional.scaled_dot_product_attention` (fused kernels on any device).
- `math`: softmax(q·kᵀ/√d)·v written out. It is the only path with forward-mode AD rules, so `torch.func.jvp`
  through the network needs it; it materialises the B·H·N·M logits.
- `auto`: flash when it can run on the inputs at hand, else SDPA.

The model resolves the requested backend once per forward (`resolve_backend`) and hands the concrete one to every
attention call, so the per-call path is plain tensor code that torch.compile traces without breaks.
All attention functions take q (B, H, N, d), k and v (B, H, M, d) and return (B, H, N, d).
"""
from __future__ import annotations

import importlib
import logging

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "flash", "sdpa", "math")

logger = logging.getLogger("tim_ray")
_logged: set[str] = set()
_flash = None  # flash_attn.flash_attn_func, or why it cannot be imported (str); None until first asked


@torch.compiler.disable  # a logging call inside a compiled graph would break it anyway; keep it outside
def _log_once(message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        logger.info(message)


def _flash_attn_func():
    global _flash
    if _flash is None:
        try:
            _flash = importlib.import_module("flash_attn").flash_attn_func
        except Exception as exc:  # a broken CUDA build fails with OSError/RuntimeError, not only ImportError
            first_line = (str(exc).splitlines() or [""])[0]
            _flash = f"flash-attn is not importable ({type(exc).__name__}: {first_line})"
    return _flash


def check_backend(name: str) -> None:
    """Fail early, at model build time, on a backend that can never run in this environment."""
    if name not in BACKENDS:
        raise ValueError(f"attention backend '{name}' is not one of {', '.join(BACKENDS)}")
    if name == "flash" and isinstance(_flash_attn_func(), str):
        raise RuntimeError(f"attention='flash' but {_flash_attn_func()}; pip install 'tim-ray[gpu]' on a CUDA "
                           "machine, or use attention='auto' to fall back to SDPA")


def _flash_blocker(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why flash-attn cannot run on inputs of this device and dtype, or None when it can."""
    flash = _flash_attn_func()
    if isinstance(flash, str):
        return flash
    if device.type != "cuda":
        return f"flash-attn needs a CUDA device, the inputs are on {device.type}"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"flash-attn runs in bf16/fp16 only, the inputs are {dtype} (enable bf16 autocast)"
    return None


def resolve_backend(requested: str, device: torch.device, dtype: torch.dtype) -> str:
    """The backend that runs for inputs of this device and compute dtype; logged once per distinct choice.
    `flash` where it cannot run is an error, `auto` falls back to SDPA."""
    if requested in ("sdpa", "math"):
        chosen = requested
    elif requested in ("flash", "auto"):
        blocker = _flash_blocker(device, dtype)
        if blocker is not None and requested == "flash":
            raise RuntimeError(f"attention='flash' cannot run here: {blocker}; use attention='auto' or 'sdpa'")
        chosen = "sdpa" if blocker else "flash"
    else:
        raise ValueError(f"attention backend '{requested}' is not one of {', '.join(BACKENDS)}")
    _log_once(f"attention: requested {requested}, using {chosen} on {device.type}/{dtype}")
    return chosen


def math_attention(q, k, v, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    logits = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    if key_padding_mask is not None:
        logits = logits.masked_fill(~key_padding_mask[:, None, None, :], float("-inf"))
    return logits.softmax(dim=-1) @ v


def attention(q, k, v, backend: str, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of q over k, v with a concrete backend ("flash" | "sdpa" | "math") from `resolve_backend`.
    `key_padding_mask` (B, M) bool, True = a real key; every row needs one True."""
    if backend == "math":
        return math_attention(q, k, v, key_padding_mask)
    # flash_attn_func takes no key padding mask: masked calls (padded captions) run on SDPA instead.
    if backend == "sdpa" or (backend == "flash" and key_padding_mask is not None):
        mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if backend != "flash":
        raise ValueError(f"attention() takes a resolved backend (flash, sdpa, math), got '{backend}'")
    out = _flash_attn_func()(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # it wants (B, N, H, d)
    return out.transpose(1, 2)
