"""The autoencoder task: train a small KL autoencoder with the same train.py and Composer Trainer.

Config sections this task reads (the other sections are train.py's, as for the diffusion task):

    task: autoencoder
    model:
      preset: minildm-32           # micro_diffusion.models.autoencoder.AUTOENCODER_PRESETS
      latent_channels: null        # C of the latent (null: the preset's)
      downsample_factor: null      # f, a power of two (null: the preset's)
      sample_posterior: true       # decode a posterior sample in training (false: the mean); eval uses the mean
      cpu_bf16: false              # bf16 autocast of the training forward and loss on CPU (Composer's amp_bf16
                                   #   is GPU-only): 1.5x on tiny-32 on a CPU with AMX, slower without native bf16
      loss:                        # AutoencoderLossConfig; an optional term is on when its section is given
        reconstruction: l1         # l1 | l2
        kl_weight: 1.0e-6
        perceptual: null           # {weight, network: efficientnet-lite0 | lpips-vgg | ..., resolution}
        discriminator: null        # {weight, start_step, adaptive_weight, base_channels, num_layers}
        diffusability: null        # {weight, factor}
      export_folder: ...           # the trained AutoencoderKL is saved here (save_pretrained) at the end
      grid_images: 8               # ReconstructionGrid of this many held-out images (0: none), PNG files in
      grid_interval: 500ba         #   <trainer.save_folder>/reconstructions, every grid_interval and at the end
    data:
      source: shapes               # a reader of micro_diffusion.data.sources
      source_options: {}           # its keyword arguments
      image_size: 32
      max_images: null             # read at most this many records (null: all)
      num_eval_images: 500         # held out (a seeded random subset) for PSNR / SSIM
      split_seed: 0
      train_batch_size: 256        # global; each of W ranks gets train_batch_size / W
      eval_batch_size: 256         # global
      num_workers: 0

Images are read once into memory (`micro_diffusion.data.images.load_source_images`), as uint8, and
served in [-1, 1]. After training, `micro-diffusion latent-stats --autoencoder <export_folder> ...` stores the
latent statistics next to the exported model.

Evaluation (PSNR, SSIM, L1 or MSE on the held-out images), the reconstruction grids and the export use the EMA
weights when the run configures the `ema` callback.

The optional patch discriminator needs no second optimizer: `AutoencoderLoss` returns one total whose
gradients are separated by construction (the generator term reads detached discriminator weights, the
discriminator term reads detached reconstructions), so one AdamW over all parameters updates each network from
its own objective only; Adam normalises each parameter's step, so the scales of the two objectives do not
interfere. Composer's single-optimizer loop, gradient accumulation, checkpoints and schedules stay as they are.
Before `start_step` the discriminator is not run at all, which DDP (without unused-parameter detection) does not
allow, so a delayed start is refused with more than one process.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import torch
from composer.core import Callback, Event, State
from composer.loggers import Logger
from composer.models import ComposerModel
from composer.utils import create_interval_scheduler, dist, model_eval_mode
from diffusers import AutoencoderKL
from torch import Tensor
from torch.utils.data import DataLoader
from torchmetrics import MeanAbsoluteError, MeanSquaredError, Metric
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure
from torchvision.utils import make_grid, save_image

from micro_diffusion.config_checks import NON_NEGATIVE, POSITIVE
from micro_diffusion.data.images import ImageSet, load_source_images
from micro_diffusion.encoders.vae import LATENT_STATS_FILE
from micro_diffusion.models.autoencoder import (
    AutoencoderLoss,
    AutoencoderLossConfig,
    AutoencoderOutput,
    autoencode,
    build_autoencoder,
)
from micro_diffusion.training.callbacks import ema_weights_applied, unwrap_composer_model
from micro_diffusion.training.config import DURATION, ConfigError, RunConfig, validate_section
from micro_diffusion.training.task_components import TaskComponents

# --------------------------------------------------------------------------------------------------------------
# Composer model
# --------------------------------------------------------------------------------------------------------------


class AutoencoderComposerModel(ComposerModel):
    """An `AutoencoderKL` and its `AutoencoderLoss` as a Composer model.

    Batches are images (B, 3, H, W) in [-1, 1]. Training returns the loss terms as a dict ("total" is
    optimised, every term is logged). Evaluation reconstructs from the posterior mean and reports PSNR and SSIM
    (per image, averaged) and the mean reconstruction distance (L1 or MSE, as the training loss).

    With `cpu_bf16`, the training forward and loss run under bf16 autocast on CPU (parameters, gradients and
    optimizer state stay float32); evaluation and the exported model are float32 either way.

    Attributes:
        training_step: training batches done; `SyncTrainingStep` sets it before each batch (the discriminator
            starts at `loss.config.discriminator.start_step`).
    """

    def __init__(
        self, autoencoder: AutoencoderKL, loss: AutoencoderLoss, sample_posterior: bool = True, cpu_bf16: bool = False
    ):
        super().__init__()
        self.autoencoder = autoencoder
        self.loss_fn = loss
        self.sample_posterior = sample_posterior
        self.cpu_bf16 = cpu_bf16
        self.training_step = 0
        self.psnr = PeakSignalNoiseRatio(data_range=(-1.0, 1.0), dim=(1, 2, 3))
        self.ssim = StructuralSimilarityIndexMeasure(data_range=(-1.0, 1.0))
        is_l1 = loss.config.reconstruction == "l1"
        self.distance_name = "L1" if is_l1 else "MSE"
        self.distance = MeanAbsoluteError() if is_l1 else MeanSquaredError()

    def forward(self, batch: Tensor) -> AutoencoderOutput:
        with self._training_autocast(batch):
            return autoencode(self.autoencoder, batch, sample_posterior=self.sample_posterior and self.training)

    def loss(self, outputs: AutoencoderOutput, batch: Tensor) -> dict[str, Tensor]:
        with self._training_autocast(batch):
            return self.loss_fn(
                batch,
                outputs,
                step=self.training_step,
                decode=self.decode,
                last_layer_weight=self.autoencoder.decoder.conv_out.weight,
            )

    def _training_autocast(self, batch: Tensor) -> torch.autocast:
        enabled = self.cpu_bf16 and self.training and batch.device.type == "cpu"
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled)

    def decode(self, latents: Tensor) -> Tensor:
        """latents (B, C, h, w) -> images (B, 3, h * f, w * f), not clamped."""
        return self.autoencoder.decode(latents).sample

    @torch.no_grad()
    def reconstruct(self, images: Tensor) -> Tensor:
        """images (B, 3, H, W) in [-1, 1] -> reconstructions from the posterior mean, clamped to [-1, 1]."""
        return autoencode(self.autoencoder, images, sample_posterior=False).reconstructions.clamp(-1.0, 1.0)

    def eval_forward(self, batch: Tensor, outputs: Any = None) -> Tensor:
        """Reconstructions (B, 3, H, W) of the batch (`outputs` is unused: the task has no training metrics)."""
        return self.reconstruct(batch)

    def get_metrics(self, is_train: bool = False) -> dict[str, Metric]:
        if is_train:
            return {}
        return {"PSNR": self.psnr, "SSIM": self.ssim, self.distance_name: self.distance}

    def update_metric(self, batch: Tensor, outputs: Tensor, metric: Metric) -> None:
        # contiguous: torchmetrics' MAE/MSE flatten with .view, and convolutions may return channels-last tensors
        metric.update(outputs.float().contiguous(), batch.float().contiguous())


# --------------------------------------------------------------------------------------------------------------
# Callbacks
# --------------------------------------------------------------------------------------------------------------


class SyncTrainingStep(Callback):
    """Sets `AutoencoderComposerModel.training_step` to the number of finished batches before each batch, so
    the loss knows when the discriminator starts (also after a resume, which restores the timestamp)."""

    def batch_start(self, state: State, logger: Logger) -> None:
        unwrap_composer_model(state.model).training_step = int(state.timestamp.batch)


class ReconstructionGrid(Callback):
    """Fixed held-out images (top row) above their reconstructions (bottom row), every `interval` and at the
    end of training: `<folder>/reconstructions_ba<batch>.png` on rank 0 (8-digit batch), and
    `logger.log_images` under the name "reconstructions". Reconstructs from the posterior mean, with the EMA
    weights when an `EMA` callback is active.

    Args:
        images: (N, 3, H, W) in [-1, 1].
        folder: where the PNG files go (created).
        interval: a Composer time string ("500ba") or int (epochs).
    """

    def __init__(self, images: Tensor, folder: str | Path, interval: str | int = "500ba"):
        self.images = images
        self.folder = Path(folder)
        self._should_log = create_interval_scheduler(
            interval, include_end_of_training=True, checkpoint_events=False, final_events={Event.FIT_END}
        )

    def batch_end(self, state: State, logger: Logger) -> None:
        if self._should_log(state, Event.BATCH_END):
            self._log(state, logger)

    def fit_end(self, state: State, logger: Logger) -> None:
        if self._should_log(state, Event.FIT_END):
            self._log(state, logger)

    def _log(self, state: State, logger: Logger) -> None:
        model = unwrap_composer_model(state.model)
        with ema_weights_applied(state), model_eval_mode(model):
            reconstructions = model.reconstruct(self.images.to(next(model.parameters()).device))
        grid = make_grid(torch.cat([self.images, reconstructions.float().cpu()]).add(1).div(2), nrow=len(self.images))
        batch = int(state.timestamp.batch)
        if dist.get_global_rank() == 0:
            self.folder.mkdir(parents=True, exist_ok=True)
            save_image(grid, self.folder / f"reconstructions_ba{batch:08d}.png")
        logger.log_images(grid, name="reconstructions", step=batch)


class ExportAutoencoder(Callback):
    """At the end of training, rank 0 saves the trained `AutoencoderKL` (the EMA weights when an `EMA` callback
    is active) to `folder` with `save_pretrained`, loadable with `load_vae(folder)`; a `latent_stats.json` of an
    earlier model in that folder is removed."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def fit_end(self, state: State, logger: Logger) -> None:
        with ema_weights_applied(state):
            if dist.get_global_rank() == 0:
                unwrap_composer_model(state.model).autoencoder.save_pretrained(self.folder)
                (self.folder / LATENT_STATS_FILE).unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------------------------
# Task builder
# --------------------------------------------------------------------------------------------------------------


@dataclass
class AutoencoderModelSection:
    """The `model` section (module docstring)."""

    preset: str
    export_folder: str
    latent_channels: Annotated[int | None, POSITIVE] = None
    downsample_factor: Annotated[int | None, POSITIVE] = None
    sample_posterior: bool = True
    cpu_bf16: bool = False
    loss: AutoencoderLossConfig = field(default_factory=AutoencoderLossConfig)
    grid_images: Annotated[int, NON_NEGATIVE] = 8
    grid_interval: Annotated[str, DURATION] = "500ba"


@dataclass
class AutoencoderDataSection:
    """The `data` section (module docstring)."""

    source: str
    image_size: Annotated[int, POSITIVE]
    source_options: dict[str, Any] = field(default_factory=dict)
    max_images: Annotated[int | None, POSITIVE] = None
    num_eval_images: Annotated[int, POSITIVE] = 500
    split_seed: int = 0
    train_batch_size: Annotated[int, POSITIVE] = 256
    eval_batch_size: Annotated[int, POSITIVE] = 256
    num_workers: Annotated[int, NON_NEGATIVE] = 0


def split_images(images: ImageSet, num_eval: int, seed: int) -> tuple[ImageSet, ImageSet]:
    """A seeded random split -> (train, held-out) with `num_eval` (data.num_eval_images) held-out images."""
    if not 0 < num_eval < len(images):
        raise ValueError(f"num_eval_images must be in [1, {len(images) - 1}] for {len(images)} images, got {num_eval}")
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    return ImageSet(images.pixels[order[num_eval:]]), ImageSet(images.pixels[order[:num_eval]])


def _per_rank(global_batch_size: int, key: str) -> int:
    world_size = dist.get_world_size()
    if global_batch_size % world_size:
        raise ConfigError(f"{key} ({global_batch_size}) must be divisible by the number of processes ({world_size})")
    return global_batch_size // world_size


def build_autoencoder_task(run: RunConfig) -> TaskComponents:
    """Model, dataloaders and callbacks of the autoencoder task from a run config's `model` and `data` sections.

    Args:
        run: the validated run configuration (`model` and `data`; `trainer.save_folder` for the grids).
    """
    try:
        model_cfg = validate_section(AutoencoderModelSection, run.model, "model")
    except ConfigError:
        raise
    except ValueError as error:  # a value that a loss dataclass rejects in its __post_init__
        raise ConfigError(f"model.loss: {error}") from None
    data_cfg = validate_section(AutoencoderDataSection, run.data, "data")
    if not 0 <= model_cfg.grid_images <= data_cfg.num_eval_images:
        raise ConfigError(
            f"model.grid_images must be in [0, data.num_eval_images = {data_cfg.num_eval_images}], "
            f"got {model_cfg.grid_images}"
        )
    try:
        autoencoder = build_autoencoder(model_cfg.preset, model_cfg.latent_channels, model_cfg.downsample_factor)
    except ValueError as error:
        raise ConfigError(f"model: {error}") from None
    loss_config = model_cfg.loss
    if loss_config.discriminator is not None and loss_config.discriminator.start_step and dist.get_world_size() > 1:
        raise ConfigError(
            "model.loss.discriminator.start_step: a delayed discriminator start needs a single process (DDP "
            "refuses parameters without gradients); use start_step 0 with several processes"
        )
    if model_cfg.cpu_bf16 and run.trainer.device != "cpu":
        raise ConfigError("model.cpu_bf16 is for CPU training; on a GPU use trainer.precision: amp_bf16")
    model = AutoencoderComposerModel(
        autoencoder, AutoencoderLoss(loss_config), model_cfg.sample_posterior, model_cfg.cpu_bf16
    )

    try:
        images = load_source_images(
            data_cfg.source, data_cfg.source_options, data_cfg.image_size, data_cfg.max_images, progress=True
        )
        train_images, eval_images = split_images(images, data_cfg.num_eval_images, data_cfg.split_seed)
    except (KeyError, ValueError) as error:  # unknown source, bad reader options, too few images to hold out
        raise ConfigError(f"data: {error}") from None
    train_dataloader = DataLoader(
        train_images,
        batch_size=_per_rank(data_cfg.train_batch_size, "data.train_batch_size"),
        sampler=dist.get_sampler(train_images, shuffle=True, drop_last=True),
        num_workers=data_cfg.num_workers,
        drop_last=True,
    )
    eval_dataloader = DataLoader(
        eval_images,
        batch_size=_per_rank(data_cfg.eval_batch_size, "data.eval_batch_size"),
        sampler=dist.get_sampler(eval_images, shuffle=False),
        num_workers=data_cfg.num_workers,
    )

    callbacks: list[Callback] = [ExportAutoencoder(model_cfg.export_folder)]
    if loss_config.discriminator is not None:
        callbacks.append(SyncTrainingStep())
    if model_cfg.grid_images:
        grid_images = next(eval_images.batches(model_cfg.grid_images))
        grid_folder = Path(run.trainer.save_folder) / "reconstructions"
        callbacks.append(ReconstructionGrid(grid_images, grid_folder, model_cfg.grid_interval))
    return TaskComponents(model, train_dataloader, eval_dataloader, callbacks)
