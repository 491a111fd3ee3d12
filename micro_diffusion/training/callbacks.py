"""Composer callbacks for latent diffusion training: EMA weights, image grids, a NaN/Inf guard, throughput and MFU.

Each callback has one concern and is configured by its arguments. They find each other through `state.callbacks`,
never through globals: `ImageGridLogger` samples with the EMA weights whenever an `EMA` callback is present.

There is no validation-loss callback: `LatentDiffusion.eval_forward` already computes the loss on held-out latents at
fixed noise levels with fixed noise, and Composer logs it as `metrics/eval/ValidationLoss` for every evaluator. With
an `EMA` callback present, that is the EMA model's validation loss.

Points and intervals in training time are counted in batches: an int, or a Composer time string such as "2500ba".
"""

from __future__ import annotations

import collections
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path

import torch
from composer.core import Callback, State, Time, TimeUnit
from composer.loggers import Logger
from composer.utils import dist, format_name_with_dist, model_eval_mode
from torch import Tensor, nn
from torch.distributed.fsdp import FullyShardedDataParallel
from torch.nn.parallel import DistributedDataParallel
from torchvision.utils import make_grid, save_image

from micro_diffusion.compat import gpu_peak_flops
from micro_diffusion.data import schema
from micro_diffusion.models.dit import num_kept_tokens

__all__ = ["EMA", "ImageGridLogger", "NaNGuard", "ThroughputMonitor", "ema_weights_applied"]

# Segments that FSDP, activation checkpointing and torch.compile insert into parameter names. Without them the
# names are those of the plain model, which are also the keys of Composer's model state dict.
_WRAPPER_NAME_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def unwrap_composer_model(model: nn.Module) -> nn.Module:
    """The ComposerModel itself: Composer wraps it in DDP, while FSDP only wraps its children."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def _plain_name(name: str) -> str:
    for segment in _WRAPPER_NAME_SEGMENTS:
        name = name.replace(segment, "")
    return name


@contextmanager
def _full_trainable_parameters(model: nn.Module, writeback: bool) -> Iterator[dict[str, nn.Parameter]]:
    """The model's trainable parameters by plain name, unsharded while the context lasts, under no_grad.

    FSDP units anywhere in the model are gathered to full tensors on every rank (a collective: call it on all
    ranks at once); with `writeback`, in-place changes go back into each rank's shard. Without FSDP this is
    simply `named_parameters()`.
    """
    with FullyShardedDataParallel.summon_full_params(model, writeback=writeback), torch.no_grad():
        yield {_plain_name(name): param for name, param in model.named_parameters() if param.requires_grad}


def _batches(time: str | int, argument: str) -> int:
    """A duration in batches, given as an int or a time string such as "1000ba"."""
    parsed = Time.from_input(time, TimeUnit.BATCH)
    if parsed.unit != TimeUnit.BATCH or parsed.value < 0:
        raise ValueError(f"{argument} must be a non-negative number of batches such as '1000ba', got {time!r}")
    return int(parsed.value)


# ----------------------------------------------------------------------------------------------------------------
# EMA
# ----------------------------------------------------------------------------------------------------------------


class EMA(Callback):
    """Exponential moving average of the trained weights, used for evaluation, image grids and export.

    After every `update_interval` optimizer steps the average moves towards the current weights,
    `ema <- smoothing * ema + (1 - smoothing) * weights`. It covers every trainable parameter of the model: the
    DiT, plus the label embedder of a class-conditional model (frozen encoders are not trained, so not averaged;
    the DiT's buffers are constants). Before `ema_start` nothing is averaged and the raw weights are used; at
    `ema_start` the average restarts from the weights of that step (with `ema_start` 0 it starts from the initial
    weights).

    Evaluation runs with the EMA weights (swapped in at `Event.EVAL_START`, swapped back at `Event.EVAL_END`, so
    training continues from the raw weights); `ImageGridLogger` samples with them; `applied(state)` swaps them in
    for any other code. The average is saved in checkpoints (`state_dict`, with the batch it starts at) and restored
    on resume; `micro_diffusion.models.checkpoints.checkpoint_ema_state` reads it from a checkpoint (Composer keys
    a callback's state by its class name, `checkpoints.EMA_CALLBACK`), for `micro-diffusion export` and `generate`.

    Distributed training: every rank keeps the full average, in the parameters' dtype and on their device. Under
    DDP the ranks' weights are identical, so are their averages. Under FSDP the update and the swap gather the
    full parameters (`summon_full_params`); the average stays identical across ranks, so writing it back gives
    each rank its own shard of it. This costs one all-gather of the trained weights per update and a full copy of
    them per rank, which SHARD_GRAD_OP at MicroDiT sizes affords; raise `update_interval` to update less often.

    Args:
        smoothing: weight of the old average at each update, in [0, 1) (the original configs: 0.99975 from
            batch 25000 in the 512-px pretraining, 0.9975 from batch 1000 in the 512-px finetuning). Give this
            or `half_life`.
        half_life: batches after which a weight's contribution to the average has halved ("1000ba"); sets
            smoothing = 0.5 ** (update_interval / half_life).
        ema_start: batch at which averaging starts; a multiple of `update_interval`.
        update_interval: batches between updates.

    The argument names are those of `composer.algorithms.EMA` (and of the original's YAML). That algorithm is not
    used: its FSDP path calls `model.module.summon_full_params`, and a ComposerModel whose children FSDP wraps
    (Composer's own layout, and ours) has no `module`; it averages and swaps every buffer of the model, the frozen
    encoders' included; and it swaps its average into the model at every checkpoint, so whether a checkpoint's
    model weights are the raw or the averaged ones depends on whether the EMA had started.
    """

    def __init__(
        self,
        smoothing: float | None = None,
        half_life: str | int | None = None,
        ema_start: str | int = 0,
        update_interval: str | int = 1,
    ) -> None:
        self.update_interval = _batches(update_interval, "update_interval")
        if self.update_interval == 0:
            raise ValueError("update_interval must be at least one batch")
        self.start_batch = _batches(ema_start, "ema_start")
        if self.start_batch % self.update_interval:
            raise ValueError(
                f"ema_start ({self.start_batch} batches) must be a multiple of update_interval ({self.update_interval})"
            )
        if (smoothing is None) == (half_life is None):
            raise ValueError("give exactly one of smoothing and half_life")
        if half_life is not None:
            half_life_batches = _batches(half_life, "half_life")
            if half_life_batches == 0:
                raise ValueError("half_life must be at least one batch")
            smoothing = 0.5 ** (self.update_interval / half_life_batches)
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
        self.smoothing = float(smoothing)
        self.weights: dict[str, Tensor] | None = None  # the average, by parameter name; None until fit start
        self._swapped_in = False  # whether the model currently holds the average (and `weights` the raw weights)

    def is_active(self, state: State) -> bool:
        """Whether the EMA weights are the ones to evaluate and sample with (from `ema_start` on)."""
        return self.weights is not None and int(state.timestamp.batch) >= self.start_batch

    @contextmanager
    def applied(self, state: State) -> Iterator[None]:
        """Run the enclosed code with the EMA weights in the model when it is active (a collective under FSDP)."""
        swap = self.is_active(state) and not self._swapped_in
        if swap:
            self._swap(state)
        try:
            yield
        finally:
            if swap:
                self._swap(state)

    def fit_start(self, state: State, logger: Logger) -> None:
        with _full_trainable_parameters(unwrap_composer_model(state.model), writeback=False) as params:
            if self.weights is None:
                self.weights = {name: param.detach().clone() for name, param in params.items()}
            else:  # restored from a checkpoint
                self._check_matches(params)
                self.weights = {name: self.weights[name].to(param) for name, param in params.items()}

    def batch_end(self, state: State, logger: Logger) -> None:
        batch = int(state.timestamp.batch)
        if batch < self.start_batch or batch % self.update_interval:
            return
        assert self.weights is not None, "EMA weights are created at Event.FIT_START"
        with _full_trainable_parameters(unwrap_composer_model(state.model), writeback=False) as params:
            averages = [self.weights[name] for name in params]
            current = [param.detach() for param in params.values()]
            if batch == self.start_batch:
                torch._foreach_copy_(averages, current)
            else:
                torch._foreach_lerp_(averages, current, 1.0 - self.smoothing)

    def eval_start(self, state: State, logger: Logger) -> None:
        if self.is_active(state) and not self._swapped_in:
            self._swap(state)

    def eval_end(self, state: State, logger: Logger) -> None:
        if self._swapped_in:
            self._swap(state)

    def state_dict(self) -> dict[str, dict[str, Tensor] | int | None]:
        if self._swapped_in:
            raise RuntimeError("EMA state requested while the EMA weights are swapped into the model")
        return {"weights": self.weights, "start_batch": self.start_batch}

    def load_state_dict(self, state: dict[str, dict[str, Tensor] | int | None]) -> None:
        self.weights = state["weights"]

    def _swap(self, state: State) -> None:
        """Exchange the model's trainable parameters with the stored ones."""
        assert self.weights is not None
        with _full_trainable_parameters(unwrap_composer_model(state.model), writeback=True) as params:
            for name, param in params.items():
                stored = self.weights[name]
                current = param.detach().clone()
                param.copy_(stored)
                stored.copy_(current)
        self._swapped_in = not self._swapped_in

    def _check_matches(self, params: dict[str, nn.Parameter]) -> None:
        assert self.weights is not None
        missing = sorted(params.keys() - self.weights.keys())
        unexpected = sorted(self.weights.keys() - params.keys())
        common = params.keys() & self.weights.keys()
        reshaped = sorted(name for name in common if params[name].shape != self.weights[name].shape)
        if missing or unexpected or reshaped:
            raise ValueError(
                "the EMA weights restored from the checkpoint do not match the model's trainable parameters: "
                f"missing {missing[:8]}, unexpected {unexpected[:8]}, other shapes {reshaped[:8]}. "
                "To start a new average from the loaded weights, load the checkpoint with load_weights_only=True."
            )


def ema_weights_applied(state: State) -> AbstractContextManager:
    """Run the enclosed code with the weights evaluation uses: the average of the run's `EMA` callback while it is
    active, else the raw weights. It does not depend on where the callback sits in the list: Composer runs the
    callbacks of an event in list order, so at `Event.EVAL_END` an `EMA` listed first has already swapped the raw
    weights back. A collective under FSDP: enter it on every rank."""
    ema = next((callback for callback in state.callbacks if isinstance(callback, EMA)), None)
    return ema.applied(state) if ema is not None else nullcontext()


# ----------------------------------------------------------------------------------------------------------------
# Image grid
# ----------------------------------------------------------------------------------------------------------------


class ImageGridLogger(Callback):
    """Samples a grid of images for fixed prompts (or class labels) and seeds, periodically and at the end of training.

    The grid goes to every configured logger (`logger.log_images`, name "image_grid") and, when `save_folder` is
    set, to `<save_folder>/grid_ba<batch>.png` (8-digit batch, so the files sort in training order). Image i is
    generated from seed `seed + i`, so successive grids differ only through the weights. Sampling uses the EMA
    weights when an `EMA` callback is present and active, leaves the training RNG streams untouched and runs on
    every rank (FSDP needs all ranks in each forward); rank 0 writes the file.

    Args:
        prompts: captions, for text-to-image models. Give this or `class_labels`.
        class_labels: class ids, for class-conditional models.
        interval: batches between grids ("2500ba"); a grid is also made when training ends.
        seed: seed of the first image.
        guidance_scale: classifier-free guidance scale (1 disables guidance).
        num_inference_steps: sampler steps.
        num_columns: images per grid row (default: a square-ish grid).
        save_folder: folder of the PNG files, formatted with `{run_name}` and the rank variables; None writes no
            file.
    """

    log_name = "image_grid"

    def __init__(
        self,
        prompts: Sequence[str] | None = None,
        class_labels: Sequence[int] | None = None,
        interval: str | int = "2500ba",
        seed: int = 0,
        guidance_scale: float = 5.0,
        num_inference_steps: int = 30,
        num_columns: int | None = None,
        save_folder: str | None = "{run_name}/images",
    ) -> None:
        if (prompts is None) == (class_labels is None):
            raise ValueError("give exactly one of prompts (text-to-image) and class_labels (class-conditional)")
        if prompts is not None:
            self.condition = {"prompt": [str(prompt) for prompt in prompts]}
        else:
            self.condition = {"class_labels": [int(label) for label in class_labels]}
        num_images = len(next(iter(self.condition.values())))
        if num_images == 0:
            raise ValueError("ImageGridLogger needs at least one prompt or class label")
        self.seeds = [seed + i for i in range(num_images)]
        self.guidance_scale = guidance_scale
        self.num_inference_steps = num_inference_steps
        self.num_columns = num_columns or math.ceil(math.sqrt(num_images))
        self.save_folder = save_folder
        self.interval = _batches(interval, "interval")
        if self.interval == 0:
            raise ValueError("interval must be at least one batch")
        self._last_grid_batch: int | None = None

    def batch_end(self, state: State, logger: Logger) -> None:
        if int(state.timestamp.batch) % self.interval == 0:
            self.log_grid(state, logger)

    def fit_end(self, state: State, logger: Logger) -> None:
        if int(state.timestamp.batch) != self._last_grid_batch:
            self.log_grid(state, logger)

    def log_grid(self, state: State, logger: Logger) -> Tensor:
        """Generate, save and log the grid now; returns it as (3, H, W) floats in [0, 1]."""
        model = unwrap_composer_model(state.model)
        device = next(model.parameters()).device
        with (
            ema_weights_applied(state),
            model_eval_mode(model),
            torch.random.fork_rng(devices=[device] if device.type == "cuda" else []),
        ):
            images = model.generate(
                **self.condition, seeds=self.seeds, guidance_scale=self.guidance_scale,
                num_inference_steps=self.num_inference_steps,
            )
        grid = make_grid(images.float().cpu(), nrow=self.num_columns)
        batch = int(state.timestamp.batch)
        if self.save_folder is not None and dist.get_global_rank() == 0:
            folder = Path(format_name_with_dist(self.save_folder, state.run_name))
            folder.mkdir(parents=True, exist_ok=True)
            save_image(grid, folder / f"grid_ba{batch:08d}.png")
        logger.log_images(grid, name=self.log_name, step=batch)
        self._last_grid_batch = batch
        return grid


# ----------------------------------------------------------------------------------------------------------------
# NaN / Inf guard
# ----------------------------------------------------------------------------------------------------------------


def _loss_terms(loss: Tensor | Mapping[str, Tensor] | Sequence[Tensor]) -> dict[str, Tensor]:
    if isinstance(loss, Tensor):
        return {"loss": loss}
    if isinstance(loss, Mapping):
        return dict(loss)
    if isinstance(loss, Sequence):
        return {f"loss[{i}]": term for i, term in enumerate(loss)}
    raise TypeError(f"the loss must be a tensor, a dict or a sequence of tensors, got {type(loss).__name__}")


def _describe(value: Tensor) -> str:
    value = value.detach().float()
    if value.numel() == 1:
        return f"{value.item():.6g}"
    return f"{int((~value.isfinite()).sum())} of {value.numel()} values not finite"


class NaNGuard(Callback):
    """Stops training with an error naming the batch and every loss term as soon as the loss is NaN or infinite.

    The check runs after each (micro)batch's loss and before its backward pass, so a non-finite loss never reaches
    the gradients, the weights or a checkpoint. It reads the loss on the host once per microbatch. Each rank checks
    its own loss; the launcher then stops the other ranks.
    """

    def after_loss(self, state: State, logger: Logger) -> None:
        terms = _loss_terms(state.loss)
        finite = torch.stack([term.detach().isfinite().all() for term in terms.values()]).all()
        if bool(finite):
            return
        described = ", ".join(f"{name}={_describe(value)}" for name, value in terms.items())
        raise RuntimeError(
            f"non-finite training loss at batch {int(state.timestamp.batch)} (epoch {int(state.timestamp.epoch)}, "
            f"rank {dist.get_global_rank()}): {described}"
        )


# ----------------------------------------------------------------------------------------------------------------
# Throughput and MFU
# ----------------------------------------------------------------------------------------------------------------


def _condition_length(model: nn.Module, batch: dict) -> int:
    """Tokens the DiT cross-attends to per image: one for a class label, else the caption states' length L."""
    if model.label_embedder is not None:
        return 1
    if schema.BATCH_CAPTION_LATENTS in batch:
        return batch[schema.BATCH_CAPTION_LATENTS].shape[-2]
    return model.text_encoder.max_length


class ThroughputMonitor(Callback):
    """Logs training throughput in images and backbone tokens per second, achieved FLOP/s and MFU.

    Every `log_interval` batches, over the last `window_size` batches (Composer's training wall-clock time, which
    excludes evaluation; time spent in other callbacks, e.g. sampling an image grid, counts):

    - `throughput/images_per_sec` (all ranks) and `throughput/device/images_per_sec` (divided by the world size);
    - `throughput/tokens_per_sec` and `throughput/device/tokens_per_sec`: image tokens through the backbone, i.e.
      the tokens kept after patch masking, `num_kept_tokens(dit.num_tokens, train_mask_ratio)` per image: the
      tokens the loss sees. Token routing does not change it (routed tokens skip some blocks, not the backbone);
    - `throughput/flops_per_sec` and `throughput/device/flops_per_sec`: images/s times the analytic FLOPs of one
      training step per image, `dit.training_flops(train_mask_ratio, caption_length, train_route_ratio)` (frozen
      encoders excluded; routed tokens count only in the blocks they go through);
    - `throughput/device/mfu`: device FLOP/s over the peak FLOP/s of one device, when that peak is known.

    Tokens, FLOP/s and MFU need the MicroDiT's analytic FLOP counter; for a network without one (the EDM2 U-Net)
    only images/s are logged.

    Args:
        window_size: batches averaged over.
        log_interval: batches between logs.
        peak_flops_per_device: dense peak FLOP/s of one device at the training precision, e.g. 989e12 for an H100
            SXM in bf16. None: Composer's table for the current GPU and precision; no MFU where the peak is unknown
            (on CPU, for example).
    """

    def __init__(
        self, window_size: int = 10, log_interval: int = 10, peak_flops_per_device: float | None = None
    ) -> None:
        if window_size < 1 or log_interval < 1:
            raise ValueError(f"window_size and log_interval must be >= 1, got {window_size} and {log_interval}")
        if peak_flops_per_device is not None and peak_flops_per_device <= 0:
            raise ValueError(f"peak_flops_per_device must be positive, got {peak_flops_per_device}")
        self.window_size = window_size
        self.log_interval = log_interval
        self.peak_flops_per_device = peak_flops_per_device
        self._peak_flops: float | None = None  # resolved at fit start
        self._flops_per_image: int | None = None  # computed at the first log: depends on the caption length
        self._history: collections.deque[tuple[float, int]] = collections.deque(maxlen=window_size + 1)

    def fit_start(self, state: State, logger: Logger) -> None:
        self._peak_flops = self.peak_flops_per_device or gpu_peak_flops(state) or None
        self._flops_per_image = None
        self._history.clear()

    def batch_end(self, state: State, logger: Logger) -> None:
        self._history.append((state.timestamp.total_wct.total_seconds(), int(state.timestamp.sample)))
        if int(state.timestamp.batch) % self.log_interval or len(self._history) <= self.window_size:
            return
        (start_seconds, start_images), (end_seconds, end_images) = self._history[0], self._history[-1]
        images_per_sec = (end_images - start_images) / (end_seconds - start_seconds)
        world_size = dist.get_world_size()
        metrics = {
            "throughput/images_per_sec": images_per_sec,
            "throughput/device/images_per_sec": images_per_sec / world_size,
        }
        model = unwrap_composer_model(state.model)
        if hasattr(model.dit, "training_flops"):  # MicroDiT; the EDM2 U-Net has no analytic counter
            metrics.update(self._token_and_flop_metrics(model, state, images_per_sec, world_size))
        logger.log_metrics(metrics)

    def _token_and_flop_metrics(self, model: nn.Module, state: State, images_per_sec: float, world_size: int) -> dict:
        if self._flops_per_image is None:
            # The FLOP counter reads weight shapes, which FSDP flattens and shards outside summon_full_params.
            with FullyShardedDataParallel.summon_full_params(model.dit, writeback=False):
                self._flops_per_image = model.dit.training_flops(
                    model.train_mask_ratio, _condition_length(model, state.batch), model.train_route_ratio
                )
        tokens_per_image = num_kept_tokens(model.dit.num_tokens, model.train_mask_ratio)
        flops_per_sec = images_per_sec * self._flops_per_image
        metrics = {
            "throughput/tokens_per_sec": images_per_sec * tokens_per_image,
            "throughput/device/tokens_per_sec": images_per_sec * tokens_per_image / world_size,
            "throughput/flops_per_sec": flops_per_sec,
            "throughput/device/flops_per_sec": flops_per_sec / world_size,
        }
        if self._peak_flops is not None:
            metrics["throughput/device/mfu"] = flops_per_sec / world_size / self._peak_flops
        return metrics
