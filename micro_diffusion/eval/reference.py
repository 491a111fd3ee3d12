"""Reference sets of the feature metrics: images read from any registered source, and their cached statistics.

Frechet distance, KID and precision/recall compare generated images with a reference set. Here the set is the
first `count` records of a source (`micro_diffusion.data.sources`), prepared as precompute prepares training
images (`micro_diffusion.data.images`: RGB, shorter side resized, centre crop), and its feature statistics are
cached per (dataset, resolution, extractor) by `load_or_compute_reference_statistics`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from micro_diffusion.data.images import crop_transform, to_rgb
from micro_diffusion.data.sources import get_source
from micro_diffusion.eval.features import FeatureExtractor
from micro_diffusion.eval.frechet import FeatureStatistics, load_or_compute_reference_statistics


@dataclass
class FeatureReference:
    """A feature extractor and the reference statistics FD / KID / precision-recall compare samples against."""

    extractor: FeatureExtractor
    statistics: FeatureStatistics
    name: str


def reference_images(
    source: str, options: dict, count: int, resolution: int, batch_size: int
) -> Callable[[], Iterator[Tensor]]:
    """A callable yielding batches (B, 3, r, r) in [0, 1] of the first `count` records of a source."""
    transform = crop_transform(resolution)

    def batches() -> Iterator[Tensor]:
        records = itertools.islice(get_source(source)(**options), count)
        while chunk := list(itertools.islice(records, batch_size)):
            yield torch.stack([(transform(to_rgb(r.open_image())) + 1) / 2 for r in chunk])

    return batches


def reference_statistics(
    source: str, options: dict, count: int, resolution: int, extractor: FeatureExtractor, cache_dir: Path,
    batch_size: int = 32,
) -> tuple[FeatureStatistics, str]:
    """Cached feature statistics of the first `count` images of a source, and a name stating that set."""
    name = source + "".join(f"-{k}={v}" for k, v in sorted(options.items()))
    stats = load_or_compute_reference_statistics(
        cache_dir, f"{name}-n{count}", resolution, extractor,
        reference_images(source, options, count, resolution, batch_size),
    )
    return stats, f"{name} ({stats.count} images, {resolution}px)"
