"""EDM preconditioning, training noise, (masked) loss and learned loss weighting."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import Tensor

from micro_diffusion.diffusion.edm import (
    EDMConfig,
    LearnedLossWeighting,
    edm_denoise,
    edm_loss,
    precondition,
    sample_training_sigmas,
)

SIGMA_DATA = EDMConfig().sigma_data
SIGMA_GRID = torch.logspace(-3, 2.5, 40, dtype=torch.float64)


def _pixel_keep_mask(token_mask: Tensor, height: int, width: int, patch_size: int) -> Tensor:
    """(B, T) token mask with 1 = dropped -> (B, 1, H, W) boolean of kept pixels (row-major patch grid)."""
    grid = token_mask.view(-1, 1, height // patch_size, width // patch_size)
    pixels = grid.repeat_interleave(patch_size, dim=2).repeat_interleave(patch_size, dim=3)
    return pixels == 0


def _random_token_mask(batch: int, num_tokens: int, num_dropped: int, generator: torch.Generator) -> Tensor:
    """(B, T) float mask with exactly num_dropped ones per row, at random positions."""
    order = torch.rand(batch, num_tokens, generator=generator).argsort(dim=1)
    return (order < num_dropped).float()


@pytest.mark.parametrize(
    "field, value",
    [
        ("sigma_data", 0.0),
        ("p_std", -1.0),
        ("sigma_min", 0.0),
        ("sigma_max", 0.001),
        ("rho", 0.0),
        ("p_mean", math.nan),
        ("sigma_max", math.inf),
    ],
)
def test_edm_config_rejects_invalid_values(field, value):
    with pytest.raises(ValueError, match=field):
        EDMConfig(**{field: value})


def test_edm_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        EDMConfig().sigma_data = 0.5


def test_preconditioning_identities():
    c = precondition(SIGMA_GRID, SIGMA_DATA)
    total = SIGMA_GRID.square() + SIGMA_DATA**2
    ones = torch.ones_like(SIGMA_GRID)
    torch.testing.assert_close(c.c_in.square() * total, ones)  # unit-variance network input
    torch.testing.assert_close(c.c_skip + c.c_out.square() / SIGMA_DATA**2, ones)
    torch.testing.assert_close(c.c_out.square(), c.c_skip * SIGMA_GRID.square())
    # Variance of the effective target F* = (y - c_skip (y + sigma n)) / c_out for Var(y) = sd^2, Var(n) = 1.
    target_variance = (1 - c.c_skip).square() * SIGMA_DATA**2 + c.c_skip.square() * SIGMA_GRID.square()
    torch.testing.assert_close(target_variance / c.c_out.square(), ones)
    torch.testing.assert_close(c.c_noise, SIGMA_GRID.log() / 4)


def test_preconditioning_follows_sigma_shape_and_dtype():
    sigma = torch.rand(3, 1, 2, dtype=torch.float32) + 0.1
    for coefficient in precondition(sigma, SIGMA_DATA):
        assert coefficient.shape == sigma.shape and coefficient.dtype == torch.float32


@pytest.mark.parametrize("sigma", [0.01, 0.9, 40.0])
def test_network_input_and_effective_target_have_unit_variance(sigma):
    generator = torch.Generator().manual_seed(0)
    clean = SIGMA_DATA * torch.randn(200_000, generator=generator, dtype=torch.float64)
    noisy = clean + sigma * torch.randn(200_000, generator=generator, dtype=torch.float64)
    c = precondition(torch.tensor(sigma, dtype=torch.float64), SIGMA_DATA)
    target = (clean - c.c_skip * noisy) / c.c_out
    assert (c.c_in * noisy).var().item() == pytest.approx(1.0, abs=0.02)
    assert target.var().item() == pytest.approx(1.0, abs=0.02)


def test_ideal_network_output_gives_the_clean_sample():
    generator = torch.Generator().manual_seed(1)
    clean = torch.randn(4, 3, 8, 8, generator=generator)
    sigma = torch.tensor([0.01, 0.5, 3.0, 60.0])
    noisy = clean + sigma.view(-1, 1, 1, 1) * torch.randn(4, 3, 8, 8, generator=generator)
    seen = {}

    def ideal_network(x_in: Tensor, c_noise: Tensor) -> Tensor:
        seen.update(x_in=x_in, c_noise=c_noise)
        c = precondition(sigma.view(-1, 1, 1, 1), SIGMA_DATA)
        return (clean - c.c_skip * noisy) / c.c_out

    denoised = edm_denoise(ideal_network, noisy, sigma, SIGMA_DATA)
    torch.testing.assert_close(denoised, clean, atol=1e-4, rtol=1e-4)
    expected_input = noisy / (sigma.square() + SIGMA_DATA**2).sqrt().view(-1, 1, 1, 1)
    torch.testing.assert_close(seen["x_in"], expected_input)
    torch.testing.assert_close(seen["c_noise"], sigma.log() / 4)


def test_denoiser_tends_to_identity_as_sigma_vanishes():
    noisy = torch.randn(2, 4, 6, 6)
    network = lambda x_in, c_noise: torch.ones_like(x_in) * 10.0
    for sigma, tolerance in [(1e-2, 0.2), (1e-4, 2e-3), (1e-6, 2e-5)]:
        denoised = edm_denoise(network, noisy, torch.full((2,), sigma), SIGMA_DATA)
        assert (denoised - noisy).abs().max().item() < tolerance


def test_denoise_combines_a_bf16_network_in_float32():
    noisy = torch.randn(2, 4, 4, 4, dtype=torch.bfloat16)
    dtypes = []

    def network(x_in: Tensor, c_noise: Tensor) -> Tensor:
        dtypes.append((x_in.dtype, c_noise.dtype))
        return x_in

    denoised = edm_denoise(network, noisy, torch.tensor([0.5, 2.0]), SIGMA_DATA)
    assert denoised.dtype == torch.float32
    assert dtypes == [(torch.bfloat16, torch.float32)]


def test_denoise_rejects_bad_shapes():
    noisy = torch.randn(2, 4, 4, 4)
    with pytest.raises(ValueError, match="sigma"):
        edm_denoise(lambda x, c: x, noisy, torch.ones(3), SIGMA_DATA)
    with pytest.raises(ValueError, match="network output"):
        edm_denoise(lambda x, c: x[:, :2], noisy, torch.ones(2), SIGMA_DATA)


def test_training_sigmas_are_log_normal():
    generator = torch.Generator().manual_seed(0)
    sigma = sample_training_sigmas(200_000, p_mean=-0.6, p_std=1.2, generator=generator)
    assert sigma.shape == (200_000,) and sigma.dtype == torch.float32 and (sigma > 0).all()
    assert sigma.log().mean().item() == pytest.approx(-0.6, abs=0.01)
    assert sigma.log().std().item() == pytest.approx(1.2, abs=0.01)
    with pytest.raises(ValueError):
        sample_training_sigmas(4, 0.0, 0.0)


def test_training_sigmas_follow_the_generator():
    def draw(seed: int) -> Tensor:
        return sample_training_sigmas(5, -0.6, 1.2, generator=torch.Generator().manual_seed(seed))

    torch.testing.assert_close(draw(3), draw(3))
    assert not torch.equal(draw(3), draw(4))


def test_loss_weighting_balances_noise_levels():
    """An error of c_out(sigma) times unit noise has weighted loss 1 at every noise level."""
    generator = torch.Generator().manual_seed(0)
    sigma = torch.logspace(-2, 1.7, 6)
    clean = torch.randn(6, 4, 32, 32, generator=generator)
    c_out = precondition(sigma, SIGMA_DATA).c_out.view(-1, 1, 1, 1)
    denoised = clean + c_out * torch.randn(6, 4, 32, 32, generator=generator)
    loss, per_sample = edm_loss(denoised, clean, sigma, SIGMA_DATA)
    torch.testing.assert_close(per_sample, torch.ones(6), atol=0.05, rtol=0)
    assert loss.item() == pytest.approx(per_sample.mean().item())


@pytest.fixture
def loss_inputs():
    generator = torch.Generator().manual_seed(2)
    clean = torch.randn(3, 4, 8, 12, generator=generator)
    denoised = clean + torch.randn(3, 4, 8, 12, generator=generator)
    sigma = torch.tensor([0.1, 1.0, 10.0])
    mask = _random_token_mask(3, (8 // 2) * (12 // 2), num_dropped=18, generator=generator)
    return denoised, clean, sigma, mask


def test_masked_loss_without_dropped_tokens_equals_plain_loss(loss_inputs):
    denoised, clean, sigma, mask = loss_inputs
    plain = edm_loss(denoised, clean, sigma, SIGMA_DATA)
    unmasked = edm_loss(denoised, clean, sigma, SIGMA_DATA, token_mask=torch.zeros_like(mask), patch_size=2)
    torch.testing.assert_close(unmasked, plain)


def test_masked_loss_is_the_mean_over_kept_pixels(loss_inputs):
    denoised, clean, sigma, mask = loss_inputs
    _, per_sample = edm_loss(denoised, clean, sigma, SIGMA_DATA, token_mask=mask, patch_size=2)
    keep = _pixel_keep_mask(mask, 8, 12, 2).expand_as(clean)
    weight = (sigma.square() + SIGMA_DATA**2) / (sigma * SIGMA_DATA).square()
    for index in range(3):
        error = (denoised[index] - clean[index]).square()[keep[index]].mean()
        assert per_sample[index].item() == pytest.approx((weight[index] * error).item(), rel=1e-5)


def test_dropped_positions_never_contribute(loss_inputs):
    denoised, clean, sigma, mask = loss_inputs
    loss, _ = edm_loss(denoised, clean, sigma, SIGMA_DATA, token_mask=mask)
    keep = _pixel_keep_mask(mask, 8, 12, 2).expand_as(clean)
    in_dropped = torch.where(keep, denoised, torch.full_like(denoised, 1e3))
    in_kept = torch.where(keep, denoised + 1.0, denoised)
    torch.testing.assert_close(edm_loss(in_dropped, clean, sigma, SIGMA_DATA, token_mask=mask)[0], loss)
    assert edm_loss(in_kept, clean, sigma, SIGMA_DATA, token_mask=mask)[0] > loss


def test_loss_is_float32_for_bf16_inputs(loss_inputs):
    denoised, clean, sigma, mask = loss_inputs
    loss, per_sample = edm_loss(denoised.bfloat16(), clean.bfloat16(), sigma, SIGMA_DATA, token_mask=mask)
    assert loss.dtype == per_sample.dtype == torch.float32


def test_loss_rejects_bad_shapes(loss_inputs):
    denoised, clean, sigma, mask = loss_inputs
    with pytest.raises(ValueError, match="token_mask"):
        edm_loss(denoised, clean, sigma, SIGMA_DATA, token_mask=mask[:, :-1])
    with pytest.raises(ValueError, match="divisible"):
        edm_loss(denoised, clean, sigma, SIGMA_DATA, token_mask=mask, patch_size=5)
    with pytest.raises(ValueError, match="sigma"):
        edm_loss(denoised, clean, sigma[:2], SIGMA_DATA)
    with pytest.raises(ValueError, match="denoised"):
        edm_loss(denoised[:, :2], clean, sigma, SIGMA_DATA)
    with pytest.raises(ValueError, match="log_var"):
        edm_loss(denoised, clean, sigma, SIGMA_DATA, log_var=torch.zeros(3, 1))


def test_learned_log_variance_is_minimised_at_the_log_error(loss_inputs):
    denoised, clean, sigma, _ = loss_inputs
    _, plain = edm_loss(denoised, clean, sigma, SIGMA_DATA)
    _, at_zero = edm_loss(denoised, clean, sigma, SIGMA_DATA, log_var=torch.zeros(3))
    torch.testing.assert_close(at_zero, plain)
    log_var = plain.log().requires_grad_()
    loss, per_sample = edm_loss(denoised, clean, sigma, SIGMA_DATA, log_var=log_var)
    torch.testing.assert_close(per_sample, 1 + plain.log())
    loss.backward()
    torch.testing.assert_close(log_var.grad, torch.zeros(3), atol=1e-6, rtol=0)


def test_learned_weighting_starts_at_zero_and_keeps_its_features():
    weighting = LearnedLossWeighting(num_features=16)
    log_var = weighting(torch.logspace(-2, 2, 7))
    assert log_var.shape == (7,) and log_var.dtype == torch.float32
    assert (log_var == 0).all()
    assert {name for name, _ in weighting.named_parameters()} == {"linear.weight", "linear.bias"}
    assert {"frequencies", "phases"} <= set(weighting.state_dict())
    with pytest.raises(ValueError):
        LearnedLossWeighting(num_features=0)


def test_learned_weighting_fits_the_log_loss_profile():
    """Fitted through edm_loss to a weighted error e(sigma), the head converges to u(sigma) = ln e(sigma)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        weighting = LearnedLossWeighting()
    error_profile = lambda sigma: 0.5 + 0.4 * torch.tanh(sigma.log())
    sigma = sample_training_sigmas(512, p_mean=-0.6, p_std=1.2, generator=torch.Generator().manual_seed(0))
    # A constant error of c_out sqrt(e) per element has an EDM-weighted squared error of exactly e(sigma).
    error = precondition(sigma, SIGMA_DATA).c_out * error_profile(sigma).sqrt()
    denoised = error.view(-1, 1, 1, 1).expand(-1, 1, 2, 2)
    optimizer = torch.optim.LBFGS(weighting.parameters(), max_iter=30, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss, _ = edm_loss(denoised, torch.zeros_like(denoised), sigma, SIGMA_DATA, log_var=weighting(sigma))
        loss.backward()
        return loss

    optimizer.step(closure)
    probe = torch.exp(torch.linspace(-2.5, 1.5, 9))
    with torch.no_grad():
        torch.testing.assert_close(weighting(probe), error_profile(probe).log(), atol=0.03, rtol=0)
