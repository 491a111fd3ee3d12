"""Scores accumulated batch by batch, in any number of processes, and merged into those of the whole sample set.

Memory does not grow with the number of samples N except where a metric needs the features themselves:

    metric               what is kept while streaming                          memory
    Frechet distance     float64 feature mean and scatter matrix               O(D^2)   (32 MB for Inception)
    KID, precision/rec.  a uniform sample of at most max_stored features       O(max_stored D)
    CLIP score           a sum and a count                                     O(1)
    shapes score         counts per criterion and category                     O(1)

Each process scores its own samples (ids: the sample indices, unique over the set); `ScoreTotals.merge` adds the
totals of the processes, and the merged totals equal those of one process that saw every sample (the moments up
to float64 rounding; the feature sample is chosen by sample id, so it is the same set).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from micro_diffusion.eval.clip_score import ClipScore
from micro_diffusion.eval.features import FeatureExtractor
from micro_diffusion.eval.frechet import FeatureStatistics
from micro_diffusion.eval.shapes_score import shapes_tally


@dataclass
class ScoreTotals:
    """What the metrics need, added up over the samples seen (picklable, to gather them across processes)."""

    features: FeatureStatistics | None = None
    shapes: Counter[str] | None = None
    clip_sum: float = 0.0
    clip_count: int = 0
    image_sizes: set[int] = field(default_factory=set)

    def merge(self, other: ScoreTotals) -> None:
        if self.features is not None and other.features is not None:
            self.features.merge(other.features)
        if self.shapes is not None and other.shapes is not None:
            self.shapes.update(other.shapes)
        self.clip_sum += other.clip_sum
        self.clip_count += other.clip_count
        self.image_sizes |= other.image_sizes

    @property
    def clip_score(self) -> float:
        """Mean CLIP score over the scored samples."""
        if self.clip_count == 0:
            raise ValueError("no samples were CLIP-scored")
        return self.clip_sum / self.clip_count


class StreamingScorer:
    """Feeds batches of samples to the metrics asked for, keeping only their `ScoreTotals`.

    Args:
        extractor: feature network of FD / KID / precision-recall (None: no feature metric).
        max_stored: features kept for KID and precision/recall (0 when only FD is asked for).
        shapes: score each image against its shapes-grammar prompt.
        clip: CLIP-score each image against its prompt.
    """

    def __init__(self, extractor: FeatureExtractor | None = None, max_stored: int = 0, shapes: bool = False,
                 clip: ClipScore | None = None) -> None:
        self.extractor = extractor
        self.clip = clip
        features = None if extractor is None else FeatureStatistics(extractor.num_features, max_stored)
        self.totals = ScoreTotals(features=features, shapes=Counter() if shapes else None)

    @torch.inference_mode()
    def update(self, ids: Sequence[int], images: Tensor, conditions: Sequence[str | int | None]) -> None:
        """ids (B,) sample indices, images (B, 3, H, W) in [0, 1], their B conditions (prompts for text metrics)."""
        self.totals.image_sizes.add(images.shape[-1])
        if self.totals.features is not None:
            self.totals.features.update(self.extractor(images), torch.as_tensor(list(ids)))
        if self.totals.shapes is not None:
            self.totals.shapes.update(shapes_tally(images, conditions))
        if self.clip is not None:
            scores = self.clip(images, list(conditions))
            self.totals.clip_sum += scores.double().sum().item()
            self.totals.clip_count += len(scores)
