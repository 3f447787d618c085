"""Per-row cleaning without Ray: every kind of broken row gets its reason, good rows come out at the right size."""
import io
import subprocess
import sys

import data_fixtures as fx
import numpy as np
import pytest
from PIL import Image

from tim_ray.config import load_config
from tim_ray.data.decode import clean_sample
from tim_ray.data.geometry import Geometry, Limits, bucket_sizes
from tim_ray.data.records import RawSample

LIMITS = Limits.of(load_config())
RGB_32 = Geometry(channels=3, sizes=((32, 32),), multiple=8)


def clean(image, captions, geometry=RGB_32) -> dict:
    return clean_sample(RawSample(sample_id=7, key="k", image=image, captions=captions), geometry, LIMITS)


@pytest.mark.parametrize("case", fx.cases(), ids=lambda c: c.name)
def test_each_case_is_kept_or_rejected_for_its_reason(case):
    row = clean(case.image, case.caption)
    assert row["reject"] == case.reason
    if case.reason:
        assert row["pixels"] is None and row["captions"] == []
    else:
        assert row["pixels"].shape == (32, 32, 3) and row["pixels"].dtype == np.uint8
        assert row["captions"] == [case.caption.decode().strip()]


@pytest.mark.parametrize("captions, reason", [
    (None, "missing_caption"),
    ("", "empty_caption"),
    (["", "  ", None], "empty_caption"),
    ("caf\udce9", "caption_not_utf8"),  # a lone surrogate: what JSON "\udce9" or surrogateescape decoding gives
    ([b"fine", b"\xff"], "caption_not_utf8"),
    ([3], "invalid_caption"),
])
def test_caption_problems(captions, reason):
    assert clean(fx.encoded(32, 32, "PNG"), captions)["reject"] == reason


def test_a_caption_list_keeps_its_non_empty_entries():
    assert clean(fx.encoded(32, 32, "PNG"), ["  first ", "", b"second"])["captions"] == ["first", "second"]


def test_missing_image_and_reader_rejects():
    assert clean(None, "a caption")["reject"] == "missing_image"
    raw = RawSample(sample_id=1, key="f.tar", image=None, captions=None, reject="unreadable_file")
    assert clean_sample(raw, RGB_32, LIMITS)["reject"] == "unreadable_file"


def test_transparent_pixels_become_white():
    buffer = io.BytesIO()
    Image.new("RGBA", (32, 32), (10, 200, 30, 0)).save(buffer, format="PNG")
    row = clean(buffer.getvalue(), "clear")
    assert set(row["pixels"].ravel()) == {255}


def test_grey_geometry_keeps_one_channel_and_decoded_arrays_pass_through():
    grey = Geometry(channels=1, sizes=((32, 32),), multiple=8)
    row = clean(np.full((28, 28), 200, dtype=np.uint8), "an array", grey)
    assert row["pixels"].shape == (32, 32, 1) and set(row["pixels"].ravel()) == {200}


def test_bucket_sizes_keep_area_multiples_and_aspect():
    sizes = bucket_sizes(64, 64, 8, 4.0)
    assert (64, 64) in sizes and sorted(sizes) == sorted((w, h) for h, w in sizes)
    for h, w in sizes:
        assert h % 8 == 0 and w % 8 == 0 and h * w <= 64 * 64 and max(h / w, w / h) <= 4.0
    assert [h / w for h, w in sizes] == sorted((h / w for h, w in sizes), reverse=True)


def test_images_go_to_the_bucket_of_their_aspect():
    geometry = Geometry(channels=3, sizes=bucket_sizes(32, 32, 8, 4.0), multiple=8)
    wide = clean(fx.encoded(80, 30, "PNG"), "wide", geometry)  # 8:3
    tall = clean(fx.encoded(30, 80, "PNG"), "tall", geometry)
    assert wide["pixels"].shape == (16, 48, 3) and tall["pixels"].shape == (48, 16, 3)
    assert geometry.sizes[wide["bucket"]] == (16, 48) and geometry.sizes[tall["bucket"]] == (48, 16)
    assert clean(fx.encoded(50, 50, "PNG"), "square", geometry)["pixels"].shape == (32, 32, 3)


def test_global_batches_follow_the_token_budget():
    geometry = Geometry(channels=3, sizes=((64, 16), (32, 32), (24, 40)), multiple=8)
    assert geometry.global_batches(1024).tolist() == [1024 // 16, 1024 // 16, 1024 // 15]
    assert RGB_32.global_batches(1024) is None


def test_the_decode_side_of_the_stream_does_not_import_torch():
    """Every Ray worker that runs a decode task imports tim_ray.data.stream; torch would cost each ~2 CPU-s."""
    code = "import sys, tim_ray.data.stream; sys.exit(2 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
