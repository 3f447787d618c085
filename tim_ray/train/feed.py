"""A training worker's view of the data: this rank's batches from any position, the rejected rows it met, and what
sampling needs (prompt conditions, the latent shape, the decoder).

The position is (epoch, samples consumed in that epoch); the order within an epoch is a pure function of
(seed, epoch) (tim_ray.data.order), so resuming at a position continues exactly, at any world size.
"""
from __future__ import annotations

import json
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from tim_ray.config import Config
from tim_ray.data.batches import StreamingData, image_channels, rank_batches, window_cache
from tim_ray.data.geometry import PIXEL_CODEC
from tim_ray.data.records import REJECT_REASONS
from tim_ray.data.rejects import rejects_sorted
from tim_ray.eval.conditions import label_conditions, prompt_conditions

REJECTS_DIR = "rejects"


@dataclass
class Position:
    epoch: int
    epoch_samples: int


def _summed(counts: Counter) -> dict[str, int]:
    """Counts by reason summed over the ranks (a collective every rank joins)."""
    values = torch.tensor([counts.get(r, 0) for r in REJECT_REASONS], dtype=torch.int64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(values)
    return {reason: int(n) for reason, n in zip(REJECT_REASONS, values.tolist()) if n}


class RejectTally:
    """The rejected rows a rank meets, counted by reason per epoch and recorded exactly once, also across resume.

    Records (first epoch only: later epochs meet the same rows again) go to <run dir>/rejects/ in one file per rank
    and checkpoint interval, named by its steps; a resume from step S deletes the files of steps after S, which
    the resumed run meets again. Rank 0 carries the epoch's counts of all ranks in the checkpoint (TrainState).
    """

    def __init__(self, run_dir: Path, rank: int, step: int, epoch_counts: dict[str, int]):
        self.directory, self.rank = run_dir / REJECTS_DIR, rank
        self.counts = Counter(epoch_counts if rank == 0 else {})
        self.records: list[dict] = []
        self.since = step
        if rank == 0 and self.directory.is_dir():
            for part in self.directory.glob("steps-*.jsonl"):
                if int(part.name.split("-")[2].split(".")[0]) > step:
                    part.unlink()

    def add(self, records: list[dict], epoch: int) -> None:
        self.counts.update(r["reason"] for r in records)
        if epoch == 0:
            self.records += records

    def checkpoint(self, step: int) -> dict[str, int]:
        """Write this rank's records since the last checkpoint; the epoch's counts over all ranks."""
        if self.records:
            self.directory.mkdir(parents=True, exist_ok=True)
            part = self.directory / f"steps-{self.since:08d}-{step:08d}.rank{self.rank}.jsonl"
            part.write_text("".join(json.dumps(r) + "\n" for r in rejects_sorted(self.records)))
            self.records = []
        self.since = step
        return _summed(self.counts)

    def end_epoch(self) -> dict[str, int]:
        """The finished epoch's counts over all ranks; starts the next epoch's."""
        total = _summed(self.counts)
        self.counts = Counter()
        return total

    def merge(self, into: Path) -> int:
        """Rank 0, after every rank's last checkpoint: all records in one file, sorted; returns their number."""
        records = [json.loads(line) for part in sorted(self.directory.glob("steps-*.jsonl"))
                   for line in part.read_text().splitlines()] if self.directory.is_dir() else []
        into.write_text("".join(json.dumps(r) + "\n" for r in rejects_sorted(records)))
        return len(records)


def _shared_cache(data: StreamingData, rank: int, world: int):
    """One WindowCache for all ranks: rank 0 makes it under a fresh name and tells the others."""
    if world == 1 or not dist.is_initialized():
        return window_cache(data)
    name = [f"tim-ray-windows-{uuid.uuid4().hex}" if rank == 0 else None]
    if rank == 0:
        cache = window_cache(data, name[0])
    dist.broadcast_object_list(name, src=0)
    if rank != 0:
        import ray

        cache = ray.get_actor(name[0])
    dist.barrier()  # rank 0 keeps the actor alive; the others only look it up
    return cache


class TrainingFeed:
    def __init__(self, cfg: Config, data: StreamingData, rank: int, world: int, device: torch.device):
        from tim_ray.models.codecs import load_codec

        self.cfg, self.data, self.rank, self.world, self.device = cfg, data, rank, world, device
        pixel = cfg.model.codec == PIXEL_CODEC
        self.codec = load_codec(cfg.model.codec, kind=cfg.model.codec_kind, device=device,
                                image_channels=image_channels(cfg) if pixel else 3)
        self.channels = self.codec.channels  # the network's input channels
        self.text = None
        if cfg.model.conditioning == "text":
            from tim_ray.models.text import load_text_encoder

            self.text = load_text_encoder(cfg.model.text_encoder, cfg.model.max_text_tokens, device=device)
        self.cache = _shared_cache(data, rank, world)
        self.rejects: RejectTally | None = None
        self.filler: dict | None = None  # a 1-row batch for a step whose rows were all rejected

    @property
    def text_dim(self) -> int | None:
        return self.text.dim if self.text else None

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return self.codec.latent_shape(self.cfg.data.height, self.cfg.data.width)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.codec.decode(latents)

    def track_rejects(self, run_dir: Path, state) -> None:
        self.rejects = RejectTally(run_dir, self.rank, state.step, state.epoch_rejects)

    def _blank(self) -> dict:
        """A 1-row batch of zeros standing in for a step without rows before any real row was seen."""
        c, h, w = self.sample_shape
        length = self.cfg.model.max_text_tokens if self.text else 0
        mask = torch.zeros(1, length, dtype=torch.bool)
        mask[:, :1] = True  # one visible token: an all-masked row would make attention NaN
        return {"image": torch.zeros(1, c, h, w), "text": torch.zeros(1, length, self.text_dim or 0),
                "text_mask": mask, "label": torch.zeros(1, dtype=torch.int64),
                "sample_id": torch.full((1,), -1, dtype=torch.int64)}

    def batches(self, position: Position, global_batch: int | None,
                on_epoch_end: Callable[[int, dict], None] = lambda epoch, counts: None
                ) -> Iterator[tuple[dict, int, Position]]:
        """(this rank's batch on the device, rows planned for the whole global batch, the position after it), epoch
        after epoch, forever. `global_batch` None: bucketed data, whose global batches are sized per bucket. After
        each epoch, `on_epoch_end(epoch, rejected rows of that epoch by reason over all ranks)`. A batch may have
        0 rows (all rejected): then `self.filler` is the row to run with weight 0."""
        epoch, start = position.epoch, position.epoch_samples
        while True:
            produced = False
            for batch, plan in rank_batches(self.data, epoch, start, global_batch, self.rank, self.world,
                                            self.cache):
                produced = True
                if self.rejects is not None:
                    self.rejects.add(plan.rejects, epoch)
                batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
                if len(batch["image"]):
                    self.filler = {k: v[:1] for k, v in batch.items()}
                elif self.filler is None:
                    self.filler = {k: v.to(self.device) for k, v in self._blank().items()}
                yield batch, plan.global_rows, Position(epoch, plan.after)
            if not produced and start == 0:
                raise ValueError(f"the data has {self.data.num_rows} rows, fewer than one global batch "
                                 f"({global_batch or 'of a bucket'}); lower train.batch_size or add data")
            on_epoch_end(epoch, self.rejects.end_epoch() if self.rejects is not None else {})
            epoch, start = epoch + 1, 0

    def grid_prompts(self) -> list[str]:
        """eval.prompts, else the source's own prompts (one per Fashion-MNIST class; the first distinct captions
        of a file source)."""
        if self.cfg.eval.prompts:
            return list(self.cfg.eval.prompts)
        return self.data.prompts()

    def grid_conditions(self) -> tuple[dict, dict, list[str]]:
        """(cond, uncond, column names) for a sample grid: prompts for text models, every class for class models."""
        if self.text is None:
            n = self.cfg.model.num_classes
            return (*label_conditions(range(n), n, self.device), [f"class {i}" for i in range(n)])
        prompts = self.grid_prompts()
        return (*prompt_conditions(self.text, prompts), prompts)

    def null_text(self) -> dict:
        """The empty caption's features as a 1-row condition, the null branch of the enhanced target."""
        features, mask = self.text.encode([""])
        return {"context": features.to(self.device), "context_mask": mask.to(self.device)}

    def report(self, run_dir: Path) -> dict:
        """The data's totals at the end of a run; rank 0 merges the rejects files into data.rejects_file."""
        report = {"source_rows": self.data.num_rows}
        if self.data.precomputed:
            return {**report, "rejected_at_precompute": self.data.manifest.get("rejected", 0)}
        if dist.is_initialized() and self.world > 1:
            dist.barrier()  # every rank has written its last records
        if self.rank == 0 and self.rejects is not None:
            report["rejected_rows_listed"] = self.rejects.merge(run_dir / self.cfg.data.rejects_file)
        return report
