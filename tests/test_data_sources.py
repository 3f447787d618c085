"""File sources read without Ray: exact reject counts per format, every good row once, listing and config errors."""
import json

import data_fixtures as fx
import pytest

from tim_ray.config import ConfigError, load_config
from tim_ray.data.decode import clean_sample
from tim_ray.data.geometry import Geometry, Limits
from tim_ray.data.records import DataError, stable_id
from tim_ray.data.sources import open_source
from tim_ray.data.sources.fashion_mnist import class_captions
from tim_ray.data.sources.filesystem import list_files

WRITERS = {"parquet": fx.write_parquet, "webdataset": fx.write_webdataset, "folder": fx.write_folder}
EXTRA_GOOD = {"parquet": set(), "folder": set(),
              "webdataset": {"shard-2.tar/json_caption", "shard-3.tar/before_cut"}}


def expected_rows(kind: str, root) -> tuple[set[str], dict[str, str]]:
    """(keys of good rows, {rejected key: reason}) for a fixture directory."""
    rows = fx.cases()
    extra_rejects = WRITERS[kind](root, rows)
    keys = {fx.case_key(kind, case, i, rows): case.reason for i, case in enumerate(rows)}
    good = {k for k, reason in keys.items() if not reason} | EXTRA_GOOD[kind]
    return good, {**{k: r for k, r in keys.items() if r}, **extra_rejects}


def read_all(cfg) -> list[dict]:
    geometry = Geometry.of(cfg)
    source = open_source(cfg, geometry)
    return [clean_sample(raw, geometry, Limits.of(cfg)) for unit in source.units()
            for raw in source.read(json.loads(json.dumps(unit)))]  # units travel to Ray tasks as JSON


@pytest.mark.parametrize("kind", list(WRITERS))
def test_every_row_is_kept_once_or_rejected_for_its_reason(kind, tmp_path):
    good, rejected = expected_rows(kind, tmp_path / kind)
    rows = read_all(load_config(overrides=[f"data.source={kind}", f"data.path='{tmp_path / kind}'"]))
    kept = [r["key"] for r in rows if not r["reject"]]
    assert sorted(kept) == sorted(good)  # each good row exactly once
    assert {r["key"]: r["reject"] for r in rows if r["reject"]} == rejected
    assert len(rows) == len(good) + len(rejected)
    assert all(r["sample_id"] == stable_id(r["key"]) for r in rows)


def test_webdataset_json_metadata_gives_caption_and_label(tmp_path):
    fx.write_webdataset(tmp_path / "wds", fx.cases())
    rows = read_all(load_config(overrides=["data.source=webdataset", f"data.path='{tmp_path / 'wds'}'"]))
    row = next(r for r in rows if r["key"] == "shard-2.tar/json_caption")
    assert row["captions"] == ["from json"] and row["label"] == 3


def test_globs_and_listing_errors(tmp_path):
    fx.write_parquet(tmp_path / "pq", fx.cases())
    assert list_files(str(tmp_path / "pq" / "part-[01].parquet"), ("parquet",)).keys == (
        "part-0.parquet", "part-1.parquet")
    assert list_files(str(tmp_path / "pq" / "part-0.parquet"), ("parquet",)).keys == ("part-0.parquet",)
    uri = list_files(f"file://{tmp_path / 'pq'}", ("parquet",))  # the pyarrow URI path (s3://, gs://, ...)
    assert uri.keys == ("part-0.parquet", "part-1.parquet", "part-9.parquet")
    with pytest.raises(DataError, match="does not exist"):
        list_files(str(tmp_path / "nowhere"), ("parquet",))
    with pytest.raises(DataError, match="no tar"):
        list_files(str(tmp_path / "pq"), ("tar",))


def test_parquet_without_an_image_column_names_the_columns(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    tmp_path.joinpath("t").mkdir()
    pq.write_table(pa.table({"picture": [b"x"], "caption": ["c"]}), tmp_path / "t" / "a.parquet")
    cfg = load_config(overrides=["data.source=parquet", f"data.path='{tmp_path / 't'}'"])
    with pytest.raises(DataError, match="no image column .* it has picture, caption"):
        open_source(cfg, Geometry.of(cfg))


def test_fashion_mnist_rows_and_captions():
    cfg = load_config(overrides=["data.split=test", "data.max_samples=30"])
    rows = read_all(cfg)
    assert [r["sample_id"] for r in rows] == list(range(30)) and not any(r["reject"] for r in rows)
    assert rows[0]["label"] == 9 and rows[0]["captions"] == class_captions(9)
    assert "a black and white photo of an ankle boot" in class_captions(9)
    assert rows[0]["pixels_shape"] == [32, 32, 1]


@pytest.mark.parametrize("overrides, message", [
    (["data.source=parquet"], "needs data.path"),
    (["data.source=shapes", "data.hflip=true"], "left/right"),
    (["data.split=validation"], "not one of train, test"),
    (["data.aspect_buckets=true", "data.height=36"], "multiples of data.bucket_multiple"),
    (["data.aspect_buckets=true", "data.bucket_token_budget=8"], "at least one"),
    (["data.max_aspect_ratio=0.5"], "must be >= 1"),
])
def test_bad_data_config_is_a_one_line_error(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=overrides)
