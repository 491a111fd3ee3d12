"""`micro-diffusion latent-stats` and the in-memory image set it shares with autoencoder training."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from micro_diffusion.cli.latent_stats import main
from micro_diffusion.data.images import load_source_images
from micro_diffusion.encoders.vae import LATENT_STATS_FILE, load_latent_stats, load_vae
from micro_diffusion.models.autoencoder import build_autoencoder, compute_latent_stats


@pytest.fixture(scope="module")
def trained_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny-32 autoencoder saved as training exports it (save_pretrained, no statistics yet)."""
    folder = tmp_path_factory.mktemp("autoencoder")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        build_autoencoder("tiny-32").save_pretrained(folder)
    return folder


def test_latent_stats_command_stores_the_statistics_that_load_vae_applies(trained_folder: Path, tmp_path: Path):
    folder = tmp_path / "autoencoder"
    folder.mkdir()
    for file in trained_folder.iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    main([
        "--autoencoder", str(folder), "--source", "shapes", "--source-option", "num_samples=24",
        "--source-option", "seed=5", "--image-size", "32", "--batch-size", "10", "--no-progress",
    ])  # fmt: skip
    images = load_source_images("shapes", {"num_samples": 24, "seed": 5}, image_size=32)
    vae = load_vae(str(folder))
    expected_mean, expected_std = compute_latent_stats(vae.vae, images.batches(24))
    mean, std = load_latent_stats(folder)
    torch.testing.assert_close(mean, expected_mean)
    torch.testing.assert_close(std, expected_std)
    torch.testing.assert_close(vae.latent_shift.flatten(), mean)
    torch.testing.assert_close(vae.latent_scale.flatten(), 1 / std)


def test_latent_stats_command_refuses_a_folder_without_an_autoencoder(tmp_path: Path):
    with pytest.raises(SystemExit, match="not a diffusers autoencoder folder"):
        main(["--autoencoder", str(tmp_path), "--source", "shapes", "--no-progress"])
    assert not (tmp_path / LATENT_STATS_FILE).exists()


def test_latent_stats_command_reports_bad_source_options(trained_folder: Path):
    with pytest.raises(SystemExit, match="bad options"):
        main(["--autoencoder", str(trained_folder), "--source", "shapes", "--source-option", "colour=red"])


def test_image_set_prepares_images_as_precompute_does_and_counts_unreadable_files(tmp_path: Path):
    transparent = Image.new("RGBA", (40, 20), (255, 0, 0, 0))
    transparent.paste((0, 0, 255, 255), (16, 0, 24, 20))  # an opaque blue band in the middle
    transparent.save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a blue band")
    (tmp_path / "b.png").write_bytes(b"not a png")
    (tmp_path / "b.txt").write_text("broken")
    with pytest.warns(UserWarning, match="skipped 1 unreadable record"):
        images = load_source_images("folder", {"root": str(tmp_path)}, image_size=8)
    assert images.pixels.shape == (1, 3, 8, 8) and images.pixels.dtype == torch.uint8
    image = images[0]
    assert image.min() >= -1 and image.max() <= 1
    # Shorter side to 8, centre crop: the middle is the blue band, transparent red became white at the edges.
    torch.testing.assert_close(image[:, 4, 4], torch.tensor([-1.0, -1.0, 1.0]))
    torch.testing.assert_close(image[:, 4, 0], torch.tensor([1.0, 1.0, 1.0]), atol=0.05, rtol=0)
