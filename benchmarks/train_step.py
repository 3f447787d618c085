"""What a TiM training step costs, as ratios measured in one run on the same model and batches.

    python benchmarks/train_step.py [--part all|objectives|dde-vs-jvp|ray] [--repeats 7]

1. objectives: a step of each configs/experiments/fmnist_*.toml (TiM, TiM + model guidance, flow matching,
   MeanFlow: tim-s, batch 64, 1x32x32, text conditioning) on the same synthetic batches, as milliseconds and as a
   ratio to TiM's, against docs/math.md §7's forward count; and the steps each run would get at TiM's measured
   compute (the experiment of docs/results.md gives each its steps from this). TiM / flow matching: target <= 1.4x.
2. dde-vs-jvp: the time derivative dF/dt by DDE (two no-grad forwards) vs torch.func.jvp, both on math attention
   (JVP has no SDPA/flash rule): time, and peak memory (CUDA: max_memory_allocated; CPU: the peak resident set of a
   fresh subprocess per method, sampled every ms, above its baseline). Target: DDE at least 2x faster or lighter.
3. ray: the same training loop (FSDP2 over one rank, gloo) inside a 1-worker Ray Train run vs in plain torch in
   this process (run before and after the Ray run), the median per-step time after warm-up, measured inside each
   loop. Target: Ray overhead under 10%. The unsharded loop is printed too, to show what FSDP2 itself costs at
   world size 1. To locate the overhead, the Ray loop then runs as many steps again with the node's other Ray
   processes (Train's controller and helper actors, idle workers, agents) paused with SIGSTOP. `--threads 1` on a
   2-core box leaves those processes a core, as a GPU node (many cores per GPU) does.
4. On CUDA with the XL/2 config (--part gpu): images/s and model FLOPs utilisation counting every forward (the grad
   forward + backward = 3 units, the DDE forwards on half the rows = 1 unit).

Timings alternate between the variants and report medians, because this machine is noisy.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from tim_ray.config import load_config
from tim_ray.models.registry import build_model
from tim_ray.train.step import build_optimizer, step_generator, train_step
from tim_ray.transition.objective import dde_time_derivative, jvp_time_derivative
from tim_ray.transition.paths import get_path

QUICKSTART = ["model.arch=tim-s", "train.batch_size=64"]
ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ["fmnist_tim", "fmnist_tim_mg", "fmnist_fm", "fmnist_meanflow"]  # the first is the baseline
TEXT_DIM, TEXT_TOKENS = 384, 32


def synthetic_batch(cfg, channels: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    b, h, w = cfg.train.batch_size, cfg.data.height, cfg.data.width
    mask = torch.arange(TEXT_TOKENS)[None] < torch.randint(3, 12, (b, 1), generator=g)
    return {"image": torch.rand(b, channels, h, w, generator=g) * 2 - 1,
            "text": torch.randn(b, TEXT_TOKENS, TEXT_DIM, generator=g), "text_mask": mask,
            "label": torch.randint(0, 10, (b,), generator=g)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def alternate(variants: dict, repeats: int, device: torch.device, warmup: int = 2) -> dict[str, float]:
    """Median seconds of each variant, run round-robin so drifting load hits them alike."""
    times = {name: [] for name in variants}
    for i in range(warmup + repeats):
        for name, fn in variants.items():
            elapsed = timed(fn, device)
            if i >= warmup:
                times[name].append(elapsed)
    return {name: statistics.median(values) for name, values in times.items()}


def objectives(repeats: int, device: torch.device) -> None:
    from tim_ray.train.ema import ShardLocalEMA
    from tim_ray.transition.objectives import get_objective

    runs, configs = {}, {}
    for name in EXPERIMENTS:
        cfg = load_config(ROOT / "configs" / "experiments" / f"{name}.toml")
        torch.manual_seed(0)
        model = build_model(cfg.model, 1, TEXT_DIM, device=device)
        optimizer = build_optimizer(model, cfg, 1e-4)
        ema = ShardLocalEMA(model, cfg.ema.decay)
        batch = {k: v.to(device) for k, v in synthetic_batch(cfg, 1).items()}
        null_text = {"context": torch.zeros(1, TEXT_TOKENS, TEXT_DIM, device=device),
                     "context_mask": torch.arange(TEXT_TOKENS, device=device)[None] < 1}
        counter = iter(range(10**9))
        configs[name] = cfg
        runs[name] = lambda m=model, o=optimizer, c=cfg, b=batch, e=ema, n=null_text: train_step(
            m, o, b, c, get_path(c.transition.path), step_generator(0, next(counter), 0, device), ema=e,
            null_text=n)
    medians = alternate(runs, repeats, device)
    base = EXPERIMENTS[0]
    counted = {name: get_objective(c.transition.objective).forwards_per_row(c.transition) for name, c in configs.items()}
    budget = medians[base] * configs[base].train.steps
    print(f"\n[1] a step of each experiment config (tim-s, batch 64, 1x32x32, text), median of {repeats}")
    print(f"  {'config':18s} {'ms':>8s} {'measured':>9s} {'counted':>8s} {'steps at equal compute':>24s} (config's)")
    for name, seconds in medians.items():
        print(f"  {name:18s} {seconds * 1e3:8.1f} {seconds / medians[base]:8.2f}x {counted[name] / counted[base]:7.2f}x "
              f"{budget / seconds:24.0f} ({configs[name].train.steps})")
    print(f"  TiM / flow matching: {medians[base] / medians['fmnist_fm']:.2f}x (docs/math.md §7 counts "
          f"{counted[base] / counted['fmnist_fm']:.2f}; target <= 1.4x)")


def _derivative_setup(device: torch.device, seed: int = 0):
    """A wide, shallow TiM on math attention where activations dominate memory."""
    cfg = load_config(None, ["model.arch=B/4", "model.conditioning=class", "model.num_classes=10",
                             "model.attention=math"])
    torch.manual_seed(seed)
    model = build_model(cfg.model, 4, None, device=device)
    model.blocks = model.blocks[:4]
    g = torch.Generator().manual_seed(seed)
    x, z = torch.randn(2, 8, 4, 64, 64, generator=g).to(device)
    t = torch.full((8,), 0.7, device=device)
    r = torch.full((8,), 0.3, device=device)
    cond = {"y": torch.arange(8, device=device) % 10}
    return model, x, z, t, r, cond, get_path("otfm")


def derivative_fn(method: str, device: torch.device):
    model, x, z, t, r, cond, path = _derivative_setup(device)
    if method == "dde":
        return lambda: dde_time_derivative(model, x, z, t, r, cond, path=path, epsilon=0.005)
    return lambda: jvp_time_derivative(model, x, z, t, r, cond, path=path)


def _peak_rss_subprocess(method: str) -> float:
    """Peak resident MiB of one derivative in a fresh process, above that process's baseline after setup."""
    out = subprocess.run([sys.executable, __file__, "--_rss", method], capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())})
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]


def _rss_child(method: str) -> None:
    """Sample this process's resident set every millisecond while one derivative runs; report the rise."""
    import threading

    import psutil

    fn = derivative_fn(method, torch.device("cpu"))
    process, peak, running = psutil.Process(), [0], [True]
    baseline = process.memory_info().rss

    def sample():
        while running[0]:
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    fn()
    running[0] = False
    sampler.join()
    print(json.dumps({"peak_mib": (peak[0] - baseline) / 2**20}))


def dde_vs_jvp(repeats: int, device: torch.device) -> None:
    medians = alternate({m: derivative_fn(m, device) for m in ("dde", "jvp")}, repeats, device)
    if device.type == "cuda":
        memory = {}
        for method in ("dde", "jvp"):
            fn = derivative_fn(method, device)
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fn()
            memory[method] = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        memory = {method: _peak_rss_subprocess(method) for method in ("dde", "jvp")}
    print("\n[2] dF/dt by DDE vs torch.func.jvp, B/4 width, 4 blocks, batch 8, 4x64x64 (256 tokens), math attention")
    for method in ("dde", "jvp"):
        print(f"  {method}: {medians[method] * 1e3:8.1f} ms, peak memory above baseline {memory[method]:8.1f} MiB")
    print(f"  JVP / DDE: time {medians['jvp'] / medians['dde']:.2f}x, memory "
          f"{memory['jvp'] / max(memory['dde'], 1e-9):.2f}x  (target: DDE >= 2x faster or lighter)")


def ray_vs_plain(steps: int) -> None:
    """Medians of per-step times; the plain FSDP2 loop runs before and after the Ray one, so a drift of this
    machine's speed during the run shows up in both."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    unsharded = _loop_step_seconds({"steps": steps, "sharded": False})["running"]
    plain = _in_one_process_group(lambda: _loop_step_seconds({"steps": steps, "sharded": True})["running"])
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        trainer = TorchTrainer(_ray_loop, train_loop_config={"steps": steps, "sharded": True,
                                                                   "threads": torch.get_num_threads()},
                               scaling_config=ray.train.ScalingConfig(num_workers=1))
        in_ray = trainer.fit().return_value
    finally:
        ray.shutdown()
    plain += _in_one_process_group(lambda: _loop_step_seconds({"steps": steps, "sharded": True})["running"])
    unsharded, plain, in_ray, helpers_paused = (statistics.median(times) for times in (
        unsharded, plain, in_ray["running"], in_ray["paused"]))
    print(f"\n[3] Ray Train worker vs the same loop (FSDP2 world 1, gloo) in plain torch, tim-s batch 64, median of "
          f"{steps} timed steps (plain FSDP2: {2 * steps}, before and after the Ray run)")
    print(f"  plain torch, unsharded: {unsharded * 1e3:8.1f} ms/step;  plain torch, FSDP2: {plain * 1e3:8.1f} ms/step;"
          f"  Ray Train worker, FSDP2: {in_ray * 1e3:8.1f} ms/step")
    print(f"  Ray overhead: {100 * (in_ray / plain - 1):+.1f}%  (target under 10%);  FSDP2 at world size 1: "
          f"{100 * (plain / unsharded - 1):+.1f}%")
    print(f"  Ray Train worker, the next {steps} steps with the node's other Ray processes paused: "
          f"{helpers_paused * 1e3:8.1f} ms/step, overhead {100 * (helpers_paused / plain - 1):+.1f}% (the difference is "
          f"what they cost the loop: each wakes ~100 times a second; it matters when the loop's threads fill every core)")


def _in_one_process_group(run):
    """run() inside a 1-process gloo group, as a Ray Train worker of world size 1 has."""
    import socket

    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        return run()
    finally:
        dist.destroy_process_group()


def _loop_step_seconds(config: dict, paused=None) -> dict[str, list[float]]:
    """Per-step seconds of config["steps"] steps; with `paused` (a context manager), as many again inside it, after
    the others (in one block: the paused processes catch up for a while after they resume)."""
    cfg = load_config(None, QUICKSTART)
    torch.manual_seed(0)
    model = build_model(cfg.model, 1, TEXT_DIM)
    if config["sharded"]:
        from tim_ray.train.parallelize import shard_model

        shard_model(model, torch.device("cpu"), 1)
    optimizer = build_optimizer(model, cfg, 1e-4)
    batch, path = synthetic_batch(cfg, 1), get_path("otfm")
    for step in range(2):
        train_step(model, optimizer, batch, cfg, path, step_generator(0, step, 0))
    times = {"running": [], "paused": []} if paused else {"running": []}
    step = 0
    for condition, steps in times.items():
        with paused() if condition == "paused" else contextlib.nullcontext():
            for _ in range(config["steps"]):
                start = time.perf_counter()
                train_step(model, optimizer, batch, cfg, path, step_generator(0, step, 0))
                steps.append(time.perf_counter() - start)
                step += 1
    return times


@contextlib.contextmanager
def _other_ray_workers_paused():
    """SIGSTOP the other children of this worker's raylet (Ray worker processes and agents), SIGCONT them after."""
    import signal

    raylet, others = os.getppid(), []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
        if parent == raylet and int(pid) != os.getpid():
            others.append(int(pid))
    for pid in others:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in others:
            os.kill(pid, signal.SIGCONT)


def _ray_loop(config: dict) -> dict[str, list[float]]:
    torch.set_num_threads(config["threads"])  # as many as the plain loop, so only Ray and FSDP differ
    return _loop_step_seconds(config, paused=_other_ray_workers_paused)


def gpu_throughput(repeats: int) -> None:
    device = torch.device("cuda")
    cfg = load_config(None, ["model.arch=XL/2", "model.conditioning=class", "model.num_classes=1000",
                             "train.batch_size=64", "data.height=32", "data.width=32", "train.precision=bf16"])
    model = build_model(cfg.model, 4, None, device=device)
    optimizer = build_optimizer(model, cfg, 1e-4)
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.randn(64, 4, 32, 32, generator=g).to(device),
             "label": torch.randint(0, 1000, (64,), generator=g).to(device)}
    path, counter = get_path("otfm"), iter(range(10**9))
    seconds = alternate({"step": lambda: train_step(model, optimizer, batch, cfg, path,
                                                    step_generator(0, next(counter), 0, device),
                                                    autocast_dtype=torch.bfloat16)}, repeats, device)["step"]
    # per-token weights: the blocks without their per-sample modulation MLPs
    params = sum(p.numel() for n, p in model.named_parameters() if n.startswith("blocks.") and "adaLN" not in n)
    tokens = 64 * (32 // 2) ** 2
    forward_flops = 2 * params * tokens + 4 * 28 * 64 * (32 // 2) ** 4 * 1152  # matmuls + attention scores/values
    units = 3 + 2 * (1 - cfg.transition.diffusion_ratio)
    peak = float(os.environ.get("TIM_PEAK_TFLOPS", "989")) * 1e12  # H100 SXM bf16 dense
    print(f"\n[4] XL/2, batch 64, 256 tokens, bf16, {torch.cuda.get_device_name()}: {64 / seconds:.1f} images/s, "
          f"MFU {forward_flops * units / seconds / peak:.1%} (peak {peak / 1e12:.0f} TFLOP/s; target >= 40%)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", default="all", choices=["all", "objectives", "dde-vs-jvp", "ray", "gpu"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None,
                        help="intra-op threads of every loop (default: torch's, one per core); fewer than the cores "
                             "leaves Ray's processes a core of their own, as on a GPU node")
    parser.add_argument("--_rss", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._rss:
        return _rss_child(args._rss)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.part in ("all", "objectives"):
        objectives(args.repeats, device)
    if args.part in ("all", "dde-vs-jvp"):
        dde_vs_jvp(args.repeats, device)
    if args.part in ("all", "ray"):
        ray_vs_plain(steps=3 * args.repeats)
    if args.part in ("all", "gpu") and device.type == "cuda":
        gpu_throughput(args.repeats)


if __name__ == "__main__":
    main()
