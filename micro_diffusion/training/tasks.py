"""Task registry: what `train.py` trains, chosen by the config's `task` key.

A task builder takes the validated `RunConfig` and returns `TaskComponents` (`training.task_components`): the
Composer model, the train and evaluation dataloaders and any callbacks that only make sense for that task. It owns
the `model` and `data` sections and must reject keys it does not use (see
`micro_diffusion.training.config.validate_section` and `call_with`). Everything generic (optimiser, schedule,
algorithms, loggers, callbacks, Trainer) is built by `train.py` from the other sections.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any

from omegaconf import MISSING
from streaming import StreamingDataset

from micro_diffusion.config_checks import NON_NEGATIVE, POSITIVE, PROBABILITY, ConfigError, check_arguments
from micro_diffusion.data.loader import build_streaming_latents_dataloader
from micro_diffusion.encoders.text import text_encoder_format
from micro_diffusion.models.model import LatentDiffusion, UNetNetwork, create_latent_diffusion
from micro_diffusion.training.autoencoder_task import build_autoencoder_task
from micro_diffusion.training.config import RunConfig, validate_section
from micro_diffusion.training.task_components import TaskBuilder, TaskComponents

# ----------------------------------------------------------------------------------------------------------------
# Latent diffusion
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class LatentDataConfig:
    """The `data` section of the diffusion task: latent MDS streams (see `micro_diffusion.data.loader`).

    datadir: folder that relative stream paths are relative to.
    train_streams, eval_streams: local folders, or mappings of Streaming `Stream` arguments (remote, local,
        proportion, repeat, choose, ...); eval_streams null for no evaluation.
    image_size: pixel size whose latents to read (column `latents_<image_size>`); it must be the model's
        latent_res times the autoencoder's downsampling factor.
    train_batch_size, eval_batch_size: global batch sizes, split across processes.
    cap_drop_prob: probability of replacing the condition by the null one in training (classifier-free
        guidance); evaluation never drops and reads its streams in order.
    caption_shape: (L, C) of the shards' caption latents when the model has no text encoder (class labels);
        null to take it from the model's text encoder.
    num_workers, prefetch_factor, persistent_workers, pin_memory: PyTorch DataLoader options; the
        prefetch factor and persistent workers need num_workers > 0, pinned memory needs a GPU.
    streaming: further `StreamingDataset` options (cache_limit, predownload, num_canonical_nodes, ...).
    """

    datadir: str = "."
    train_streams: list[Any] = MISSING
    eval_streams: list[Any] | None = None
    image_size: Annotated[int, POSITIVE] = MISSING
    train_batch_size: Annotated[int, POSITIVE] = MISSING
    eval_batch_size: Annotated[int | None, POSITIVE] = None
    cap_drop_prob: Annotated[float, PROBABILITY] = 0.0
    caption_shape: Annotated[list[int] | None, POSITIVE] = None
    num_workers: Annotated[int, NON_NEGATIVE] = 0
    prefetch_factor: Annotated[int | None, POSITIVE] = None
    persistent_workers: bool = False
    pin_memory: bool = False
    streaming: dict[str, Any] = field(default_factory=dict)


_STREAMING_SET_BY_LOADER = ("streams", "batch_size", "shuffle", "shuffle_seed")
# `model` keys that configure the MicroDiT, so have no effect when model.unet_preset selects the EDM2 U-Net.
_DIT_ONLY_MODEL_KEYS = ("dit_arch", "dit_kwargs", "pos_interp_scale", "label_embedding_dim", "train_mask_ratio",
                        "train_route_ratio")


@dataclass(frozen=True)
class DiffusionSpec:
    """The diffusion task's validated settings: everything needed to build it, nothing built yet.

    shard_format: the latent and caption shapes the loader expects, derived from the model arguments so that
    model and data always agree.
    """

    model_arguments: dict[str, Any]
    data: LatentDataConfig
    shard_format: dict[str, int]


def diffusion_spec(run: RunConfig) -> DiffusionSpec:
    """Validate the `model` (arguments of `create_latent_diffusion`) and `data` sections without loading
    anything, so a bad key fails before a large model or dataset is touched."""
    check_arguments(create_latent_diffusion, run.model, "model")
    if run.model.get("unet_preset") is not None:
        unused = [key for key in _DIT_ONLY_MODEL_KEYS if key in run.model]
        if unused:
            raise ConfigError(f"model.{unused[0]}: configures the MicroDiT, which model.unet_preset replaces")
    if _model_argument(run.model, "train_route_ratio") and "route_span" not in (run.model.get("dit_kwargs") or {}):
        raise ConfigError("model.train_route_ratio: routes tokens around the backbone blocks of "
                          "model.dit_kwargs.route_span ([start, end]), which is not set")
    data = validate_section(LatentDataConfig, run.data, "data")
    if not data.train_streams:
        raise ConfigError("data.train_streams: no training data given")
    if (data.eval_streams is None) != (data.eval_batch_size is None):
        raise ConfigError("data.eval_streams and data.eval_batch_size: set both (evaluation) or neither")
    if data.num_workers == 0 and (data.prefetch_factor is not None or data.persistent_workers):
        raise ConfigError("data.prefetch_factor and data.persistent_workers need data.num_workers > 0")
    if data.pin_memory and run.trainer.device != "gpu":
        raise ConfigError(f"data.pin_memory needs trainer.device gpu, not {run.trainer.device}")
    _check_streaming_options(data.streaming)
    return DiffusionSpec(dict(run.model), data, _shard_format(run.model, data))


def build_diffusion_task(run: RunConfig) -> TaskComponents:
    """LatentDiffusion from `model` and latent streams from `data` (see `diffusion_spec`)."""
    spec = diffusion_spec(run)
    data = spec.data
    model = create_latent_diffusion(**spec.model_arguments)
    _mark_checkpointable_blocks(model)
    loader_options = dict(
        image_size=data.image_size, num_workers=data.num_workers, prefetch_factor=data.prefetch_factor,
        persistent_workers=data.persistent_workers, pin_memory=data.pin_memory, shuffle_seed=run.seed,
        **spec.shard_format, **data.streaming,
    )
    train_dataloader = build_streaming_latents_dataloader(
        _under(data.datadir, data.train_streams), data.train_batch_size, cap_drop_prob=data.cap_drop_prob,
        shuffle=True, drop_last=True, **loader_options,
    )
    eval_dataloader = None
    if data.eval_streams is not None:
        eval_dataloader = build_streaming_latents_dataloader(
            _under(data.datadir, data.eval_streams), data.eval_batch_size, cap_drop_prob=0.0, shuffle=False,
            drop_last=False, **loader_options,
        )
    return TaskComponents(model, train_dataloader, eval_dataloader)


def _under(datadir: str, streams: list[Any]) -> list[Any]:
    """Streams with relative local paths (plain strings) taken relative to `datadir`."""
    return [os.path.join(datadir, stream) if isinstance(stream, str) else stream for stream in streams]


def _check_streaming_options(options: Mapping[str, Any]) -> None:
    clash = sorted(set(options) & set(_STREAMING_SET_BY_LOADER))
    if clash:
        raise ConfigError(f"data.streaming.{clash[0]}: set by the training script, not configurable")
    check_arguments(StreamingDataset.__init__, options, "data.streaming")


def _model_argument(model_arguments: Mapping[str, Any], name: str) -> Any:
    """A `create_latent_diffusion` argument as configured, or its default."""
    if name in model_arguments:
        return model_arguments[name]
    return inspect.signature(create_latent_diffusion).parameters[name].default


def _shard_format(model_arguments: Mapping[str, Any], data: LatentDataConfig) -> dict[str, int]:
    latent_res = _model_argument(model_arguments, "latent_res")
    if data.image_size % latent_res:
        raise ConfigError(f"data.image_size {data.image_size} is not a multiple of model.latent_res {latent_res}")
    text_encoder_name = _model_argument(model_arguments, "text_encoder_name")
    if text_encoder_name is None:
        if data.caption_shape is None or len(data.caption_shape) != 2:
            raise ConfigError(
                "data.caption_shape: [length, channels] of the shards' caption latents is required when the "
                "model has no text encoder"
            )
        caption_length, caption_channels = data.caption_shape
    else:
        if data.caption_shape is not None:
            raise ConfigError("data.caption_shape: comes from model.text_encoder_name here; leave it null")
        caption_length, caption_channels = text_encoder_format(text_encoder_name)
    return dict(
        latent_channels=_model_argument(model_arguments, "in_channels"),
        latent_downsample=data.image_size // latent_res,
        caption_length=caption_length, caption_channels=caption_channels,
    )


def _mark_checkpointable_blocks(model: LatentDiffusion) -> None:
    """Transformer blocks (U-Net blocks) are the units of FSDP wrapping and of activation checkpointing.

    Each checkpointed block must be its own FSDP unit: with one unit for the whole network, the recomputation in
    the backward pass reads bf16 parameter copies that FSDP has already freed (seen on an H100, issue 6).
    """
    network = model.dit
    if isinstance(network, UNetNetwork):
        blocks = [*network.unet.encoder.values(), *network.unet.decoder.values()]
    else:
        blocks = [*network.patch_mixer, *network.blocks]
    for block in blocks:
        block._activation_checkpointing = True
        block._fsdp_wrap = True


# ----------------------------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------------------------


TASKS: dict[str, TaskBuilder] = {
    "diffusion": build_diffusion_task,
    "autoencoder": build_autoencoder_task,
}
# Validation of a task's sections that loads nothing, run before any task is built (tasks without one
# validate their sections first thing in their builder).
TASK_CHECKS: dict[str, Callable[[RunConfig], object]] = {"diffusion": diffusion_spec}
