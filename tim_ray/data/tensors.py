"""Tensors inside Arrow tables: column NAME holds each row's raw bytes and NAME_shape its shape; the dtype is fixed
per name in `DTYPES`.

Why not Ray's tensor extension types: rows of one column differ in shape under aspect buckets, and plain binary
round-trips through parquet and pyarrow without Ray installed (precomputed shards are read by plain pyarrow).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa

DTYPES = {
    "pixels": np.uint8,  # (H, W, C), 0..255
    "image": np.float32,  # (C, H, W): pixels in [-1, 1] or codec latents
    "image_flipped": np.float32,  # the latents of the horizontally flipped pixels (precompute with data.hflip)
    "text": np.float32,  # (L, D) text-encoder features
    "text_mask": np.bool_,  # (L,), True = a real token
}


def tensor_columns(name: str, arrays: Sequence[np.ndarray] | np.ndarray) -> dict[str, pa.Array]:
    """{NAME: binary, NAME_shape: list<int32>} for one array per row: a list, or rows of one shape stacked into
    one (rows, *shape) array, whose bytes become the column's buffer as they are (no Python bytes per row: for
    small images the per-row objects cost more than the pixels)."""
    dtype = DTYPES[name]
    if isinstance(arrays, np.ndarray):
        stack = np.ascontiguousarray(arrays, dtype=dtype)
        rows, shape = len(stack), stack.shape[1:]
        row_bytes = stack.nbytes // rows if rows else 0
        if row_bytes * rows >= 2**31:
            raise ValueError(f"column '{name}' would hold {row_bytes * rows} bytes, over Arrow binary's 2 GiB")
        offsets = pa.py_buffer(np.arange(rows + 1, dtype=np.int32) * np.int32(row_bytes))
        return {
            name: pa.Array.from_buffers(pa.binary(), rows, [None, offsets, pa.py_buffer(stack.reshape(-1))]),
            f"{name}_shape": pa.ListArray.from_arrays(
                pa.array(np.arange(rows + 1, dtype=np.int32) * np.int32(len(shape))),
                pa.array(np.tile(np.array(shape, dtype=np.int32), rows))),
        }
    return {
        name: pa.array([np.ascontiguousarray(a, dtype=dtype).tobytes() for a in arrays], pa.binary()),
        f"{name}_shape": pa.array([list(a.shape) for a in arrays], pa.list_(pa.int32())),
    }


def with_tensor(table: pa.Table, name: str, arrays: Sequence[np.ndarray] | np.ndarray) -> pa.Table:
    """`table` with the tensor column NAME set (replaced if present)."""
    for column, values in tensor_columns(name, arrays).items():
        if column in table.column_names:
            table = table.set_column(table.column_names.index(column), column, values)
        else:
            table = table.append_column(column, values)
    return table


def without_tensor(table: pa.Table, name: str) -> pa.Table:
    return table.drop_columns([name, f"{name}_shape"])


def row_tensors(table: pa.Table, name: str) -> list[np.ndarray]:
    """One array per row (shapes may differ)."""
    dtype = DTYPES[name]
    return [np.frombuffer(data, dtype=dtype).reshape(shape)
            for data, shape in zip(table[name].to_pylist(), table[f"{name}_shape"].to_pylist())]


def stacked(table: pa.Table, name: str) -> np.ndarray:
    """(rows, *shape) for rows that all share one shape; a writable copy, read straight from the Arrow buffer (no
    Python bytes per row: at 128x128 pixels, going through to_pylist cost the training process more CPU than the
    rest of a batch's preparation)."""
    shapes = {tuple(shape) for shape in table[f"{name}_shape"].to_pylist()}
    if len(shapes) != 1:
        raise ValueError(f"column '{name}' mixes shapes {sorted(shapes)}; group rows by bucket first")
    shape = shapes.pop()
    column = table[name].combine_chunks()
    offsets = np.frombuffer(column.buffers()[1], dtype=np.int32)[column.offset:column.offset + len(column) + 1]
    data = np.frombuffer(column.buffers()[2], dtype=np.uint8)[offsets[0]:offsets[-1]]  # rows of equal size, in order
    return data.view(DTYPES[name]).reshape(table.num_rows, *shape).copy()
