"""How accurate is the DDE time derivative under bf16 autocast? (docs/decisions.md, docs/math.md B2)

    python benchmarks/dde_precision.py [--arch tim-s] [--device cpu|cuda] [--batch 32]

Reference: the exact derivative by torch.func.jvp in float64 with tangent (v, 1, 0). The network is a TiM with
math attention and weights jittered off the zero init (so F ≠ 0). For each ε it reports the rms error of:
  fp32           DDE with fp32 forwards
  bf16           DDE, forwards under bf16 autocast, difference in fp32 (tim-ray's default)
  bf16-official  forwards under bf16 autocast, each output scaled by 1/(2ε) in bf16 before subtracting
"""
from __future__ import annotations

import argparse
import dataclasses

import torch

from tim_ray.config import ModelConfig
from tim_ray.models.registry import build_model
from tim_ray.transition.objective import dde_time_derivative, jvp_time_derivative
from tim_ray.transition.paths import OTFMPath

EPSILONS = (0.0025, 0.005, 0.01, 0.02)


def official_order(model, x, z, t, r, cond, path, epsilon):
    """The official arithmetic: F(t+ε)·(1/2ε) - F(t-ε)·(1/2ε), in the forwards' dtype."""
    scale = 1 / (2 * epsilon)
    upper = model(path.interpolate(x, z, t + epsilon), t + epsilon, r, **cond)
    lower = model(path.interpolate(x, z, t - epsilon), t - epsilon, r, **cond)
    return upper * scale - lower * scale


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="tim-s")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    device, path = torch.device(args.device), OTFMPath()
    config = dataclasses.replace(ModelConfig(), arch=args.arch, conditioning="class", attention="math")
    torch.manual_seed(0)
    model = build_model(config, in_channels=3, text_dim=None, device=device, dtype=torch.float64)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    x, z = (torch.randn(args.batch, 3, 32, 32, device=device, dtype=torch.float64) for _ in range(2))
    t = 0.1 + 0.85 * torch.rand(args.batch, device=device, dtype=torch.float64)
    r = t * torch.rand(args.batch, device=device, dtype=torch.float64)
    r = torch.minimum(r, t - 0.03)  # keep every row on the central stencil for all ε
    cond = {"y": torch.randint(0, config.num_classes, (args.batch,), device=device)}
    exact = jvp_time_derivative(model, x, z, t, r, cond, path=path)
    model.float()
    x32, z32, t32, r32 = x.float(), z.float(), t.float(), r.float()
    rms = lambda estimate: (estimate.double() - exact).pow(2).mean().sqrt().item()
    print(f"{args.arch} on {device}, batch {args.batch}: rms |dF/dt| = {exact.pow(2).mean().sqrt().item():.3f}, "
          f"rms |F| = {model(x32, t32, r32, **cond).pow(2).mean().sqrt().item():.3f}")
    print(f"{'eps':>8} {'fp32':>10} {'bf16':>10} {'bf16-official':>14}")
    for epsilon in EPSILONS:
        fp32 = dde_time_derivative(model, x32, z32, t32, r32, cond, path=path, epsilon=epsilon)
        with torch.autocast(device.type, dtype=torch.bfloat16), torch.no_grad():
            bf16 = dde_time_derivative(model, x32, z32, t32, r32, cond, path=path, epsilon=epsilon)
            official = official_order(model, x32, z32, t32, r32, cond, path, epsilon)
        print(f"{epsilon:8.4f} {rms(fp32):10.2e} {rms(bf16):10.2e} {rms(official):14.2e}")


if __name__ == "__main__":
    main()
