"""Samplers against a 2-D Gaussian mixture whose ideal denoiser is known in closed form, plus guidance."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from micro_diffusion.diffusion.samplers import (
    edm_heun_sampler,
    euler_sampler,
    generators_from_seeds,
    guided_denoiser,
    karras_sigmas,
    noise_from_seeds,
)

NUM_SAMPLES = 4000


class GaussianMixture2D:
    """A 3-component 2-D Gaussian mixture; `denoise` is its exact posterior mean E[x0 | x0 + sigma n = x]."""

    weights = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    means = torch.tensor([[-2.0, 0.0], [1.5, 1.5], [1.0, -2.0]], dtype=torch.float64)
    covariances = torch.tensor(
        [[[0.3, 0.1], [0.1, 0.2]], [[0.1, 0.0], [0.0, 0.4]], [[0.2, -0.05], [-0.05, 0.1]]],
        dtype=torch.float64,
    )

    def denoise(self, x: Tensor, sigma: Tensor) -> Tensor:
        """x: (B, 2), sigma: (B,) -> posterior mean (B, 2), computed in float64, returned in x's dtype.

        Under noise sigma, component k of the noisy data is N(mu_k, Sigma_k + sigma^2 I); its posterior mean is
        mu_k + Sigma_k (Sigma_k + sigma^2 I)^-1 (x - mu_k), weighted by the component's posterior probability.
        """
        noise_variance = sigma.double().square()[:, None]  # (B, 1)
        variance_x = self.covariances[:, 0, 0] + noise_variance  # (B, K)
        variance_y = self.covariances[:, 1, 1] + noise_variance
        covariance_xy = self.covariances[:, 0, 1]  # (K,)
        determinant = variance_x * variance_y - covariance_xy.square()  # (B, K)
        offset_x, offset_y = (x.double()[:, None, :] - self.means).unbind(-1)  # (B, K) each
        whitened_x = (variance_y * offset_x - covariance_xy * offset_y) / determinant
        whitened_y = (variance_x * offset_y - covariance_xy * offset_x) / determinant
        log_posterior = (
            self.weights.log() - 0.5 * (offset_x * whitened_x + offset_y * whitened_y) - 0.5 * determinant.log()
        )
        responsibilities = (log_posterior - log_posterior.logsumexp(dim=1, keepdim=True)).exp()  # (B, K)
        whitened = torch.stack([whitened_x, whitened_y], dim=-1)  # (B, K, 2)
        component_means = self.means + torch.einsum("kij,bkj->bki", self.covariances, whitened)
        return (responsibilities.unsqueeze(-1) * component_means).sum(1).to(x.dtype)

    def mean(self) -> Tensor:
        return self.weights @ self.means

    def covariance(self) -> Tensor:
        second_moment = self.covariances + self.means[:, :, None] * self.means[:, None, :]
        mean = self.mean()
        return torch.einsum("k,kij->ij", self.weights, second_moment) - torch.outer(mean, mean)

    def mode_weights(self, samples: Tensor) -> Tensor:
        """Fraction of samples nearest to each component mean, (K,)."""
        nearest = torch.cdist(samples, self.means).argmin(dim=1)
        return torch.bincount(nearest, minlength=len(self.weights)).double() / len(samples)


@pytest.fixture(scope="module")
def mixture() -> GaussianMixture2D:
    return GaussianMixture2D()


@pytest.fixture(scope="module", autouse=True)
def single_intra_op_thread():
    """The tensors here are tiny, so intra-op threads only add synchronisation (which stalls on a busy CPU)."""
    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(num_threads)


class CallRecorder:
    """Wraps a denoiser and records the batch size and dtypes of every call."""

    def __init__(self, denoiser):
        self.denoiser = denoiser
        self.calls: list[tuple[int, torch.dtype, torch.dtype]] = []

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        self.calls.append((x.shape[0], x.dtype, sigma.dtype))
        return self.denoiser(x, sigma)


def test_karras_sigmas_endpoints_and_order():
    sigmas = karras_sigmas(18, sigma_min=0.002, sigma_max=80.0, rho=7.0)
    assert sigmas.shape == (19,) and sigmas.dtype == torch.float64
    assert sigmas[0].item() == pytest.approx(80.0) and sigmas[-2].item() == pytest.approx(0.002)
    assert sigmas[-1].item() == 0.0
    assert (sigmas[1:] < sigmas[:-1]).all()


def test_karras_sigmas_rho_one_is_linear_and_single_step_goes_to_zero():
    linear = karras_sigmas(5, sigma_min=1.0, sigma_max=5.0, rho=1.0)[:-1]
    torch.testing.assert_close(linear, torch.linspace(5.0, 1.0, 5, dtype=torch.float64))
    assert karras_sigmas(1, sigma_max=80.0).tolist() == [80.0, 0.0]


@pytest.mark.parametrize(
    "bad", [dict(num_steps=0), dict(sigma_min=0.0), dict(sigma_min=10.0, sigma_max=1.0), dict(rho=0.0)]
)
def test_karras_sigmas_rejects_bad_arguments(bad):
    arguments = dict(num_steps=4, sigma_min=0.002, sigma_max=80.0, rho=7.0) | bad
    with pytest.raises(ValueError):
        karras_sigmas(**arguments)


@pytest.mark.parametrize(
    "sampler, options",
    [
        (edm_heun_sampler, dict(num_steps=32)),
        (euler_sampler, dict(num_steps=128)),
        (edm_heun_sampler, dict(num_steps=64, churn=40.0, s_tmin=0.05, s_tmax=50.0, s_noise=1.003)),
    ],
    ids=["heun", "euler", "heun-churn"],
)
def test_sampler_reproduces_gaussian_mixture(mixture, sampler, options):
    noise = noise_from_seeds(range(NUM_SAMPLES), (2,), dtype=torch.float64)
    with torch.random.fork_rng():
        torch.manual_seed(0)  # churn noise from the global generator here; per-seed churn is tested below
        samples = sampler(mixture.denoise, noise, **options)
    assert samples.dtype == torch.float64
    # Tolerances are about 4 standard errors of the estimates from NUM_SAMPLES draws.
    torch.testing.assert_close(samples.mean(0), mixture.mean(), atol=0.1, rtol=0)
    torch.testing.assert_close(torch.cov(samples.T), mixture.covariance(), atol=0.2, rtol=0)
    torch.testing.assert_close(mixture.mode_weights(samples), mixture.weights, atol=0.03, rtol=0)


def test_heun_is_second_order_and_beats_euler(mixture):
    noise = noise_from_seeds(range(200), (2,), dtype=torch.float64)
    exact = edm_heun_sampler(mixture.denoise, noise, num_steps=256)

    def error(sampler, num_steps: int) -> float:
        return (sampler(mixture.denoise, noise, num_steps=num_steps) - exact).norm(dim=1).mean().item()

    heun = {n: error(edm_heun_sampler, n) for n in (12, 16, 32)}
    euler = {n: error(euler_sampler, n) for n in (12, 16, 32)}
    for num_steps in heun:
        assert heun[num_steps] < euler[num_steps]
    # Doubling the steps divides the error by about 4 for a second-order method and 2 for a first-order one.
    assert math.log2(heun[16] / heun[32]) > 1.7
    assert math.log2(euler[16] / euler[32]) < 1.3


@pytest.mark.parametrize("num_steps", [1, 2, 7])
def test_function_evaluation_counts_and_dtypes(mixture, num_steps):
    noise = torch.randn(3, 2)
    heun = CallRecorder(mixture.denoise)
    euler = CallRecorder(mixture.denoise)
    edm_heun_sampler(heun, noise, num_steps=num_steps)
    euler_sampler(euler, noise, num_steps=num_steps)
    assert len(heun.calls) == 2 * num_steps - 1
    assert len(euler.calls) == num_steps
    assert set(heun.calls + euler.calls) == {(3, torch.float32, torch.float32)}


def test_final_step_returns_the_denoised_estimate():
    """The last step goes to sigma = 0, so a constant denoiser yields its constant exactly."""
    target = torch.tensor([[0.25, -1.5]])
    samples = edm_heun_sampler(lambda x, sigma: target.expand_as(x), torch.randn(4, 2), num_steps=3)
    torch.testing.assert_close(samples, target.expand(4, 2))


@pytest.mark.parametrize("churn", [0.0, 20.0])
def test_sample_depends_only_on_its_own_seed(mixture, churn):
    def sample(seeds: list[int]) -> Tensor:
        noise = noise_from_seeds(seeds, (2,))
        return edm_heun_sampler(
            mixture.denoise, noise, num_steps=8, churn=churn, generators=generators_from_seeds(seeds)
        )

    alone = sample([7])
    in_batch = sample([3, 7, 11, 12])
    torch.testing.assert_close(in_batch[1:2], alone, rtol=0, atol=1e-6)
    assert not torch.allclose(in_batch[0], in_batch[2])


def test_churn_injects_noise(mixture):
    noise = noise_from_seeds([1, 2], (2,))
    deterministic = edm_heun_sampler(mixture.denoise, noise, num_steps=8)
    stochastic = edm_heun_sampler(
        mixture.denoise, noise, num_steps=8, churn=20.0, generators=generators_from_seeds([1, 2])
    )
    assert not torch.allclose(deterministic, stochastic)


def test_heun_rejects_bad_generators_and_churn(mixture):
    noise = torch.randn(2, 2)
    with pytest.raises(ValueError, match="generators"):
        edm_heun_sampler(mixture.denoise, noise, churn=1.0, generators=generators_from_seeds([0]))
    with pytest.raises(ValueError, match="churn"):
        edm_heun_sampler(mixture.denoise, noise, churn=-1.0)


def test_noise_from_seeds_is_per_sample():
    batch = noise_from_seeds([5, 6, 5], (3, 4, 4), dtype=torch.float64)
    assert batch.shape == (3, 3, 4, 4) and batch.dtype == torch.float64
    torch.testing.assert_close(batch[0], batch[2], rtol=0, atol=0)
    alone = noise_from_seeds([6], (3, 4, 4), dtype=torch.float64)
    torch.testing.assert_close(batch[1:2], alone, rtol=0, atol=0)
    assert not torch.allclose(batch[0], batch[1])
    with pytest.raises(ValueError):
        noise_from_seeds([], (2,))


class ToyConditionalDenoiser:
    """denoise(x, sigma, condition) = x * weight + shift + sigma term; records every call's batch size."""

    def __init__(self):
        self.batch_sizes: list[int] = []

    def __call__(self, x: Tensor, sigma: Tensor, condition) -> Tensor:
        self.batch_sizes.append(x.shape[0])
        if isinstance(condition, dict):
            return x * condition["scale"][:, None] + condition["shift"] + 0.1 * sigma[:, None]
        return x + condition + 0.1 * sigma[:, None]


def _plain_cfg(denoise_fn, x, sigma, cond, uncond, scale) -> Tensor:
    """Reference guidance from two separate forwards."""
    unconditional = denoise_fn(x, sigma, uncond)
    return unconditional + scale * (denoise_fn(x, sigma, cond) - unconditional)


@pytest.fixture
def guidance_inputs():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, generator=generator)
    sigma = torch.full((4,), 2.0)
    cond = torch.randn(4, 3, generator=generator)
    return x, sigma, cond, torch.zeros_like(cond)


def test_guidance_scale_one_is_the_conditional_prediction(guidance_inputs):
    x, sigma, cond, uncond = guidance_inputs
    network = ToyConditionalDenoiser()
    denoiser = guided_denoiser(network, cond, uncond, guidance_scale=1.0)
    torch.testing.assert_close(denoiser(x, sigma), x + cond + 0.1 * sigma[:, None])
    assert network.batch_sizes == [4]


def test_guidance_runs_one_batched_forward_equal_to_two_separate_ones(guidance_inputs):
    x, sigma, cond, uncond = guidance_inputs
    network = ToyConditionalDenoiser()
    guided = guided_denoiser(network, cond, uncond, guidance_scale=4.5)(x, sigma)
    assert network.batch_sizes == [8]
    torch.testing.assert_close(guided, _plain_cfg(network, x, sigma, cond, uncond, 4.5))


def test_guidance_with_dict_conditions(guidance_inputs):
    x, sigma, _, _ = guidance_inputs
    cond = {"scale": torch.tensor([1.0, 2.0, 3.0, 4.0]), "shift": torch.ones(4, 3)}
    uncond = {"scale": torch.zeros(4), "shift": torch.zeros(4, 3)}
    network = ToyConditionalDenoiser()
    guided = guided_denoiser(network, cond, uncond, guidance_scale=3.0)(x, sigma)
    torch.testing.assert_close(guided, _plain_cfg(network, x, sigma, cond, uncond, 3.0))


def test_interval_covering_everything_equals_plain_guidance(guidance_inputs):
    x, sigma, cond, uncond = guidance_inputs
    network = ToyConditionalDenoiser()
    plain = guided_denoiser(network, cond, uncond, guidance_scale=2.0)(x, sigma)
    interval = guided_denoiser(network, cond, uncond, guidance_scale=2.0, guidance_interval=(0.0, math.inf))
    torch.testing.assert_close(interval(x, sigma), plain)


def test_interval_guides_only_samples_inside_it(guidance_inputs):
    x, _, cond, uncond = guidance_inputs
    sigma = torch.tensor([0.1, 1.0, 5.0, 50.0])
    network = ToyConditionalDenoiser()
    denoiser = guided_denoiser(network, cond, uncond, guidance_scale=3.0, guidance_interval=(0.5, 5.0))
    result = denoiser(x, sigma)
    assert network.batch_sizes == [4 + 2]
    inside = torch.tensor([False, True, True, False])
    guided = _plain_cfg(network, x, sigma, cond, uncond, 3.0)
    conditional = network(x, sigma, cond)
    torch.testing.assert_close(result[inside], guided[inside])
    torch.testing.assert_close(result[~inside], conditional[~inside])


def test_guided_heun_skips_unconditional_forwards_outside_the_interval(guidance_inputs):
    x, _, cond, uncond = guidance_inputs
    network = ToyConditionalDenoiser()
    interval = (0.3, 2.0)
    denoiser = guided_denoiser(network, cond, uncond, guidance_scale=2.0, guidance_interval=interval)
    num_steps = 10
    edm_heun_sampler(denoiser, x, num_steps=num_steps)
    sigmas = karras_sigmas(num_steps).tolist()
    evaluated = []  # the sigma of every denoiser call: each step's own, then its Heun correction's
    for index in range(num_steps):
        evaluated.append(sigmas[index])
        if index < num_steps - 1:
            evaluated.append(sigmas[index + 1])
    expected = [8 if interval[0] < s <= interval[1] else 4 for s in evaluated]
    assert network.batch_sizes == expected
    assert 4 in expected and 8 in expected


def test_guidance_rejects_mismatched_conditions(guidance_inputs):
    x, sigma, cond, _ = guidance_inputs
    network = ToyConditionalDenoiser()
    with pytest.raises(ValueError, match="shape"):
        guided_denoiser(network, cond, torch.zeros(4, 5), guidance_scale=2.0)
    with pytest.raises(TypeError):
        guided_denoiser(network, cond, {"shift": cond}, guidance_scale=2.0)
    with pytest.raises(ValueError, match="keys"):
        guided_denoiser(network, {"a": cond}, {"b": cond}, guidance_scale=2.0)
    with pytest.raises(ValueError, match="guidance_interval"):
        guided_denoiser(network, cond, cond, guidance_scale=2.0, guidance_interval=(2.0, 1.0))
    with pytest.raises(ValueError, match="batch"):
        guided_denoiser(network, cond, cond, guidance_scale=2.0)(x[:2], sigma[:2])
