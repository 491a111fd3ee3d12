"""Own autoencoders (micro_diffusion.models.autoencoder): presets, learning, diffusers round trip, latent
statistics, and every loss term."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from torch import Tensor

from micro_diffusion.data.images import load_source_images
from micro_diffusion.encoders.vae import DiffusersAutoencoder, load_latent_stats, load_vae, save_latent_stats
from micro_diffusion.models.autoencoder import (
    AUTOENCODER_PRESETS,
    AutoencoderLoss,
    AutoencoderLossConfig,
    AutoencoderOutput,
    DiffusabilityConfig,
    DiscriminatorConfig,
    EfficientNetDistance,
    LpipsDistance,
    PerceptualLossConfig,
    autoencode,
    build_autoencoder,
    compute_latent_stats,
    scale_equivariance_error,
)


def _images(batch: int = 4, size: int = 32, seed: int = 0) -> Tensor:
    """Smooth random images (batch, 3, size, size) in [-1, 1] (upsampled noise, so features are image-like)."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, 3, size // 4, size // 4, generator=generator) * 2 - 1
    return F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


def _tiny_vae(seed: int = 0) -> AutoencoderKL:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_autoencoder("tiny-32")


@pytest.fixture(scope="module")
def tiny_vae() -> AutoencoderKL:
    return _tiny_vae().eval()


def _psnr(reconstructions: Tensor, images: Tensor) -> float:
    """Mean per-image PSNR of images in [-1, 1] (peak-to-peak 2)."""
    mse = (reconstructions.clamp(-1, 1) - images).square().mean((1, 2, 3))
    return (10 * torch.log10(4 / mse)).mean().item()


# ---------------------------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------------------------


def test_minildm_preset_is_a_3_5m_autoencoder_from_32px_rgb_to_8x8x16():
    vae = build_autoencoder("minildm-32")
    assert 3.4e6 < sum(p.numel() for p in vae.parameters()) < 3.6e6
    with torch.no_grad():
        output = autoencode(vae, _images(2), sample_posterior=False)
    assert output.latents.shape == (2, 16, 8, 8)
    assert output.reconstructions.shape == (2, 3, 32, 32)


@pytest.mark.parametrize(
    "preset, factor, channels", [("tiny-32", 4, 8), ("minildm-32", 4, 16), ("small-64", 4, 8), ("f8-256", 8, 4)]
)
def test_presets_have_their_documented_latent_shape(preset: str, factor: int, channels: int):
    vae = DiffusersAutoencoder(build_autoencoder(preset), scale=1.0)
    assert (vae.downsample_factor, vae.latent_channels) == (factor, channels)
    assert vae.vae.config.sample_size == AUTOENCODER_PRESETS[preset].image_size


@pytest.mark.parametrize("factor, latent_side", [(1, 32), (2, 16), (8, 4)])
def test_latent_channels_and_downsampling_are_configurable(factor: int, latent_side: int):
    vae = build_autoencoder("tiny-32", latent_channels=3, downsample_factor=factor)
    with torch.no_grad():
        output = autoencode(vae, _images(1), sample_posterior=True)
    assert output.latents.shape == (1, 3, latent_side, latent_side)
    assert output.reconstructions.shape == (1, 3, 32, 32)


def test_bad_preset_or_factor_is_refused():
    with pytest.raises(ValueError, match="unknown autoencoder preset"):
        build_autoencoder("huge")
    with pytest.raises(ValueError, match="power of two"):
        build_autoencoder("tiny-32", downsample_factor=3)


# ---------------------------------------------------------------------------------------------------------------
# Learning
# ---------------------------------------------------------------------------------------------------------------

SHAPES_STEPS = 120
SHAPES_PSNR_DB = 18.0  # 20.0 dB measured after SHAPES_STEPS on one VM, 18.75 on another (same code); mean: 14.6


@pytest.mark.slow
def test_tiny_autoencoder_learns_shapes_and_generalises_to_held_out_images():
    images = load_source_images("shapes", {"num_samples": 576, "seed": 0}, image_size=32)
    train, held_out = images.batches(512)  # 512 training images, 64 held out
    torch.manual_seed(0)
    vae = build_autoencoder("tiny-32", downsample_factor=2)
    loss_fn = AutoencoderLoss(AutoencoderLossConfig())
    optimizer = torch.optim.AdamW(vae.parameters(), lr=3e-3)
    losses = []
    for step in range(SHAPES_STEPS):
        batch = train[torch.randint(0, len(train), (8,))]
        terms = loss_fn(batch, autoencode(vae, batch, sample_posterior=True), step=step)
        optimizer.zero_grad()
        terms["total"].backward()
        optimizer.step()
        losses.append(terms["reconstruction"].item())
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last <= 0.5 * first, f"reconstruction loss {first:.3f} -> {last:.3f}"
    with torch.no_grad():
        reconstructions = autoencode(vae.eval(), held_out, sample_posterior=False).reconstructions
    mean_image_psnr = _psnr(train.mean(0, keepdim=True).expand_as(held_out), held_out)
    psnr = _psnr(reconstructions, held_out)
    assert psnr >= max(SHAPES_PSNR_DB, mean_image_psnr + 3), f"{psnr:.2f} dB (mean image: {mean_image_psnr:.2f})"


# ---------------------------------------------------------------------------------------------------------------
# Saving, loading, latent statistics
# ---------------------------------------------------------------------------------------------------------------


def test_saved_autoencoder_loads_through_load_vae_and_gives_the_same_latents(tiny_vae, tmp_path: Path):
    tiny_vae.save_pretrained(tmp_path)
    loaded = load_vae(str(tmp_path))
    assert isinstance(loaded, DiffusersAutoencoder)
    assert (loaded.latent_channels, loaded.downsample_factor) == (8, 4)
    images = _images()
    with torch.no_grad():
        posterior = tiny_vae.encode(images).latent_dist
        decoded = tiny_vae.decode(posterior.mean).sample.clamp(-1, 1)
    mean, std = loaded.encode_moments(images)
    torch.testing.assert_close(mean, posterior.mean)
    torch.testing.assert_close(std, posterior.std)
    torch.testing.assert_close(loaded.decode(posterior.mean), decoded)


def test_latent_stats_are_the_exact_moments_of_posterior_samples(tiny_vae):
    batches = [_images(4, seed=seed) for seed in range(3)]
    mean, std = compute_latent_stats(tiny_vae, batches)
    assert mean.shape == std.shape == (8,)
    with torch.no_grad():
        posterior = tiny_vae.encode(torch.cat(batches)).latent_dist
        samples = torch.cat([posterior.sample() for _ in range(200)])
    torch.testing.assert_close(mean, samples.mean((0, 2, 3)), atol=0.01, rtol=0)
    torch.testing.assert_close(std, samples.std((0, 2, 3)), atol=0, rtol=0.02)


def test_latent_stats_round_trip_and_normalise_the_latents_of_load_vae(tiny_vae, tmp_path: Path):
    images = _images(16)
    mean, std = compute_latent_stats(tiny_vae, [images[:8], images[8:]])
    tiny_vae.save_pretrained(tmp_path)
    save_latent_stats(tmp_path, mean, std)
    loaded_mean, loaded_std = load_latent_stats(tmp_path)
    torch.testing.assert_close(loaded_mean, mean)
    torch.testing.assert_close(loaded_std, std)
    normalised_mean, normalised_std = load_vae(str(tmp_path)).encode_moments(images)
    # Over the same images every channel of a normalised latent sample has mean 0 and variance 1.
    channel_mean = normalised_mean.mean((0, 2, 3))
    channel_variance = (normalised_mean.square() + normalised_std.square()).mean((0, 2, 3)) - channel_mean.square()
    torch.testing.assert_close(channel_mean, torch.zeros(8), atol=1e-5, rtol=0)
    torch.testing.assert_close(channel_variance, torch.ones(8), atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# Loss terms
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def batch(tiny_vae) -> tuple[Tensor, AutoencoderOutput]:
    images = _images()
    with torch.no_grad():
        return images, autoencode(tiny_vae, images, sample_posterior=False)


def _decode(tiny_vae: AutoencoderKL):
    return lambda latents: tiny_vae.decode(latents).sample


def test_base_loss_is_reconstruction_plus_weighted_kl(batch):
    images, output = batch
    for reconstruction, distance in (("l1", F.l1_loss), ("l2", F.mse_loss)):
        config = AutoencoderLossConfig(reconstruction=reconstruction, kl_weight=1e-2)
        terms = AutoencoderLoss(config)(images, output, step=0)
        assert set(terms) == {"total", "reconstruction", "kl"}
        torch.testing.assert_close(terms["reconstruction"], distance(output.reconstructions, images))
        torch.testing.assert_close(terms["total"], terms["reconstruction"] + 1e-2 * terms["kl"])
    kl = 0.5 * (output.posterior_mean.square() + output.posterior_logvar.exp() - 1 - output.posterior_logvar)
    torch.testing.assert_close(terms["kl"], kl.sum((1, 2, 3)).mean() / (3 * 32 * 32))


OPTIONAL_TERMS = {
    "perceptual": PerceptualLossConfig(weight=0.5),
    "diffusability": DiffusabilityConfig(weight=0.5),
    "discriminator": DiscriminatorConfig(weight=0.5, num_layers=2),
}


@pytest.mark.parametrize("term", sorted(OPTIONAL_TERMS))
def test_each_optional_term_adds_exactly_its_weighted_value_when_on_and_nothing_when_off(tiny_vae, batch, term):
    images, output = batch
    base = AutoencoderLoss(AutoencoderLossConfig())(images, output, step=0, decode=_decode(tiny_vae))
    config = AutoencoderLossConfig(**{term: OPTIONAL_TERMS[term]})
    terms = AutoencoderLoss(config)(images, output, step=0, decode=_decode(tiny_vae))
    for name in ("reconstruction", "kl"):
        torch.testing.assert_close(terms[name], base[name])
    added = 0.5 * terms["generator"] + terms["discriminator"] if term == "discriminator" else 0.5 * terms[term]
    assert abs(added.item()) > 1e-4
    torch.testing.assert_close(terms["total"], base["total"] + added)
    assert set(terms) - set(base) == ({"generator", "discriminator"} if term == "discriminator" else {term})


def test_discriminator_terms_start_at_their_step(batch):
    images, output = batch
    config = AutoencoderLossConfig(discriminator=DiscriminatorConfig(weight=0.5, start_step=10, num_layers=2))
    loss = AutoencoderLoss(config)
    base = AutoencoderLoss(AutoencoderLossConfig())(images, output, step=0)
    before = loss(images, output, step=9)
    assert set(before) == set(base)
    torch.testing.assert_close(before["total"], base["total"])
    assert {"generator", "discriminator"} <= set(loss(images, output, step=10))


def test_generator_and_discriminator_gradients_are_separated():
    vae = _tiny_vae()
    config = AutoencoderLossConfig(discriminator=DiscriminatorConfig(weight=0.5, num_layers=2))
    loss = AutoencoderLoss(config)
    images = _images()
    terms = loss(images, autoencode(vae, images, sample_posterior=True), step=0)
    autoencoder_parameters = list(vae.parameters())
    discriminator_parameters = list(loss.discriminator.parameters())

    def grads(term: str, parameters: list) -> tuple:
        return torch.autograd.grad(terms[term], parameters, retain_graph=True, allow_unused=True)

    assert all(grad is None for grad in grads("discriminator", autoencoder_parameters))
    assert all(grad is None for grad in grads("generator", discriminator_parameters))
    assert all(grad is not None and grad.abs().sum() > 0 for grad in grads("discriminator", discriminator_parameters))
    assert grads("generator", [vae.decoder.conv_out.weight])[0].abs().sum() > 0


def test_adaptive_weight_is_the_ratio_of_gradient_norms_at_the_decoder_output():
    vae = _tiny_vae()
    config = AutoencoderLossConfig(discriminator=DiscriminatorConfig(weight=0.5, adaptive_weight=True, num_layers=2))
    images = _images()
    last_layer = vae.decoder.conv_out.weight
    output = autoencode(vae, images, sample_posterior=False)
    terms = AutoencoderLoss(config)(images, output, step=0, last_layer_weight=last_layer)
    (reconstruction_grad,) = torch.autograd.grad(terms["reconstruction"], last_layer, retain_graph=True)
    (generator_grad,) = torch.autograd.grad(terms["generator"], last_layer, retain_graph=True)
    adaptive = reconstruction_grad.norm() / (generator_grad.norm() + 1e-4)
    expected = terms["reconstruction"] + 1e-6 * terms["kl"] + 0.5 * adaptive * terms["generator"]
    torch.testing.assert_close(terms["total"], expected + terms["discriminator"])


def test_diffusability_is_zero_for_autoencoders_that_commute_with_downsampling():
    images = _images()
    # Pixel space (the identity autoencoder), through the loss itself.
    identity = AutoencoderOutput(images, images, images, torch.zeros_like(images))
    config = AutoencoderLossConfig(diffusability=DiffusabilityConfig(weight=1.0))
    assert AutoencoderLoss(config)(images, identity, step=0, decode=lambda latents: latents)["diffusability"] == 0
    with pytest.raises(ValueError, match="needs `decode`"):
        AutoencoderLoss(config)(images, identity, step=0)
    # Any per-pixel linear map (an invertible 1x1 convolution as encoder, its inverse as decoder).
    mixing = torch.tensor([[2.0, 0.5, 0.0], [0.0, 1.0, -0.5], [0.3, 0.0, 1.5]])
    latents = torch.einsum("ij,bjhw->bihw", mixing, images)
    decode = lambda z: torch.einsum("ij,bjhw->bihw", torch.linalg.inv(mixing), z)  # noqa: E731
    assert scale_equivariance_error(images, latents, decode, factor=2) < 1e-6
    # Space-to-depth is a perfect autoencoder that does not commute with downsampling.
    space_to_depth = F.pixel_unshuffle(images, 2)
    error = scale_equivariance_error(images, space_to_depth, lambda z: F.pixel_shuffle(z, 2), factor=2)
    assert error > 0.01


def test_diffusability_needs_latents_divisible_by_its_factor():
    images = _images(1, size=12)
    with pytest.raises(ValueError, match="not divisible"):
        scale_equivariance_error(images, images[..., :3, :3], lambda z: z, factor=2)


# ---------------------------------------------------------------------------------------------------------------
# Perceptual networks
# ---------------------------------------------------------------------------------------------------------------


def test_efficientnet_distance_is_frozen_zero_on_equal_images_and_grows_with_the_error():
    distance = EfficientNetDistance()
    assert list(distance.parameters()) == [] and distance.state_dict() == {}
    distance.train()
    assert not distance.training
    images = _images()
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(1))
    small, large = ((images + scale * noise).clamp(-1, 1).requires_grad_() for scale in (0.05, 0.5))
    torch.testing.assert_close(distance(images, images), torch.zeros(4))
    near, far = distance(images, small), distance(images, large)
    assert near.shape == (4,) and bool((near < far).all())
    near.sum().backward()
    assert small.grad.abs().sum() > 0


def _save_random_squeezenet(hub_dir: Path) -> None:
    """A random SqueezeNet 1.1 state dict where torchvision caches the ImageNet one (5 MB, no download)."""
    import torchvision

    url = torchvision.models.SqueezeNet1_1_Weights.DEFAULT.url
    (hub_dir / "checkpoints").mkdir(parents=True)
    torch.save(torchvision.models.squeezenet1_1().state_dict(), hub_dir / "checkpoints" / Path(url).name)


def test_lpips_is_used_when_its_backbone_weights_are_on_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError, match="squeezenet1_1"):
        LpipsDistance("squeeze")
    _save_random_squeezenet(tmp_path / "hub")
    distance = LpipsDistance("squeeze")
    assert distance.state_dict() == {}
    images, other = _images(), _images(seed=1)
    torch.testing.assert_close(distance(images, images), torch.zeros(4))
    assert bool((distance(images, other) > 0).all())


def test_loss_sections_refuse_values_that_would_do_nothing():
    with pytest.raises(ValueError, match="weight must be > 0"):
        PerceptualLossConfig(weight=0.0)
    with pytest.raises(ValueError, match="perceptual.network"):
        PerceptualLossConfig(weight=1.0, network="vgg")
    with pytest.raises(ValueError, match="factor"):
        DiffusabilityConfig(weight=1.0, factor=1)
    with pytest.raises(ValueError, match="reconstruction"):
        AutoencoderLossConfig(reconstruction="l3")
