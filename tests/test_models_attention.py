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
    q, k, v = qkv(torch.float32)
    assert attn.resolve_backend("auto", q) == "sdpa"
    torch.testing.assert_close(attn.attention(q, k, v, "auto"), attn.attention(q, k, v, "sdpa"))


def test_flash_where_it_cannot_run_is_a_clear_error():
    q, k, v = qkv(torch.float32)
    with pytest.raises(RuntimeError, match="attention='flash'.*'auto'"):
        attn.attention(q, k, v, "flash")
    if isinstance(attn._flash_attn_func(), str):  # flash-attn absent: refused already when the model is built
        with pytest.raises(RuntimeError, match="flash-attn is not importable"):
            attn.check_backend("flash")
    with pytest.raises(ValueError, match="auto, flash, sdpa, math"):
        attn.check_backend("xformers")


def test_the_chosen_backend_is_logged_once(caplog, monkeypatch):
    monkeypatch.setattr(attn, "_logged", set())
    q, k, v = qkv()
    with caplog.at_level(logging.INFO, logger="tim_ray"):
        for _ in range(3):
            attn.attention(q, k, v, "math")
    lines = [r.getMessage() for r in caplog.records if r.name == "tim_ray"]
    assert lines == ["attention: requested math, using math on cpu/torch.float64"]
