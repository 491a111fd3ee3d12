"""Power-function EMA and its post-hoc reconstruction (EDM2, Karras et al. 2024, Section 3).

A power-function EMA with exponent gamma averages the training trajectory theta(tau), tau in (0, t], with the
profile p(tau) = (gamma + 1) tau^gamma / t^(gamma + 1): its weight on the past grows with the length of the run,
and the random initialisation is forgotten. Its width relative to the run length is

  sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3))),   0 < sigma_rel <= 1/sqrt(12) ~= 0.2887 (gamma >= 0).

Time t counts training images. After an optimiser step that brings t from t - dt to t, the average is updated as
ema <- beta ema + (1 - beta) theta with beta = (1 - dt / t)^(gamma + 1). With the weights held constant over each
step, this is exactly the integral of p against the piecewise-constant trajectory: step k gets the weight
(t_k^(gamma+1) - t_{k-1}^(gamma+1)) / t^(gamma+1), the profile's mass over (t_{k-1}, t_k].

Post-hoc reconstruction: snapshots of a few such averages, saved at times t_i with exponents gamma_i, are each a
known profile p_i. An average with any other profile p (any sigma_rel, at a snapshot time T) is approximated by
sum_i x_i p_i, with x the least-squares fit of the profiles in L2(0, inf): A x = b, A_ij = <p_i, p_j>,
b_i = <p_i, p>, all inner products in closed form. The coefficients are rescaled to sum to one, and the network
weights are averaged with them.

Snapshot files: one safetensors file per tracked sigma_rel and snapshot time, named
phema-<images, 12 digits>-<sigma_rel>.safetensors, holding the network's state dict (parameters averaged, buffers
as they were) and, in the header, the snapshot's time in images and its exponent gamma (`save_snapshot`,
`find_snapshots`). `reconstruct` turns them into the EMA of any sigma_rel at any snapshot time, written as a plain
network state dict by `save_reconstruction`; `sweep` scores a list of sigma_rels with any metric.

Plain numpy, torch and safetensors: the Composer callback (`micro_diffusion.training.power_ema_callback`) and the
command (`micro-diffusion posthoc-ema`) live elsewhere.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

MAX_SIGMA_REL = 1 / math.sqrt(12)  # gamma = 0: a uniform average over the whole run
SNAPSHOT_FORMAT = "micro_diffusion.phema_snapshot.v1"
WEIGHTS_FORMAT = "micro_diffusion.posthoc_ema.v1"
Evaluate = Callable[[dict[str, Tensor]], float]


def gamma_to_sigma_rel(gamma: float) -> float:
    """Relative standard deviation of the power profile with exponent gamma (> -1)."""
    if gamma <= -1:
        raise ValueError(f"gamma must be > -1, got {gamma}")
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent gamma >= 0 whose profile has relative width sigma_rel, 0 < sigma_rel <= 1/sqrt(12).

    It is the largest real root of gamma^3 + 7 gamma^2 + (16 - s^-2) gamma + (12 - s^-2) = 0, s = sigma_rel.
    """
    if not 0 < sigma_rel <= MAX_SIGMA_REL + 1e-12:
        raise ValueError(f"sigma_rel must be in (0, {MAX_SIGMA_REL:.4f}], got {sigma_rel}")
    inv_sq = sigma_rel**-2
    roots = np.roots([1.0, 7.0, 16.0 - inv_sq, 12.0 - inv_sq])
    return max(0.0, float(roots[np.abs(roots.imag) < 1e-6].real.max()))


def ema_beta(t: float, dt: float, gamma: float) -> float:
    """Decay of the update that brings the time from t - dt to t (images, 0 < dt <= t): (1 - dt / t)^(gamma + 1).

    The first update (dt = t) gives 0, so the average starts at the current weights.
    """
    if not 0 < dt <= t:
        raise ValueError(f"need 0 < dt <= t, got t={t}, dt={dt}")
    return (1 - dt / t) ** (gamma + 1)


def power_profile(tau: np.ndarray, t: float, gamma: float) -> np.ndarray:
    """The averaging profile of a snapshot taken at time t with exponent gamma, evaluated at times tau.

    p(tau) = (gamma + 1) tau^gamma / t^(gamma + 1) on (0, t] and 0 after; it integrates to one.
    """
    tau = np.asarray(tau, dtype=np.float64)
    inside = (tau > 0) & (tau <= t)
    ratio = np.where(inside, tau / t, 0.0)
    return np.where(inside, (gamma + 1) / t * ratio**gamma, 0.0)


def profile_inner_products(t_a: np.ndarray, gamma_a: np.ndarray, t_b: np.ndarray, gamma_b: np.ndarray) -> np.ndarray:
    """<p_a, p_b> = integral of p_a p_b over (0, inf) for power profiles (broadcasting arrays).

    Equal to (g_a + 1)(g_b + 1) min(t_a, t_b)^(g_a + g_b + 1) / ((g_a + g_b + 1) t_a^(g_a + 1) t_b^(g_b + 1)),
    evaluated in log space so that long runs (t ~ 1e9 images, gamma ~ 20) do not overflow.
    """
    t_a, gamma_a, t_b, gamma_b = (np.asarray(v, dtype=np.float64) for v in (t_a, gamma_a, t_b, gamma_b))
    gamma_sum = gamma_a + gamma_b + 1
    log_value = (
        np.log(gamma_a + 1)
        + np.log(gamma_b + 1)
        - np.log(gamma_sum)
        + gamma_sum * np.log(np.minimum(t_a, t_b))
        - (gamma_a + 1) * np.log(t_a)
        - (gamma_b + 1) * np.log(t_b)
    )
    return np.exp(log_value)


class PosthocSolution(NamedTuple):
    """weights: (num_snapshots, num_targets), each column sums to one; fit_error: (num_targets,) relative L2 error
    |sum_i x_i p_i - p| / |p| of the reconstructed profile."""

    weights: np.ndarray
    fit_error: np.ndarray


def solve_posthoc_weights(
    snapshot_times: Sequence[float],
    snapshot_gammas: Sequence[float],
    target_time: float,
    target_sigma_rels: Sequence[float],
) -> PosthocSolution:
    """Per-snapshot weights that reconstruct power-function EMAs of the given sigma_rels at target_time.

    snapshot_times, snapshot_gammas: (S,) the stored averages' times (images) and exponents; snapshots after
    target_time would bring in weights from its future and are rejected.
    """
    times = np.asarray(snapshot_times, dtype=np.float64)
    gammas = np.asarray(snapshot_gammas, dtype=np.float64)
    if times.ndim != 1 or times.shape != gammas.shape or times.size == 0:
        raise ValueError("need one gamma per snapshot time and at least one snapshot")
    if times.min() <= 0 or times.max() > target_time:
        raise ValueError(f"snapshot times must lie in (0, target_time={target_time}], got {times.min()}..{times.max()}")
    target_gammas = np.array([sigma_rel_to_gamma(s) for s in target_sigma_rels], dtype=np.float64)
    gram = profile_inner_products(times[:, None], gammas[:, None], times[None, :], gammas[None, :])
    cross = profile_inner_products(times[:, None], gammas[:, None], target_time, target_gammas[None, :])
    target_norm_sq = profile_inner_products(target_time, target_gammas, target_time, target_gammas)
    weights = np.linalg.lstsq(gram, cross, rcond=None)[0]
    residual_sq = np.einsum("ik,ij,jk->k", weights, gram, weights) - 2 * np.einsum("ik,ik->k", weights, cross)
    fit_error = np.sqrt(np.maximum(residual_sq + target_norm_sq, 0.0) / target_norm_sq)
    return PosthocSolution(weights / weights.sum(axis=0, keepdims=True), fit_error)


class PowerFunctionEMA:
    """Power-function EMAs of a network's parameters, one per sigma_rel, with time counted in images.

    The averages are float32 tensors on the parameters' devices; buffers are not averaged (a snapshot takes the
    network's current ones). The network itself is never modified.

    Args:
        network: the trained module.
        sigma_rels: relative widths of the tracked averages (EDM2 tracks 0.05 and 0.10).
        t_images: training time of the network's current weights; the averages start at them.
    """

    def __init__(self, network: nn.Module, sigma_rels: Sequence[float] = (0.05, 0.10), t_images: int = 0) -> None:
        if len(sigma_rels) == 0 or len(set(sigma_rels)) != len(sigma_rels):
            raise ValueError(f"need at least one sigma_rel and no repeats, got {list(sigma_rels)}")
        if t_images < 0:
            raise ValueError(f"t_images must be >= 0, got {t_images}")
        self.network = network
        self.sigma_rels = tuple(float(s) for s in sigma_rels)
        self.gammas = tuple(sigma_rel_to_gamma(s) for s in self.sigma_rels)
        self.t_images = t_images
        named = list(network.named_parameters(remove_duplicate=False))
        self.names = [name for name, _ in named]
        self._parameters = [param for _, param in named]
        self.averages = [[p.detach().float().clone() for p in self._parameters] for _ in self.gammas]

    @torch.no_grad()
    def update(self, t_images: int) -> None:
        """Fold in the network's current weights, reached at training time t_images (> the last update's)."""
        if t_images <= self.t_images:
            raise ValueError(f"time must increase: last update at {self.t_images} images, got {t_images}")
        current = [p.detach().float() for p in self._parameters]
        for gamma, average in zip(self.gammas, self.averages):
            beta = ema_beta(t_images, t_images - self.t_images, gamma)
            torch._foreach_lerp_(average, current, 1 - beta)
        self.t_images = t_images

    def averaged_state_dict(self, index: int) -> dict[str, Tensor]:
        """The network's state dict with the parameters replaced by average `index` (float32; the tensors are the
        live averages, copy them to keep them) and copies of the buffers."""
        state = {name: tensor.detach().clone() for name, tensor in self.network.state_dict().items()}
        state.update(zip(self.names, self.averages[index]))
        return state

    def buffer_names(self) -> list[str]:
        """State-dict keys of the network that are not averaged parameters."""
        parameters = set(self.names)
        return [name for name in self.network.state_dict() if name not in parameters]

    def state_dict(self) -> dict[str, Any]:
        """sigma_rels, time of the last update and the averages by parameter name (the live tensors, not copies)."""
        return {
            "sigma_rels": list(self.sigma_rels),
            "t_images": self.t_images,
            "averages": [dict(zip(self.names, average)) for average in self.averages],
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a `state_dict()` of averages of the same sigma_rels and parameter names (any device)."""
        if tuple(state["sigma_rels"]) != self.sigma_rels:
            raise ValueError(f"saved EMAs track sigma_rels {state['sigma_rels']}, this one {list(self.sigma_rels)}")
        for saved, average in zip(state["averages"], self.averages):
            if set(saved) != set(self.names):
                missing, unexpected = set(self.names) - set(saved), set(saved) - set(self.names)
                raise ValueError(f"saved EMA parameters differ: missing {sorted(missing)}, extra {sorted(unexpected)}")
            for name, tensor in zip(self.names, average):
                tensor.copy_(saved[name])
        self.t_images = int(state["t_images"])


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
