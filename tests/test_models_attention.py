"""Attention backends: SDPA and the math path agree, flash fails clearly where it cannot run, one log line."""
import logging

import pytest
import torch

from tim_ray.models import attention as attn


def qkv(dtype=torch.float64, n=10, m=7):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(2, 3, n, 8, generator=g, dtype=dtype), torch.randn(2, 3, m, 8, generator=g, dtype=dtype),
            torch.randn(2, 3, m, 8, generator=g, dtype=dtype))


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_sdpa_and_math_agree(dtype, tol):
    q, k, v = qkv(dtype)
    mask = torch.tensor([[True] * 7, [True] * 3 + [False] * 4])
    for key_padding_mask in (None, mask):
        sdpa = attn.attention(q, k, v, "sdpa", key_padding_mask)
        math = attn.attention(q, k, v, "math", key_padding_mask)
        torch.testing.assert_close(sdpa, math, rtol=tol, atol=tol)


def test_math_attention_ignores_masked_keys():
    q, k, v = qkv()
    mask = torch.tensor([[True] * 3 + [False] * 4] * 2)
    full = attn.math_attention(q, k, v, mask)
    torch.testing.assert_close(full, attn.math_attention(q, k[:, :, :3], v[:, :, :3]))


def test_auto_falls_back_to_sdpa_on_cpu():
    cpu = torch.device("cpu")
    assert attn.resolve_backend("auto", cpu, torch.float32) == "sdpa"
    assert attn.resolve_backend("auto", cpu, torch.bfloat16) == "sdpa"
    assert attn.resolve_backend("math", cpu, torch.float64) == "math"


def test_flash_where_it_cannot_run_is_a_clear_error():
    with pytest.raises(RuntimeError, match="attention='flash' cannot run here: .*'auto'"):
        attn.resolve_backend("flash", torch.device("cpu"), torch.bfloat16)
    if isinstance(attn._flash_attn_func(), str):  # flash-attn absent: refused already when the model is built
        with pytest.raises(RuntimeError, match="flash-attn is not importable"):
            attn.check_backend("flash")
    for bad in (lambda: attn.check_backend("xformers"), lambda: attn.attention(*qkv(), "auto")):
        with pytest.raises(ValueError, match="flash, sdpa, math"):
            bad()


def test_the_chosen_backend_is_logged_once_per_choice(caplog, monkeypatch):
    monkeypatch.setattr(attn, "_logged", set())
    with caplog.at_level(logging.INFO, logger="tim_ray"):
        for _ in range(3):
            attn.resolve_backend("auto", torch.device("cpu"), torch.float32)
        attn.resolve_backend("math", torch.device("cpu"), torch.float32)
    lines = [r.getMessage() for r in caplog.records if r.name == "tim_ray"]
    assert lines == ["attention: requested auto, using sdpa on cpu/torch.float32",
                     "attention: requested math, using math on cpu/torch.float32"]
