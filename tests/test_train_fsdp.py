"""FSDP2 on CPU/gloo with two processes (no Ray): the DDE target through the sharded model equals the target of the
unsharded model (spec B11: the DDE forwards must go through the wrapped module), and a training step keeps ranks in
step."""
import copy
import json

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tim_ray.config import load_config
from tim_ray.models.registry import build_model
from tim_ray.train.parallelize import shard_model
from tim_ray.train.step import build_optimizer, step_generator, train_step
from tim_ray.transition.intervals import sample_intervals
from tim_ray.transition.objective import transition_target
from tim_ray.transition.paths import get_path

WORLD = 2


def _config():
    return load_config(None, ["model.arch=tim-tiny", "model.max_text_tokens=6", "train.batch_size=4",
                              "optim.scale_lr=false"])


def _inputs(rank: int, cfg, path):
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(4, 3, 8, 8, generator=g)
    z = torch.randn(4, 3, 8, 8, generator=g)
    times = sample_intervals(4, path, cfg.transition, g)
    cond = {"context": torch.randn(4, 6, 16, generator=g), "context_mask": torch.ones(4, 6, dtype=torch.bool)}
    return x, z, times, cond


def _worker(rank: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/pg", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    cfg, path = _config(), get_path("otfm")
    torch.manual_seed(0)
    model = build_model(cfg.model, in_channels=3, text_dim=16)
    reference = copy.deepcopy(model)
    shard_model(model, torch.device("cpu"), WORLD)
    x, z, times, cond = _inputs(rank, cfg, path)
    args = dict(path=path, config=cfg.transition)
    # a few optimizer steps first, so the comparison is not at the zero-output init
    optimizer = build_optimizer(model, cfg, 1e-2)
    batch = {"image": x, "text": cond["context"], "text_mask": cond["context_mask"], "label": torch.zeros(4)}
    for step in range(3):
        sharded = train_step(model, optimizer, batch, cfg, path, step_generator(0, step, rank))
        assert not sharded.skipped
    full = {name: p.full_tensor() for name, p in model.named_parameters()}
    target_sharded, dF_sharded = transition_target(model, x, z, times.t, times.r, cond, **args)
    reference.load_state_dict(full)
    target_ref, dF_ref = transition_target(reference, x, z, times.t, times.r, cond, **args)
    result = {"target_diff": (target_sharded - target_ref).abs().max().item(),
              "dF_diff": (dF_sharded - dF_ref).abs().max().item(),
              "dF_rms": dF_ref.pow(2).mean().sqrt().item(),
              "params": {n: v.sum().item() for n, v in full.items()}}
    with open(f"{out_dir}/rank{rank}.json", "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


def test_dde_target_through_fsdp_equals_unsharded_and_ranks_agree(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path),), nprocs=WORLD, join=True)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    for r in results:
        assert r["dF_rms"] > 1e-3  # a real derivative, not the zero of an untrained net
        assert r["target_diff"] < 1e-5 and r["dF_diff"] < 1e-4, r
    assert results[0]["params"] == results[1]["params"]  # every rank holds the same full model after steps
