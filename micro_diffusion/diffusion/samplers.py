"""Samplers for EDM denoisers: Karras schedule, Euler and EDM-Heun ODE solvers, classifier-free guidance.

Everything is a pure function of a denoiser, `denoiser(x (B, ...) float32, sigma (B,) float32) -> (B, ...)`,
the posterior-mean estimate D(x; sigma). Sampler state is kept in float64. Per-sample noise comes from
per-sample generators so that an image depends only on its own seed, never on the batch it is drawn in.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from micro_diffusion.diffusion.edm import EDMConfig

Denoiser = Callable[[Tensor, Tensor], Tensor]
Condition = Tensor | Mapping[str, Tensor]
ConditionalDenoiser = Callable[[Tensor, Tensor, Condition], Tensor]

_EDM_DEFAULTS = EDMConfig()


def karras_sigmas(
    num_steps: int,
    sigma_min: float = _EDM_DEFAULTS.sigma_min,
    sigma_max: float = _EDM_DEFAULTS.sigma_max,
    rho: float = _EDM_DEFAULTS.rho,
    device: torch.device | str | None = None,
) -> Tensor:
    """Karras et al. noise levels sigma_0 = sigma_max > ... > sigma_{N-1} = sigma_min, then sigma_N = 0.

    sigma_i = (sigma_max^(1/rho) + i / (N - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho.
    With num_steps = 1 the schedule is [sigma_max, 0]. Returns (num_steps + 1,) float64.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if not 0 < sigma_min <= sigma_max:
        raise ValueError(f"need 0 < sigma_min <= sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    if rho <= 0:
        raise ValueError(f"rho must be > 0, got {rho}")
    ramp = torch.linspace(0, 1, num_steps, dtype=torch.float64, device=device)
    max_root, min_root = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    sigmas = (max_root + ramp * (min_root - max_root)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)])


SEED_LIMIT = 2**64  # torch.Generator.manual_seed takes a uint64 (a negative seed would alias seed + 2**64)


def check_seeds(seeds: Iterable[int]) -> None:
    """Raise naming the first seed that is not an integer in [0, SEED_LIMIT)."""
    for seed in seeds:
        try:
            value = operator.index(seed)
        except TypeError:
            raise TypeError(f"seed {seed!r} is not an integer") from None
        if not 0 <= value < SEED_LIMIT:
            raise ValueError(f"seed {value} is out of range: seeds are integers in [0, 2**64)")


def generators_from_seeds(seeds: Sequence[int], device: torch.device | str | None = None) -> list[torch.Generator]:
    """One torch.Generator per seed, on `device` (CPU when None); the seeds are checked (`check_seeds`)."""
    if len(seeds) == 0:
        raise ValueError("need at least one seed")
    check_seeds(seeds)
    device = torch.device("cpu" if device is None else device)
    return [torch.Generator(device=device).manual_seed(int(seed)) for seed in seeds]


def _normal_from_generators(
    generators: Sequence[torch.Generator],
    shape_per_sample: Sequence[int],
    device: torch.device,
    dtype: torch.dtype,
) -> Tensor:
    """Standard normal (len(generators), *shape_per_sample); row b is drawn from generators[b] only."""
    return torch.stack(
        [torch.randn(tuple(shape_per_sample), generator=g, device=device, dtype=dtype) for g in generators]
    )


def noise_from_seeds(
    seeds: Sequence[int],
    shape_per_sample: Sequence[int],
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Standard normal noise (len(seeds), *shape_per_sample); sample b depends only on seeds[b]."""
    device = torch.device("cpu" if device is None else device)
    return _normal_from_generators(generators_from_seeds(seeds, device), shape_per_sample, device, dtype)


def _schedule(num_steps: int, sigma_min: float, sigma_max: float, rho: float) -> list[float]:
    """The Karras schedule as Python floats, so the sampler loop needs no device synchronisation."""
    return karras_sigmas(num_steps, sigma_min, sigma_max, rho).tolist()


def _steps(sigmas: list[float], progress: bool, description: str) -> Iterable[tuple[float, float]]:
    """(sigma_current, sigma_next) pairs, wrapped in a tqdm bar when progress is set."""
    return tqdm(list(zip(sigmas[:-1], sigmas[1:])), desc=description, disable=not progress)


def _ode_slope(denoiser: Denoiser, x: Tensor, sigma: float) -> Tensor:
    """dx/dsigma = (x - D(x; sigma)) / sigma of the probability-flow ODE; x and the result are float64."""
    sigma_batch = torch.full((x.shape[0],), sigma, dtype=torch.float32, device=x.device)
    denoised = denoiser(x.float(), sigma_batch)
    return (x - denoised.double()) / sigma


def _churn_noise(x: Tensor, generators: Sequence[torch.Generator] | None) -> Tensor:
    """Standard normal like x, from the per-sample generators when given, else from the global RNG."""
    if generators is None:
        return torch.randn_like(x)
    return _normal_from_generators(generators, x.shape[1:], x.device, x.dtype)


def edm_heun_sampler(
    denoiser: Denoiser,
    noise: Tensor,
    num_steps: int = 30,
    sigma_min: float = _EDM_DEFAULTS.sigma_min,
    sigma_max: float = _EDM_DEFAULTS.sigma_max,
    rho: float = _EDM_DEFAULTS.rho,
    churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = math.inf,
    s_noise: float = 1.0,
    generators: Sequence[torch.Generator] | None = None,
    progress: bool = False,
) -> Tensor:
    """EDM Algorithm 2: Heun's method on the probability-flow ODE, optionally with churn (stochastic).

    noise: (B, ...) standard normal; the start is noise * sigma_max.
    Every step but the last (which goes to sigma = 0) adds a Heun correction: 2 N - 1 denoiser calls.
    churn > 0 raises sigma by a factor 1 + min(churn / N, sqrt(2) - 1) at the steps where
    s_tmin <= sigma <= s_tmax and adds the matching fresh noise (scaled by s_noise), drawn from `generators`
    (one per sample, e.g. generators_from_seeds) or from the global RNG when None.
    Returns the sample x_0 (B, ...) in noise's dtype.
    """
    if churn < 0:
        raise ValueError(f"churn must be >= 0, got {churn}")
    if generators is not None and len(generators) != noise.shape[0]:
        raise ValueError(f"got {len(generators)} generators for a batch of {noise.shape[0]}")
    sigmas = _schedule(num_steps, sigma_min, sigma_max, rho)
    gamma = min(churn / num_steps, math.sqrt(2) - 1)
    x = noise.double() * sigmas[0]
    for sigma_cur, sigma_next in _steps(sigmas, progress, "EDM Heun"):
        sigma_hat = sigma_cur * (1 + gamma) if s_tmin <= sigma_cur <= s_tmax else sigma_cur
        if sigma_hat > sigma_cur:
            x = x + math.sqrt(sigma_hat**2 - sigma_cur**2) * s_noise * _churn_noise(x, generators)
        slope = _ode_slope(denoiser, x, sigma_hat)
        x_next = x + (sigma_next - sigma_hat) * slope
        if sigma_next > 0:
            slope_next = _ode_slope(denoiser, x_next, sigma_next)
            x_next = x + (sigma_next - sigma_hat) * 0.5 * (slope + slope_next)
        x = x_next
    return x.to(noise.dtype)


def euler_sampler(
    denoiser: Denoiser,
    noise: Tensor,
    num_steps: int = 30,
    sigma_min: float = _EDM_DEFAULTS.sigma_min,
    sigma_max: float = _EDM_DEFAULTS.sigma_max,
    rho: float = _EDM_DEFAULTS.rho,
    progress: bool = False,
) -> Tensor:
    """Euler's method on the probability-flow ODE over the Karras schedule: N denoiser calls.

    noise: (B, ...) standard normal; the start is noise * sigma_max. Returns x_0 (B, ...) in noise's dtype.
    """
    sigmas = _schedule(num_steps, sigma_min, sigma_max, rho)
    x = noise.double() * sigmas[0]
    for sigma_cur, sigma_next in _steps(sigmas, progress, "Euler"):
        x = x + (sigma_next - sigma_cur) * _ode_slope(denoiser, x, sigma_cur)
    return x.to(noise.dtype)


def _condition_batch_size(condition: Condition) -> int:
    """Batch size (dim 0) of a condition tensor or of every tensor in a condition dict."""
    tensors = list(condition.values()) if isinstance(condition, Mapping) else [condition]
    sizes = {tensor.shape[0] for tensor in tensors}
    if len(sizes) != 1:
        raise ValueError(f"condition tensors disagree on the batch size: {sorted(sizes)}")
    return sizes.pop()


def _check_matching_conditions(cond: Condition, uncond: Condition) -> None:
    """cond and uncond must be both tensors or both dicts with the same keys, with equal shapes."""
    if isinstance(cond, Mapping) != isinstance(uncond, Mapping):
        raise TypeError("cond and uncond must both be tensors or both be dicts of tensors")
    if isinstance(cond, Mapping):
        if set(cond) != set(uncond):
            raise ValueError(f"cond keys {sorted(cond)} != uncond keys {sorted(uncond)}")
        pairs = [(key, cond[key], uncond[key]) for key in cond]
    else:
        pairs = [("condition", cond, uncond)]
    for name, conditional, unconditional in pairs:
        if conditional.shape != unconditional.shape:
            raise ValueError(
                f"{name}: cond shape {tuple(conditional.shape)} != uncond shape {tuple(unconditional.shape)}"
            )


def _concat_rows(cond: Condition, uncond: Condition, rows: Tensor) -> Condition:
    """cond followed by uncond[rows] along dim 0, key by key for dicts."""
    if isinstance(cond, Mapping):
        return {key: torch.cat([cond[key], uncond[key].index_select(0, rows)]) for key in cond}
    return torch.cat([cond, uncond.index_select(0, rows)])


def _check_batch(x: Tensor, batch_size: int) -> None:
    """The samples must match the batch size of the guidance conditions."""
    if x.shape[0] != batch_size:
        raise ValueError(f"denoiser got a batch of {x.shape[0]} but the condition has {batch_size}")


def _rows_to_guide(sigma: Tensor, guidance_interval: tuple[float, float] | None) -> Tensor:
    """Indices of the samples whose sigma lies in the interval (sigma_lo, sigma_hi]; all when None."""
    if guidance_interval is None:
        return torch.arange(sigma.shape[0], device=sigma.device)
    sigma_lo, sigma_hi = guidance_interval
    # nonzero() waits for the device once per call, which is negligible next to a network forward.
    return ((sigma > sigma_lo) & (sigma <= sigma_hi)).nonzero().flatten()


def guided_denoiser(
    denoise_fn: ConditionalDenoiser,
    cond: Condition,
    uncond: Condition,
    guidance_scale: float,
    guidance_interval: tuple[float, float] | None = None,
) -> Denoiser:
    """Classifier-free guidance: D = D_uncond + scale (D_cond - D_uncond), as a plain denoiser(x, sigma).

    denoise_fn(x (B', ...), sigma (B',), condition) -> (B', ...); cond and uncond are tensors or dicts of
    tensors batched along dim 0 with the batch size B of the samples. Conditional and unconditional halves
    run in one batched forward of size up to 2 B. guidance_interval = (sigma_lo, sigma_hi) guides only the
    samples with sigma_lo < sigma <= sigma_hi; the others get the conditional prediction and no unconditional
    forward.
    A scale of 1.0 returns the conditional denoiser itself (one forward of size B per call).
    """
    _check_matching_conditions(cond, uncond)
    batch_size = _condition_batch_size(cond)
    if not math.isfinite(guidance_scale):
        raise ValueError(f"guidance_scale must be finite, got {guidance_scale}")
    if guidance_interval is not None and not 0 <= guidance_interval[0] < guidance_interval[1]:
        raise ValueError(f"guidance_interval must be (lo, hi) with 0 <= lo < hi, got {guidance_interval}")

    def conditional(x: Tensor, sigma: Tensor) -> Tensor:
        _check_batch(x, batch_size)
        return denoise_fn(x, sigma, cond)

    if guidance_scale == 1.0:
        return conditional

    def guided(x: Tensor, sigma: Tensor) -> Tensor:
        rows = _rows_to_guide(sigma, guidance_interval)
        if rows.numel() == 0:
            return conditional(x, sigma)
        _check_batch(x, batch_size)
        both = denoise_fn(
            torch.cat([x, x.index_select(0, rows)]),
            torch.cat([sigma, sigma.index_select(0, rows)]),
            _concat_rows(cond, uncond, rows),
        )
        predicted_cond, predicted_uncond = both[:batch_size], both[batch_size:]
        mixed = torch.lerp(predicted_uncond, predicted_cond.index_select(0, rows), guidance_scale)
        return predicted_cond.index_copy(0, rows, mixed)

    return guided
