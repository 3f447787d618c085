"""File sources read without Ray: exact reject counts per format, every good row once, listing and config errors."""
import json

import data_fixtures as fx
import pytest

from tim_ray.config import ConfigError, load_config
from tim_ray.data.decode import clean_sample
from tim_ray.data.geometry import Geometry, Limits
from tim_ray.data.records import DataError, stable_id
from tim_ray.data.rejects import rejects_sorted
from tim_ray.data.sources import first_rows, open_source
from tim_ray.data.sources.fashion_mnist import class_captions
from tim_ray.data.sources.filesystem import list_files
from tim_ray.data.windows import unit_samples

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
    """Every row of every unit, as the window reader gets them (exactly the unit's metadata row count)."""
    geometry = Geometry.of(cfg)
    source = open_source(cfg, geometry)
    units = first_rows(source.units(), cfg.data.max_samples)
    return [clean_sample(raw, geometry, Limits.of(cfg)) for unit in units
            for raw in unit_samples(source, json.loads(json.dumps(unit)))]  # units travel to Ray tasks as JSON


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


def test_webdataset_counts_come_from_img2dataset_stats_when_present(tmp_path):
    fx.write_webdataset(tmp_path / "wds", fx.cases())
    cfg = load_config(overrides=["data.source=webdataset", f"data.path='{tmp_path / 'wds'}'"])
    scanned = {u["name"]: u["rows"] for u in open_source(cfg, Geometry.of(cfg)).units()}
    assert scanned == {"shard-0.tar": 8, "shard-1.tar": 9, "shard-2.tar": 4, "shard-3.tar": 2}
    (tmp_path / "wds" / "shard-0_stats.json").write_text(json.dumps({"count": 9, "successes": 3}))
    units = open_source(cfg, Geometry.of(cfg)).units()
    assert units[0] == {"name": "shard-0.tar", "rows": 3}  # metadata is trusted: no scan of that shard
    assert len(list(unit_samples(open_source(cfg, Geometry.of(cfg)), units[0]))) == 3


def test_parquet_units_are_row_groups_and_columns_can_be_named(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    tmp_path.joinpath("t").mkdir()
    pq.write_table(pa.table({"picture": [fx.encoded(32, 32, "PNG")] * 5, "alt": ["a cat"] * 5}),
                   tmp_path / "t" / "a.parquet", row_group_size=2)
    cfg = load_config(overrides=["data.source=parquet", f"data.path='{tmp_path / 't'}'", "data.image_column=picture",
                                 "data.caption_column=alt"])
    source = open_source(cfg, Geometry.of(cfg))
    assert [(u["row_group"], u["first_row"], u["rows"]) for u in source.units()] == [(0, 0, 2), (1, 2, 2), (2, 4, 1)]
    assert [r["key"] for r in read_all(cfg)] == [f"a.parquet#{i}" for i in range(5)]
    wrong = load_config(overrides=["data.source=parquet", f"data.path='{tmp_path / 't'}'", "data.image_column=img"])
    with pytest.raises(DataError, match="no column 'img' .data.image_column.; it has picture, alt"):
        open_source(wrong, Geometry.of(wrong))


def test_a_parquet_file_given_to_the_fashion_mnist_source_is_a_one_line_error(tmp_path):
    fx.write_parquet(tmp_path / "pq", fx.cases())
    cfg = load_config(overrides=[f"data.path='{tmp_path / 'pq' / 'part-0.parquet'}'"])
    with pytest.raises(DataError, match="not found.*set data.source = 'parquet'"):
        open_source(cfg, Geometry.of(cfg))


def test_reject_files_sort_numbers_as_numbers():
    records = [{"id": key, "reason": "x"} for key in ("part-2.parquet#1014", "part-10.parquet#1",
                                                       "part-2.parquet#102", "part-2.parquet#7")]
    assert [r["id"] for r in rejects_sorted(records)] == ["part-2.parquet#7", "part-2.parquet#102",
                                                          "part-2.parquet#1014", "part-10.parquet#1"]


def test_fashion_mnist_rows_and_captions():
    cfg = load_config(overrides=["data.split=test", "data.max_samples=30"])
    rows = read_all(cfg)
    assert [r["sample_id"] for r in rows] == list(range(30)) and not any(r["reject"] for r in rows)
    assert rows[0]["label"] == 9 and rows[0]["captions"] == class_captions(9)
    assert "a black and white photo of an ankle boot" in class_captions(9)
    assert rows[0]["pixels"].shape == (32, 32, 1)


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
