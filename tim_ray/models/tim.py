"""The Transition Model network (TiM, arXiv 2509.04394, docs/math.md §11): a DiT-style transformer F(x_t, t, r, cond).

Reading order: small layers, the embedders of the inputs, the two attentions, the block, the final layer, the
model. Module and parameter names follow the official implementation (x_embedder, t_embedder, delta_embedder,
y_embedder, blocks.i.{attn.qkv, attn.qkv_d, cross_attn.kv, mlp.fc1_g, adaLN_modulation.fc2, ...}, projector,
final_layer) so that a released state dict loads with strict=True. LayerNorms without affine parameters carry
no state, so they are plain function calls here.

Two heads share the trunk:
- class-to-image: c = e_t(t) + e_Δ(t-r) + e_y(y), 6-way adaLN (attention, MLP);
- text-to-image: c = e_t(t) + e_Δ(t-r), caption tokens through cross-attention, 9-way adaLN.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from tim_ray.models.attention import attention, check_backend, resolve_backend
from tim_ray.models.rope import apply_rope, grid_positions, rope_tables

CONDITIONINGS = ("class", "text")


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


def plain_norm(x: torch.Tensor) -> torch.Tensor:
    """LayerNorm without affine parameters, eps 1e-6 (every token norm of the trunk)."""
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


class SwiGLU(nn.Module):
    """fc2(silu(fc1_g x) ⊙ fc1_x x)."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int):
        super().__init__()
        self.fc1_g = nn.Linear(in_features, hidden_features)
        self.fc1_x = nn.Linear(in_features, hidden_features)
        self.fc2 = nn.Linear(hidden_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.silu(self.fc1_g(x)) * self.fc1_x(x))


# ---------------------------------------------------------------------------------------------------------------
# Input embedders


class PatchEmbed(nn.Module):
    """(B, C, H, W) -> (B, H/p · W/p, D), tokens in row-major order n = row · W/p + col."""

    def __init__(self, in_channels: int, hidden_size: int, patch_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x.to(self.proj.weight.dtype)).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """MLP of a 256-d sinusoid [cos(t·f), sin(t·f)], f_i = 10000^(-i/128), on the raw t ∈ [0, 1].

    The raw scale matters (docs/math.md §3): with 1000·t the fastest sinusoid turns ~5 rad between DDE's t ± 0.005
    evaluations, the finite difference becomes noise and training diverges.
    """

    frequency_dim = 256

    def __init__(self, hidden_size: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(self.frequency_dim, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))

    @classmethod
    def sinusoid(cls, t: torch.Tensor) -> torch.Tensor:
        dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
        half = cls.frequency_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=dtype) / half)
        args = t.to(dtype)[:, None] * freqs
        return torch.cat([args.cos(), args.sin()], dim=-1)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.sinusoid(t).to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """A table of num_classes + 1 rows; row num_classes is the null (dropped) label used for CFG."""

    def __init__(self, num_classes: int, hidden_size: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(labels)


class CaptionEmbedder(nn.Module):
    """Text-encoder features (B, L, text_dim) -> caption tokens (B, L, D): LayerNorm then SwiGLU(→4D→D)."""

    def __init__(self, text_dim: int, hidden_size: int):
        super().__init__()
        self.norm = nn.LayerNorm(text_dim)
        self.mlp = SwiGLU(text_dim, 4 * hidden_size, hidden_size)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.norm(features.to(self.norm.weight.dtype)))


# ---------------------------------------------------------------------------------------------------------------
# Attention


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, N, H·d) -> (B, H, N, d)."""
    return x.unflatten(-1, (num_heads, -1)).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, N, d) -> (B, N, H·d)."""
    return x.transpose(1, 2).flatten(2)


class SelfAttention(nn.Module):
    """Interval-aware self-attention: qkv = W·h + b + W_d·e_Δ, then QK-norm, 2D RoPE on q and k."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        head_dim = hidden_size // num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.qkv_d = nn.Linear(hidden_size, 3 * hidden_size, bias=False)
        self.q_norm = nn.LayerNorm(head_dim)
        self.k_norm = nn.LayerNorm(head_dim)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x, delta_emb, rope_cos, rope_sin, backend: str) -> torch.Tensor:
        qkv = self.qkv(x) + self.qkv_d(delta_emb)  # (B, N, 3D) + (B, 1, 3D)
        q, k, v = (split_heads(part, self.num_heads) for part in qkv.chunk(3, dim=-1))
        # QK-norm upcasts under autocast; the attention kernel gets them back in v's dtype.
        q = apply_rope(self.q_norm(q), rope_cos, rope_sin).to(v.dtype)
        k = apply_rope(self.k_norm(k), rope_cos, rope_sin).to(v.dtype)
        return self.proj(merge_heads(attention(q, k, v, backend)))


class CrossAttention(nn.Module):
    """Image tokens attend to caption tokens. QK-norm on both; RoPE on the queries only, as in the official
    model, which makes the logits depend on the query's place in the image."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        head_dim = hidden_size // num_heads
        self.q = nn.Linear(hidden_size, hidden_size)
        self.kv = nn.Linear(hidden_size, 2 * hidden_size)
        self.q_norm = nn.LayerNorm(head_dim)
        self.k_norm = nn.LayerNorm(head_dim)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x, context, context_mask, rope_cos, rope_sin, backend: str) -> torch.Tensor:
        q = split_heads(self.q(x), self.num_heads)
        k, v = (split_heads(part, self.num_heads) for part in self.kv(context).chunk(2, dim=-1))
        q = apply_rope(self.q_norm(q), rope_cos, rope_sin).to(v.dtype)
        k = self.k_norm(k).to(v.dtype)
        return self.proj(merge_heads(attention(q, k, v, backend, key_padding_mask=context_mask)))


# ---------------------------------------------------------------------------------------------------------------
# Block, final layer


class TiMBlock(nn.Module):
    """adaLN-zero transformer block. The modulation SwiGLU reads c directly (no SiLU in front); its zero-init
    fc2 makes every gate 0 at init, so the block starts as the identity."""

    def __init__(self, hidden_size: int, num_heads: int, adaln_hidden_size: int, mlp_ratio: float,
                 cross_attention: bool):
        super().__init__()
        self.attn = SelfAttention(hidden_size, num_heads)
        self.cross_attn = CrossAttention(hidden_size, num_heads) if cross_attention else None
        self.mlp = SwiGLU(hidden_size, int(hidden_size * mlp_ratio) * 2 // 3, hidden_size)
        self.num_modulations = 9 if cross_attention else 6
        self.adaLN_modulation = SwiGLU(hidden_size, adaln_hidden_size, self.num_modulations * hidden_size)

    def forward(self, x, c, delta_emb, rope_cos, rope_sin, backend: str, context=None, context_mask=None):
        mods = self.adaLN_modulation(c).chunk(self.num_modulations, dim=-1)
        shift_msa, scale_msa, gate_msa = mods[:3]
        shift_mlp, scale_mlp, gate_mlp = mods[-3:]
        h = modulate(plain_norm(x), shift_msa, scale_msa)
        x = x + gate_msa * self.attn(h, delta_emb, rope_cos, rope_sin, backend)
        if self.cross_attn is not None:
            shift_msc, scale_msc, gate_msc = mods[3:6]
            h = modulate(plain_norm(x), shift_msc, scale_msc)
            x = x + gate_msc * self.cross_attn(h, context, context_mask, rope_cos, rope_sin, backend)
        return x + gate_mlp * self.mlp(modulate(plain_norm(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = SwiGLU(hidden_size, hidden_size // 2, 2 * hidden_size)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(plain_norm(x), shift, scale))


def repa_projector(hidden_size: int, projector_dim: int, repa_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(hidden_size, projector_dim), nn.SiLU(), nn.Linear(projector_dim, projector_dim),
                         nn.SiLU(), nn.Linear(projector_dim, repa_dim))


# ---------------------------------------------------------------------------------------------------------------
# The model


class TiM(nn.Module):
    """F_θ(x_t, t, r, cond): the average velocity over [r, t], same shape as x_t (docs/math.md §2).

    `attention` is a plain attribute ("auto" | "flash" | "sdpa" | "math") read on every call, so a caller may
    switch to "math" for torch.func.jvp. `blocks` is an nn.ModuleList: the unit that FSDP2 shards.
    """

    def __init__(self, *, in_channels: int, hidden_size: int, depth: int, num_heads: int, patch_size: int,
                 adaln_hidden_size: int, encoder_depth: int, conditioning: str = "class", num_classes: int = 1000,
                 text_dim: int | None = None, repa_dim: int = 0, projector_dim: int = 2048,
                 mlp_ratio: float = 4.0, attention: str = "auto", rope_grid: str = "row_col",
                 cross_attention_mask: bool = True):
        super().__init__()
        if conditioning not in CONDITIONINGS:
            raise ValueError(f"conditioning '{conditioning}' is not one of {', '.join(CONDITIONINGS)}")
        if conditioning == "text" and not text_dim:
            raise ValueError("text conditioning needs text_dim, the width of the text encoder's features")
        if hidden_size % num_heads or (hidden_size // num_heads) % 4:
            raise ValueError(f"hidden_size {hidden_size} / num_heads {num_heads} must be a head dim divisible by 4")
        if repa_dim and not 1 <= encoder_depth <= depth:
            raise ValueError(f"encoder_depth {encoder_depth} must be in [1, depth={depth}] for the REPA projector")
        grid_positions(1, 1, rope_grid)  # rejects an unknown mapping now rather than on the first forward
        check_backend(attention)
        self.in_channels = self.out_channels = in_channels
        self.patch_size, self.head_dim, self.encoder_depth = patch_size, hidden_size // num_heads, encoder_depth
        self.conditioning, self.rope_grid, self.cross_attention_mask = conditioning, rope_grid, cross_attention_mask
        self.attention = attention

        self.x_embedder = PatchEmbed(in_channels, hidden_size, patch_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.delta_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = (LabelEmbedder(num_classes, hidden_size) if conditioning == "class"
                           else CaptionEmbedder(text_dim, hidden_size))
        self.blocks = nn.ModuleList(
            TiMBlock(hidden_size, num_heads, adaln_hidden_size, mlp_ratio, cross_attention=conditioning == "text")
            for _ in range(depth))
        self.projector = repa_projector(hidden_size, projector_dim, repa_dim) if repa_dim else None
        self.final_layer = FinalLayer(hidden_size, patch_size, in_channels)
        self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """Spec §4: xavier Linears with zero bias, N(0, 0.02) for the label table, the caption MLP and the t MLP
        (the Δt MLP keeps xavier), zero adaLN fc2 and final Linear, so F ≡ 0 at init. Call it again after
        materialising a meta-device model (to_empty)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                module.reset_parameters()
        conv = self.x_embedder.proj
        nn.init.xavier_uniform_(conv.weight.view(conv.weight.shape[0], -1))
        nn.init.zeros_(conv.bias)
        normal_weights = [self.t_embedder.mlp[0].weight, self.t_embedder.mlp[2].weight]
        if self.conditioning == "class":
            normal_weights.append(self.y_embedder.embedding_table.weight)
        else:
            caption_mlp = self.y_embedder.mlp
            normal_weights += [caption_mlp.fc1_g.weight, caption_mlp.fc1_x.weight, caption_mlp.fc2.weight]
        for weight in normal_weights:
            nn.init.normal_(weight, std=0.02)
        zeroed = [self.final_layer.linear, self.final_layer.adaLN_modulation.fc2]
        zeroed += [block.adaLN_modulation.fc2 for block in self.blocks]
        for linear in zeroed:
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)

    def rope(self, h: int, w: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        positions = grid_positions(h, w, self.rope_grid, device=device)
        table_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        return rope_tables(positions, self.head_dim, table_dtype)

    def unpatchify(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """(B, h·w, p·p·C) -> (B, C, h·p, w·p); each token's features are ordered (patch row, patch col, C)."""
        p, c = self.patch_size, self.out_channels
        x = x.reshape(x.shape[0], h, w, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def condition(self, t, r, y, context, context_mask):
        """(c (B, 1, D), e_Δ (B, 1, D), caption tokens or None, their key padding mask or None)."""
        delta_emb = self.delta_embedder(t - r)[:, None]
        c = self.t_embedder(t)[:, None] + delta_emb
        if self.conditioning == "class":
            if y is None:
                raise ValueError("a class-conditional TiM needs labels y (use num_classes for the null label)")
            return c + self.y_embedder(y)[:, None], delta_emb, None, None
        if context is None:
            raise ValueError("a text-conditional TiM needs context (B, L, text_dim) from the text encoder")
        tokens = plain_norm(self.y_embedder(context))
        if context_mask is None or not self.cross_attention_mask:
            return c, delta_emb, tokens, None
        # A row with no real token would softmax over nothing (NaN); let it see every token, as unmasked.
        context_mask = context_mask | ~context_mask.any(dim=1, keepdim=True)
        return c, delta_emb, tokens, context_mask

    def forward(self, x, t, r, *, y=None, context=None, context_mask=None, return_repa: bool = False):
        """x (B, C, H, W) with H, W divisible by the patch size; t, r (B,) with r ≤ t in [0, 1]; y (B,) int64
        labels; context (B, L, text_dim) and context_mask (B, L) bool (True = real token).
        Returns F (B, C, H, W), or (F, h_proj (B, N, repa_dim)) when return_repa."""
        _, _, height, width = x.shape
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(f"input size {height}x{width} is not divisible by the patch size {p}")
        if return_repa and self.projector is None:
            raise ValueError("return_repa needs a REPA projector: build the model with repa_dim > 0")
        h, w = height // p, width // p
        tokens = self.x_embedder(x)
        c, delta_emb, context, context_mask = self.condition(t, r, y, context, context_mask)
        rope_cos, rope_sin = self.rope(h, w, tokens.device, tokens.dtype)
        # The patch embedding comes out in the compute dtype (bf16 under autocast), which decides flash vs SDPA.
        backend = resolve_backend(self.attention, tokens.device, tokens.dtype)
        h_proj = None
        for depth, block in enumerate(self.blocks, start=1):
            tokens = block(tokens, c, delta_emb, rope_cos, rope_sin, backend, context, context_mask)
            if return_repa and depth == self.encoder_depth:
                h_proj = self.projector(tokens)
        out = self.unpatchify(self.final_layer(tokens, c), h, w)
        return (out, h_proj) if return_repa else out
