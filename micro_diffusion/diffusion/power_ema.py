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

Plain numpy and torch: the Composer callback, the snapshot files and the command live elsewhere.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

MAX_SIGMA_REL = 1 / math.sqrt(12)  # gamma = 0: a uniform average over the whole run


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
