"""Image preparation shared by precompute, autoencoder training, latent statistics and evaluation.

Every path that turns a source's image into a tensor goes through `to_rgb` and `crop_transform`, so the
autoencoder, its latent statistics, the latent shards and the reference statistics of an evaluation all see the
same pixels. Plain PIL and torchvision: nothing here imports Streaming.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import transforms
from tqdm import tqdm

from micro_diffusion.data.sources import get_source


def to_rgb(image: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Any-mode image -> RGB; transparent pixels (RGBA, LA, P with transparency) put on `background`.

    16-bit grey (modes I;16*, as Pillow opens 16-bit grey PNGs) is scaled to 8 bits; Pillow's own conversion
    clips it, turning all but the darkest levels white. (Pillow reads 16-bit RGB PNGs as 8-bit RGB already.)
    """
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I;16"):
        levels = np.asarray(image, dtype=np.uint16).astype(np.float32)
        return Image.fromarray(np.round(levels / 257).astype(np.uint8)).convert("RGB")
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, background + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


def crop_transform(resolution: int) -> transforms.Compose:
    """PIL RGB -> (3, resolution, resolution) in [-1, 1]: shorter side resized (bicubic), centre crop."""
    return transforms.Compose(
        [
            transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BICUBIC, antialias=True),
            transforms.CenterCrop(resolution),
            transforms.ToTensor(),
            transforms.Normalize([0.5], [0.5]),
        ]
    )


class ImageSet(Dataset):
    """Images held in memory as uint8 (N, 3, S, S); item i is a float32 (3, S, S) in [-1, 1]."""

    def __init__(self, pixels: Tensor):
        if pixels.dtype != torch.uint8 or pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"expected uint8 pixels (N, 3, S, S), got {pixels.dtype} {tuple(pixels.shape)}")
        self.pixels = pixels

    def __len__(self) -> int:
        return self.pixels.shape[0]

    def __getitem__(self, index: int) -> Tensor:
        return _to_unit_range(self.pixels[index])

    def batches(self, batch_size: int) -> Iterator[Tensor]:
        """All images in order, (B, 3, S, S) float32 in [-1, 1] with B <= batch_size."""
        for pixels in self.pixels.split(batch_size):
            yield _to_unit_range(pixels)


def _to_unit_range(pixels: Tensor) -> Tensor:
    """uint8 levels 0..255 -> float32 in [-1, 1] (the project's image convention)."""
    return pixels.float() / 127.5 - 1.0


def load_source_images(
    source: str,
    source_options: Mapping[str, Any] | None = None,
    image_size: int = 32,
    max_images: int | None = None,
    progress: bool = False,
) -> ImageSet:
    """Read a registered source (`micro_diffusion.data.sources`) into memory, as precompute prepares images:
    RGB (transparency on white), shorter side resized to `image_size` (bicubic), centre crop.

    Records whose image cannot be read are skipped, counted and reported in a warning.

    Args:
        source: a reader name (`available_sources()`), e.g. "shapes", "fashion_mnist", "emoji", "folder".
        source_options: the reader's keyword arguments.
        image_size: side S of the square images.
        max_images: read at most this many records (None: all).
        progress: show a progress bar.
    """
    reader = get_source(source)
    options = dict(source_options or {})
    try:
        inspect.signature(reader).bind(**options)
    except TypeError as error:
        raise ValueError(f"bad options {options} for source {source!r}: {error}") from None
    transform = crop_transform(image_size)
    images, skipped = [], []
    records = reader(**options)
    for record in tqdm(records, desc=f"reading {source}", total=max_images, disable=not progress):
        if max_images is not None and len(images) >= max_images:
            break
        try:
            image = to_rgb(record.open_image())
        except (OSError, ValueError) as error:
            skipped.append(f"{record.key} ({error})")
            continue
        images.append(transform(image).add(1).mul(127.5).round().to(torch.uint8))
    if skipped:
        warnings.warn(f"{source}: skipped {len(skipped)} unreadable record(s): {', '.join(skipped[:5])}", stacklevel=2)
    if not images:
        raise ValueError(f"source {source!r} with options {options} yielded no readable image")
    return ImageSet(torch.stack(images))
