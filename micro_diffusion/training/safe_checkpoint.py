"""Training reads checkpoints only through a weights-only load: a checkpoint cannot run code.

Composer 0.32.1 reads every monolithic checkpoint (the save folder's latest checkpoint under autoresume, and
`trainer.load_path`, with or without `load_weights_only`) in `composer.utils.checkpoint._torch_load_with_validation`,
which calls `torch.load(weights_only=False)`: a full unpickle, so a file planted in the save folder (which may be
a shared bucket) runs its code on every node. `install()` replaces that function, where Composer defines it and
where `composer.checkpoint.load` imported it by name, with the project's one checkpoint load: `torch.load` with
`weights_only=True` and the allowlist of `micro_diffusion.models.checkpoints.checkpoint_globals` (tensors,
numbers, containers, and the few plain types a Composer checkpoint holds).

Composer also offers a hook, the CHECKPOINT_VALIDATION_FUNCTION environment variable, which is called with the
path before its own load. It is not used: a check followed by Composer's unsafe load reads the file twice, and
whoever can write the save folder can swap the file in between. Here the bytes that are checked are the bytes
that are loaded. The validation hook itself still runs, before the safe load, as it did before.

Composer's `load_checkpoint` is wrapped as well, so that a refusal names the checkpoint the user gave rather
than the temporary copy Composer loads, and so that sharded (torch.distributed.checkpoint) checkpoints, whose
metadata Composer unpickles without any allowlist, are refused instead of loaded.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import pickle
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from micro_diffusion.models.checkpoints import IncompleteCheckpointError, check_checkpoint_complete, checkpoint_globals

__all__ = ["PATCHED", "UnsafeCheckpointError", "checkpoint_globals", "install", "load_training_checkpoint"]

COMPOSER_VERSION = "0.32.1"
# (module, attribute) of each function of Composer 0.32.1 that install() replaces.
PATCHED = (
    ("composer.utils.checkpoint", "_torch_load_with_validation"),
    ("composer.checkpoint.load", "_torch_load_with_validation"),
    ("composer.utils.checkpoint", "load_checkpoint"),
)


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint holds something a weights-only load does not allow (code to run, or an unknown type)."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path, self.reason = str(path), reason
        super().__init__(f"refused to load the checkpoint {path}: {reason}")


def load_training_checkpoint(path: str | Path, map_location: Any = "cpu") -> Any:
    """`torch.load(path)` with `weights_only=True` and the project's allowlist of checkpoint types.

    Raises UnsafeCheckpointError, naming the file and the refused global, for anything else, and
    IncompleteCheckpointError, naming the file, for one cut short while it was written.
    """
    check_checkpoint_complete(path)
    try:
        with torch.serialization.safe_globals(checkpoint_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        raise UnsafeCheckpointError(path, _refusal(str(error))) from None


def _refusal(reason: str) -> str:
    refused = re.search(r"GLOBAL (\S+)", reason)
    what = f"it needs {refused.group(1)}" if refused else reason.strip().splitlines()[0]
    return (
        f"{what}, which a weights-only load does not allow. Training checkpoints hold tensors and plain data "
        "only; a file that needs anything else may run code when read. Delete it (and any 'latest' link to it) "
        "if you did not write it yourself"
    )


def install() -> None:
    """Make Composer read every checkpoint with `load_training_checkpoint` (idempotent)."""
    checkpoint_utils = _module("composer.utils.checkpoint")
    ensure_valid = _attribute(checkpoint_utils, "composer.utils.checkpoint", "_ensure_valid_checkpoint")

    def torch_load_with_validation(checkpoint_filepath: str | Path, map_location: str) -> Any:
        """Composer's validation hook, then the weights-only load (replaces Composer's unpickle)."""
        return load_training_checkpoint(ensure_valid(checkpoint_filepath), map_location=map_location)

    torch_load_with_validation.__module__ = __name__
    for module_name, attribute in PATCHED:
        module = _module(module_name)
        current = _attribute(module, module_name, attribute)
        if getattr(current, "__module__", None) == __name__:
            continue  # installed before
        safe = torch_load_with_validation if attribute == "_torch_load_with_validation" else _naming_the_source(current)
        setattr(module, attribute, safe)


def _naming_the_source(load_checkpoint: Callable) -> Callable:
    """Composer's `load_checkpoint(path, state, ...)`, refusing sharded checkpoints, and naming `path` (not the
    temporary copy that was loaded) when the safe load refuses the file."""
    signature = inspect.signature(load_checkpoint)

    @functools.wraps(load_checkpoint)
    def load(*args: Any, **kwargs: Any) -> Any:
        arguments = signature.bind(*args, **kwargs).arguments
        path, state = arguments["path"], arguments["state"]
        if state.fsdp_sharded_state_dict_enabled:
            raise UnsafeCheckpointError(
                path, "it is sharded, and torch.distributed.checkpoint unpickles the metadata of sharded "
                "checkpoints without an allowlist. Save and load full checkpoints (fsdp_config.state_dict_type: full)"
            )
        try:
            return load_checkpoint(*args, **kwargs)
        except UnsafeCheckpointError as error:
            raise UnsafeCheckpointError(path, error.reason) from None
        except IncompleteCheckpointError as error:
            raise IncompleteCheckpointError(path, error.reason) from None

    load.__module__ = __name__
    return load


def _module(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError as error:
        raise _moved(name, error) from error


def _attribute(module: Any, module_name: str, attribute: str) -> Any:
    if not hasattr(module, attribute):
        raise _moved(f"{module_name}.{attribute}", AttributeError(attribute))
    return getattr(module, attribute)


def _moved(what: str, error: Exception) -> RuntimeError:
    return RuntimeError(
        f"{what} is not where composer {COMPOSER_VERSION} had it ({type(error).__name__}: {error}): training "
        "would read checkpoints without the weights-only load; update micro_diffusion/training/safe_checkpoint.py"
    )
