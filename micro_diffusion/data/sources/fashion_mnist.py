"""Fashion-MNIST from the Debian package `dataset-fashion-mnist`: 70,000 28x28 grey images in 10 classes.

Files: /usr/share/datasets/fashion-mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz (idx format: a
big-endian header with a magic number and the dimensions, then uint8 values). Captions come from class names.
"""

from __future__ import annotations

import gzip
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from micro_diffusion.data.sources.base import Record, SourceUnavailableError, register_source

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASS_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
CAPTION_NAMES = (
    "a T-shirt", "a pair of trousers", "a pullover", "a dress", "a coat",
    "a sandal", "a shirt", "a sneaker", "a bag", "an ankle boot",
)  # fmt: skip
SPLIT_PREFIXES = {"train": "train", "test": "t10k"}
_IMAGES_MAGIC, _LABELS_MAGIC = 2051, 2049


@register_source("fashion_mnist")
def iter_fashion_mnist(
    root: str | Path | None = None,
    split: str = "train",
    caption_template: str = "a photo of {name}",
) -> Iterator[Record]:
    """Yield Fashion-MNIST images (mode "L", 28x28), label = class index, caption from the class name.

    Args:
        root: folder with the four idx .gz files (default: the Debian package's folder).
        split: "train" (60,000), "test" (10,000) or "all" (train then test).
        caption_template: format string with `{name}`, the class as a noun phrase ("an ankle boot").
    """
    folder = Path(root) if root is not None else FASHION_MNIST_DIR
    if split not in (*SPLIT_PREFIXES, "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    for name in SPLIT_PREFIXES if split == "all" else (split,):
        images, labels = load_fashion_mnist(folder, name)
        for index, (pixels, label) in enumerate(zip(images, labels)):
            yield Record(
                key=f"{name}/{index:05d}",
                image=Image.fromarray(pixels, mode="L"),
                caption=caption_template.format(name=CAPTION_NAMES[label]),
                label=int(label),
            )


def load_fashion_mnist(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 28, 28) uint8, labels (N,) uint8) of one split, with checked idx headers."""
    prefix = SPLIT_PREFIXES[split]
    images_path = folder / f"{prefix}-images-idx3-ubyte.gz"
    labels_path = folder / f"{prefix}-labels-idx1-ubyte.gz"
    if not images_path.is_file() or not labels_path.is_file():
        raise SourceUnavailableError(
            f"Fashion-MNIST files not found in {folder}; install them with "
            "`scripts/get_offline_data.sh fashion_mnist` (runs `apt-get install -y dataset-fashion-mnist`)"
        )
    images = _read_idx(images_path, _IMAGES_MAGIC, dims=3)
    labels = _read_idx(labels_path, _LABELS_MAGIC, dims=1)
    if len(images) != len(labels):
        raise ValueError(f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels")
    if labels.max(initial=0) >= len(CLASS_NAMES):
        raise ValueError(f"{labels_path}: label {labels.max()} outside the {len(CLASS_NAMES)} classes")
    return images, labels


def _read_idx(path: Path, magic: int, dims: int) -> np.ndarray:
    """Read a gzipped idx file of uint8 values with `dims` dimensions."""
    data = gzip.open(path).read()
    header = np.frombuffer(data, dtype=">u4", count=1 + dims)
    if int(header[0]) != magic:
        raise ValueError(
            f"{path}: not an idx file of {dims}-d uint8 (magic {int(header[0])}, expected {magic})"
        )
    shape = tuple(int(size) for size in header[1:])
    values = np.frombuffer(data, dtype=np.uint8, offset=4 * (1 + dims))
    if values.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape} but holds {values.size} values (truncated file?)")
    return values.reshape(shape)
