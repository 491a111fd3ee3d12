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
import re
import textwrap
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
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
        sampler: e.g. "edm-heun" ("unknown" for samples scored from a folder made elsewhere).
        steps: sampler steps (None: unknown).
        guidance: classifier-free guidance scale (1.0: none; None: unknown).
        seed: seed of the first sample.
    """

    extractor: str
    num_samples: int
    reference_set: str
    sampler: str
    steps: int | None
    guidance: float | None
    seed: int

    def __post_init__(self) -> None:
        problems = [f"{f.name} is empty" for f in fields(self) if getattr(self, f.name) == ""]
        counts = {"num_samples": self.num_samples, "steps": self.steps}
        problems += [f"{name} must be >= 1" for name, value in counts.items() if value is not None and value < 1]
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


def save_captioned_grid(
    sections: Sequence[tuple[str, Tensor, Sequence[str]]], path: str | os.PathLike, columns: int = 8, scale: int = 4
) -> Path:
    """A grid for people: each section a title line, then its images (B, C, H, W) in [0, 1], upscaled `scale`
    times (nearest neighbour, so nothing is smoothed away), each with its caption wrapped below it."""
    from PIL import Image, ImageDraw, ImageFont  # imported here: only the grid needs them

    if not sections or any(len(images) != len(captions) or len(images) == 0 for _, images, captions in sections):
        raise ValueError("each section needs as many captions as images, and at least one image")
    font = ImageFont.load_default(size=11)
    line_height, pad = 13, 4
    tile = sections[0][1].shape[-1] * scale
    chars_per_line = max(8, tile // 6)
    wrapped = [[textwrap.wrap(caption, chars_per_line) for caption in captions] for _, _, captions in sections]
    caption_lines = max(len(lines) for section in wrapped for lines in section)
    cell_height = tile + caption_lines * line_height + pad
    rows = [math.ceil(len(images) / columns) for _, images, _ in sections]
    width = columns * (tile + pad) + pad
    height = sum(line_height + pad + row_count * cell_height for row_count in rows) + pad
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    top = pad
    for (title, images, _), lines_per_image, row_count in zip(sections, wrapped, rows):
        draw.text((pad, top), title, fill=(0, 0, 0), font=font)
        top += line_height + pad
        pixels = (images.detach().float().cpu().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()
        for index, (image, lines) in enumerate(zip(pixels, lines_per_image)):
            left = pad + (index % columns) * (tile + pad)
            cell_top = top + (index // columns) * cell_height
            canvas.paste(Image.fromarray(image).resize((tile, tile), Image.NEAREST), (left, cell_top))
            for line_index, line in enumerate(lines):
                draw.text((left, cell_top + tile + line_index * line_height), line, fill=(0, 0, 0), font=font)
        top += row_count * cell_height
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def plot_scores_by_set(
    scores: Mapping[str, Mapping[str, float]], path: str | os.PathLike, title: str = "",
    targets: Mapping[str, float] | None = None,
) -> Path:
    """Grouped bars: for each prompt set (keys of `scores`), the rate of each criterion it has; `targets` (set ->
    all-correct target) are drawn as marks over the sets' "all" bars."""
    plt = pyplot()
    criteria = list(dict.fromkeys(name for score in scores.values() for name in score))
    figure, axis = plt.subplots(figsize=(max(6, 1.2 * len(criteria) * len(scores) / 2), 4))
    width = 0.8 / len(scores)
    for set_index, (name, score) in enumerate(scores.items()):
        positions = [i + set_index * width for i, criterion in enumerate(criteria) if criterion in score]
        values = [score[criterion] for criterion in criteria if criterion in score]
        bars = axis.bar(positions, values, width, label=name)
        if targets and name in targets and "all" in score:
            x = criteria.index("all") + set_index * width
            axis.hlines(targets[name], x - width / 2, x + width / 2, colors=bars.patches[0].get_facecolor(),
                        linestyles="--", lw=2)
    axis.set_xticks([i + 0.4 - width / 2 for i in range(len(criteria))], criteria)
    axis.set(ylim=(0, 1), ylabel="rate over the set's prompts",
             title=title + (" (dashes: all-correct targets)" if targets else ""))
    axis.legend(fontsize=8)
    return save_figure(figure, path)


def pyplot():
    """matplotlib.pyplot on the file-only backend (imported here: only the plots need it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure, path: str | os.PathLike) -> Path:
    """Lays out, writes (PNG at 120 dpi) and closes `figure`; returns the path."""
    path = Path(path)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    pyplot().close(figure)
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


_LOGGED_LOSS = re.compile(r"\[metric\]\[batch=(\d+)\]: (loss/train/total|metrics/eval/ValidationLoss): ([-\d.e+]+)")


def plot_loss_curves(runs: Sequence[Path], path: str | os.PathLike, title: str = "", smoothing: int = 25) -> Path:
    """Plot the training loss (mean of `smoothing` batches) and validation loss of training runs, one run per
    folder holding the `metrics.txt` of Composer's file logger, on a log scale over the batch count."""
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(7, 4))
    for run in runs:
        series: dict[str, dict[int, float]] = {}
        log_text = (Path(run) / "metrics.txt").read_text(errors="replace")  # captured progress bars may cut a byte
        for match in _LOGGED_LOSS.finditer(log_text):
            series.setdefault(match[2], {})[int(match[1])] = float(match[3])  # a resumed run logs a step again
        for name, points in series.items():
            steps, values = zip(*sorted(points.items()))
            if name.startswith("loss"):
                window = np.ones(smoothing) / smoothing
                smoothed = np.convolve(values, window, mode="valid") if len(values) > smoothing else values
                label = f"{Path(run).name}: train (mean of {smoothing})"
                axis.plot(steps[len(steps) - len(smoothed):], smoothed, lw=1, label=label)
            else:
                axis.plot(steps, values, "o-", lw=2, label=f"{Path(run).name}: validation (fixed sigmas)")
    axis.set(xlabel="batch", ylabel="EDM loss", yscale="log", title=title)
    axis.legend(fontsize=7)
    return save_figure(figure, path)
