"""The TiM network: init (O7), exact sizes, shapes, conditioning, masks, float64 and forward-mode AD."""
import logging

import pytest
import torch

from tim_ray.config import ConfigError, ModelConfig
from tim_ray.models.registry import ARCHS, build_model, count_parameters
from tim_ray.models.rope import grid_positions, rope_tables
from tim_ray.models.tim import TimestepEmbedder

TEXT_DIM = 24


def tiny(conditioning="text", dtype=torch.float64, seed=0, perturb=True, **overrides) -> torch.nn.Module:
    """tim-tiny; with `perturb`, the zero-initialised layers get random weights so that F is not ≡ 0."""
    torch.manual_seed(seed)
    cfg = ModelConfig(arch="tim-tiny", conditioning=conditioning, num_classes=5, **overrides)
    model = build_model(cfg, in_channels=3, text_dim=TEXT_DIM, dtype=dtype)
    if perturb:
        with torch.no_grad():
            for block in [*model.blocks, model.final_layer]:
                for param in block.adaLN_modulation.fc2.parameters():
                    param.normal_(std=0.3)
            model.final_layer.linear.weight.normal_(std=0.3)
    return model


def inputs(batch=3, height=8, width=8, length=6, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(batch, generator=g, dtype=dtype)
    return dict(
        x=torch.randn(batch, 3, height, width, generator=g, dtype=dtype),
        t=t, r=t * torch.rand(batch, generator=g, dtype=dtype),
        y=torch.randint(0, 6, (batch,), generator=g),
        context=torch.randn(batch, length, TEXT_DIM, generator=g, dtype=dtype),
        context_mask=torch.arange(length)[None] < torch.tensor([length, 2, 4][:batch])[:, None])


def run(model, kw, **extra):
    return model(kw["x"], kw["t"], kw["r"], y=kw["y"], context=kw["context"], context_mask=kw["context_mask"],
                 **extra)


# --- O7: zero output at init, exact parameter counts ------------------------------------------------------------

@pytest.mark.parametrize("conditioning", ["class", "text"])
def test_output_is_zero_at_init_for_any_input(conditioning):
    model = tiny(conditioning, perturb=False, repa_dim=7)
    for seed in range(3):
        kw = inputs(seed=seed, height=8, width=12)
        kw["x"] = kw["x"] * 100
        out, h_proj = run(model, kw, return_repa=True)
        assert torch.equal(out, torch.zeros_like(kw["x"]))
        # every block is the identity, so the REPA features are the projector of the patch embedding
        torch.testing.assert_close(h_proj, model.projector(model.x_embedder(kw["x"])))


PAPER_COUNTS = {  # spec §10-O7: (arch, conditioning, in_channels): (without projector, with projector)
    ("B/4", "class", 4): (128_828_224, 136_173_120),
    ("XL/2", "class", 4): (664_128_016, 672_259_344),
    ("XL/1", "class", 32): (664_164_896, 672_296_224),
    ("T2I-XL/1", "text", 32): (864_978_080, 873_109_408),
}


@pytest.mark.parametrize("key", PAPER_COUNTS, ids=[k[0] for k in PAPER_COUNTS])
def test_paper_sizes_have_exact_parameter_counts(key):
    arch, conditioning, in_channels = key
    for repa_dim, expected in zip((0, 768), PAPER_COUNTS[key]):
        cfg = ModelConfig(arch=arch, conditioning=conditioning, num_classes=1000, repa_dim=repa_dim)
        model = build_model(cfg, in_channels=in_channels, text_dim=1152, device="meta")
        assert count_parameters(model) == expected


def test_official_state_dict_names():
    keys = set(build_model(ModelConfig(arch="tim-tiny", repa_dim=8), 4, 16, device="meta").state_dict())
    for name in ["x_embedder.proj.weight", "t_embedder.mlp.0.weight", "t_embedder.mlp.2.bias",
                 "delta_embedder.mlp.0.weight", "y_embedder.norm.weight", "y_embedder.mlp.fc1_g.weight",
                 "blocks.0.attn.qkv.weight", "blocks.0.attn.qkv_d.weight", "blocks.0.attn.q_norm.weight",
                 "blocks.0.attn.proj.bias", "blocks.0.cross_attn.q.weight", "blocks.0.cross_attn.kv.weight",
                 "blocks.0.cross_attn.k_norm.bias", "blocks.1.mlp.fc1_x.weight", "blocks.1.mlp.fc2.weight",
                 "blocks.1.adaLN_modulation.fc2.bias", "projector.0.weight", "projector.4.bias",
                 "final_layer.linear.weight", "final_layer.adaLN_modulation.fc1_g.weight"]:
        assert name in keys, name
    assert "blocks.0.attn.qkv_d.bias" not in keys
    class_keys = build_model(ModelConfig(arch="tim-tiny", conditioning="class"), 4, None, device="meta").state_dict()
    assert class_keys["y_embedder.embedding_table.weight"].shape == (11, 32)  # 10 classes + the null row


def test_quickstart_size_is_small():
    model = build_model(ModelConfig(), in_channels=1, text_dim=384, device="meta")  # the config defaults
    assert 1.5e6 <= count_parameters(model) <= 3e6


def test_unknown_arch_and_missing_text_dim_are_clear_errors():
    with pytest.raises(ConfigError, match="model.arch = 'XXL' is not one of .*tim-s"):
        build_model(ModelConfig(arch="XXL"), 3, 384)
    with pytest.raises(ValueError, match="text_dim"):
        build_model(ModelConfig(arch="tim-tiny", conditioning="text"), 3, None)
    assert set(ARCHS) >= {"tim-tiny", "tim-s", "B/4", "XL/2", "XL/1", "T2I-XL/1"}


# --- shapes, conditioning, RoPE in the model ------------------------------------------------------------------

@pytest.mark.parametrize("height,width", [(32, 64), (64, 32), (8, 8)])
@pytest.mark.parametrize("conditioning", ["class", "text"])
def test_forward_any_aspect_ratio(height, width, conditioning):
    model = tiny(conditioning, dtype=torch.float32)
    kw = inputs(height=height, width=width, dtype=torch.float32)
    out = run(model, kw)
    assert out.shape == kw["x"].shape and torch.isfinite(out).all() and out.abs().sum() > 0


def test_model_rope_tables_follow_the_token_layout_on_non_square_grids():
    model = tiny(dtype=torch.float32)
    h, w = 16, 32  # a 32x64 input with patch 2
    cos, sin = model.rope(h, w, torch.device("cpu"), torch.float32)
    for row, col in [(0, 5), (3, 0), (7, 31), (15, 17)]:
        expected_cos, expected_sin = rope_tables(torch.tensor([[col, row]]), model.head_dim)
        torch.testing.assert_close(cos[row * w + col], expected_cos[0])
        torch.testing.assert_close(sin[row * w + col], expected_sin[0])
    official = tiny(dtype=torch.float32, rope_grid="official").rope(h, w, torch.device("cpu"), torch.float32)[0]
    assert torch.equal(official, rope_tables(grid_positions(h, w, "official"), model.head_dim)[0])
    assert not torch.equal(official, cos)


def test_wrong_inputs_are_clear_errors():
    model, kw = tiny("class"), inputs()
    with pytest.raises(ValueError, match="not divisible by the patch size 2"):
        model(kw["x"][..., :7], kw["t"], kw["r"], y=kw["y"])
    with pytest.raises(ValueError, match="needs labels y"):
        model(kw["x"], kw["t"], kw["r"])
    with pytest.raises(ValueError, match="repa_dim > 0"):
        model(kw["x"], kw["t"], kw["r"], y=kw["y"], return_repa=True)
    with pytest.raises(ValueError, match="needs context"):
        tiny("text")(kw["x"], kw["t"], kw["r"])


def test_labels_and_captions_change_the_output():
    kw = inputs()
    class_model, text_model = tiny("class"), tiny("text")
    other = dict(kw, y=(kw["y"] + 1) % 6, context=torch.randn_like(kw["context"]))
    assert not torch.allclose(run(class_model, kw), run(class_model, other))
    assert not torch.allclose(run(text_model, kw), run(text_model, other))


@pytest.mark.parametrize("attention", ["sdpa", "math"])
def test_padded_caption_tokens_are_ignored_only_with_the_mask(attention):
    kw = inputs()
    changed = kw["context"].clone()
    changed[~kw["context_mask"]] = torch.randn_like(changed[~kw["context_mask"]]) * 10
    masked = tiny(attention=attention)
    torch.testing.assert_close(run(masked, kw), run(masked, dict(kw, context=changed)), rtol=0, atol=1e-12)
    unmasked = tiny(attention=attention, cross_attention_mask=False)
    assert not torch.allclose(run(unmasked, kw), run(unmasked, dict(kw, context=changed)))


def test_a_caption_with_no_real_token_does_not_give_nan():
    kw = inputs()
    kw["context_mask"][0] = False
    assert torch.isfinite(run(tiny(), kw)).all()


@pytest.mark.parametrize("conditioning", ["class", "text"])
def test_sdpa_and_math_attention_agree_in_the_model(conditioning):
    kw = inputs(height=8, width=16)
    sdpa, math = tiny(conditioning, attention="sdpa"), tiny(conditioning, attention="math")
    torch.testing.assert_close(run(sdpa, kw), run(math, kw), rtol=1e-10, atol=1e-10)


def test_a_forward_logs_its_attention_backend_once(caplog, monkeypatch):
    from tim_ray.models import attention

    monkeypatch.setattr(attention, "_logged", set())
    model, kw = tiny(attention="math"), inputs()
    with caplog.at_level(logging.INFO, logger="tim_ray"):
        run(model, kw)
        run(model, kw)
    assert [r.getMessage() for r in caplog.records] == ["attention: requested math, using math on cpu/torch.float64"]


# --- time embedding, float64, forward-mode AD -------------------------------------------------------------------

def test_time_embedding_is_smooth_at_the_dde_scale():
    """Raw t (not 1000·t): every sinusoid has frequency ≤ 1, so its central difference at ε is ≤ 1 (spec §12)."""
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    eps = 0.005
    slope = (TimestepEmbedder.sinusoid(t + eps) - TimestepEmbedder.sinusoid(t - eps)) / (2 * eps)
    assert slope.abs().max() <= 1.0


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")  # torch's own jvp decomps
def test_float64_jvp_matches_the_central_difference_at_order_two():
    """spec §10-O6(c): torch.func.jvp with tangent (v, 1, 0) vs DDE; the error falls as ε² (math attention)."""
    model = tiny(attention="math")
    kw = inputs()
    v = torch.randn_like(kw["x"])

    def f(x, t, r):
        return model(x, t, r, context=kw["context"], context_mask=kw["context_mask"])

    x, t, r = kw["x"], kw["t"], kw["r"]
    _, exact = torch.func.jvp(f, (x, t, r), (v, torch.ones_like(t), torch.zeros_like(r)))
    errors = []
    for eps in (0.02, 0.01, 0.005):
        dde = (f(x + eps * v, t + eps, r) - f(x - eps * v, t - eps, r)) / (2 * eps)
        errors.append((dde - exact).abs().max().item())
    ratios = [errors[i] / errors[i + 1] for i in range(2)]
    assert all(3.0 < ratio < 5.0 for ratio in ratios), (errors, ratios)


def test_gradients_reach_every_parameter():
    model = tiny("text", dtype=torch.float32, repa_dim=5)
    kw = inputs(dtype=torch.float32)
    out, h_proj = run(model, kw, return_repa=True)
    (out.square().mean() + h_proj.square().mean()).backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing
