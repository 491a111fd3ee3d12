"""The autoencoder task under Composer (micro_diffusion.training.autoencoder_task): the configs, a real
train.py run, the reconstruction grid, the export, and the discriminator's delayed start in the Trainer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from composer import Trainer
from composer.loggers import InMemoryLogger, LoggerDestination
from hydra import compose, initialize_config_dir
from PIL import Image
from torch.utils.data import DataLoader

from micro_diffusion.data.images import ImageSet, load_source_images
from micro_diffusion.encoders.vae import LATENT_STATS_FILE, load_vae
from micro_diffusion.models.autoencoder import (
    AutoencoderLoss,
    AutoencoderLossConfig,
    DiscriminatorConfig,
    build_autoencoder,
)
from micro_diffusion.training.autoencoder_task import (
    AutoencoderComposerModel,
    AutoencoderDataSection,
    AutoencoderModelSection,
    ReconstructionGrid,
    SyncTrainingStep,
    build_autoencoder_task,
    split_images,
)
from micro_diffusion.training.config import ConfigError, load_run_config, validate_section
from train import build_trainer

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
AUTOENCODER_CONFIGS = ["autoencoder_shapes", "autoencoder_fashion_mnist", "autoencoder_emoji"]


def _compose(name: str, overrides: list[str] = ()):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        return compose(name, overrides=list(overrides))


class ImageRecorder(LoggerDestination):
    """Keeps every (name, step, image) given to `log_images`."""

    def __init__(self) -> None:
        self.images: list[tuple[str, int, torch.Tensor]] = []

    def log_images(self, images, name="Images", channels_last=False, step=None, masks=None, mask_class_labels=None,
                   use_table=True) -> None:  # fmt: skip
        self.images.append((name, step, images))


@pytest.fixture(scope="module")
def shapes() -> ImageSet:
    return load_source_images("shapes", {"num_samples": 48, "seed": 0}, image_size=32)


@pytest.mark.parametrize("name", AUTOENCODER_CONFIGS)
def test_autoencoder_configs_compose_and_their_sections_validate(name: str):
    run = load_run_config(_compose(name))
    assert run.task == "autoencoder"
    model = validate_section(AutoencoderModelSection, run.model, "model")
    data = validate_section(AutoencoderDataSection, run.data, "data")
    assert model.export_folder == f"{run.trainer.save_folder}/autoencoder"
    build_autoencoder(model.preset, model.latent_channels, model.downsample_factor)
    assert data.image_size in (32, 64)


def test_unknown_or_useless_keys_stop_the_task(tmp_path: Path):
    base = [
        "data.source_options.num_samples=40", "data.num_eval_images=8", "model.grid_images=8",
        f"trainer.save_folder={tmp_path}",
    ]  # fmt: skip
    for override, message in [
        ("+model.loss.bogus=1", "model.loss.bogus"),
        ("model.loss.perceptual={weight: 0}", "perceptual.weight must be > 0"),
        ("+data.augment=true", "data.augment"),
        ("model.grid_images=9", "model.grid_images"),
        ("data.num_eval_images=40", "data: num_eval_images"),
        ("+data.source_options.colour=red", "data: bad options"),
    ]:
        with pytest.raises(ConfigError, match=message):
            build_autoencoder_task(load_run_config(_compose("autoencoder_shapes", [*base, override])))
    with pytest.raises(ConfigError, match="model.cpu_bf16 is for CPU training"):
        gpu_run = [*base, "+model.cpu_bf16=true", "trainer.device=gpu"]
        build_autoencoder_task(load_run_config(_compose("autoencoder_shapes", gpu_run)))


def test_train_py_trains_the_shapes_config_and_exports_a_loadable_autoencoder(tmp_path: Path):
    overrides = [
        "data.source_options.num_samples=48", "data.num_eval_images=16", "data.train_batch_size=8",
        "data.eval_batch_size=16", "model.grid_images=4", "model.grid_interval=2ba", "trainer.max_duration=4ba",
        "trainer.eval_interval=2ba", "trainer.save_interval=4ba", f"trainer.save_folder={tmp_path}",
        "trainer.progress_bar=false", "logger={}",
    ]  # fmt: skip
    run = load_run_config(_compose("autoencoder_shapes", overrides))
    export_folder = Path(run.model["export_folder"])
    export_folder.mkdir(parents=True)
    (export_folder / LATENT_STATS_FILE).write_text("stale statistics of an earlier model")
    components = build_autoencoder_task(run)
    assert len(components.train_dataloader.dataset) == 32 and len(components.eval_dataloader.dataset) == 16
    trainer = build_trainer(run, components)
    trainer.fit()
    metrics = {name: metric.compute().item() for name, metric in trainer.state.eval_metrics["eval"].items()}
    assert set(metrics) == {"PSNR", "SSIM", "L1"} and metrics["PSNR"] > 0
    grids = sorted((tmp_path / "reconstructions").glob("*.png"))
    assert [grid.name for grid in grids] == ["reconstructions_ba00000002.png", "reconstructions_ba00000004.png"]
    assert Image.open(grids[-1]).size == (4 * 34 + 2, 2 * 34 + 2)  # 4 columns, originals over reconstructions
    assert not (export_folder / LATENT_STATS_FILE).exists()
    images = next(components.eval_dataloader.dataset.batches(4))
    with torch.no_grad():
        expected = components.model.autoencoder.encode(images).latent_dist.mean
    torch.testing.assert_close(load_vae(str(export_folder)).encode(images, sample=False), expected)
    trainer.close()


def test_reconstruction_grid_shows_originals_above_their_reconstructions(shapes: ImageSet, tmp_path: Path):
    model = AutoencoderComposerModel(build_autoencoder("tiny-32"), AutoencoderLoss(AutoencoderLossConfig()))
    logger = ImageRecorder()
    originals = next(shapes.batches(3))
    trainer = Trainer(
        model=model, train_dataloader=DataLoader(shapes, batch_size=8), max_duration="2ba", device="cpu",
        optimizers=torch.optim.AdamW(model.parameters(), lr=1e-3), loggers=[logger], progress_bar=False,
        callbacks=[ReconstructionGrid(originals, tmp_path, interval="1ba")],
    )  # fmt: skip
    trainer.fit()
    assert [(name, step) for name, step, _ in logger.images] == [("reconstructions", 1), ("reconstructions", 2)]
    grid = logger.images[-1][2]
    assert grid.shape == (3, 2 * 34 + 2, 3 * 34 + 2)
    top_left = grid[:, 2:34, 2:34]
    torch.testing.assert_close(top_left, originals[0].add(1).div(2))
    bottom_left = grid[:, 36:68, 2:34]
    torch.testing.assert_close(bottom_left, model.reconstruct(originals)[0].add(1).div(2), atol=1e-5, rtol=0)
    assert len(list(tmp_path.glob("reconstructions_ba*.png"))) == 2
    trainer.close()


def test_cpu_bf16_trains_under_autocast_and_evaluates_in_float32(shapes: ImageSet):
    model = AutoencoderComposerModel(build_autoencoder("tiny-32"), AutoencoderLoss(AutoencoderLossConfig()),
                                     cpu_bf16=True)  # fmt: skip
    images = next(shapes.batches(8))
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(30):
        outputs = model(images)
        assert outputs.reconstructions.dtype == torch.bfloat16
        loss = model.loss(outputs, images)["total"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in model.parameters())
    assert losses[-1] < 0.5 * losses[0]
    model.eval()
    assert model(images).reconstructions.dtype == torch.float32
    assert model.reconstruct(images).dtype == torch.float32


def test_discriminator_starts_in_the_trainer_at_its_step(shapes: ImageSet):
    config = AutoencoderLossConfig(discriminator=DiscriminatorConfig(weight=0.1, start_step=2, num_layers=2))
    model = AutoencoderComposerModel(build_autoencoder("tiny-32"), AutoencoderLoss(config))
    logger = InMemoryLogger()
    initial = [p.detach().clone() for p in model.loss_fn.discriminator.parameters()]
    trainer = Trainer(
        model=model, train_dataloader=DataLoader(shapes, batch_size=8), max_duration="4ba", device="cpu",
        optimizers=torch.optim.AdamW(model.parameters(), lr=1e-3), loggers=[logger], progress_bar=False,
        callbacks=[SyncTrainingStep()],
    )  # fmt: skip
    trainer.fit()
    batches_with_discriminator = [int(t.batch) for t, _ in logger.data["loss/train/discriminator"]]
    assert batches_with_discriminator == [2, 3]
    assert len(logger.data["loss/train/reconstruction"]) == 4
    assert any(not torch.equal(a, b) for a, b in zip(initial, model.loss_fn.discriminator.parameters()))
    trainer.close()


def test_split_is_seeded_and_disjoint(shapes: ImageSet):
    train, held_out = split_images(shapes, 8, seed=3)
    again, _ = split_images(shapes, 8, seed=3)
    assert (len(train), len(held_out)) == (40, 8)
    assert torch.equal(train.pixels, again.pixels)
    rows = {tuple(image.flatten().tolist()) for image in train.pixels}
    assert not any(tuple(image.flatten().tolist()) in rows for image in held_out.pixels)
