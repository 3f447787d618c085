"""`tim-ray precompute`: encode a source once into parquet shards + manifest.json, streaming; `PrecomputedSource`
reads them back for training (data.precomputed = DIR) the same streaming way as any source.

Output directory (local or a mounted shared filesystem):
    plan.json                 what is being precomputed (source units, settings); a rerun must match it
    shard-00000.parquet ...   sample_id, key, label, bucket, scene, caption, and tensor columns (tensors.py):
                              text + text_mask (text conditioning), then image (codec latents) [+ image_flipped
                              when data.hflip] or, for the pixel codec, pixels (uint8, flipped at batch time);
                              row groups of ROW_GROUP_ROWS rows (the units training reads)
    shard-00000.rejects.jsonl the shard's rejected source rows
    shard-00000.json          the shard's summary (rows, rejects by reason, shapes); written last: its presence
                              marks a finished shard
    null_text.npz             the encoding of "" (caption dropout at training time)
    manifest.json             totals, rejects by reason, encoder and codec ids, shapes per bucket; written last

Shard s holds the source units whose first row falls in [s·SHARD_ROWS, (s+1)·SHARD_ROWS) of the source, in source
order, read, cleaned, encoded and written by Ray tasks and actors: nothing passes through the driver but each
shard's summary. A crashed or stopped precompute run again with the same --out resumes: finished shards are kept,
the others redone. Each row's caption is picked once (the epoch-0 pick of train.seed); caption dropout and flips
stay per epoch.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tim_ray.config import config_hash
from tim_ray.data.batches import StreamingData, open_training_data
from tim_ray.data.encode import EncoderSpec, add_encode_stages, check_encoders
from tim_ray.data.records import DataError
from tim_ray.data.rejects import count_reasons, rejects_sorted
from tim_ray.data.stream import clean_batch
from tim_ray.data.windows import raw_table

MANIFEST, NULL_TEXT, PLAN = "manifest.json", "null_text.npz", "plan.json"
SHARD_ROWS = 4096  # source rows per shard
ROW_GROUP_ROWS = 512  # rows per parquet row group: the unit training reads and shuffles
PROGRESS_EVERY_S = 10.0
DROPPED_COLUMNS = ("group", "rejects", "noise_seed", "shard")  # the pipeline's own columns


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


def shard_units(unit_rows: np.ndarray, rows_per_shard: int) -> list[np.ndarray]:
    """Unit indices of each shard: consecutive units, a unit in the shard where its first row falls."""
    starts = np.concatenate([[0], np.cumsum(unit_rows)[:-1]]) // rows_per_shard
    return [np.flatnonzero(starts == shard) for shard in np.unique(starts)]


def _shard_name(shard: int) -> str:
    return f"shard-{shard:05d}"


def _write_atomically(path: Path, write: Callable[[str], None]) -> None:
    temporary = f"{path}.tmp-{os.getpid()}"
    write(temporary)
    os.replace(temporary, path)


def _write_json(path: Path, value) -> None:
    def write(name: str) -> None:
        Path(name).write_text(json.dumps(value, indent=2) + "\n")

    _write_atomically(path, write)


def _summary(rows: int, rejects: list[dict], table: pa.Table | None) -> dict:
    shapes = {}
    if table is not None:
        image = "image" if "image" in table.column_names else "pixels"
        for bucket, shape in zip(table["bucket"].to_pylist(), table[f"{image}_shape"].to_pylist()):
            shapes.setdefault(bucket, shape if image == "image" else [shape[2], shape[0], shape[1]])
    return {"rows": rows, "rejected": len(rejects), "rejects": count_reasons(rejects),
            "buckets": {str(b): {"image_shape": s, "rows": int(sum(1 for x in table["bucket"].to_pylist() if x == b))}
                        for b, s in shapes.items()},
            "text_shape": table["text_shape"][0].as_py() if table is not None and "text" in table.column_names
            else None}


def _read_shard(item: pa.Table, *, data: StreamingData, out: str, chunk_rows: int) -> Iterator[pa.Table]:
    """Ray Data map: a shard index -> its clean rows (epoch-0 caption picks, no flips, no dropout), bucket by
    bucket in encoder chunks (`group`); the rejects file written here. A shard without a usable row is finished
    here (its summary written)."""
    shard, units = item["shard"][0].as_py(), item["units"][0].as_py()
    rows = raw_table(data.source, [data.units[u] for u in units], data.geometry)
    table, rejects = clean_batch(rows, data, epoch=0)
    name = Path(out) / _shard_name(shard)
    lines = "".join(json.dumps(r) + "\n" for r in rejects_sorted(rejects))
    _write_atomically(name.with_suffix(".rejects.jsonl"), lambda path: Path(path).write_text(lines))
    if table is None:
        _write_json(name.with_suffix(".json"), {"shard": shard, **_summary(0, rejects, None)})
        return
    table = table.sort_by([("bucket", "ascending")])
    buckets = table["bucket"].to_numpy()
    group, groups, start = 0, np.zeros(table.num_rows, dtype=np.int64), 0
    for stop in [*np.flatnonzero(np.diff(buckets)) + 1, table.num_rows]:
        for begin in range(start, stop, chunk_rows):
            groups[begin:min(begin + chunk_rows, stop)] = shard * 2**20 + group
            group += 1
        start = stop
    table = table.append_column("group", pa.array(groups)).append_column("rejects", pa.array(
        [json.dumps(rejects)] + [""] * (table.num_rows - 1), pa.string()))
    yield table.append_column("shard", pa.array(np.full(table.num_rows, shard, dtype=np.int64)))


class _ShardWriter:
    """Ray Data map (one block = one shard's encoded rows): writes the parquet shard, then its summary."""

    def __init__(self, out: str):
        self.out = Path(out)

    def __call__(self, table: pa.Table) -> pa.Table:
        shard = int(table["shard"][0].as_py())
        rejects = json.loads(table["rejects"][0].as_py() or "[]")
        table = table.drop_columns(list(DROPPED_COLUMNS))
        name = self.out / _shard_name(shard)
        _write_atomically(name.with_suffix(".parquet"),
                          lambda path: pq.write_table(table, path, row_group_size=ROW_GROUP_ROWS))
        summary = {"shard": shard, "file": f"{_shard_name(shard)}.parquet", **_summary(table.num_rows, rejects,
                                                                                        table)}
        _write_json(name.with_suffix(".json"), summary)
        return pa.table({"shard": [shard], "rows": [table.num_rows], "rejected": [len(rejects)]})


def _plan(cfg, data: StreamingData, shard_rows: int) -> dict:
    units = json.dumps(data.units, sort_keys=True).encode()
    return {"signature": data_signature(cfg), "units": len(data.units), "rows": data.num_rows,
            "units_sha256": hashlib.sha256(units).hexdigest(), "shard_rows": shard_rows,
            "caption_seed": cfg.train.seed, "hflip": cfg.data.hflip}


def prepare_precompute(cfg, out_dir: str | Path, encoders: EncoderSpec | None = None) -> StreamingData:
    """Everything that can be checked before Ray starts: the output directory, the source (listed and counted,
    columns checked); returns the opened source. Creates nothing."""
    out = Path(out_dir)
    if (out / MANIFEST).exists():
        raise DataError(f"'{out}' already holds a finished precompute ({MANIFEST}); remove it or choose another "
                        f"--out")
    if cfg.data.precomputed:
        raise DataError("data.precomputed is set; precompute reads the source given by data.source/data.path")
    if out.exists() and not out.is_dir():
        raise DataError(f"--out '{out}' exists and is not a directory")
    return open_training_data(cfg, encoders)


def run_precompute(cfg, out_dir: str | Path, *, data: StreamingData | None = None,
                   encoders: EncoderSpec | None = None, log: Callable[[str], None] = print,
                   shard_rows: int = SHARD_ROWS) -> dict:
    """Encode every usable row of the configured source once into shards of about `shard_rows` source rows +
    manifest in `out_dir` (resuming an unfinished run there); returns the manifest. `data`: from
    prepare_precompute; `encoders` overrides the config's (tests)."""
    import ray.data

    data = data or prepare_precompute(cfg, out_dir, encoders)
    data = dataclasses.replace(data, hflip=False, caption_dropout=0.0)  # both stay per epoch, at training time
    out = Path(out_dir)
    plan = _plan(cfg, data, shard_rows)
    if (out / PLAN).is_file():
        before = json.loads((out / PLAN).read_text())
        if before != plan:
            changed = sorted(k for k in plan if before.get(k) != plan[k])
            raise DataError(f"'{out}' holds an unfinished precompute of other data or settings ({', '.join(changed)} "
                            f"differ); remove it or choose another --out")
    start = time.monotonic()
    spec = data.encoders
    null_text = check_encoders(spec, (cfg.data.height, cfg.data.width, data.geometry.channels))["null_text"]
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / PLAN, plan)
    shards = shard_units(data.unit_rows, shard_rows)
    todo = [s for s in range(len(shards)) if not (out / f"{_shard_name(s)}.json").is_file()]
    if len(todo) < len(shards):
        log(f"precompute: resuming: {len(shards) - len(todo)} of {len(shards)} shards already written")
    if todo:
        ds = ray.data.from_items([{"shard": s, "units": shards[s].tolist()} for s in todo],
                                 override_num_blocks=len(todo))
        ds.context.execution_options.preserve_order = True
        ds.context.target_max_block_size = None  # a block is one shard: keep it whole
        ds.context.enable_progress_bars = False
        ds = ds.map_batches(_read_shard, batch_size=1, batch_format="pyarrow",
                            fn_kwargs={"data": data, "out": str(out), "chunk_rows": cfg.data.encode_batch_size})
        ds = add_encode_stages(ds, spec, with_flipped=cfg.data.hflip and spec.latent)
        ds = ds.map_batches(_ShardWriter, batch_size=None, batch_format="pyarrow", fn_constructor_kwargs={"out": str(out)},
                            compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0)
        _follow(ds, data, len(todo), log)
    if null_text is not None:
        _write_atomically(out / NULL_TEXT, lambda path: np.savez(open(path, "wb"), text=null_text[0],
                                                                 text_mask=null_text[1]))
    manifest = _manifest(cfg, data, out, len(shards), spec, time.monotonic() - start)
    _write_json(out / MANIFEST, manifest)  # last: its presence marks a complete precompute
    log(f"precompute: wrote {manifest['rows']} rows in {len(manifest['shards'])} shards to {out} "
        f"({manifest['rejected']} rejected rows listed in {out}/shard-*.rejects.jsonl) in {manifest['seconds']} s")
    return manifest


def _follow(ds, data: StreamingData, shards: int, log: Callable[[str], None]) -> None:
    done, rows, last, start = 0, 0, 0.0, time.monotonic()
    for summary in ds.iter_rows():
        done, rows = done + 1, rows + summary["rows"] + summary["rejected"]
        if time.monotonic() - last >= PROGRESS_EVERY_S or done == shards:
            last = time.monotonic()
            log(f"precompute: {done}/{shards} shards ({rows} source rows, {rows / max(last - start, 1e-9):.0f} "
                f"rows/s)")


def _manifest(cfg, data: StreamingData, out: Path, shards: int, spec: EncoderSpec, seconds: float) -> dict:
    summaries = [json.loads((out / f"{_shard_name(s)}.json").read_text()) for s in range(shards)]
    rejects: Counter = Counter()
    buckets: dict[int, dict] = {}
    for summary in summaries:
        rejects.update(summary["rejects"])
        for bucket, info in summary["buckets"].items():
            entry = buckets.setdefault(int(bucket), {"id": int(bucket), "pixels": list(data.geometry.sizes[int(bucket)]),
                                                     "image_shape": info["image_shape"], "rows": 0})
            entry["rows"] += info["rows"]
    text_shape = next((s["text_shape"] for s in summaries if s["text_shape"]), None)
    return {
        "format": 2,
        "rows": sum(s["rows"] for s in summaries),
        "rejected": sum(s["rejected"] for s in summaries),
        "rejects": dict(sorted(rejects.items())),
        "shards": [{"file": s["file"], "rows": s["rows"]} for s in summaries if s["rows"]],
        "buckets": [buckets[b] for b in sorted(buckets)],
        "text_shape": text_shape,
        "flipped_latents": cfg.data.hflip and spec.latent,
        "text_encoder": spec.text_encoder if spec.text else None,
        "codec": spec.codec,
        "signature": data_signature(cfg),
        "provenance": {"path": cfg.data.path, "split": cfg.data.split, "max_samples": cfg.data.max_samples,
                       "data_seed": cfg.data.seed, "caption_seed": cfg.train.seed},
        "config_hash": config_hash(cfg),
        "seconds": round(seconds, 1),
    }


class PrecomputedSource:
    """The shards of a precompute directory as a source whose units are parquet row groups of encoded rows."""

    name = "precomputed"

    def __init__(self, where: str, manifest: dict, null_text):
        self.where, self.manifest, self.null_text = where, manifest, null_text

    def _row_groups(self, shard: dict) -> list[dict]:
        meta = pq.ParquetFile(Path(self.where) / shard["file"]).metadata
        units, first = [], 0
        for group in range(meta.num_row_groups):
            rows = meta.row_group(group).num_rows
            units.append({"name": shard["file"], "row_group": group, "first_row": first, "rows": rows})
            first += rows
        return units

    def units(self) -> list[dict]:
        with ThreadPoolExecutor(32) as pool:
            return [u for units in pool.map(self._row_groups, self.manifest["shards"]) for u in units if u["rows"]]

    def read_rows(self, units: list[dict]) -> pa.Table:
        tables = []
        for unit in units:
            table = pq.ParquetFile(Path(self.where) / unit["name"]).read_row_group(unit["row_group"])
            tables.append(table.slice(0, unit["rows"]))
        return pa.concat_tables(tables)


def _check_signature(cfg, manifest: dict, where: Path) -> None:
    made_with = manifest["signature"]
    wrong = [f"{key} = {made_with.get(key)!r} (config: {value!r})" for key, value in data_signature(cfg).items()
             if made_with.get(key) != value]
    if wrong:
        raise DataError(f"data.precomputed '{where}' was made with other settings: {'; '.join(wrong)}")
    if cfg.data.hflip and made_with["model.codec"] != "pixel" and not manifest["flipped_latents"]:
        raise DataError(f"data.hflip needs flipped latents, but '{where}' was precomputed with data.hflip = false")


def read_manifest(where: str | Path) -> dict:
    where = Path(where)
    if not (where / MANIFEST).is_file():
        hint = (" (an unfinished precompute: run the same `tim-ray precompute` again to finish it)"
                if (where / PLAN).is_file() else "; run `tim-ray precompute` into it first")
        raise DataError(f"data.precomputed '{where}' has no {MANIFEST}{hint}")
    try:
        manifest = json.loads((where / MANIFEST).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"'{where / MANIFEST}' is not valid JSON ({exc}); precompute again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != 2:
        raise DataError(f"'{where / MANIFEST}' is not a tim-ray precompute manifest of format 2; precompute again")
    missing = [key for key in ("shards", "buckets", "signature", "flipped_latents") if key not in manifest]
    if missing:
        raise DataError(f"'{where / MANIFEST}' lacks {', '.join(missing)}; precompute again")
    return manifest


def open_precomputed(cfg) -> PrecomputedSource:
    """The shards of data.precomputed, checked against the config (sizes, encoder, codec must match)."""
    where = Path(cfg.data.precomputed)
    manifest = read_manifest(where)
    _check_signature(cfg, manifest, where)
    null_text = None
    if (where / NULL_TEXT).is_file():
        try:
            with np.load(where / NULL_TEXT, allow_pickle=False) as saved:
                null_text = (saved["text"], saved["text_mask"])
        except (ValueError, KeyError, OSError) as exc:  # ValueError: a pickle inside, refused; or not an .npz
            raise DataError(f"'{where / NULL_TEXT}' is not a tim-ray null-caption file ({exc}); precompute "
                            f"again") from None
    return PrecomputedSource(str(where), manifest, null_text)
