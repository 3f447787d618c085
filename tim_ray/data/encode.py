"""Encoder stages as Ray Data actor pools: a text encoder and a latent codec, each loaded once per actor.

Both stages see whole groups of rows (a group is one rank's batch of one step, or one precompute chunk) and encode
each group in one call, so the result depends only on the group's rows, never on how Ray Data cut its blocks; the
codec's posterior noise comes from a generator seeded by the group (the `noise_seed` of its first row). That keeps
on-the-fly encoding reproducible across a resume.

Encoders come from tim_ray.models (`load_text_encoder`, `load_codec`) unless an EncoderSpec names other loaders
(tests use tiny stand-ins).

torch is imported only inside the functions that run an encoder: this module is part of what every Ray worker
running a decode task imports, and importing torch costs each such process about 2 CPU-seconds.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import ray
import ray.data

from tim_ray.data.geometry import PIXEL_CODEC
from tim_ray.data.tensors import stacked, with_tensor, without_tensor


def _load_text_encoder(name: str, max_tokens: int, device: str, cache_size: int = 0):
    from tim_ray.models.text import load_text_encoder

    return load_text_encoder(name, max_tokens, device=device, cache_size=cache_size)


def _load_codec(name: str, kind: str, sample_posterior: bool, device: str):
    from tim_ray.models.codecs import load_codec

    return load_codec(name, kind=kind, sample_posterior=sample_posterior, device=device)


@dataclass(frozen=True)
class EncoderSpec:
    """What the encode stages load and how many actors of what size run them."""

    text: bool  # encode captions (text conditioning); False for class-conditional models
    text_encoder: str
    max_text_tokens: int
    codec: str
    codec_kind: str
    sample_posterior: bool
    actors: int
    cpus: int  # per actor; Ray sets OMP_NUM_THREADS (so torch's threads) to it
    gpus: float  # per actor; > 0 puts the encoders on CUDA
    load_text: Callable = _load_text_encoder
    load_codec: Callable = _load_codec

    @staticmethod
    def of(cfg) -> EncoderSpec:
        m, d = cfg.model, cfg.data
        return EncoderSpec(text=m.conditioning == "text", text_encoder=m.text_encoder,
                           max_text_tokens=m.max_text_tokens, codec=m.codec, codec_kind=m.codec_kind,
                           sample_posterior=m.codec_sample_posterior, actors=d.encode_actors, cpus=d.encode_cpus,
                           gpus=d.encode_gpus, load_text=functools.partial(_load_text_encoder,
                                                                           cache_size=m.text_cache))

    @property
    def device(self) -> str:
        return "cuda" if self.gpus > 0 else "cpu"

    @property
    def latent(self) -> bool:
        return self.codec != PIXEL_CODEC


def group_runs(table: pa.Table) -> list[tuple[int, int]]:
    """(start, stop) of each run of equal `group` values, in order."""
    groups = table["group"].to_numpy()
    starts = np.flatnonzero(np.diff(groups)) + 1
    edges = [0, *starts.tolist(), len(groups)]
    return list(zip(edges[:-1], edges[1:]))


def pad_text(features: torch.Tensor, mask: torch.Tensor, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Cut or zero-pad (B, L, D) features and (B, L) mask to L = length, so every batch stacks."""
    features, mask = features[:, :length].float().cpu().numpy(), mask[:, :length].bool().cpu().numpy()
    short = length - features.shape[1]
    if short:
        features = np.pad(features, ((0, 0), (0, short), (0, 0)))
        mask = np.pad(mask, ((0, 0), (0, short)))
    return features, mask


def unit_range(pixels: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, C) -> float32 (B, C, H, W) in [-1, 1]. In numpy: torch's uint8 -> float conversion of a
    permuted tensor took 10 ms of CPU for a 256-image 32x32 batch, numpy 1 ms, with bit-identical results."""
    import torch

    chw = np.ascontiguousarray(pixels.transpose(0, 3, 1, 2))
    out = np.divide(chw, np.float32(127.5), dtype=np.float32)
    return torch.from_numpy(np.subtract(out, np.float32(1.0), out=out))


class TextEncodeStage:
    """Adds `text` (L, D) and `text_mask` (L,) per row from its `caption`."""

    def __init__(self, spec: EncoderSpec):
        self.encoder = spec.load_text(spec.text_encoder, spec.max_text_tokens, spec.device)
        self.length = spec.max_text_tokens

    def __call__(self, table: pa.Table) -> pa.Table:
        captions = table["caption"].to_pylist()
        features, masks = [], []
        for start, stop in group_runs(table):
            f, m = pad_text(*self.encoder.encode(captions[start:stop]), self.length)
            features.append(f)
            masks.append(m)
        # Every row is (L, D) after pad_text: one stacked array each, whose bytes become the column as they are.
        return with_tensor(with_tensor(table, "text", np.concatenate(features)), "text_mask", np.concatenate(masks))


class LatentEncodeStage:
    """Replaces `pixels` by `image` latents (C, h, w); with `with_flipped`, also `image_flipped`, the latents of
    the mirrored pixels (what precompute stores so that training can still flip)."""

    def __init__(self, spec: EncoderSpec, with_flipped: bool):
        self.codec = spec.load_codec(spec.codec, spec.codec_kind, spec.sample_posterior, spec.device)
        self.with_flipped = with_flipped

    def _encode(self, pixels: np.ndarray, generator: torch.Generator) -> list[np.ndarray]:
        return list(self.codec.encode(unit_range(pixels), generator=generator).float().cpu().numpy())

    def __call__(self, table: pa.Table) -> pa.Table:
        import torch

        seeds = table["noise_seed"].to_numpy()
        latents, flipped = [], []
        for start, stop in group_runs(table):
            pixels = stacked(table.slice(start, stop - start), "pixels")
            generator = torch.Generator().manual_seed(int(seeds[start]))
            latents += self._encode(pixels, generator)
            if self.with_flipped:
                flipped += self._encode(np.ascontiguousarray(pixels[:, :, ::-1]), generator)
        table = with_tensor(without_tensor(table, "pixels"), "image", latents)
        return with_tensor(table, "image_flipped", flipped) if self.with_flipped else table


def add_encode_stages(ds: ray.data.Dataset, spec: EncoderSpec, with_flipped: bool = False) -> ray.data.Dataset:
    """ds with the text stage (if spec.text) and the codec stage (unless the codec is the pixel identity)."""
    pool = {"batch_size": None, "batch_format": "pyarrow", "compute": ray.data.ActorPoolStrategy(size=spec.actors),
            "num_cpus": spec.cpus, "num_gpus": spec.gpus}
    if spec.text:
        ds = ds.map_batches(TextEncodeStage, fn_constructor_kwargs={"spec": spec}, **pool)
    if spec.latent:
        ds = ds.map_batches(LatentEncodeStage, fn_constructor_kwargs={"spec": spec, "with_flipped": with_flipped},
                            **pool)
    return ds


@ray.remote
def _null_text(spec: EncoderSpec) -> tuple[np.ndarray, np.ndarray]:
    encoder = spec.load_text(spec.text_encoder, spec.max_text_tokens, spec.device)
    features, mask = pad_text(*encoder.encode([""]), spec.max_text_tokens)
    return features[0], mask[0]


@ray.remote
def _latent_shape(spec: EncoderSpec, pixel_shape: tuple[int, int, int]) -> tuple[int, ...]:
    import torch

    codec = spec.load_codec(spec.codec, spec.codec_kind, spec.sample_posterior, spec.device)
    pixels = np.zeros((1, *pixel_shape), dtype=np.uint8)
    return tuple(codec.encode(unit_range(pixels), generator=torch.Generator().manual_seed(0)).shape[1:])


def check_encoders(spec: EncoderSpec, pixel_shape: tuple[int, int, int]) -> dict:
    """Load and try each encoder once in a Ray task, where the stages will run, before any pipeline starts: a
    missing model or an image size the codec cannot take is then its own one-line error (TextEncoderError,
    CodecError) instead of an actor death deep inside Ray Data. Returns {"null_text": (features (L, D), mask (L,))
    or None, "image_shape": (C, h, w) of an (H, W, C) = pixel_shape image}."""
    options = {"num_cpus": spec.cpus, "num_gpus": spec.gpus}
    null_text = _null_text.options(**options).remote(spec) if spec.text else None
    latent = _latent_shape.options(**options).remote(spec, pixel_shape) if spec.latent else None
    try:
        return {"null_text": ray.get(null_text) if null_text else None,
                "image_shape": ray.get(latent) if latent else (pixel_shape[2], *pixel_shape[:2])}
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, ValueError):  # the loaders' own one-line errors
            raise exc.cause from None
        raise
