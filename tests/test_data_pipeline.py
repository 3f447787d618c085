"""The streaming pipeline end to end on a real local Ray (few, coarse tests: each Ray Data run costs seconds here).

Broken inputs of every kind stream with exact reject counts; batches follow the planned order, resume
bit-identically and at another world size; buckets stay apart; precompute streams shards, resumes after a crash
and trains the same way; an object store (a real S3 server on loopback) serves training and precompute.
"""
import dataclasses
import json
from collections import Counter

import data_fixtures as fx
import numpy as np
import pytest
import ray
import ray.cloudpickle
import torch

from tim_ray.config import load_config
from tim_ray.data import (DataError, EncoderSpec, image_channels, open_training_data, prepare_precompute,
                          rank_batches, run_precompute, window_cache)
from tim_ray.data.encode import check_encoders, unit_range
from tim_ray.data.decode import clean_sample
from tim_ray.data.order import draw, fixed_batches, rank_slice
from tim_ray.data.records import RawSample
from tim_ray.data.stream import batches_per_task, task_items
from tim_ray.data.sources.fashion_mnist import IMAGES_MAGIC, read_idx
from tim_ray.data.sources.shapes import render, scene

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module", autouse=True)
def local_ray(s3_server):  # the S3 server's endpoint and credentials are in the env before Ray's workers start
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)  # logical CPUs: RAY_NOTES §0
    ray.cloudpickle.register_pickle_by_value(fx)  # Ray workers cannot import the tests directory
    yield
    ray.shutdown()


def stand_ins(cfg) -> EncoderSpec:
    return dataclasses.replace(EncoderSpec.of(cfg), load_text=fx.load_stand_in_text,
                               load_codec=fx.load_stand_in_codec)


def file_source(kind: str, root, *overrides: str):
    rows = fx.cases()
    extra = {"parquet": fx.write_parquet, "webdataset": fx.write_webdataset, "folder": fx.write_folder}[kind](
        root, rows)
    rejects = {fx.case_key(kind, c, i, rows): c.reason for i, c in enumerate(rows) if c.reason} | extra
    return load_config(overrides=[f"data.source={kind}", f"data.path='{root}'", *overrides]), rejects


def stream(data, epoch=0, start=0, global_batch=4, rank=0, world=1, cache=None):
    """[(batch, plan)] of one rank for the rest of an epoch."""
    return list(rank_batches(data, epoch, start, global_batch, rank, world, cache or window_cache(data)))


@pytest.mark.parametrize("kind", ["parquet", "webdataset", "folder"])
def test_broken_files_are_counted_and_every_good_row_arrives_once(kind, tmp_path):
    cfg, rejects = file_source(kind, tmp_path / kind)
    data = open_training_data(cfg, stand_ins(cfg))
    batches = stream(data, global_batch=1)  # one row a step: nothing left over at the epoch's end
    seen = {r["id"]: r["reason"] for _, plan in batches for r in plan.rejects}
    assert seen == rejects and sum(len(plan.rejects) for _, plan in batches) == len(rejects)
    assert {r["source"] for _, plan in batches for r in plan.rejects} == {kind}
    ids = torch.cat([batch["sample_id"] for batch, _ in batches]).tolist()
    assert len(ids) == len(set(ids)) == sum(not c.reason for c in fx.cases()) + (2 if kind == "webdataset" else 0)
    assert sum(plan.global_rows for _, plan in batches) == data.num_rows
    empty = [batch for batch, plan in batches if plan.rejects]
    assert all(len(b["image"]) == 0 and b["image"].shape == (0,) for b in empty)  # a rejected row's step: no rows


def test_max_samples_keeps_the_first_source_rows(tmp_path):
    cfg, _ = file_source("parquet", tmp_path / "pq", "data.max_samples=5")
    data = open_training_data(cfg, stand_ins(cfg))
    keys = {r["id"] for _, plan in stream(data, global_batch=1) for r in plan.rejects}
    assert data.num_rows == 5 and keys <= {f"part-0.parquet#{i}" for i in range(5)}


def test_batches_follow_the_plan_and_resume_bit_identically():
    cfg = load_config(overrides=["data.max_samples=300", "data.caption_dropout=0.3", "data.hflip=true",
                                 "data.shuffle_window=100"])
    data = open_training_data(cfg, stand_ins(cfg))
    cache = window_cache(data)
    whole = [batch for batch, _ in stream(data, epoch=1, global_batch=16, rank=1, world=2, cache=cache)]
    layout = data.layout(1)
    plan = [rank_slice(b.positions, 1, 2) for b in fixed_batches(layout, 0, 16)]
    units, rows = zip(*(layout.source_rows(p) for p in plan))
    expected = [(np.array([data.units[u]["first_row"] for u in us]) + r).tolist()
                for us, r in zip(units, rows)]  # built-in ids are the row index
    assert [b["sample_id"].tolist() for b in whole] == expected
    batch = whole[0]
    assert batch["image"].shape == (8, 1, 32, 32) and batch["image"].dtype == torch.float32
    assert batch["text"].shape == (8, 32, 3) and batch["text_mask"].shape == (8, 32)
    assert batch["text_mask"].dtype == torch.bool and batch["label"].dtype == torch.int64
    assert -1.0 <= batch["image"].min() < batch["image"].max() <= 1.0
    draws = [draw(b["sample_id"].numpy(), np.ones(8), 0, 1, True, 0.3) for b in whole]
    dropped = np.concatenate([d.drop for d in draws])
    empty = torch.cat([~b["text_mask"].any(1) for b in whole]).numpy()
    assert np.array_equal(dropped, empty) and 0 < dropped.sum() < len(dropped)  # "" encodes to no tokens
    source = read_idx(data.source.images_path, IMAGES_MAGIC)
    cleaned = [clean_sample(RawSample(i, "", source[i], "caption"), data.geometry, data.limits)
               for i in batch["sample_id"].tolist()]
    pixels = unit_range(np.stack([c["pixels"] for c in cleaned]))
    flip = torch.from_numpy(draws[0].flip)
    assert 0 < flip.sum() < 8 and torch.equal(batch["image"], torch.where(flip[:, None, None, None],
                                                                          pixels.flip(-1), pixels))

    resumed = [b for b, _ in stream(data, epoch=1, start=4 * 16, global_batch=16, rank=1, world=2, cache=cache)]
    assert len(resumed) == len(whole) - 4
    for a, b in zip(whole[4:], resumed):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_decode_tasks_ramp_up_to_their_size_and_cover_every_slot_once():
    items = task_items([(0, 5), (1, 0), (2, 9)], most=4)
    assert [item["count"] for item in items] == [1, 2, 2, 4, 4, 1]  # a window's last task takes what is left
    covered = [(item["window"], item["first"] + k) for item in items for k in range(item["count"])]
    assert covered == [(0, k) for k in range(5)] + [(2, k) for k in range(9)]
    cfg = load_config(overrides=["data.height=32", "data.width=32"])  # 1 channel: 1 KiB of pixels a row
    data = open_training_data(cfg, stand_ins(cfg))
    assert batches_per_task(data, 1024, 1) == 16 and batches_per_task(data, 1024, 8) == 32  # TASK_BYTES 16 MiB
    assert batches_per_task(data, 2**20, 1) == 1


def test_two_ranks_see_the_global_batches_of_one_and_a_resize_skips_nothing():
    cfg = load_config(overrides=["data.max_samples=200", "data.shuffle_window=64"])
    data = open_training_data(cfg, stand_ins(cfg))
    cache = window_cache(data)
    single = [b["sample_id"].tolist() for b, _ in stream(data, global_batch=8, cache=cache)]
    ranks = [[b["sample_id"].tolist() for b, _ in stream(data, global_batch=8, rank=r, world=2, cache=cache)]
             for r in range(2)]
    assert [a + b for a, b in zip(*ranks)] == single
    consumed = [i for step in single[:5] for i in step]  # 5 steps at world 1, then 3 ranks of 4
    after = [[b["sample_id"].tolist() for b, _ in stream(data, start=40, global_batch=12, rank=r, world=3,
                                                         cache=cache)] for r in range(3)]
    rest = [i for rank in after for step in rank for i in step]
    units, rows = data.layout(0).source_rows(np.arange(40 + 12 * ((200 - 40) // 12)))
    expected = np.array([data.units[u]["first_row"] for u in units]) + rows  # built-in ids are the row index
    assert Counter(consumed + rest) == Counter(expected.tolist())
    assert ray.get(cache.stats.remote())["reads"] <= 2 * data.layout(0).num_windows  # windows shared, not per rank


def test_buckets_with_a_latent_codec_never_mix_shapes():
    cfg = load_config(overrides=["data.source=shapes", "data.max_samples=150", "data.aspect_buckets=true",
                                 "data.bucket_token_budget=160", "model.codec=stand-in", "data.shuffle_window=1000"])
    data = open_training_data(cfg, stand_ins(cfg))
    batches = [b for b, _ in stream(data, global_batch=None)]
    shapes = {tuple(b["image"].shape[1:]) for b in batches}
    assert len(shapes) > 2 and all(s[0] == 4 for s in shapes)  # several buckets, each batch one shape
    for b in batches:
        h, w = b["image"].shape[2:]
        assert len(b["sample_id"]) == 160 // ((h * 2 // 8) * (w * 2 // 8))  # full batches of the bucket's size
    ids = torch.cat([b["sample_id"] for b in batches]).tolist()
    assert len(ids) == len(set(ids)) and set(ids) <= set(range(150)) and len(ids) > 100


def test_precompute_streams_shards_resumes_after_a_crash_and_trains_with_flips_and_dropout(tmp_path):
    cfg, rejects = file_source("parquet", tmp_path / "pq", "data.hflip=true", "data.encode_batch_size=4",
                               "model.codec=stand-in", "data.caption_dropout=0.5")
    lines = []
    manifest = run_precompute(cfg, tmp_path / "out", encoders=stand_ins(cfg), log=lines.append, shard_rows=4)
    good = sum(not c.reason for c in fx.cases())
    assert manifest["rows"] == good and manifest["rejected"] == len(rejects)
    assert manifest["rejects"] == dict(sorted(Counter(rejects.values()).items())) and manifest["flipped_latents"]
    assert manifest["buckets"][0]["image_shape"] == [4, 16, 16] and manifest["text_shape"] == [32, 3]
    assert lines[-1].startswith("precompute: wrote") and any("shards (" in line for line in lines)
    written = [json.loads(line) for f in sorted((tmp_path / "out").glob("*.rejects.jsonl"))
               for line in f.read_text().splitlines()]
    assert {r["id"]: r["reason"] for r in written} == rejects
    with pytest.raises(DataError, match="already holds a finished precompute"):
        prepare_precompute(cfg, tmp_path / "out")

    # A crash: the manifest and one shard's summary never written. The rerun redoes only that shard.
    shard = tmp_path / "out" / "shard-00000.parquet"
    before = shard.read_bytes()
    (tmp_path / "out" / "manifest.json").unlink()
    (tmp_path / "out" / "shard-00000.json").unlink()
    lines.clear()
    again = run_precompute(cfg, tmp_path / "out", encoders=stand_ins(cfg), log=lines.append, shard_rows=4)
    assert "resuming: 4 of 5 shards already written" in lines[0] and shard.read_bytes() == before
    assert {k: v for k, v in again.items() if k != "seconds"} == {k: v for k, v in manifest.items() if k != "seconds"}
    other = load_config(overrides=["data.source=shapes", "data.max_samples=8"])
    (tmp_path / "out" / "manifest.json").unlink()
    with pytest.raises(DataError, match="unfinished precompute of other data"):
        run_precompute(other, tmp_path / "out", encoders=stand_ins(other))
    (tmp_path / "out" / "manifest.json").write_text(json.dumps(manifest))

    trained = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, precomputed=str(tmp_path / "out")))
    data = open_training_data(trained)
    assert image_channels(trained) == 4 and data.precomputed and data.num_rows == good
    batches = [b for b, _ in stream(data, epoch=2, global_batch=1)]
    ids = torch.cat([b["sample_id"] for b in batches])
    assert sorted(ids.tolist()) == sorted(data.source.read_rows(data.units)["sample_id"].to_pylist())
    rows = data.source.read_rows(data.units)
    position = {sid: i for i, sid in enumerate(rows["sample_id"].to_pylist())}
    taken = rows.take([position[i] for i in ids.tolist()])
    draws = draw(ids.numpy(), np.ones(len(ids)), 0, 2, True, 0.5)
    stored = {name: np.stack([np.frombuffer(v, np.float32).reshape(4, 16, 16) for v in taken[name].to_pylist()])
              for name in ("image", "image_flipped")}
    expected = np.where(draws.flip[:, None, None, None], stored["image_flipped"], stored["image"])
    assert np.array_equal(torch.cat([b["image"] for b in batches]).numpy(), expected)
    assert np.array_equal(~torch.cat([b["text_mask"] for b in batches]).any(1).numpy(), draws.drop)


def test_pixel_shards_hold_the_source_pixels_and_refuse_another_geometry(tmp_path):
    source = ["data.source=shapes", "data.max_samples=12", "data.caption_dropout=0"]
    cfg = load_config(overrides=source)
    run_precompute(cfg, tmp_path / "out", encoders=stand_ins(cfg), log=lambda line: None)
    data = open_training_data(load_config(overrides=[*source, f"data.precomputed='{tmp_path / 'out'}'"]))
    batch = stream(data)[0][0]
    rendered = np.stack([render(scene(0, i, ((32, 32),))) for i in batch["sample_id"].tolist()])
    assert torch.equal(batch["image"], unit_range(rendered)) and batch["text_mask"].any(1).all()
    other = load_config(overrides=["data.source=shapes", "data.height=64", f"data.precomputed='{tmp_path / 'out'}'"])
    with pytest.raises(DataError, match="data.height = 32 .config: 64."):
        open_training_data(other)


@pytest.mark.parametrize("kind", ["parquet", "webdataset"])
def test_training_and_precompute_read_from_an_object_store(kind, tmp_path, s3_server):
    cfg, rejects = file_source(kind, tmp_path / kind)
    url = s3_server.upload_tree(tmp_path / kind, s3_server.create_bucket(), prefix="corpus")
    remote = load_config(overrides=[f"data.source={kind}", f"data.path='{url}'"])
    local_data, remote_data = open_training_data(cfg, stand_ins(cfg)), open_training_data(remote, stand_ins(cfg))
    assert remote_data.units == local_data.units  # keys are relative to the root: the same ids anywhere
    local = stream(local_data, global_batch=1)
    served = stream(remote_data, global_batch=1)
    assert [b["sample_id"].tolist() for b, _ in served] == [b["sample_id"].tolist() for b, _ in local]
    assert all(torch.equal(a["image"], b["image"]) for (a, _), (b, _) in zip(local, served))
    assert {r["id"]: r["reason"] for _, p in served for r in p.rejects} == rejects
    manifest = run_precompute(remote, tmp_path / "out", encoders=stand_ins(cfg), log=lambda line: None)
    assert manifest["rows"] == len(torch.cat([b["sample_id"] for b, _ in local])) and manifest["rejected"] == len(rejects)
    assert manifest["provenance"]["path"] == url


def test_encoders_are_tried_before_any_pipeline_starts():
    cfg = load_config(overrides=["model.codec=stand-in"])
    checked = check_encoders(stand_ins(cfg), (32, 32, 3))
    assert checked["image_shape"] == (4, 16, 16) and checked["null_text"][0].shape == (32, 3)
    assert not checked["null_text"][1].any()
    missing = dataclasses.replace(stand_ins(cfg), load_text=fx.load_missing_text)
    with pytest.raises(ValueError, match=r"^text encoder 'minilm' does not exist$"):
        check_encoders(missing, (32, 32, 3))
