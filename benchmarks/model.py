"""TiM network cost: forward+backward time of SDPA vs math attention, parameter and activation memory.

    python benchmarks/model.py [--repeats 7] [--device cpu|cuda]

Both backends are timed in the same run, alternating, after a warm-up; the median of the repeats is reported.
Activation memory is the bytes of the distinct tensors autograd saves for backward (saved-tensor hooks), i.e.
what a training step keeps alive between forward and backward at that batch size.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

from tim_ray.models.registry import ARCHS, count_parameters
from tim_ray.models.tim import TiM

# (label, arch, depth override, conditioning, in_channels, image size, batch)
CASES = [
    ("tim-tiny t2i 3x32x32", "tim-tiny", None, "text", 3, 32, 16),
    ("tim-s t2i 1x32x32", "tim-s", None, "text", 1, 32, 64),
    ("XL/2 (2 blocks) c2i 4x32x32", "XL/2", 2, "class", 4, 32, 4),
]
TEXT_DIM, TEXT_TOKENS = 384, 32


def build(arch_name: str, depth: int | None, conditioning: str, in_channels: int, device) -> TiM:
    arch = ARCHS[arch_name]
    if depth is not None:
        arch = dataclasses.replace(arch, depth=depth, encoder_depth=min(arch.encoder_depth, depth))
    return TiM(in_channels=in_channels, conditioning=conditioning, num_classes=1000, text_dim=TEXT_DIM,
               **dataclasses.asdict(arch)).to(device)


def make_inputs(conditioning: str, in_channels: int, size: int, batch: int, device) -> tuple[tuple, dict]:
    x = torch.randn(batch, in_channels, size, size, device=device)
    t = torch.rand(batch, device=device)
    r = t * torch.rand(batch, device=device)
    if conditioning == "class":
        return (x, t, r), {"y": torch.randint(0, 1001, (batch,), device=device)}
    mask = torch.arange(TEXT_TOKENS, device=device)[None] < torch.randint(2, TEXT_TOKENS, (batch, 1), device=device)
    return (x, t, r), {"context": torch.randn(batch, TEXT_TOKENS, TEXT_DIM, device=device), "context_mask": mask}


def step(model: TiM, args: tuple, kwargs: dict) -> None:
    model.zero_grad(set_to_none=True)
    model(*args, **kwargs).square().mean().backward()


def timed(model: TiM, args: tuple, kwargs: dict) -> float:
    if args[0].device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    step(model, args, kwargs)
    if args[0].device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def saved_activation_bytes(model: TiM, args: tuple, kwargs: dict) -> int:
    """Bytes of the distinct storages autograd saves in one forward (parameters excluded)."""
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in param_storages:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(*args, **kwargs).square().mean()
    return sum(seen.values())


def measure(case, repeats: int, device) -> dict:
    label, arch, depth, conditioning, in_channels, size, batch = case
    torch.manual_seed(0)
    model = build(arch, depth, conditioning, in_channels, device)
    args, kwargs = make_inputs(conditioning, in_channels, size, batch, device)
    times = {"sdpa": [], "math": []}
    activations = {}
    for backend in times:
        model.attention = backend
        activations[backend] = saved_activation_bytes(model, args, kwargs)
        for _ in range(2):
            step(model, args, kwargs)
    for _ in range(repeats):
        for backend in times:
            model.attention = backend
            times[backend].append(timed(model, args, kwargs))
    sdpa, math = (statistics.median(times[b]) for b in ("sdpa", "math"))
    tokens = (size // model.patch_size) ** 2
    return dict(label=label, batch=batch, tokens=tokens, params=count_parameters(model),
                param_bytes=sum(p.numel() * p.element_size() for p in model.parameters()),
                sdpa_s=sdpa, math_s=math, act_sdpa=activations["sdpa"], act_math=activations["math"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    options = parser.parse_args()
    device = torch.device(options.device)
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, fp32, "
          f"median of {options.repeats} fwd+bwd after 2 warm-ups")
    header = (f"{'case':30} {'batch':>5} {'tokens':>6} {'params':>11} {'param MB':>9} {'sdpa ms':>8} "
              f"{'math ms':>8} {'math/sdpa':>9} {'act MB sdpa':>11} {'act MB math':>11}")
    print(header)
    for case in CASES:
        row = measure(case, options.repeats, device)
        print(f"{row['label']:30} {row['batch']:>5} {row['tokens']:>6} {row['params']:>11,} "
              f"{row['param_bytes'] / 2**20:>9.1f} {row['sdpa_s'] * 1e3:>8.1f} {row['math_s'] * 1e3:>8.1f} "
              f"{row['math_s'] / row['sdpa_s']:>9.2f} {row['act_sdpa'] / 2**20:>11.1f} "
              f"{row['act_math'] / 2**20:>11.1f}")


if __name__ == "__main__":
    main()
