"""`micro-diffusion posthoc-ema`: post-hoc EMA reconstruction from power-function EMA snapshots (EDM2).

The PowerEMA training callback writes snapshots, one safetensors file per tracked sigma_rel and snapshot time,
named phema-<images, 12 digits>-<sigma_rel>.safetensors, holding the network's state dict (parameters averaged,
buffers as they were) and, in the header, the snapshot's time in images and its exponent gamma. This command
solves for the weights that turn those snapshots into the power-function EMA of any sigma_rel at any snapshot
time (see micro_diffusion.diffusion.power_ema) and writes the result as a plain network state dict (safetensors)
that `load_dit_weights(model.dit, path)` or `network.load_state_dict(load_file(path))` loads.

    micro-diffusion posthoc-ema runs/x/phema --sigma-rel 0.08 --output ema-0.080.safetensors
    micro-diffusion posthoc-ema runs/x/phema --sigma-rel 0.05,0.10,0.15 --at-images 8000000 --out-dir ema/

`sweep()` evaluates a list of sigma_rels with any metric and writes a table (JSON and CSV) and a plot.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from micro_diffusion.diffusion.power_ema import gamma_to_sigma_rel, sigma_rel_to_gamma, solve_posthoc_weights

SNAPSHOT_FORMAT = "micro_diffusion.phema_snapshot.v1"
WEIGHTS_FORMAT = "micro_diffusion.posthoc_ema.v1"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
Evaluate = Callable[[dict[str, Tensor]], float]


# --------------------------------------------------------------------------------------------------------------
# Snapshot files
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    """A stored power-function EMA: its file, time (images), exponent and the state-dict keys of its buffers."""

    path: Path
    t_images: int
    gamma: float
    buffers: tuple[str, ...]

    @property
    def sigma_rel(self) -> float:
        return gamma_to_sigma_rel(self.gamma)


def snapshot_filename(t_images: int, sigma_rel: float) -> str:
    return f"phema-{t_images:012d}-{sigma_rel:.3f}.safetensors"


def save_snapshot(
    folder: str | Path,
    state: dict[str, Tensor],
    t_images: int,
    sigma_rel: float,
    buffers: Sequence[str],
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write one snapshot atomically: averaged floating-point parameters cast to `dtype`, buffers as they are."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    buffer_set = set(buffers)

    def stored(name: str, tensor: Tensor) -> Tensor:
        tensor = tensor.detach().cpu()
        if tensor.is_floating_point() and name not in buffer_set:
            tensor = tensor.to(dtype)
        return tensor.contiguous()

    header = {
        "format": SNAPSHOT_FORMAT,
        "t_images": str(t_images),
        "gamma": repr(sigma_rel_to_gamma(sigma_rel)),
        "sigma_rel": repr(float(sigma_rel)),
        "buffers": json.dumps(sorted(buffer_set)),
    }
    path = folder / snapshot_filename(t_images, sigma_rel)
    partial = path.with_name(path.name + ".partial")
    save_file({name: stored(name, tensor) for name, tensor in state.items()}, str(partial), metadata=header)
    os.replace(partial, path)
    return path


def read_snapshot(path: str | Path) -> Snapshot:
    """The header of one snapshot file."""
    with safe_open(str(path), framework="pt") as file:
        header = file.metadata() or {}
    if header.get("format") != SNAPSHOT_FORMAT:
        raise ValueError(f"{path} is not a power-function EMA snapshot (format {header.get('format')!r})")
    return Snapshot(Path(path), int(header["t_images"]), float(header["gamma"]), tuple(json.loads(header["buffers"])))


def find_snapshots(folder: str | Path) -> list[Snapshot]:
    """All snapshots in a folder, sorted by time then gamma."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"snapshot folder {folder} does not exist")
    snapshots = [read_snapshot(path) for path in sorted(folder.glob("phema-*.safetensors"))]
    if not snapshots:
        raise FileNotFoundError(f"no phema-*.safetensors snapshots in {folder}")
    return sorted(snapshots, key=lambda s: (s.t_images, s.gamma))


# --------------------------------------------------------------------------------------------------------------
# Reconstruction
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reconstruction:
    """A reconstructed EMA: its state dict (float32 parameters), target and how well the profile was fitted."""

    state_dict: dict[str, Tensor]
    sigma_rel: float
    t_images: int
    fit_error: float


def reconstruct(
    snapshots: Sequence[Snapshot], sigma_rels: Sequence[float], at_images: int | None = None
) -> list[Reconstruction]:
    """Post-hoc EMAs for `sigma_rels` at snapshot time `at_images` (the latest when None), in one pass over the
    snapshot files; memory holds one float32 copy of the network per sigma_rel. Buffers come from a snapshot
    taken at `at_images`."""
    times = sorted({s.t_images for s in snapshots})
    at_images = times[-1] if at_images is None else at_images
    if at_images not in times:
        raise ValueError(f"at_images {at_images} is not a snapshot time; the snapshots are at {times}")
    used = [s for s in snapshots if s.t_images <= at_images]
    solution = solve_posthoc_weights([s.t_images for s in used], [s.gamma for s in used], at_images, sigma_rels)
    sums: list[dict[str, Tensor]] = [{} for _ in sigma_rels]
    keys: set[str] | None = None
    for snapshot, weights in zip(used, solution.weights):
        with safe_open(str(snapshot.path), framework="pt") as file:
            if keys is None:
                keys = set(file.keys())
            elif set(file.keys()) != keys:
                raise ValueError(f"{snapshot.path} holds other tensors than the snapshots before it")
            for name in sorted(keys - set(snapshot.buffers)):
                tensor = file.get_tensor(name).float()
                for total, weight in zip(sums, weights):
                    if name in total:
                        total[name].add_(tensor, alpha=float(weight))
                    else:
                        total[name] = tensor * float(weight)
    final = next(s for s in reversed(used) if s.t_images == at_images)
    with safe_open(str(final.path), framework="pt") as file:
        buffers = {name: file.get_tensor(name) for name in final.buffers}
    return [
        Reconstruction({**total, **buffers}, float(sigma_rel), at_images, float(error))
        for total, sigma_rel, error in zip(sums, sigma_rels, solution.fit_error)
    ]


def save_reconstruction(path: str | Path, reconstruction: Reconstruction, dtype: torch.dtype = torch.float32) -> Path:
    """Write a reconstructed EMA as a network state dict (safetensors), its target in the header."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {
        name: (tensor.to(dtype) if tensor.is_floating_point() else tensor).contiguous()
        for name, tensor in reconstruction.state_dict.items()
    }
    header = {
        "format": WEIGHTS_FORMAT,
        "sigma_rel": repr(reconstruction.sigma_rel),
        "gamma": repr(sigma_rel_to_gamma(reconstruction.sigma_rel)),
        "t_images": str(reconstruction.t_images),
        "profile_fit_error": repr(reconstruction.fit_error),
    }
    save_file(tensors, str(path), metadata=header)
    return path


# --------------------------------------------------------------------------------------------------------------
# Sweep
# --------------------------------------------------------------------------------------------------------------


def sweep(
    snapshot_folder: str | Path,
    sigma_rels: Sequence[float],
    evaluate: Evaluate,
    out_dir: str | Path,
    at_images: int | None = None,
    metric_name: str = "metric",
    lower_is_better: bool = True,
    max_batch: int = 8,
) -> list[dict[str, float]]:
    """Evaluate the post-hoc EMA of every sigma_rel with `evaluate(state_dict) -> float`.

    Reconstructs up to `max_batch` sigma_rels per pass over the snapshots. Writes posthoc_sweep.json (with the best
    row), posthoc_sweep.csv and posthoc_sweep.png (metric against sigma_rel) into out_dir; returns the rows
    {sigma_rel, gamma, t_images, profile_fit_error, <metric_name>} in the order of sigma_rels.
    """
    if not sigma_rels:
        raise ValueError("need at least one sigma_rel")
    snapshots = find_snapshots(snapshot_folder)
    rows: list[dict[str, float]] = []
    for start in range(0, len(sigma_rels), max_batch):
        for result in reconstruct(snapshots, sigma_rels[start : start + max_batch], at_images):
            value = float(evaluate(result.state_dict))
            rows.append(
                {
                    "sigma_rel": result.sigma_rel,
                    "gamma": sigma_rel_to_gamma(result.sigma_rel),
                    "t_images": result.t_images,
                    "profile_fit_error": result.fit_error,
                    metric_name: value,
                }
            )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    finite = [row for row in rows if math.isfinite(row[metric_name])]
    pick = min if lower_is_better else max
    best = pick(finite, key=lambda row: row[metric_name]) if finite else None
    table = {"metric": metric_name, "lower_is_better": lower_is_better, "best": best, "rows": rows}
    (out_dir / "posthoc_sweep.json").write_text(json.dumps(table, indent=2))
    with open(out_dir / "posthoc_sweep.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    _plot_sweep(rows, metric_name, best, out_dir / "posthoc_sweep.png")
    return rows


def _plot_sweep(rows: list[dict[str, float]], metric_name: str, best: dict[str, float] | None, path: Path) -> None:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5, 3.5), layout="tight")
    axes = figure.add_subplot()
    axes.plot([row["sigma_rel"] for row in rows], [row[metric_name] for row in rows], marker="o")
    if best is not None:
        axes.plot([best["sigma_rel"]], [best[metric_name]], marker="*", markersize=14, linestyle="none")
    axes.set_xlabel("EMA length sigma_rel")
    axes.set_ylabel(metric_name)
    axes.set_title(f"post-hoc EMA at {rows[0]['t_images']:,} images")
    axes.grid(alpha=0.3)
    figure.savefig(path, dpi=120)


# --------------------------------------------------------------------------------------------------------------
# Command
# --------------------------------------------------------------------------------------------------------------


def parse_sigma_rels(text: str) -> list[float]:
    """'0.05,0.10' -> [0.05, 0.1], each checked to be a valid sigma_rel."""
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: {text!r}") from error
    for value in values:
        try:
            sigma_rel_to_gamma(value)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from error
    if not values:
        raise argparse.ArgumentTypeError("need at least one sigma_rel")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="micro-diffusion posthoc-ema",
        description="Reconstruct power-function EMAs of any length from the snapshots of a training run.",
    )
    parser.add_argument("snapshots", type=Path, help="folder of phema-*.safetensors snapshots (PowerEMA callback)")
    parser.add_argument("--sigma-rel", type=parse_sigma_rels, required=True, help="target EMA length(s): 0.05,0.1")
    parser.add_argument("--at-images", type=int, help="snapshot time to reconstruct at (default: the latest)")
    output = parser.add_mutually_exclusive_group(required=True)
    output.add_argument("--output", type=Path, help="weights file to write (one sigma_rel)")
    output.add_argument("--out-dir", type=Path, help="folder for one ema-<images>-<sigma_rel>.safetensors per target")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype of the written weights")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.output is not None and len(args.sigma_rel) != 1:
        parser.error("--output takes one --sigma-rel; use --out-dir for several")
    try:
        results = reconstruct(find_snapshots(args.snapshots), args.sigma_rel, args.at_images)
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    for result in results:
        name = f"ema-{result.t_images:012d}-{result.sigma_rel:.3f}.safetensors"
        path = args.output if args.output is not None else args.out_dir / name
        save_reconstruction(path, result, DTYPES[args.dtype])
        print(
            f"sigma_rel {result.sigma_rel:.4f} at {result.t_images:,} images -> {path} "
            f"(profile fit error {result.fit_error:.2e})"
        )
