"""PowerEMA: track power-function EMAs of the trained network and save snapshots for post-hoc reconstruction.

EDM2 practice: two averages (sigma_rel 0.05 and 0.10) updated after every optimiser step with
beta = (1 - batch / t)^(gamma + 1), t the number of training images seen, and both saved every N images. Any
other EMA length at any snapshot time is then reconstructed after training with `micro-diffusion posthoc-ema`.

The averages live in float32 on every rank (with DDP all ranks hold the same weights, so they stay identical)
and are part of the callback's state dict, so a run resumed from a Composer checkpoint continues them exactly.
Only global rank 0 writes snapshots. FSDP is not supported: the averages are of the parameters each rank holds;
the config check (`training.config.consistency_errors`) refuses the combination before anything loads.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from operator import attrgetter
from pathlib import Path
from typing import Any

from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist
from torch import nn

from micro_diffusion.diffusion.power_ema import PowerFunctionEMA, save_snapshot
from micro_diffusion.dtypes import DTYPES
from micro_diffusion.models.checkpoints import trained_modules
from micro_diffusion.training.callbacks import unwrap_composer_model

log = logging.getLogger(__name__)


def _averaged_modules(model: nn.Module, network: nn.Module) -> nn.Module:
    """What the EMAs average: a LatentDiffusion's trained modules (`models.checkpoints.trained_modules`: its network,
    and a class-conditional MicroDiT's label embedding with it, since sampling needs both), or any other network
    as it is."""
    return trained_modules(model) if network is getattr(model, "dit", None) else network


class PowerEMA(Callback):
    """Power-function EMAs of `model.<network_attribute>`, saved every `snapshot_interval_images` images.

    Args:
        snapshot_interval_images: save a snapshot of every average whenever the image count crosses a multiple of
            this (at the batch that crosses it, so the snapshot time is that batch's image count); the last
            batch of a fit is always saved too.
        sigma_rels: relative lengths of the tracked averages.
        folder: where snapshots go; '{run_name}' is replaced by the run's name.
        network_attribute: dotted attribute path of the averaged network on the ComposerModel; with "dit" on a
            class-conditional MicroDiT its learned label embedding is averaged too (keys "dit.*" and
            "label_embedder.weight").
        snapshot_dtype: 'float32', 'float16' or 'bfloat16' for the stored parameters (buffers keep their dtype).

    Snapshots are named phema-<images>-<sigma_rel>.safetensors (see micro_diffusion.diffusion.power_ema).
    """

    def __init__(
        self,
        snapshot_interval_images: int,
        sigma_rels: Sequence[float] = (0.05, 0.10),
        folder: str = "{run_name}/phema",
        network_attribute: str = "dit",
        snapshot_dtype: str = "float32",
    ) -> None:
        if snapshot_interval_images < 1:
            raise ValueError(f"snapshot_interval_images must be >= 1, got {snapshot_interval_images}")
        if snapshot_dtype not in DTYPES:
            raise ValueError(f"snapshot_dtype must be one of {sorted(DTYPES)}, got {snapshot_dtype!r}")
        self.snapshot_interval_images = snapshot_interval_images
        self.sigma_rels = tuple(sigma_rels)
        self.folder = folder
        self.network_attribute = network_attribute
        self.snapshot_dtype = DTYPES[snapshot_dtype]
        self.ema: PowerFunctionEMA | None = None
        self.last_snapshot_images = 0
        self._loaded_state: dict[str, Any] | None = None

    def fit_start(self, state: State, logger: Logger) -> None:
        if state.fsdp_enabled:
            raise ValueError("PowerEMA does not support FSDP-sharded models; train with DDP or a single device")
        t_images = state.timestamp.sample.value
        if self.ema is None:
            model = unwrap_composer_model(state.model)
            network = attrgetter(self.network_attribute)(model)
            if not isinstance(network, nn.Module):
                raise TypeError(f"model.{self.network_attribute} is a {type(network).__name__}, not an nn.Module")
            self.ema = PowerFunctionEMA(_averaged_modules(model, network), self.sigma_rels, t_images)
            if self._loaded_state is not None:
                self.ema.load_state_dict(self._loaded_state["ema"])
                self.last_snapshot_images = self._loaded_state["last_snapshot_images"]
                self._loaded_state = None
        if self.ema.t_images != t_images:
            raise ValueError(
                f"the power EMAs were last updated at {self.ema.t_images} images but the trainer is at {t_images}; "
                "resume from the checkpoint that saved them"
            )

    def batch_end(self, state: State, logger: Logger) -> None:
        assert self.ema is not None, "fit_start runs first"
        t_images = state.timestamp.sample.value
        self.ema.update(t_images)
        if t_images // self.snapshot_interval_images > self.last_snapshot_images // self.snapshot_interval_images:
            self._save_snapshots(state)

    def fit_end(self, state: State, logger: Logger) -> None:
        assert self.ema is not None, "fit_start runs first"
        if self.ema.t_images > self.last_snapshot_images:
            self._save_snapshots(state)

    def _save_snapshots(self, state: State) -> None:
        assert self.ema is not None
        t_images = self.ema.t_images
        if dist.get_global_rank() == 0:
            folder = Path(self.folder.format(run_name=state.run_name))
            buffers = self.ema.buffer_names()
            for index, sigma_rel in enumerate(self.ema.sigma_rels):
                averaged = self.ema.averaged_state_dict(index)
                path = save_snapshot(folder, averaged, t_images, sigma_rel, buffers, self.snapshot_dtype)
                log.info("power EMA snapshot: %s", path)
        self.last_snapshot_images = t_images

    def state_dict(self) -> dict[str, Any]:
        if self.ema is None:  # saved before fit_start: pass on what was loaded, if anything
            return self._loaded_state or {}
        return {"ema": self.ema.state_dict(), "last_snapshot_images": self.last_snapshot_images}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        if self.ema is None:  # Composer loads checkpoints before fit_start builds the averages
            self._loaded_state = state
            return
        self.ema.load_state_dict(state["ema"])
        self.last_snapshot_images = state["last_snapshot_images"]
