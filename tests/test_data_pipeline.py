"""The Ray Data pipeline end to end on a real local Ray (few, coarse tests: each Ray Data run costs seconds here).

Broken inputs of every kind finish with exact counts and a rejects file; batches follow the planned order, resume
bit-identically, keep buckets apart; precompute writes shards that train the same way.
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
from tim_ray.data import (
    DataError,
    EncoderSpec,
    image_channels,
    load_clean,
    load_precomputed,
    rank_batches,
    run_precompute,
)
from tim_ray.data.encode import check_encoders, unit_range
from tim_ray.data.order import draw, epoch_batches, rank_slice
from tim_ray.data.sources.shapes import render, scene

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module", autouse=True)
def local_ray():
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


@pytest.mark.parametrize("kind", ["parquet", "webdataset", "folder"])
def test_broken_files_are_counted_and_every_good_row_arrives_once(kind, tmp_path):
    cfg, rejects = file_source(kind, tmp_path / kind)
    data = load_clean(cfg, tmp_path / "run" / "rejects.jsonl", stand_ins(cfg))
    assert data.reject_counts() == dict(sorted(Counter(rejects.values()).items()))
    written = [json.loads(line) for line in (tmp_path / "run" / "rejects.jsonl").read_text().splitlines()]
    assert {r["id"]: r["reason"] for r in written} == rejects and {r["source"] for r in written} == {kind}
    keys = data.table["key"].to_pylist()
    assert len(keys) == len(set(keys)) and not set(keys) & set(rejects)
    assert len(keys) == sum(not c.reason for c in fx.cases()) + (2 if kind == "webdataset" else 0)
    ids = data.table["sample_id"].to_numpy()
    assert np.all(np.diff(ids) > 0)  # sorted by sample id: positions are stable


def test_max_samples_keeps_the_first_source_rows(tmp_path):
    cfg, _ = file_source("parquet", tmp_path / "pq", "data.max_samples=5")
    data = load_clean(cfg, tmp_path / "rejects.jsonl")
    seen = set(data.table["key"].to_pylist()) | {r["id"] for r in data.rejects}
    assert seen == {f"part-0.parquet#{i}" for i in range(5)}


def test_batches_follow_the_plan_and_resume_bit_identically(tmp_path):
    cfg = load_config(overrides=["data.max_samples=200", "data.caption_dropout=0.3", "data.hflip=true"])
    data = load_clean(cfg, tmp_path / "rejects.jsonl", stand_ins(cfg))
    whole = list(rank_batches(data, seed=4, epoch=1, start_sample=0, global_batch=16, rank=1, world=2))
    plan = [rank_slice(b, 1, 2) for b in epoch_batches(data.buckets, None, 4, 1, 0, 16)]
    ids = data.table["sample_id"].to_numpy()
    assert [b["sample_id"].tolist() for b in whole] == [ids[p].tolist() for p in plan]
    batch = whole[0]
    assert batch["image"].shape == (8, 1, 32, 32) and batch["image"].dtype == torch.float32
    assert batch["text"].shape == (8, 32, 3) and batch["text_mask"].shape == (8, 32)
    assert batch["text_mask"].dtype == torch.bool and batch["label"].dtype == torch.int64
    assert -1.0 <= batch["image"].min() < batch["image"].max() <= 1.0
    draws = [draw(b["sample_id"].numpy(), np.ones(8), 4, 1, True, 0.3) for b in whole]
    dropped = np.concatenate([d.drop for d in draws])
    empty = torch.cat([~b["text_mask"].any(1) for b in whole]).numpy()
    assert np.array_equal(dropped, empty) and 0 < dropped.sum() < len(dropped)  # "" encodes to no tokens
    pixels = unit_range(np.stack([np.frombuffer(p, np.uint8).reshape(32, 32, 1)
                                  for p in data.table.take(plan[0])["pixels"].to_pylist()]))
    flip = torch.from_numpy(draws[0].flip)
    assert 0 < flip.sum() < 8 and torch.equal(batch["image"], torch.where(flip[:, None, None, None],
                                                                          pixels.flip(-1), pixels))

    resumed = list(rank_batches(data, seed=4, epoch=1, start_sample=4 * 16, global_batch=16, rank=1, world=2))
    assert len(resumed) == len(whole) - 4
    for a, b in zip(whole[4:], resumed):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_buckets_with_a_latent_codec_never_mix_shapes(tmp_path):
    cfg = load_config(overrides=["data.source=shapes", "data.max_samples=150", "data.aspect_buckets=true",
                                 "data.bucket_token_budget=160", "model.codec=stand-in"])
    data = load_clean(cfg, tmp_path / "rejects.jsonl", stand_ins(cfg))
    assert data.table["scene"][0].as_py().startswith("{")
    batches = list(rank_batches(data, 0, 0, 0, None, rank=0, world=1, drop_last=False))
    shapes = {tuple(b["image"].shape[1:]) for b in batches}
    assert len(shapes) > 2 and all(s[0] == 4 for s in shapes)  # several buckets, each batch one shape
    for b in batches:
        h, w = b["image"].shape[2:]
        assert len(b["sample_id"]) <= 160 // ((h * 2 // 8) * (w * 2 // 8))
    assert sorted(torch.cat([b["sample_id"] for b in batches]).tolist()) == list(range(150))


def test_precompute_writes_shards_that_train_with_flips_and_dropout(tmp_path):
    cfg, rejects = file_source("parquet", tmp_path / "pq", "data.hflip=true", "data.encode_batch_size=4",
                               "model.codec=stand-in", "data.caption_dropout=0.5")
    lines = []
    manifest = run_precompute(cfg, tmp_path / "out", encoders=stand_ins(cfg), log=lines.append)
    good = sum(not c.reason for c in fx.cases())
    assert manifest["rows"] == good and manifest["rejected"] == len(rejects)
    assert sum(manifest["rejects"].values()) == len(rejects) and manifest["flipped_latents"]
    assert manifest["buckets"][0]["image_shape"] == [4, 16, 16] and manifest["text_shape"] == [32, 3]
    assert lines[-1].startswith("precompute: wrote") and any("rows encoded" in line for line in lines)
    assert len((tmp_path / "out" / "rejects.jsonl").read_text().splitlines()) == len(rejects)
    with pytest.raises(DataError, match="already holds"):
        run_precompute(cfg, tmp_path / "out", encoders=stand_ins(cfg))

    trained = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, precomputed=str(tmp_path / "out")))
    data = load_precomputed(trained)
    assert image_channels(trained) == 4 and data.reject_counts() == manifest["rejects"]
    batches = list(rank_batches(data, 0, 2, 0, 4, rank=0, world=1, drop_last=False))
    assert sorted(torch.cat([b["sample_id"] for b in batches]).tolist()) == sorted(
        data.table["sample_id"].to_pylist())
    rows = data.table.take(epoch_batches(data.buckets, None, 0, 2, 0, 4, drop_last=False)[0])
    draws = draw(rows["sample_id"].to_numpy(), np.ones(4), 0, 2, True, 0.5)
    stored = {name: np.stack([np.frombuffer(v, np.float32).reshape(4, 16, 16) for v in rows[name].to_pylist()])
              for name in ("image", "image_flipped")}
    expected = np.where(draws.flip[:, None, None, None], stored["image_flipped"], stored["image"])
    assert np.array_equal(batches[0]["image"].numpy(), expected)
    assert np.array_equal(~batches[0]["text_mask"].any(1).numpy(), draws.drop)


def test_pixel_shards_hold_the_source_pixels_and_refuse_another_geometry(tmp_path):
    source = ["data.source=shapes", "data.max_samples=12", "data.caption_dropout=0"]
    cfg = load_config(overrides=source)
    run_precompute(cfg, tmp_path / "out", encoders=stand_ins(cfg), log=lambda line: None)
    data = load_precomputed(load_config(overrides=[*source, f"data.precomputed='{tmp_path / 'out'}'"]))
    batch = next(iter(rank_batches(data, 0, 0, 0, 4, rank=0, world=1)))
    rendered = np.stack([render(scene(0, i, ((32, 32),))) for i in batch["sample_id"].tolist()])
    assert torch.equal(batch["image"], unit_range(rendered)) and batch["text_mask"].any(1).all()
    other = load_config(overrides=["data.source=shapes", "data.height=64", f"data.precomputed='{tmp_path / 'out'}'"])
    with pytest.raises(DataError, match="data.height = 32 .config: 64."):
        load_precomputed(other)


def test_encoders_are_tried_before_any_pipeline_starts():
    cfg = load_config(overrides=["model.codec=stand-in"])
    checked = check_encoders(stand_ins(cfg), (32, 32, 3))
    assert checked["image_shape"] == (4, 16, 16) and checked["null_text"][0].shape == (32, 3)
    assert not checked["null_text"][1].any()
    missing = dataclasses.replace(stand_ins(cfg), load_text=fx.load_missing_text)
    with pytest.raises(ValueError, match=r"^text encoder 'minilm' does not exist$"):
        check_encoders(missing, (32, 32, 3))
