"""Builders of deliberately broken datasets (parquet, webdataset, folder) and tiny encoder stand-ins for the data
tests. Every case knows the reject reason it must produce, so tests compare exact counts."""
from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image


def encoded(width: int, height: int, fmt: str, seed: int = 0, mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = (rng.random((height, width, channels)) * 255).astype(np.uint8).squeeze(-1 if channels == 1 else ())
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def png_header_claiming(width: int, height: int) -> bytes:
    """A PNG that declares a huge size in its header and holds no pixels (a decompression-bomb shape)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + chunk(
        b"IEND", b"")


@dataclass(frozen=True)
class Case:
    name: str
    image: bytes | None
    caption: bytes | None
    reason: str  # "" = a good row
    extension: str = "png"


def cases() -> list[Case]:
    """One row per kind of breakage, plus good rows of several formats and aspect ratios."""
    jpeg, png = encoded(48, 40, "JPEG", 1), encoded(40, 48, "PNG", 2)
    good = [Case(f"good{i}", encoded(w, h, fmt, 10 + i), f"a picture number {i}".encode(), "", fmt.lower())
            for i, (w, h, fmt) in enumerate([(32, 32, "PNG"), (64, 32, "JPEG"), (32, 64, "PNG"), (50, 40, "WEBP"),
                                             (40, 40, "JPEG"), (24, 72, "PNG")])]
    good.append(Case("good_rgba", encoded(32, 32, "PNG", 20, "RGBA"), b"a transparent picture", ""))
    good.append(Case("good_grey", encoded(32, 32, "PNG", 21, "L"), "un caf\u00e9 gris".encode(), ""))
    broken = [
        Case("zero_bytes", b"", b"a zero byte file", "empty_image"),
        Case("truncated_jpeg", jpeg[: len(jpeg) // 2], b"half a jpeg", "truncated_image", "jpg"),
        Case("truncated_png", png[: len(png) // 2], b"half a png", "truncated_image"),
        Case("not_an_image", b"this is plain text, not pixels", b"a text file", "not_an_image"),
        Case("huge_header", png_header_claiming(100_000, 100_000), b"a bomb", "absurd_size"),
        Case("tiny", encoded(2, 2, "PNG", 3), b"two by two", "absurd_size"),
        Case("sliver", encoded(400, 12, "PNG", 4), b"a sliver", "absurd_size"),
        Case("empty_caption", encoded(32, 32, "PNG", 5), b"   ", "empty_caption"),
        Case("non_utf8_caption", encoded(32, 32, "PNG", 6), b"caf\xe9 \xff\xfe", "caption_not_utf8"),
    ]
    return good + broken


def expected_counts(rows: list[Case]) -> dict[str, int]:
    return dict(sorted(Counter(c.reason for c in rows if c.reason).items()))


def write_parquet(root: Path, rows: list[Case]) -> dict[str, str]:
    """Two parquet files (binary captions, so non-UTF-8 survives) and one file that is not parquet at all.
    Returns the extra expected rejects {key: reason}."""
    root.mkdir(parents=True)
    half = len(rows) // 2
    for index, part in enumerate([rows[:half], rows[half:]]):
        table = pa.table({"image": pa.array([c.image for c in part], pa.binary()),
                          "caption": pa.array([c.caption for c in part], pa.binary()),
                          "label": pa.array(list(range(len(part))), pa.int64())})
        pq.write_table(table, root / f"part-{index}.parquet", row_group_size=3)
    (root / "part-9.parquet").write_bytes(b"PAR1 this file has no footer")
    return {"part-9.parquet#0": "unreadable_file"}


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shard(path: Path, members: list[tuple[str, bytes]], cut_at: int | None = None) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members:
            _add(tar, name, data)
    path.write_bytes(buffer.getvalue()[:cut_at])


def write_webdataset(root: Path, rows: list[Case]) -> dict[str, str]:
    """Two shards of the cases (txt captions), a shard of metadata troubles, and a shard cut short.
    Returns the extra expected rejects {key: reason} beyond the cases."""
    root.mkdir(parents=True)
    half = len(rows) // 2
    for index, part in enumerate([rows[:half], rows[half:]]):
        members = [m for c in part for m in [(f"{c.name}.{c.extension}", c.image), (f"{c.name}.txt", c.caption)]]
        write_shard(root / f"shard-{index}.tar", members)
    image = encoded(32, 32, "PNG", 30)
    write_shard(root / "shard-2.tar", [
        ("json_caption.png", image), ("json_caption.json", json.dumps({"caption": "from json", "label": 3}).encode()),
        ("bad_json.png", image), ("bad_json.json", b"{not json"),
        ("no_image.txt", b"a caption without its image"),
        ("no_caption.png", image),
    ])
    cut = [("before_cut.png", image), ("before_cut.txt", b"fine"), ("after_cut.png", image * 4),
           ("after_cut.txt", b"lost")]
    padded_image = -(-len(image) // 512) * 512
    write_shard(root / "shard-3.tar", cut, cut_at=4 * 512 + padded_image + 100)  # inside after_cut.png
    (root / "notes.md").write_text("not a shard")
    return {"shard-2.tar/bad_json": "invalid_caption", "shard-2.tar/no_image": "missing_image",
            "shard-2.tar/no_caption": "missing_caption", "shard-3.tar#1": "unreadable_file"}


def write_folder(root: Path, rows: list[Case]) -> dict[str, str]:
    """Half the cases with sidecar .txt, half captioned by captions.jsonl, plus an uncaptioned image and a broken
    jsonl line. Returns the extra expected rejects {key: reason}."""
    (root / "sub").mkdir(parents=True)
    half = len(rows) // 2
    lines = []
    for index, case in enumerate(rows):
        key = f"{'sub/' if index % 2 else ''}{case.name}.{case.extension}"
        (root / key).write_bytes(case.image)
        if index < half:
            (root / key).with_suffix(".txt").write_bytes(case.caption)
        else:
            line = json.dumps({"file": key, "caption": "PLACEHOLDER"}).encode()
            lines.append(line.replace(b"PLACEHOLDER", case.caption.replace(b'"', b"")))
    (root / "uncaptioned.png").write_bytes(encoded(32, 32, "PNG", 40))
    lines.insert(1, b'{"file": "broken line"')
    (root / "captions.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    return {"uncaptioned.png": "missing_caption", "captions.jsonl:2": "invalid_caption"}


def case_key(source: str, case: Case, index: int, rows: list[Case]) -> str:
    """The key the source gives a case row (see write_*)."""
    half = len(rows) // 2
    if source == "folder":
        return f"{'sub/' if index % 2 else ''}{case.name}.{case.extension}"
    if source == "webdataset":
        return f"shard-{0 if index < half else 1}.tar/{case.name}"
    return f"part-{0 if index < half else 1}.parquet#{index if index < half else index - half}"


class StandInTextEncoder:
    """Deterministic features from the caption's characters: enough to check plumbing, padding and dropout."""

    dim = 3

    def __init__(self, max_tokens: int):
        self.max_tokens = max_tokens

    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = min(self.max_tokens + 3, 40)  # longer than max_tokens: the stage must cut
        features = torch.zeros(len(captions), tokens, self.dim)
        mask = torch.zeros(len(captions), tokens, dtype=torch.bool)
        for row, caption in enumerate(captions):
            words = caption.split()[:tokens]
            for position, word in enumerate(words):
                features[row, position] = torch.tensor([len(word), ord(word[0]) / 100, position])
            mask[row, :len(words)] = True
        return features, mask


def load_stand_in_text(name: str, max_tokens: int, device: str) -> StandInTextEncoder:
    return StandInTextEncoder(max_tokens)


def load_missing_text(name: str, max_tokens: int, device: str):
    raise ValueError(f"text encoder '{name}' does not exist")


class StandInCodec:
    """Latents = 2x2 average pool, widened to 4 channels, plus posterior noise from the given generator."""

    channels = 4

    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        pooled = torch.nn.functional.avg_pool2d(images, 2)
        latents = pooled.mean(1, keepdim=True).repeat(1, self.channels, 1, 1)
        return latents + 0.01 * torch.randn(latents.shape, generator=generator)


def load_stand_in_codec(name: str, kind: str, sample_posterior: bool, device: str) -> StandInCodec:
    return StandInCodec()
