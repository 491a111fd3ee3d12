"""Frechet distance, KID and k-NN precision/recall over any feature extractor; cached reference statistics.

Features stream through `FeatureStatistics`: float64 running moments, so N can be 50k or more, plus a capped
uniform sample of the features themselves for the metrics that need them (KID, precision/recall). Reference
statistics are cached as one safetensors file per (dataset, resolution, extractor).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from micro_diffusion.eval.features import FeatureExtractor, iter_image_batches

log = logging.getLogger(__name__)

STATS_FORMAT = "micro_diffusion.feature_statistics.v2"
_RESERVED_METADATA = ("format", "count", "max_stored", "seed")


class FeatureStatistics:
    """Streaming mean and covariance of features (B, D), plus a capped uniform sample of them; mergeable.

    Moments are merged batch by batch in float64 with Chan et al.'s parallel update (mean and centred
    scatter matrix), which stays accurate when the mean is large next to the spread. The sample keeps at
    most `max_stored` features: those whose sample ids have the smallest hash keys (bottom-k sampling),
    a uniform sample that depends only on which ids were seen, not on their order nor on how the stream was
    split. Statistics of disjoint parts of one set (the shards of several processes) therefore `merge` into
    exactly the statistics of the whole set, moments up to float64 rounding. Memory: O(D^2) for the moments
    and O(max_stored D) for the sample, whatever the number of features.

    Args:
        num_features: D.
        max_stored: size of the kept sample (KID and precision/recall use it); 0 keeps moments only.
        seed: seeds the hash keys, so the same ids keep the same sample.
    """

    def __init__(self, num_features: int, max_stored: int = 10_000, seed: int = 0):
        if num_features < 1 or max_stored < 0:
            raise ValueError(f"need num_features >= 1 and max_stored >= 0, got {num_features}, {max_stored}")
        self.num_features = num_features
        self.max_stored = max_stored
        self.seed = seed
        self.count = 0
        self.metadata: dict[str, str] = {}
        self._mean = torch.zeros(num_features, dtype=torch.float64)
        self._scatter = torch.zeros(num_features, num_features, dtype=torch.float64)
        self._stored = torch.empty(0, num_features)
        self._stored_ids = torch.empty(0, dtype=torch.int64)
        self._covariance_sqrt: Tensor | None = None

    def update(self, features: Tensor, ids: Tensor | None = None) -> None:
        """Adds a batch of features (B, D), on any device, with their sample ids (B,) int64, unique over the
        whole set (default: their positions in the stream, count ... count + B - 1)."""
        if features.ndim != 2 or features.shape[1] != self.num_features:
            raise ValueError(f"expected features (B, {self.num_features}), got shape {tuple(features.shape)}")
        batch = features.detach().to("cpu", torch.float64)
        if not torch.isfinite(batch).all():
            raise ValueError("features contain NaN or infinity; check the images and the extractor's weights")
        if len(batch) == 0:
            return
        ids = torch.arange(self.count, self.count + len(batch)) if ids is None else torch.as_tensor(ids).long()
        if ids.shape != (len(batch),):
            raise ValueError(f"expected {len(batch)} sample ids, got shape {tuple(ids.shape)}")
        centred = batch - batch.mean(dim=0)
        self._merge_moments(len(batch), batch.mean(dim=0), centred.T @ centred)
        self._keep_sample(torch.cat([self._stored, batch.float()]), torch.cat([self._stored_ids, ids]))

    def merge(self, other: FeatureStatistics) -> None:
        """Adds the statistics of a disjoint set of features (other ids), e.g. another process's shard."""
        if (other.num_features, other.max_stored, other.seed) != (self.num_features, self.max_stored, self.seed):
            raise ValueError("only statistics of the same width, max_stored and seed merge")
        if other.count:
            self._merge_moments(other.count, other._mean, other._scatter)
            ids = torch.cat([self._stored_ids, other._stored_ids])
            self._keep_sample(torch.cat([self._stored, other._stored]), ids)

    def _merge_moments(self, count: int, mean: Tensor, scatter: Tensor) -> None:
        """Chan et al.: merge `count` features of mean (D,) and centred scatter matrix (D, D) into the moments."""
        delta = mean - self._mean
        total = self.count + count
        self._mean += delta * (count / total)
        self._scatter += scatter + torch.outer(delta, delta) * (self.count * count / total)
        self.count = total
        self._covariance_sqrt = None

    def _keep_sample(self, features: Tensor, ids: Tensor) -> None:
        """Keep the `max_stored` features (N, D) of smallest hash key of their ids (N,), ordered by id. One gather
        of the features, so at the cap the update holds the kept sample at most three times (old, `features`, new)."""
        if len(ids) > self.max_stored:
            kept = torch.argsort(_hash_keys(ids, self.seed))[: self.max_stored]
            index = kept[torch.argsort(ids[kept])]
        else:
            index = torch.argsort(ids)
        self._stored, self._stored_ids = features[index], ids[index]

    @property
    def mean(self) -> Tensor:
        """(D,) float64."""
        self._require(1)
        return self._mean.clone()

    @property
    def covariance(self) -> Tensor:
        """(D, D) float64, unbiased (divides by N - 1)."""
        self._require(2)
        return self._scatter / (self.count - 1)

    @property
    def covariance_sqrt(self) -> Tensor:
        """(D, D) float64 symmetric square root of the covariance, computed once and kept until the next
        update (reference statistics are compared with many sample sets)."""
        if self._covariance_sqrt is None:
            self._covariance_sqrt = _psd_sqrt(self.covariance)
        return self._covariance_sqrt

    @property
    def stored_features(self) -> Tensor:
        """(min(N, max_stored), D) float32, a uniform sample of the features seen."""
        return self._stored.clone()

    def _require(self, minimum: int) -> None:
        if self.count < minimum:
            raise ValueError(f"statistics need at least {minimum} features, got {self.count}")

    def save(self, path: str | os.PathLike) -> None:
        """Writes a safetensors file (atomically), with `metadata` in its header."""
        clash = set(self.metadata) & set(_RESERVED_METADATA)
        if clash:
            raise ValueError(f"metadata keys {sorted(clash)} are reserved")
        header = {
            **self.metadata,
            "format": STATS_FORMAT,
            "count": str(self.count),
            "max_stored": str(self.max_stored),
            "seed": str(self.seed),
        }
        tensors = {"mean": self._mean, "scatter": self._scatter, "stored": self._stored.contiguous(),
                   "stored_ids": self._stored_ids.contiguous()}
        path = Path(path)
        partial = path.with_name(path.name + ".partial")
        save_file(tensors, partial, metadata=header)
        os.replace(partial, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> FeatureStatistics:
        """Reads a file written by `save`."""
        with safe_open(path, framework="pt") as file:
            header = file.metadata() or {}
            if header.get("format") != STATS_FORMAT:
                raise ValueError(
                    f"{path} is not a feature statistics file ({STATS_FORMAT}; an older version's cache file "
                    "can be deleted, it is computed again)"
                )
            tensors = {key: file.get_tensor(key) for key in ("mean", "scatter", "stored", "stored_ids")}
        stats = cls(len(tensors["mean"]), int(header["max_stored"]), int(header["seed"]))
        stats.count = int(header["count"])
        stats._mean, stats._scatter = tensors["mean"], tensors["scatter"]
        stats._stored, stats._stored_ids = tensors["stored"], tensors["stored_ids"]
        stats.metadata = {k: v for k, v in header.items() if k not in _RESERVED_METADATA}
        return stats


def compute_feature_statistics(
    images: Tensor | Iterable[Tensor],
    extractor: FeatureExtractor,
    batch_size: int = 64,
    max_stored: int = 10_000,
) -> FeatureStatistics:
    """Streams images (one tensor (N, C, H, W) or an iterable of batches, floats in [0, 1]) through the
    extractor and returns their feature statistics."""
    stats = FeatureStatistics(extractor.num_features, max_stored)
    with torch.inference_mode():
        for batch in iter_image_batches(images, batch_size):
            stats.update(extractor(batch))
    if stats.count == 0:
        raise ValueError("no images were given")
    return stats


def frechet_distance(stats_a: FeatureStatistics, stats_b: FeatureStatistics) -> float:
    """Frechet distance between the Gaussians fitted to two feature sets:
    |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a^1/2 S_b S_a^1/2)^1/2).

    Pass the reference as `stats_a`: its S_a^1/2 (the costly part) is cached between calls.

    The last trace is the sum of the square roots of the eigenvalues of the symmetric PSD matrix
    S_a^1/2 S_b S_a^1/2, found with `eigvalsh` in float64: no complex intermediate values and no sqrtm
    iterations. Eigenvalues within float64 rounding of zero are set to zero, so rank-deficient
    covariances (N < D) add no sqrt(rounding) noise.
    """
    if stats_a.num_features != stats_b.num_features:
        raise ValueError(
            f"feature widths differ ({stats_a.num_features} vs {stats_b.num_features}): the statistics come "
            "from different extractors"
        )
    cov_a, cov_b, sqrt_a = stats_a.covariance, stats_b.covariance, stats_a.covariance_sqrt
    eigenvalues = _zero_rounding_noise(torch.linalg.eigvalsh(_symmetrise(sqrt_a @ cov_b @ sqrt_a)))
    distance = (stats_a.mean - stats_b.mean).square().sum() + cov_a.trace() + cov_b.trace()
    distance -= 2 * eigenvalues.sqrt().sum()
    return max(distance.item(), 0.0)


def kernel_inception_distance(
    features_a: Tensor,
    features_b: Tensor,
    subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 2020,
) -> tuple[float, float]:
    """KID (Binkowski et al. 2018): the unbiased MMD^2 estimate with the kernel k(x, y) = (x.y / D + 1)^3,
    over `subsets` random subsets of `subset_size` features drawn from each set (torch-fidelity's code).

    Args:
        features_a, features_b: (N_a, D) and (N_b, D), both N >= subset_size >= 2.
    Returns:
        (mean, standard deviation) over the subsets; the mean is near 0 (either sign) for equal
        distributions.
    """
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric

    _check_feature_pair(features_a, features_b)
    if subsets < 1 or not 2 <= subset_size <= min(len(features_a), len(features_b)):
        raise ValueError(
            f"KID needs subsets >= 1 and 2 <= subset_size <= the smaller set ({len(features_a)}, "
            f"{len(features_b)} features), got subsets={subsets}, subset_size={subset_size}"
        )
    result = kid_features_to_metric(
        features_a.detach().cpu().double(),
        features_b.detach().cpu().double(),
        kid_subsets=subsets,
        kid_subset_size=subset_size,
        rng_seed=seed,
        verbose=False,
    )
    return result[KEY_METRIC_KID_MEAN], result[KEY_METRIC_KID_STD]


def precision_recall(generated: Tensor, reference: Tensor, neighborhood: int = 3) -> tuple[float, float]:
    """k-NN manifold precision and recall (Kynkaanniemi et al. 2019), with torch-fidelity's code.

    Each set's manifold is the union of balls around its features reaching their k-th nearest neighbour.
    Precision: share of generated features inside the reference manifold (fidelity); recall: share of
    reference features inside the generated manifold (coverage).

    Args:
        generated, reference: (N_g, D) and (N_r, D) features, both N > neighborhood.
    """
    from torch_fidelity.metric_prc import KEY_METRIC_PRECISION, KEY_METRIC_RECALL, prc_features_to_metric

    _check_feature_pair(generated, reference)
    if neighborhood < 1 or min(len(generated), len(reference)) <= neighborhood:
        raise ValueError(
            f"precision/recall needs more than neighborhood={neighborhood} features per set, got "
            f"{len(generated)} generated and {len(reference)} reference"
        )
    result = prc_features_to_metric(
        generated.detach().cpu().float(),
        reference.detach().cpu().float(),
        prc_neighborhood=neighborhood,
        save_cpu_ram=True,
        verbose=False,
    )
    return result[KEY_METRIC_PRECISION], result[KEY_METRIC_RECALL]


def reference_statistics_path(
    cache_dir: str | os.PathLike, dataset: str, resolution: int, extractor_name: str
) -> Path:
    """The cache file of one (dataset, resolution, extractor):
    <cache_dir>/<dataset>-<resolution>px-<extractor>.safetensors."""
    return Path(cache_dir) / f"{_slug(dataset)}-{resolution}px-{_slug(extractor_name)}.safetensors"


def load_or_compute_reference_statistics(
    cache_dir: str | os.PathLike,
    dataset: str,
    resolution: int,
    extractor: FeatureExtractor,
    images: Callable[[], Tensor | Iterable[Tensor]],
    batch_size: int = 64,
    max_stored: int = 10_000,
) -> FeatureStatistics:
    """Reference statistics from the cache, or computed from `images()` and cached.

    Args:
        cache_dir: folder of the cache files (created if missing).
        dataset, resolution: name the reference set; with `extractor.name` they form the cache key.
        extractor: the network whose features are summarised.
        images: called only on a cache miss; returns the reference images (floats in [0, 1]).
    """
    path = reference_statistics_path(cache_dir, dataset, resolution, extractor.name)
    key = {"dataset": dataset, "resolution": str(resolution), "extractor": extractor.name}
    if path.exists():
        stats = FeatureStatistics.load(path)
        found = {name: stats.metadata.get(name) for name in key}
        if found != key or stats.num_features != extractor.num_features:
            raise ValueError(
                f"{path} holds statistics for {found} ({stats.num_features} features), not {key} "
                f"({extractor.num_features} features); delete the file or use another cache_dir"
            )
        log.info("reference statistics of %s loaded from %s (%d images)", dataset, path, stats.count)
        return stats
    stats = compute_feature_statistics(images(), extractor, batch_size, max_stored)
    stats.metadata = key
    path.parent.mkdir(parents=True, exist_ok=True)
    stats.save(path)
    log.info("reference statistics of %s computed from %d images, saved to %s", dataset, stats.count, path)
    return stats


def compute_image_metrics(
    images: Tensor | Iterable[Tensor],
    reference_stats: FeatureStatistics,
    extractor: FeatureExtractor,
    *,
    batch_size: int = 64,
    max_stored: int = 10_000,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    precision_recall_neighborhood: int = 3,
) -> dict[str, float]:
    """Scores generated images against reference statistics made with the same extractor.

    Args:
        images: one tensor (N, C, H, W) or an iterable of batches, floats in [0, 1].
        reference_stats: e.g. from `load_or_compute_reference_statistics`; KID and precision/recall use
            its stored feature sample.
        extractor: the extractor the reference statistics were made with.
        kid_subsets: 0 skips KID; kid_subset_size must not exceed either feature sample.
        precision_recall_neighborhood: k of the k-NN manifolds; 0 skips precision/recall. Its cost grows
            as (stored features)^2 x D: about 20 s on 2 CPU cores at the default 10k x 2048.
    Returns:
        {"frechet_distance", and unless skipped "kid_mean", "kid_std", "precision", "recall"}.
    """
    expected = reference_stats.metadata.get("extractor", extractor.name)
    if expected != extractor.name or reference_stats.num_features != extractor.num_features:
        raise ValueError(
            f"reference statistics were made with {expected!r} ({reference_stats.num_features} features), "
            f"not {extractor.name!r} ({extractor.num_features}); use the same extractor for both"
        )
    generated = compute_feature_statistics(images, extractor, batch_size, max_stored)
    return statistics_metrics(generated, reference_stats, kid_subsets=kid_subsets, kid_subset_size=kid_subset_size,
                              precision_recall_neighborhood=precision_recall_neighborhood)


def statistics_metrics(
    generated: FeatureStatistics,
    reference_stats: FeatureStatistics,
    *,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    precision_recall_neighborhood: int = 3,
) -> dict[str, float]:
    """`compute_image_metrics` from the generated images' feature statistics (e.g. streamed, or merged over
    processes). FD needs only the moments; KID and precision/recall need the stored features of both sets."""
    reference_sample = reference_stats.stored_features
    if (kid_subsets or precision_recall_neighborhood) and len(reference_sample) == 0:
        raise ValueError(
            "KID and precision/recall need reference features, but the reference statistics store none; "
            "rebuild them with max_stored > 0 or pass kid_subsets=0, precision_recall_neighborhood=0"
        )
    if kid_subsets and kid_subset_size > len(reference_sample):
        raise ValueError(
            f"kid_subset_size={kid_subset_size} exceeds the {len(reference_sample)} stored reference features"
        )
    metrics = {"frechet_distance": frechet_distance(reference_stats, generated)}
    sample = generated.stored_features
    if kid_subsets:
        kid = kernel_inception_distance(sample, reference_sample, kid_subsets, kid_subset_size)
        metrics["kid_mean"], metrics["kid_std"] = kid
    if precision_recall_neighborhood:
        pr = precision_recall(sample, reference_sample, precision_recall_neighborhood)
        metrics["precision"], metrics["recall"] = pr
    return metrics


def _psd_sqrt(matrix: Tensor) -> Tensor:
    """Square root of a symmetric PSD matrix (D, D) by eigendecomposition."""
    eigenvalues, eigenvectors = torch.linalg.eigh(_symmetrise(matrix))
    return (eigenvectors * _zero_rounding_noise(eigenvalues).sqrt()) @ eigenvectors.T


def _zero_rounding_noise(eigenvalues: Tensor) -> Tensor:
    """Sets eigenvalues (D,) of a PSD matrix that rounding alone could produce (|x| <= D eps max|x|) to 0."""
    tolerance = len(eigenvalues) * torch.finfo(eigenvalues.dtype).eps * eigenvalues.abs().max()
    return eigenvalues.where(eigenvalues > tolerance, torch.zeros_like(eigenvalues))


def _hash_keys(ids: Tensor, seed: int) -> Tensor:
    """Pseudo-random int64 keys in [0, 2^53) of sample ids (N,) int64, a function of (id, seed) alone:
    the SplitMix64 finaliser of id + seed * golden gamma, in wrapping uint64 arithmetic."""
    mixed = ids.numpy().astype(np.uint64) + np.array([seed], np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    for shift, multiplier in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB)):
        mixed = (mixed ^ (mixed >> np.uint64(shift))) * np.uint64(multiplier)
    mixed ^= mixed >> np.uint64(31)
    return torch.from_numpy((mixed >> np.uint64(11)).astype(np.int64))


def _symmetrise(matrix: Tensor) -> Tensor:
    return (matrix + matrix.T) / 2


def _check_feature_pair(features_a: Tensor, features_b: Tensor) -> None:
    if features_a.ndim != 2 or features_b.ndim != 2 or features_a.shape[1] != features_b.shape[1]:
        raise ValueError(
            f"expected two feature sets (N, D) of the same width, got {tuple(features_a.shape)} and "
            f"{tuple(features_b.shape)}"
        )


def _slug(text: str) -> str:
    """A file-name-safe form of a name: runs of characters other than letters, digits, '.', '_' become '-'."""
    return re.sub(r"[^A-Za-z0-9._]+", "-", text).strip("-.") or "unnamed"
