"""Reject records (one JSON line per unusable source row: {source, id, sample_id, reason, epoch}), their counts by
reason, and their order in files: by key with the numbers in it compared as numbers ("#102" before "#1014")."""
from __future__ import annotations

import re
from collections import Counter

_NUMBER = re.compile(r"(\d+)")


def natural_key(text: str) -> tuple:
    """'part-2.parquet#102' sorts before 'part-2.parquet#1014' and 'part-10...'."""
    return tuple(int(part) if part.isdigit() else part for part in _NUMBER.split(text))


def rejects_sorted(records: list[dict]) -> list[dict]:
    return sorted(records, key=lambda r: (r.get("epoch", 0), natural_key(r["id"])))


def count_reasons(records: list[dict]) -> dict[str, int]:
    """{reason: rows}, by reason name."""
    return dict(sorted(Counter(r["reason"] for r in records).items()))
