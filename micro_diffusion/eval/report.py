"""Evaluation report: every number written next to the protocol that produced it, plus a sample grid PNG.

A Frechet distance means nothing without its extractor, sample count, reference set, sampler, steps,
guidance and seed, so each result in the JSON file carries all of them:

    {"format": "micro_diffusion.eval_report.v1", "created": "...", "micro_diffusion_version": "...",
     "sample_grid": "grid.png",
     "results": [{"metric": "frechet_distance", "value": 12.3, "extractor": "inception-v3",
                  "num_samples": 30000, "reference_set": "coco2014-val-256px", "sampler": "edm-heun",
                  "steps": 30, "guidance": 5.0, "seed": 2024}, ...]}
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from torch import Tensor
from torchvision.utils import save_image

REPORT_FORMAT = "micro_diffusion.eval_report.v1"


@dataclass(frozen=True)
class EvalProtocol:
    """How a number was measured.

    Args:
        extractor: feature network, e.g. "inception-v3", "efficientnet-lite0", "clip-ViT-B-32".
        num_samples: generated images scored (N).
        reference_set: what they were compared with, e.g. "coco2014-val-256px (30000 images)".
        sampler: e.g. "edm-heun".
        steps: sampler steps.
        guidance: classifier-free guidance scale (1.0: none).
        seed: seed of the first sample.
    """

    extractor: str
    num_samples: int
    reference_set: str
    sampler: str
    steps: int
    guidance: float
    seed: int

    def __post_init__(self) -> None:
        problems = [f"{f.name} is empty" for f in fields(self) if getattr(self, f.name) == ""]
        problems += [f"{name} must be >= 1" for name in ("num_samples", "steps") if getattr(self, name) < 1]
        if problems:
            raise ValueError(f"invalid evaluation protocol ({'; '.join(problems)}): {self}")


def metric_records(metrics: Mapping[str, float], protocol: EvalProtocol) -> list[dict[str, Any]]:
    """One record per metric: {"metric": name, "value": value, **protocol}. Values must be finite."""
    records = []
    for name, value in metrics.items():
        if not math.isfinite(value):
            raise ValueError(f"metric {name!r} is {value}: not a reportable number; check the samples")
        records.append({"metric": name, "value": float(value), **asdict(protocol)})
    return records


def write_report(
    path: str | os.PathLike,
    records: Iterable[Mapping[str, Any]],
    sample_grid: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Writes the JSON report and returns it.

    Args:
        path: the .json file to write (its folder is created).
        records: from `metric_records`, possibly for several protocols.
        sample_grid: the grid PNG of the samples; stored relative to the report's folder when inside it.
    """
    path = Path(path)
    required = ["metric", "value", *(f.name for f in fields(EvalProtocol))]
    results = [dict(record) for record in records]
    for record in results:
        missing = [name for name in required if name not in record]
        if missing:
            raise ValueError(f"result {record} lacks fields {missing}; build results with metric_records()")
    report = {
        "format": REPORT_FORMAT,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "micro_diffusion_version": _package_version(),
        "sample_grid": None if sample_grid is None else _relative_to(Path(sample_grid), path.parent),
        "results": results,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    return report


def save_sample_grid(
    images: Tensor, path: str | os.PathLike, nrow: int | None = None, padding: int = 2
) -> Path:
    """Saves images (B, C, H, W) in [0, 1] as one PNG grid, `nrow` images per row (default: near square)."""
    if images.ndim != 4 or len(images) == 0:
        raise ValueError(f"expected a non-empty image batch (B, C, H, W), got shape {tuple(images.shape)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nrow = nrow or math.ceil(math.sqrt(len(images)))
    save_image(images.detach().float().cpu(), path, nrow=nrow, padding=padding)
    return path


def _relative_to(path: Path, folder: Path) -> str:
    try:
        return str(path.resolve().relative_to(folder.resolve()))
    except ValueError:
        return str(path)


def _package_version() -> str:
    try:
        return version("micro_diffusion")
    except PackageNotFoundError:
        return "unknown"
