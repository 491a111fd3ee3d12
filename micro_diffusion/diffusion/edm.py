"""EDM formulation (Karras et al. 2022) as used by MicroDiT and EDM2: preconditioning, training noise, loss.

The denoiser is D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma)), where F is the
network. Training draws ln(sigma) ~ N(p_mean, p_std^2) per sample and minimises
lambda(sigma) |D(y + sigma n; sigma) - y|^2, with lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2 and
sd = sigma_data, which gives the network a unit-weight, unit-variance target at every noise level.
Everything here is plain PyTorch; all arithmetic that mixes noise levels runs in float32.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Network = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class EDMConfig:
    """Hyperparameters of the EDM formulation; the defaults are MicroDiT's 256-px pretraining values.

    sigma_data: standard deviation of the (scaled) training latents.
    p_mean, p_std: mean and standard deviation of ln(sigma) for the training noise.
    sigma_min, sigma_max, rho: the Karras sampling schedule.
    """

    sigma_data: float = 0.9
    p_mean: float = -0.6
    p_std: float = 1.2
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not math.isfinite(value):
                raise ValueError(f"EDMConfig.{name} must be finite, got {value}")
        for name in ("sigma_data", "p_std", "sigma_min", "rho"):
            if getattr(self, name) <= 0:
                raise ValueError(f"EDMConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.sigma_max <= self.sigma_min:
            raise ValueError(f"EDMConfig.sigma_max ({self.sigma_max}) must exceed sigma_min ({self.sigma_min})")


class Preconditioning(NamedTuple):
    """EDM preconditioning coefficients; each has the shape of the sigma they were computed from."""

    c_skip: Tensor
    c_out: Tensor
    c_in: Tensor
    c_noise: Tensor


def noise_conditioning(sigma: Tensor) -> Tensor:
    """The network's noise input c_noise = ln(sigma) / 4, same shape as sigma."""
    return sigma.log() / 4


def precondition(sigma: Tensor, sigma_data: float) -> Preconditioning:
    """EDM coefficients for noise levels sigma (any shape, > 0); the result follows sigma's shape and dtype.

    With sd = sigma_data: c_skip = sd^2 / (sigma^2 + sd^2), c_out = sigma sd / sqrt(sigma^2 + sd^2),
    c_in = 1 / sqrt(sigma^2 + sd^2), c_noise = ln(sigma) / 4.
    """
    total_variance = sigma.square() + sigma_data**2
    c_in = total_variance.rsqrt()
    return Preconditioning(
        c_skip=sigma_data**2 / total_variance,
        c_out=sigma * sigma_data * c_in,
        c_in=c_in,
        c_noise=noise_conditioning(sigma),
    )


def loss_weight(sigma: Tensor, sigma_data: float) -> Tensor:
    """EDM loss weight lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2 = 1 / c_out^2, same shape as sigma."""
    return (sigma.square() + sigma_data**2) / (sigma * sigma_data).square()


def sample_training_sigmas(
    batch_size: int,
    p_mean: float,
    p_std: float,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Log-normal training noise levels: ln(sigma) ~ N(p_mean, p_std^2). Returns (batch_size,) float32."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if p_std <= 0:
        raise ValueError(f"p_std must be > 0, got {p_std}")
    log_sigma = torch.randn(batch_size, device=device, dtype=torch.float32, generator=generator) * p_std + p_mean
    return log_sigma.exp()


def _per_sample(values: Tensor, ndim: int) -> Tensor:
    """Reshape (B,) to (B, 1, ..., 1) with `ndim` dimensions so it broadcasts over a (B, ...) tensor."""
    return values.reshape(-1, *([1] * (ndim - 1)))


def _check_per_sample(values: Tensor, batch_size: int, name: str) -> None:
    """Require a per-sample tensor of shape (batch_size,)."""
    if values.shape != (batch_size,):
        raise ValueError(f"{name} must have shape ({batch_size},), got {tuple(values.shape)}")


def edm_denoise(network: Network, x_noisy: Tensor, sigma: Tensor, sigma_data: float) -> Tensor:
    """Preconditioned denoiser D(x; sigma) = c_skip x + c_out F(c_in x, c_noise).

    network: F(x_in (B, C, H, W) in x_noisy's dtype, c_noise (B,) float32) -> (B, C, H, W); it closes over
        its own conditioning (captions, labels, mask ratio).
    x_noisy: (B, C, H, W) noisy latents; sigma: (B,) noise levels.
    Returns the denoised estimate (B, C, H, W) in float32 (the skip combination is done in float32).
    """
    _check_per_sample(sigma, x_noisy.shape[0], "sigma")
    coefficients = precondition(sigma.float(), sigma_data)
    x32 = x_noisy.float()
    c_skip = _per_sample(coefficients.c_skip, x32.ndim)
    c_out = _per_sample(coefficients.c_out, x32.ndim)
    c_in = _per_sample(coefficients.c_in, x32.ndim)
    network_output = network((c_in * x32).to(x_noisy.dtype), coefficients.c_noise)
    if network_output.shape != x_noisy.shape:
        raise ValueError(f"network output shape {tuple(network_output.shape)} != input shape {tuple(x_noisy.shape)}")
    return c_skip * x32 + c_out * network_output.float()


def _masked_patch_mean(error: Tensor, token_mask: Tensor, patch_size: int) -> Tensor:
    """Per-sample mean of a per-element error over the kept patches.

    error: (B, C, H, W); token_mask: (B, T) with 1 = dropped, T = (H / p)(W / p) patches in row-major order.
    Returns (B,): channel mean, average-pooled to one value per patch, averaged over kept patches.
    A sample with every patch dropped has no loss and yields NaN.
    """
    batch, _, height, width = error.shape
    if height % patch_size or width % patch_size:
        raise ValueError(f"latent size {height}x{width} is not divisible by patch_size {patch_size}")
    num_tokens = (height // patch_size) * (width // patch_size)
    if token_mask.shape != (batch, num_tokens):
        raise ValueError(f"token_mask must have shape ({batch}, {num_tokens}), got {tuple(token_mask.shape)}")
    per_patch = F.avg_pool2d(error.mean(dim=1, keepdim=True), patch_size).flatten(1)
    keep = 1.0 - token_mask.float()
    return (per_patch * keep).sum(dim=1) / keep.sum(dim=1)


def edm_loss(
    denoised: Tensor,
    clean: Tensor,
    sigma: Tensor,
    sigma_data: float,
    token_mask: Tensor | None = None,
    patch_size: int = 2,
    log_var: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """EDM-weighted denoising loss, in float32.

    denoised, clean: (B, C, H, W); sigma: (B,).
    token_mask: optional (B, T) with 1 = dropped token (MicroDiT patch masking); the loss is then averaged
        over the kept patches only, so dropped positions never contribute. All zeros gives the plain loss.
    log_var: optional (B,) learned log-variance u(sigma) (EDM2); the per-sample loss becomes
        error / exp(u) + u. (EDM2 sums over elements, so its u term is C*H*W times larger; the minimiser is
        the same.)
    Returns (loss: scalar batch mean, per_sample: (B,)).
    """
    if denoised.shape != clean.shape or denoised.ndim != 4:
        raise ValueError(
            f"denoised and clean must be equal (B, C, H, W), got {tuple(denoised.shape)} {tuple(clean.shape)}"
        )
    _check_per_sample(sigma, clean.shape[0], "sigma")
    weight = _per_sample(loss_weight(sigma.float(), sigma_data), clean.ndim)
    error = weight * (denoised.float() - clean.float()).square()
    if token_mask is None:
        per_sample = error.mean(dim=(1, 2, 3))
    else:
        per_sample = _masked_patch_mean(error, token_mask, patch_size)
    if log_var is not None:
        _check_per_sample(log_var, clean.shape[0], "log_var")
        log_var = log_var.float()
        per_sample = per_sample * torch.exp(-log_var) + log_var
    return per_sample.mean(), per_sample


class LearnedLossWeighting(nn.Module):
    """EDM2's learned uncertainty u(sigma): the log-variance of the weighted loss at noise level sigma.

    Fourier features sqrt(2) cos(2 pi (f c_noise + phi)) of c_noise = ln(sigma) / 4, with fixed random
    frequencies f ~ N(0, 1) and phases phi ~ U(0, 1) (persistent buffers, so checkpoints keep them), then a
    zero-initialised nn.Linear to one value, so u = 0 (plain EDM weighting) at the start of training.
    """

    def __init__(self, num_features: int = 128) -> None:
        super().__init__()
        if num_features < 1:
            raise ValueError(f"num_features must be >= 1, got {num_features}")
        self.register_buffer("frequencies", 2 * math.pi * torch.randn(num_features))
        self.register_buffer("phases", 2 * math.pi * torch.rand(num_features))
        self.linear = nn.Linear(num_features, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, sigma: Tensor) -> Tensor:
        """sigma: (B,) noise levels -> u(sigma): (B,) float32 log-variances."""
        c_noise = noise_conditioning(sigma.float())
        angles = torch.outer(c_noise, self.frequencies.float()) + self.phases.float()
        features = math.sqrt(2) * torch.cos(angles)
        return self.linear(features.to(self.linear.weight.dtype)).squeeze(1).float()
