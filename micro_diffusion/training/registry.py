"""The callbacks and loggers a config can name, and how a config entry becomes a class and its arguments.

An entry of the `callbacks` or `logger` section is `name: {arguments}` (null disables it). The name is a key of
the registry, or the entry carries `_target_: package.module.Class`, a class that can be imported and is a
Composer Callback (for `callbacks`) or LoggerDestination (for `logger`); the entry's name is then free.

    callbacks:
      memory_monitor: {}                      # any public callback of composer.callbacks, in snake case
      ema: {smoothing: 0.9999}                # ours (micro_diffusion.training)
      grads:
        _target_: my_package.GradientHistogram
        interval: 100ba
    logger:
      wandb: {project: microdit}              # W&B, MLflow, Comet, Neptune, TensorBoard, file, ...

The arguments are checked against the class signature (`check_arguments`) before anything is built.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import composer.callbacks
from composer.core import Callback
from composer.loggers import (
    CometMLLogger,
    LoggerDestination,
    MLFlowLogger,
    MosaicMLLogger,
    NeptuneLogger,
    RemoteUploaderDownloader,
    SlackLogger,
    TensorboardLogger,
)

from micro_diffusion.config_checks import ConfigError
from micro_diffusion.training.callbacks import EMA, ImageGridLogger, NaNGuard, ThroughputMonitor
from micro_diffusion.training.config import pick
from micro_diffusion.training.loggers import ResumableFileLogger, WandBLogger
from micro_diffusion.training.power_ema_callback import PowerEMA
from micro_diffusion.training.sample_quality import SampleQuality

__all__ = ["CALLBACKS", "LOGGERS", "Registry", "configured_entries", "snake_case"]

TARGET_KEY = "_target_"


@dataclass(frozen=True)
class Registry:
    """Named classes of one kind (`base`) a config section can use; `requires` maps a name whose class needs an
    optional package to (its module, how to install it)."""

    names: Mapping[str, type]
    base: type
    requires: Mapping[str, tuple[str, str]] = field(default_factory=dict)


def snake_case(class_name: str) -> str:
    """"MemoryMonitor" -> "memory_monitor", "LRMonitor" -> "lr_monitor", "NaNMonitor" -> "nan_monitor"; a
    trailing "Callback" is dropped."""
    name = re.sub(r"Callback$", "", class_name).replace("NaN", "Nan")
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).lower()


def _composer_callbacks() -> dict[str, type[Callback]]:
    """The public callbacks of composer.callbacks, by snake-case name."""
    classes = (getattr(composer.callbacks, name) for name in composer.callbacks.__all__)
    return {snake_case(cls.__name__): cls for cls in classes if inspect.isclass(cls) and issubclass(cls, Callback)}


CALLBACKS = Registry(
    names={
        **_composer_callbacks(),
        "ema": EMA,
        "image_grid": ImageGridLogger,
        "nan_guard": NaNGuard,
        "throughput": ThroughputMonitor,
        "power_ema": PowerEMA,
        "sample_quality": SampleQuality,
    },
    base=Callback,
)

# The console and the progress bar are trainer keys (console_log_interval, progress_bar), not loggers.
LOGGERS = Registry(
    names={
        "tensorboard": TensorboardLogger,
        "file": ResumableFileLogger,
        "wandb": WandBLogger,
        "mlflow": MLFlowLogger,
        "comet_ml": CometMLLogger,
        "neptune": NeptuneLogger,
        "slack": SlackLogger,
        "mosaicml": MosaicMLLogger,
        "remote_uploader_downloader": RemoteUploaderDownloader,
    },
    base=LoggerDestination,
    # Composer's extras (mosaicml[...]); micro_diffusion's `test` extra pins mlflow-skinny, the client without the
    # server, which is all MLFlowLogger needs.
    requires={
        "wandb": ("wandb", "pip install 'mosaicml[wandb]==0.32.1'"),
        "mlflow": ("mlflow", "pip install 'mlflow-skinny>=2.14.1,<3' (or 'mosaicml[mlflow]==0.32.1')"),
        "comet_ml": ("comet_ml", "pip install 'mosaicml[comet-ml]==0.32.1'"),
        "neptune": ("neptune", "pip install 'mosaicml[neptune]==0.32.1'"),
        "slack": ("slack_sdk", "pip install 'mosaicml[slack]==0.32.1'"),
    },
)


def configured_entries(section: Mapping[str, Any], registry: Registry, prefix: str) -> list[tuple[str, type, dict]]:
    """(dotted path, class, arguments) of each enabled entry of a name -> arguments section; null disables an
    entry. The class is the registry's entry of that name, or the entry's `_target_`."""
    entries = []
    for name, arguments in section.items():
        if arguments is None:
            continue
        path, arguments = f"{prefix}.{name}", dict(arguments)
        if TARGET_KEY in arguments:
            target = import_target(arguments.pop(TARGET_KEY), registry.base, f"{path}.{TARGET_KEY}")
        else:
            target = pick(registry.names, name, path)
            _check_installed(registry, name, path)
        entries.append((path, target, arguments))
    return entries


def _check_installed(registry: Registry, name: str, path: str) -> None:
    """Raise a ConfigError, saying how to install it, when the entry `name` needs a package that is missing."""
    if name not in registry.requires:
        return
    module, install = registry.requires[name]
    if importlib.util.find_spec(module) is None:
        raise ConfigError(f"{path}: {registry.names[name].__name__} needs the package {module!r}, not installed: "
                          f"{install}")


def import_target(target: Any, base: type, path: str) -> type:
    """The class named "package.module.Class", which must be a subclass of `base`."""
    module_name, _, class_name = target.rpartition(".") if isinstance(target, str) else ("", "", "")
    if not module_name:
        raise ConfigError(f"{path}: {target!r} is not a dotted path package.module.Class")
    try:
        found = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as error:
        raise ConfigError(f"{path}: cannot import {target} ({type(error).__name__}: {error})") from None
    if not (inspect.isclass(found) and issubclass(found, base)):
        raise ConfigError(f"{path}: {target} is not a subclass of {base.__module__}.{base.__qualname__}")
    return found
