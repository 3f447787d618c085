"""Fashion-MNIST from its IDX files (Debian's dataset-fashion-mnist by default): real 28x28 grey images, captioned
from the class names with several templates. The class id stays in the `label` column for class-conditional runs.
"""
from __future__ import annotations

import functools
import gzip
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from tim_ray.data.records import DataError, RawSample

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
SPLIT_PREFIX = {"train": "train", "test": "t10k"}
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
               "Ankle boot")
CLASS_NOUNS = ("t-shirt", "pair of trousers", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
               "ankle boot")
GRID_TEMPLATE = "a photo of {}"  # the caption of a class in sample grids and evaluation
TEMPLATES = (GRID_TEMPLATE, "a black and white photo of {}", "a picture of {}", "a product photo of {}",
             "a grayscale image of {}", "{}")
IMAGES_MAGIC, LABELS_MAGIC = 2051, 2049
# Rows per unit: the unit permutation is the coarse half of the shuffle (tim_ray.data.order), so units are small.
ROWS_PER_UNIT = 1000


def with_article(noun: str) -> str:
    return f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"


def class_captions(label: int) -> list[str]:
    """Every template filled with the class noun, e.g. 'a black and white photo of an ankle boot'."""
    return [template.format(with_article(CLASS_NOUNS[label])) for template in TEMPLATES]


def class_prompts(labels) -> list[str]:
    """The caption of each class label in GRID_TEMPLATE: the prompts of training's grids, `sample` and `eval`."""
    return [GRID_TEMPLATE.format(with_article(CLASS_NOUNS[int(label)])) for label in labels]


@functools.lru_cache(maxsize=2)
def read_idx(path: str, magic: int) -> np.ndarray:
    """An IDX array (big-endian header: magic, then one uint32 per dimension). Cached: every read task of a worker
    process would otherwise decompress the same 26 MB file again."""
    try:
        with gzip.open(path) as f:
            data = f.read()
    except (FileNotFoundError, NotADirectoryError):
        raise DataError(f"Fashion-MNIST file '{path}' not found; install the Debian package dataset-fashion-mnist "
                        "or set data.path to a directory with the IDX .gz files (for a parquet file or directory, "
                        "set data.source = 'parquet')") from None
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read Fashion-MNIST file '{path}': {exc}") from None
    header = np.frombuffer(data, dtype=">u4", count=1)[0]
    if header != magic:
        raise DataError(f"'{path}' is not an IDX file (magic {header}, expected {magic})")
    ndim = magic & 0xFF
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


class FashionMnistSource:
    """Everything tim-ray knows about Fashion-MNIST: reading, its settings, its grid prompts, its metrics."""

    name = "fashion-mnist"
    needs_path = False
    grey = True  # one channel in pixel space
    num_classes = len(CLASS_NAMES)
    metrics = ("fid", "kid", "class_agreement", "fid_inception", "kid_inception")  # compared with its test split

    @staticmethod
    def check(cfg) -> None:
        """This source's own settings; a DataError names the bad one."""
        if cfg.data.split not in SPLIT_PREFIX:
            raise DataError(f"data.split = '{cfg.data.split}' is not one of {', '.join(SPLIT_PREFIX)} for "
                            f"fashion-mnist")

    def __init__(self, path: str, split: str):
        directory = Path(path or DEFAULT_DIR)
        self.split = split
        self.images_path = str(directory / f"{SPLIT_PREFIX[split]}-images-idx3-ubyte.gz")
        self.labels_path = str(directory / f"{SPLIT_PREFIX[split]}-labels-idx1-ubyte.gz")
        self.count = len(read_idx(self.labels_path, LABELS_MAGIC))

    def units(self) -> list[dict]:
        return [{"name": self.split, "first_row": s, "rows": min(ROWS_PER_UNIT, self.count - s)}
                for s in range(0, self.count, ROWS_PER_UNIT)]

    def prompts(self) -> list[str]:
        """One grid prompt per class."""
        return class_prompts(range(len(CLASS_NOUNS)))

    def read(self, unit: dict) -> Iterator[RawSample]:
        images = read_idx(self.images_path, IMAGES_MAGIC)
        labels = read_idx(self.labels_path, LABELS_MAGIC)
        for index in range(unit["first_row"], unit["first_row"] + unit["rows"]):
            label = int(labels[index])
            yield RawSample(sample_id=index, key=f"{self.split}/{index}", image=images[index],
                            captions=class_captions(label), label=label)
