"""Safe loading of network weights: safetensors, or torch files read with `weights_only=True`. Never a bare unpickle.

Accepted layouts: a plain DiT state dict (the released MicroDiT checkpoints), a LatentDiffusion state dict whose
DiT keys carry a `dit.` prefix, or a Composer checkpoint (its `state.model` section, which Composer may prefix
with `model.`), so one loader serves released checkpoints, our own exports and training checkpoints. Composer
checkpoints are read with `weights_only=True` plus an allowlist of the plain-data types they contain.
"""

from __future__ import annotations

import datetime
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

PREFIXES = ("model.dit.", "dit.", "module.dit.")


def _checkpoint_globals() -> list:
    """The plain-data types a Composer checkpoint pickles besides tensors (run time as a timedelta, the torch
    version, numpy RNG states): allowed, and nothing else, when reading a checkpoint with weights_only=True."""
    from torch.torch_version import TorchVersion

    numpy_core = getattr(np, "_core", None) or np.core
    dtypes = [type(np.dtype(name)) for name in ("bool", "uint8", "int32", "int64", "uint32", "float32", "float64")]
    return [datetime.timedelta, TorchVersion, numpy_core.multiarray._reconstruct, np.ndarray, np.dtype, *dtypes]


def load_checkpoint(path: str | Path) -> dict:
    """A Composer checkpoint (or any torch file) read with `weights_only=True`: tensors and plain data only."""
    with torch.serialization.safe_globals(_checkpoint_globals()):
        return torch.load(path, map_location="cpu", weights_only=True)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a weights file (.safetensors, or .pt/.pth/.bin through torch.load(weights_only=True))."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    try:
        state = load_checkpoint(path)
    except Exception as error:  # noqa: BLE001  (re-raised with what to do)
        raise ValueError(
            f"{path} is not a plain tensor file that torch.load(weights_only=True) can read ({error}). "
            "Save a state dict of tensors instead (e.g. with save_dit_weights)."
        ) from error
    if isinstance(state, dict) and "state" in state and isinstance(state["state"], dict):
        state = state["state"].get("model", state["state"])
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a flat state dict of tensors")
    return state


def dit_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keep the DiT's entries of a LatentDiffusion / Composer state dict (stripping the prefix), or all of a
    plain DiT state dict."""
    for prefix in PREFIXES:
        picked = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
        if picked:
            return picked
    return dict(state)


def load_dit_weights(dit: nn.Module, path: str | Path, ignore_pos_embed: bool = False) -> None:
    """Load DiT weights strictly. `ignore_pos_embed` keeps the model's own position table, for a checkpoint
    trained at another resolution (the table is fixed, not learned, so nothing is lost)."""
    load_dit_state(dit, read_state_dict(path), str(path), ignore_pos_embed)


def load_dit_state(
    dit: nn.Module, state: dict[str, torch.Tensor], source: str = "the state dict", ignore_pos_embed: bool = False
) -> None:
    """`load_dit_weights` for a state dict in memory (any layout `dit_state_dict` accepts); `source` names it in
    errors."""
    state = dit_state_dict(state)
    if ignore_pos_embed:
        state["pos_embed"] = dit.pos_embed
    missing, unexpected = dit.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise KeyError(f"{source} does not match the network: missing {missing[:8]}, unexpected {unexpected[:8]}")


def save_dit_weights(dit: nn.Module, path: str | Path) -> Path:
    """Write the DiT state dict as safetensors (contiguous CPU tensors)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in dit.state_dict().items()}, str(path))
    return path
