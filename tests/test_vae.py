"""Image <-> latent interface: a tiny diffusers AutoencoderKL on disk, presets, stats file, identity."""

import shutil
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL

from micro_diffusion.encoders import vae as vae_module
from micro_diffusion.encoders.vae import (
    KNOWN_VAES,
    DiffusersAutoencoder,
    IdentityAutoencoder,
    load_latent_stats,
    load_vae,
    save_latent_stats,
)


def _images(batch: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Random images (batch, 3, size, size) in [-1, 1]."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, size, size, generator=generator) * 2 - 1


@pytest.fixture(scope="module")
def raw_vae(tiny_vae_dir: Path) -> AutoencoderKL:
    """The fixture's AutoencoderKL loaded directly with diffusers, the reference for normalisation."""
    return AutoencoderKL.from_pretrained(tiny_vae_dir).eval()


@pytest.fixture(scope="module")
def tiny_vae(tiny_vae_dir: Path) -> DiffusersAutoencoder:
    return load_vae(str(tiny_vae_dir))


def test_loads_folder_with_config_normalisation(tiny_vae, raw_vae):
    assert isinstance(tiny_vae, DiffusersAutoencoder)
    assert (tiny_vae.latent_channels, tiny_vae.downsample_factor) == (4, 4)
    images = _images()
    latents = tiny_vae.encode(images, sample=False)
    assert latents.shape == (2, 4, 8, 8)
    with torch.no_grad():
        raw_mean = raw_vae.encode(images).latent_dist.mean
    torch.testing.assert_close(latents, (raw_mean - 0.25) * 0.5)


def test_decode_undoes_the_normalisation(tiny_vae, raw_vae):
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = raw_vae.decode(latents / 0.5 + 0.25).sample.clamp(-1, 1)
    decoded = tiny_vae.decode(latents)
    assert decoded.shape == (2, 3, 32, 32)
    torch.testing.assert_close(decoded, expected)


def test_mean_is_deterministic_and_sample_follows_the_moments(tiny_vae):
    images = _images()
    torch.testing.assert_close(tiny_vae.encode(images, sample=False), tiny_vae.encode(images, sample=False))
    mean, std = tiny_vae.encode_moments(images)
    assert torch.all(std > 0)
    sample = tiny_vae.encode(images, generator=torch.Generator().manual_seed(7))
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(sample, mean + std * noise)
    other = tiny_vae.encode(images, generator=torch.Generator().manual_seed(8))
    assert not torch.allclose(sample, other)


def test_per_channel_stats_file_overrides_the_config(tiny_vae_dir, raw_vae, tmp_path):
    folder = shutil.copytree(tiny_vae_dir, tmp_path / "vae")
    mean, std = torch.tensor([0.1, -0.2, 0.3, 0.0]), torch.tensor([0.5, 1.0, 2.0, 4.0])
    save_latent_stats(folder, mean, std)
    loaded_mean, loaded_std = load_latent_stats(folder)
    torch.testing.assert_close((loaded_mean, loaded_std), (mean, std))

    autoencoder = load_vae(str(folder))
    images = _images()
    with torch.no_grad():
        posterior = raw_vae.encode(images).latent_dist
    normalised_mean, normalised_std = autoencoder.encode_moments(images)
    channel_mean, channel_std = mean.view(1, 4, 1, 1), std.view(1, 4, 1, 1)
    torch.testing.assert_close(normalised_mean, (posterior.mean - channel_mean) / channel_std)
    torch.testing.assert_close(normalised_std, posterior.std / channel_std)


def test_stats_of_the_wrong_channel_count_are_rejected(tiny_vae_dir, tmp_path):
    folder = shutil.copytree(tiny_vae_dir, tmp_path / "vae")
    save_latent_stats(folder, [0.0, 0.0, 0.0], [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="one value per latent channel"):
        load_vae(str(folder))


@pytest.mark.parametrize(
    ("mean", "std", "message"),
    [
        ([0.0, 0.0], [1.0], "one value per channel"),
        ([0.0], [0.0], "positive"),
        ([float("nan")], [1.0], "finite"),
    ],
)
def test_bad_latent_stats_are_rejected(tmp_path, mean, std, message):
    with pytest.raises(ValueError, match=message):
        save_latent_stats(tmp_path, mean, std)


def test_malformed_stats_file_names_itself(tmp_path):
    (tmp_path / vae_module.LATENT_STATS_FILE).write_text('{"mean": [0.0]}')
    with pytest.raises(ValueError, match="latent_stats.json"):
        load_latent_stats(tmp_path)


def test_requested_dtype_is_used_for_weights_and_outputs(tiny_vae_dir):
    autoencoder = load_vae(str(tiny_vae_dir), dtype=torch.bfloat16)
    assert {p.dtype for p in autoencoder.parameters()} == {torch.bfloat16}
    latents = autoencoder.encode(_images())
    assert latents.dtype == torch.bfloat16
    assert autoencoder.decode(latents).dtype == torch.bfloat16


def test_autoencoder_is_frozen(tiny_vae):
    assert not any(p.requires_grad for p in tiny_vae.parameters())
    tiny_vae.train()
    assert not tiny_vae.training and not tiny_vae.vae.training


def test_identity_is_pixel_space():
    autoencoder = load_vae("pixel")
    assert isinstance(autoencoder, IdentityAutoencoder)
    assert (autoencoder.latent_channels, autoencoder.downsample_factor) == (3, 1)
    images = _images(size=8)
    torch.testing.assert_close(autoencoder.encode(images), images)
    torch.testing.assert_close(autoencoder.decode(images), images)
    assert load_vae("identity", dtype=torch.float16).encode(images).dtype == torch.float16


@pytest.mark.parametrize(
    ("images", "message"),
    [
        (torch.rand(1, 3, 32, 32) * 255, r"\[-1, 1\]"),
        (torch.zeros(1, 3, 32, 32, dtype=torch.uint8), "127.5"),
        (torch.zeros(1, 1, 32, 32), r"\(B, 3, H, W\)"),
        (torch.zeros(1, 3, 30, 32), "divisible"),
    ],
)
def test_bad_images_give_clear_errors(tiny_vae, images, message):
    with pytest.raises(ValueError, match=message):
        tiny_vae.encode(images)


def test_latents_with_the_wrong_channel_count_are_rejected(tiny_vae):
    with pytest.raises(ValueError, match=r"\(B, 4, h, w\)"):
        tiny_vae.decode(torch.zeros(1, 3, 8, 8))


def test_preset_gives_subfolder_and_scale(tiny_vae_dir, monkeypatch):
    calls = []
    load_folder = AutoencoderKL.from_pretrained

    def fake_from_pretrained(name, subfolder=None, **kwargs):
        calls.append((name, subfolder))
        return load_folder(tiny_vae_dir, **kwargs)

    monkeypatch.setattr(vae_module.AutoencoderKL, "from_pretrained", fake_from_pretrained)
    autoencoder = load_vae("stabilityai/stable-diffusion-xl-base-1.0")
    assert calls == [("stabilityai/stable-diffusion-xl-base-1.0", "vae")]
    assert autoencoder.latent_scale.item() == pytest.approx(0.13025)
    assert autoencoder.latent_shift.item() == 0.0
    assert KNOWN_VAES["ostris/vae-kl-f8-d16"].subfolder is None


def test_missing_hub_model_says_how_to_get_it():
    with pytest.raises(OSError, match="huggingface-cli download micro-diffusion-tests/no-such-vae"):
        load_vae("micro-diffusion-tests/no-such-vae")


def test_missing_folder_is_named():
    with pytest.raises(FileNotFoundError, match="'./no/such/folder'.*identity"):
        load_vae("./no/such/folder")
