"""The FSDP2 plan: `fully_shard` each transformer block, then the root (as torchtitan does for its DiT/Flux).

Only plain forwards ever go through the sharded module, including the two no-grad DDE forwards of the objective;
that is what makes TiM's finite-difference derivative compatible with FSDP (a JVP through FSDP's hooks is not).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype:
    """`train.precision`: auto = bf16 autocast on CUDA, fp32 elsewhere (CPU bf16 matmuls are slow here)."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return torch.float32


def apply_activation_checkpointing(model: nn.Module) -> None:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for i, block in enumerate(model.blocks):
        model.blocks[i] = checkpoint_wrapper(block)


def shard_model(model: nn.Module, device: torch.device, world_size: int) -> nn.Module:
    """Shard `model` in place over all ranks. Parameters are gathered in fp32, not bf16: bf16 compute comes from
    autocast around the gradient forward, so the two DDE forwards can run in fp32 (with bf16 weights the finite
    difference is mostly round-off noise; see docs/decisions.md, B2). Gradients are reduced in fp32."""
    mesh = init_device_mesh(device.type, (world_size,))
    policy = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model
