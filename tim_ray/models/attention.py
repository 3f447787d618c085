"""Scaled dot-product attention with three interchangeable backends.

- `flash`: flash-attn's kernel (CUDA, bf16/fp16 only). Imported lazily, so the package never needs flash-attn.
- `sdpa`: `torch.nn.functional.scaled_dot_product_attention` (fused kernels on any device).
- `math`: softmax(q·kᵀ/√d)·v written out. It is the only path with forward-mode AD rules, so `torch.func.jvp`
  through the network needs it; it materialises the B·H·N·M logits.
- `auto`: flash when it can run on the inputs at hand, else SDPA.

All functions take q (B, H, N, d), k and v (B, H, M, d) and return (B, H, N, d).
"""
from __future__ import annotations

import functools
import importlib
import logging

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "flash", "sdpa", "math")

logger = logging.getLogger("tim_ray")
_logged: set[str] = set()


def _log_once(message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        logger.info(message)


@functools.cache
def _flash_attn_func():
    """flash_attn.flash_attn_func, or the reason it cannot be imported (a str)."""
    try:
        return importlib.import_module("flash_attn").flash_attn_func
    except Exception as exc:  # a broken CUDA build fails with OSError/RuntimeError, not only ImportError
        return f"flash-attn is not importable ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"


def check_backend(name: str) -> None:
    """Fail early, at model build time, on a backend that can never run in this environment."""
    if name not in BACKENDS:
        raise ValueError(f"attention backend '{name}' is not one of {', '.join(BACKENDS)}")
    if name == "flash" and isinstance(_flash_attn_func(), str):
        raise RuntimeError(f"attention='flash' but {_flash_attn_func()}; pip install 'tim-ray[gpu]' on a CUDA "
                           "machine, or use attention='auto' to fall back to SDPA")


def _flash_blocker(q: torch.Tensor) -> str | None:
    """Why flash-attn cannot run on these inputs, or None when it can."""
    flash = _flash_attn_func()
    if isinstance(flash, str):
        return flash
    if q.device.type != "cuda":
        return f"flash-attn needs a CUDA device, the inputs are on {q.device.type}"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"flash-attn runs in bf16/fp16 only, the inputs are {q.dtype} (enable bf16 autocast)"
    return None


def resolve_backend(requested: str, q: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> str:
    """The backend that will run on these inputs. `flash` where it cannot run is an error, `auto` falls back.

    Masked calls (cross-attention to padded captions) take SDPA under `flash` too: flash_attn_func has no key
    padding mask, and failing there would make `flash` unusable for text-to-image.
    """
    if requested in ("sdpa", "math"):
        chosen = requested
    elif requested in ("flash", "auto"):
        blocker = _flash_blocker(q)
        if blocker is not None and requested == "flash":
            raise RuntimeError(f"attention='flash' cannot run here: {blocker}; use attention='auto' or 'sdpa'")
        chosen = "sdpa" if blocker or key_padding_mask is not None else "flash"
    else:
        raise ValueError(f"attention backend '{requested}' is not one of {', '.join(BACKENDS)}")
    masked = " (masked)" if key_padding_mask is not None else ""
    _log_once(f"attention{masked}: requested {requested}, using {chosen} on {q.device.type}/{q.dtype}")
    return chosen


def math_attention(q, k, v, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    logits = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    if key_padding_mask is not None:
        logits = logits.masked_fill(~key_padding_mask[:, None, None, :], float("-inf"))
    return logits.softmax(dim=-1) @ v


def attention(q, k, v, backend: str = "auto", key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of q over k, v. `key_padding_mask` (B, M) bool, True = a real key; every row needs one True."""
    chosen = resolve_backend(backend, q, key_padding_mask)
    if chosen == "math":
        return math_attention(q, k, v, key_padding_mask)
    if chosen == "sdpa":
        mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    out = _flash_attn_func()(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # it wants (B, N, H, d)
    return out.transpose(1, 2)
