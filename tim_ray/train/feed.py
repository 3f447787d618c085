"""A training worker's view of the data: this rank's batches from any position, and what sampling needs (prompt
conditions, the latent shape, the decoder).

The position is (epoch, samples consumed in that epoch); the order within an epoch is a pure function of
(seed, epoch) (tim_ray.data.order), so resuming at a position continues exactly, at any world size.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from tim_ray.config import Config
from tim_ray.data.batches import TrainingData, image_channels, rank_batches
from tim_ray.data.geometry import PIXEL_CODEC
from tim_ray.data.order import epoch_batches
from tim_ray.eval.conditions import fashion_mnist_prompts, label_conditions, prompt_conditions

GRID_COLUMNS_FROM_DATA = 8


@dataclass
class Position:
    epoch: int
    epoch_samples: int


class TrainingFeed:
    def __init__(self, cfg: Config, data: TrainingData, rank: int, world: int, device: torch.device):
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

    @property
    def text_dim(self) -> int | None:
        return self.text.dim if self.text else None

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return self.codec.latent_shape(self.cfg.data.height, self.cfg.data.width)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.codec.decode(latents)

    def batches(self, position: Position, global_batch: int | None) -> Iterator[tuple[dict, int, Position]]:
        """(this rank's batch on the device, samples in the whole global batch, the position after it), epoch
        after epoch, forever. `global_batch` None: bucketed data, whose global batches are sized per bucket."""
        epoch, skip = position.epoch, position.epoch_samples
        seed = self.cfg.train.seed
        while True:
            sizes = [len(b) for b in epoch_batches(self.data.buckets, self.data.bucket_batch_sizes, seed, epoch,
                                                   skip, global_batch, True)]
            if not sizes:
                raise ValueError(f"the data has {self.data.num_rows} rows, fewer than one global batch "
                                 f"({global_batch}); lower train.batch_size or add data")
            local = rank_batches(self.data, seed, epoch, skip, global_batch, self.rank, self.world)
            for i, (size, batch) in enumerate(zip(sizes, local)):
                skip += size
                after = Position(epoch + 1, 0) if i == len(sizes) - 1 else Position(epoch, skip)
                yield {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}, size, after
            epoch, skip = epoch + 1, 0

    def grid_prompts(self) -> list[str]:
        """eval.prompts, else one prompt per Fashion-MNIST class, else the first distinct captions of the data."""
        if self.cfg.eval.prompts:
            return list(self.cfg.eval.prompts)
        if self.cfg.data.source == "fashion-mnist":
            from tim_ray.data.sources.fashion_mnist import CLASS_NOUNS

            return fashion_mnist_prompts(range(len(CLASS_NOUNS)))
        seen: list[str] = []
        for captions in self.data.table["captions"].to_pylist():
            if captions and captions[0] not in seen:
                seen.append(captions[0])
            if len(seen) == GRID_COLUMNS_FROM_DATA:
                break
        return seen

    def grid_conditions(self) -> tuple[dict, dict, list[str]]:
        """(cond, uncond, column names) for a sample grid: prompts for text models, every class for class models."""
        if self.text is None:
            n = self.cfg.model.num_classes
            return (*label_conditions(range(n), n, self.device), [f"class {i}" for i in range(n)])
        prompts = self.grid_prompts()
        return (*prompt_conditions(self.text, prompts), prompts)

    def report(self) -> dict:
        counts = self.data.reject_counts()
        return {"rows": self.data.num_rows, "rejected": sum(counts.values()),
                **{f"rejected.{reason}": n for reason, n in counts.items()}}
