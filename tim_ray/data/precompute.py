"""`tim-ray precompute`: encode a cleaned source once into parquet shards + manifest.json; `PrecomputedSet` reads
them back for training (data.precomputed = DIR), so the text encoder and codec do not run again every epoch.

Output directory (local or a mounted shared filesystem):
    shard-00000.parquet ...  sample_id, key, label, bucket, scene, caption, and tensor columns (tensors.py):
                             text + text_mask (text conditioning), then image (codec latents) [+ image_flipped
                             when data.hflip] or, for the pixel codec, pixels (uint8, flipped at batch time)
    null_text.npz            the encoding of "" (caption dropout at training time)
    rejects.jsonl            the rejected source rows
    manifest.json            counts, rejects by reason, encoder and codec ids, shapes per bucket, config hash

Each row's caption is picked once (the epoch-0 pick of train.seed); caption dropout and flips stay per epoch.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from tim_ray.config import config_hash
from tim_ray.data.clean import CleanSet, load_clean
from tim_ray.data.encode import EncoderSpec, check_encoders
from tim_ray.data.geometry import Geometry
from tim_ray.data.order import draw
from tim_ray.data.records import DataError
from tim_ray.data.stream import encoded_groups, to_batch
from tim_ray.data.tensors import stacked

MANIFEST, NULL_TEXT, REJECTS = "manifest.json", "null_text.npz", "rejects.jsonl"
SHARD_ROWS = 4096
PROGRESS_EVERY_S = 10.0
DROPPED_COLUMNS = ("group", "noise_seed")


def data_signature(cfg) -> dict:
    """The settings that decide what the tensors in the shards mean; training on shards must agree with all of them.
    (Which rows went in, path/split/max_samples/seeds, is kept in the manifest's provenance instead.)"""
    d, m = cfg.data, cfg.model
    buckets = ({"data.bucket_multiple": d.bucket_multiple, "data.bucket_max_aspect": d.bucket_max_aspect}
               if d.aspect_buckets else {})
    return {"data.source": d.source, "data.height": d.height, "data.width": d.width,
            "data.aspect_buckets": d.aspect_buckets, **buckets, "model.conditioning": m.conditioning,
            "model.text_encoder": m.text_encoder, "model.max_text_tokens": m.max_text_tokens,
            "model.codec": m.codec, "model.codec_kind": m.codec_kind,
            "model.codec_sample_posterior": m.codec_sample_posterior}


def _chunks(clean: CleanSet, rows: int) -> list[np.ndarray]:
    """Row positions bucket by bucket, in chunks of at most `rows` (each chunk is one encoder call)."""
    buckets, chunks = clean.buckets, []
    for bucket in np.unique(buckets):
        positions = np.flatnonzero(buckets == bucket)
        chunks += np.array_split(positions, -(-len(positions) // rows))
    return chunks


def _image_shape(table: pa.Table) -> list[int]:
    """(C, H, W) of the first row's training image: latents as stored, pixels channels-first."""
    if "image_shape" in table.column_names:
        return table["image_shape"][0].as_py()
    height, width, channels = table["pixels_shape"][0].as_py()
    return [channels, height, width]


@dataclass
class _Written:
    shards: list[dict]
    image_shapes: dict[int, list[int]]  # per bucket
    text_shape: list[int] | None


def _write_shards(out: Path, tables: Iterator[pa.Table], total: int, log: Callable[[str], None]) -> _Written:
    written, pending = _Written(shards=[], image_shapes={}, text_shape=None), []
    done, start, last = 0, time.monotonic(), 0.0

    def flush():
        name = f"shard-{len(written.shards):05d}.parquet"
        table = pa.concat_tables(pending)
        pq.write_table(table, out / name)
        written.shards.append({"file": name, "rows": table.num_rows})
        pending.clear()

    for table in tables:
        pending.append(table.drop_columns(list(DROPPED_COLUMNS)))
        written.image_shapes.setdefault(table["bucket"][0].as_py(), _image_shape(table))
        if "text_shape" in table.column_names:
            written.text_shape = table["text_shape"][0].as_py()
        done += table.num_rows
        if sum(t.num_rows for t in pending) >= SHARD_ROWS:
            flush()
        if time.monotonic() - last >= PROGRESS_EVERY_S or done == total:
            last = time.monotonic()
            log(f"precompute: {done}/{total} rows encoded ({done / max(last - start, 1e-9):.0f} rows/s)")
    if pending:
        flush()
    return written


def _with_provenance(clean: pa.Table, groups: list[np.ndarray], tables: Iterator[pa.Table]) -> Iterator[pa.Table]:
    """Each encoded group with its rows' key and scene (for evaluation and debugging) from the clean table."""
    for positions, table in zip(groups, tables):
        source = clean.take(positions)
        yield table.append_column("key", source["key"]).append_column("scene", source["scene"])


def run_precompute(cfg, out_dir: str | Path, *, encoders: EncoderSpec | None = None,
                   log: Callable[[str], None] = print) -> dict:
    """Clean the configured source, encode every usable row once, write shards + manifest to `out_dir`; returns the
    manifest. Refuses an `out_dir` that already holds a manifest. `encoders` overrides the config's (tests)."""
    out = Path(out_dir)
    if (out / MANIFEST).exists():
        raise DataError(f"'{out}' already holds a precompute ({MANIFEST}); remove it or choose another output")
    if cfg.data.precomputed:
        raise DataError("data.precomputed is set; precompute reads the source given by data.source/data.path")
    out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    spec = encoders or EncoderSpec.of(cfg)
    null_text = check_encoders(spec, (cfg.data.height, cfg.data.width, Geometry.of(cfg).channels))["null_text"]
    clean = load_clean(cfg, out / REJECTS, spec)
    log(f"precompute: {clean.num_rows} usable rows, {len(clean.rejects)} rejected {clean.reject_counts()}")
    groups = _chunks(clean, cfg.data.encode_batch_size)
    tables = encoded_groups(clean.table, groups, spec, seed=cfg.train.seed, epoch=0, hflip=False,
                            caption_dropout=0.0, with_flipped=cfg.data.hflip and spec.latent)
    written = _write_shards(out, _with_provenance(clean.table, groups, tables), clean.num_rows, log)
    if null_text is not None:
        np.savez(out / NULL_TEXT, text=null_text[0], text_mask=null_text[1])
    counts = np.bincount(clean.buckets, minlength=len(clean.geometry.sizes))
    manifest = {
        "format": 1,
        "rows": clean.num_rows,
        "rejected": len(clean.rejects),
        "rejects": clean.reject_counts(),
        "shards": written.shards,
        "buckets": [{"id": b, "pixels": list(clean.geometry.sizes[b]), "image_shape": shape, "rows": int(counts[b])}
                    for b, shape in sorted(written.image_shapes.items())],
        "text_shape": written.text_shape,
        "flipped_latents": cfg.data.hflip and spec.latent,
        "text_encoder": spec.text_encoder if spec.text else None,
        "codec": spec.codec,
        "signature": data_signature(cfg),
        "provenance": {"path": cfg.data.path, "split": cfg.data.split, "max_samples": cfg.data.max_samples,
                       "data_seed": cfg.data.seed, "caption_seed": cfg.train.seed},
        "config_hash": config_hash(cfg),
        "seconds": round(time.monotonic() - start, 1),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")  # last: its presence marks a complete run
    log(f"precompute: wrote {clean.num_rows} rows in {len(written.shards)} shards to {out} "
        f"in {manifest['seconds']} s")
    return manifest


@dataclass
class PrecomputedSet:
    """Precomputed rows in memory (sorted by sample_id); batches are gathered without Ray."""

    table: pa.Table
    manifest: dict
    null_text: tuple[np.ndarray, np.ndarray] | None
    bucket_batch_sizes: np.ndarray | None
    hflip: bool
    caption_dropout: float

    @property
    def num_rows(self) -> int:
        return self.table.num_rows

    @property
    def buckets(self) -> np.ndarray:
        return self.table["bucket"].to_numpy()

    def reject_counts(self) -> dict[str, int]:
        return dict(self.manifest["rejects"])

    def _flip(self, rows: pa.Table, batch: dict, flip: torch.Tensor) -> None:
        mirrored = (torch.from_numpy(stacked(rows, "image_flipped")) if "image_flipped" in rows.column_names
                    else batch["image"].flip(-1))
        batch["image"][flip] = mirrored[flip]

    def local_batches(self, groups: list[np.ndarray], seed: int, epoch: int) -> Iterator[dict]:
        """A training batch per group of row positions, with this epoch's flips and caption dropout."""
        for positions in groups:
            rows = self.table.take(positions)
            draws = draw(rows["sample_id"].to_numpy(), np.ones(len(positions)), seed, epoch, self.hflip,
                         self.caption_dropout)
            batch = to_batch(rows)
            if draws.flip.any():
                self._flip(rows, batch, torch.from_numpy(draws.flip))
            if draws.drop.any() and self.null_text is not None:
                drop = torch.from_numpy(draws.drop)
                batch["text"][drop] = torch.from_numpy(self.null_text[0])
                batch["text_mask"][drop] = torch.from_numpy(self.null_text[1])
            yield batch


def _check_signature(cfg, manifest: dict, where: Path) -> None:
    made_with = manifest["signature"]
    wrong = [f"{key} = {made_with.get(key)!r} (config: {value!r})" for key, value in data_signature(cfg).items()
             if made_with.get(key) != value]
    if wrong:
        raise DataError(f"data.precomputed '{where}' was made with other settings: {'; '.join(wrong)}")
    if cfg.data.hflip and made_with["model.codec"] != "pixel" and not manifest["flipped_latents"]:
        raise DataError(f"data.hflip needs flipped latents, but '{where}' was precomputed with data.hflip = false")


def read_manifest(where: Path) -> dict:
    if not (where / MANIFEST).is_file():
        raise DataError(f"data.precomputed '{where}' has no {MANIFEST}; run `tim-ray precompute` into it first")
    return json.loads((where / MANIFEST).read_text())


def load_precomputed(cfg) -> PrecomputedSet:
    """The shards of data.precomputed, checked against the config (sizes, encoder, codec must match)."""
    where = Path(cfg.data.precomputed)
    manifest = read_manifest(where)
    _check_signature(cfg, manifest, where)
    table = pa.concat_tables([pq.read_table(where / s["file"]) for s in manifest["shards"]])
    null_text = None
    if (where / NULL_TEXT).is_file():
        with np.load(where / NULL_TEXT) as saved:
            null_text = (saved["text"], saved["text_mask"])
    return PrecomputedSet(table=table.sort_by("sample_id").combine_chunks(), manifest=manifest, null_text=null_text,
                          bucket_batch_sizes=Geometry.of(cfg).global_batches(cfg.data.bucket_token_budget),
                          hflip=cfg.data.hflip, caption_dropout=cfg.data.caption_dropout)
