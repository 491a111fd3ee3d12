"""Safe loading of network weights: safetensors, or torch files read with `weights_only=True`. Never a bare unpickle.

Accepted layouts: a plain DiT state dict (the released MicroDiT checkpoints), a LatentDiffusion state dict whose
DiT keys carry a `dit.` prefix, or a Composer checkpoint (its `state.model` section, which Composer may prefix
with `model.`), so one loader serves released checkpoints, our own exports and training checkpoints. Composer
checkpoints are read with `weights_only=True` plus an allowlist of the plain-data types they contain.

`read_trained_weights` picks the weights to sample with, and says which: a Composer checkpoint's EMA (the `EMA`
callback's average) when it holds one, else its raw weights. A model folder (`save_model_folder`, written by
`micro-diffusion export`) holds a model's `create_latent_diffusion` arguments, latent statistics and which weights
it has in MODEL_FOLDER_CONFIG, and the weights in one safetensors file.
"""

from __future__ import annotations

import datetime
import json
import logging
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

# The weight layout of a LatentDiffusion: its network under `dit.`, and, for a class-conditional MicroDiT, the
# learned label embedding under `label_embedder.` (the attribute names of LatentDiffusion). Composer's
# checkpoints may put `model.` (its state) or `module.` (DDP) in front.
NETWORK_ATTRIBUTE = "dit"
LABEL_EMBEDDER_ATTRIBUTE = "label_embedder"
LABEL_EMBEDDING_KEY = f"{LABEL_EMBEDDER_ATTRIBUTE}.weight"
WRAPPER_PREFIXES = ("model.", "", "module.")
PREFIXES = tuple(f"{wrapper}{NETWORK_ATTRIBUTE}." for wrapper in WRAPPER_PREFIXES)
# A Composer checkpoint keeps each callback's state under its class name: that of `training.callbacks.EMA`.
EMA_CALLBACK = "EMA"
# Which weights a model holds -> how they are named to the user.
WEIGHT_KINDS = {"ema": "EMA", "raw": "raw (not averaged)", "posthoc": "post-hoc EMA", "file": "given"}
# A model folder: its description (JSON) and its weights (safetensors).
MODEL_FOLDER_CONFIG = "micro_diffusion.json"
MODEL_FOLDER_WEIGHTS = "model.safetensors"
MODEL_FOLDER_FORMAT = "micro_diffusion.model.v1"

log = logging.getLogger(__name__)


class IncompleteCheckpointError(RuntimeError):
    """A checkpoint file that was not written to the end (a crash or a full disk during the save)."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path, self.reason = str(path), reason
        super().__init__(f"the checkpoint {path} is incomplete: {reason}")


def checkpoint_globals() -> list:
    """The plain-data types a Composer checkpoint pickles besides tensors (run time as a timedelta, the torch
    version, numpy RNG states): allowed, and nothing else, when reading a checkpoint with weights_only=True."""
    from torch.torch_version import TorchVersion

    numpy_core = getattr(np, "_core", None) or np.core
    dtypes = [type(np.dtype(name)) for name in ("bool", "uint8", "int32", "int64", "uint32", "float32", "float64")]
    return [datetime.timedelta, TorchVersion, numpy_core.multiarray._reconstruct, np.ndarray, np.dtype, *dtypes]


def incomplete_checkpoint_reason(path: str | Path) -> str | None:
    """Why the torch file at `path` was not written to the end, or None when it was.

    `torch.save` writes a zip archive whose central directory comes last, so a file cut short by a crash, a
    killed process or a full disk lacks it. Only the end of the file is read: the check costs nothing at any size.
    """
    path = Path(path)
    if not path.exists():
        return "the file does not exist" if not path.is_symlink() else f"it links to {path.readlink()}, which is gone"
    size = path.stat().st_size
    if size == 0:
        return "the file is empty"
    if not zipfile.is_zipfile(path):
        return f"its {size} bytes end before the archive's closing directory (cut short while being written)"
    return None


def check_checkpoint_complete(path: str | Path) -> None:
    """Raise IncompleteCheckpointError, naming the file, unless `incomplete_checkpoint_reason` finds it whole."""
    reason = incomplete_checkpoint_reason(path)
    if reason is not None:
        raise IncompleteCheckpointError(path, reason)


def load_checkpoint(path: str | Path) -> dict:
    """A Composer checkpoint (or any torch file) read with `weights_only=True`: tensors and plain data only.
    A file cut short raises IncompleteCheckpointError naming it."""
    check_checkpoint_complete(path)
    with torch.serialization.safe_globals(checkpoint_globals()):
        return torch.load(path, map_location="cpu", weights_only=True)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a weights file (.safetensors, or .pt/.pth/.bin through torch.load(weights_only=True)); of a Composer
    checkpoint, its model's (raw) weights."""
    return _flat_state(_read_weights_file(path), path)


def _read_weights_file(path: str | Path) -> dict:
    """What a weights file holds: a safetensors state dict, or the object a torch file holds, read safely."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    try:
        return load_checkpoint(path)
    except Exception as error:  # noqa: BLE001  (re-raised with what to do)
        raise ValueError(
            f"{path} is not a plain tensor file that torch.load(weights_only=True) can read ({error}). "
            "Save a state dict of tensors instead (e.g. with save_dit_weights)."
        ) from error


def _is_composer_checkpoint(content: Any) -> bool:
    return isinstance(content, dict) and isinstance(content.get("state"), dict)


def _flat_state(content: Any, path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict of tensors: `content` itself, or a Composer checkpoint's model section."""
    if _is_composer_checkpoint(content):
        content = content["state"].get("model", content["state"])
    if not isinstance(content, dict) or not all(isinstance(v, torch.Tensor) for v in content.values()):
        raise ValueError(f"{path} does not hold a flat state dict of tensors")
    return content


def checkpoint_ema_state(checkpoint: Mapping[str, Any], source: str) -> dict[str, torch.Tensor]:
    """The EMA model of a Composer checkpoint (`load_checkpoint`) saved with the `EMA` callback, under the model's
    key names: the full state (parameters with their averaged values, and buffers) of every module the average
    covers, `dit.*` and, for a class-conditional model, `label_embedder.*`.

    Raises a KeyError saying why when there is none: no EMA callback, or a checkpoint saved before the average
    started (its EMA entry then still holds the initial weights).
    """
    state = checkpoint["state"]
    ema = state.get("callbacks", {}).get(EMA_CALLBACK, {})
    averages = ema.get("weights")
    if averages is None:
        raise KeyError(f"{source} holds no EMA weights: it was not saved by a run with the EMA callback")
    timestamp = state.get("timestamp", {})
    batch = timestamp.get("Timestamp", timestamp).get("batch")  # Composer keys the timestamp by its class name
    start = ema.get("start_batch", 0)
    if batch is not None and int(batch) < int(start):
        raise KeyError(f"{source} was saved at batch {int(batch)}, before its EMA started (batch {int(start)})")
    modules = {name.split(".", 1)[0] for name in averages}
    weights = {key: value for key, value in state["model"].items() if key.split(".", 1)[0] in modules}
    missing = sorted(averages.keys() - weights.keys())
    if missing:
        raise KeyError(f"{source}: EMA weights without a model entry: {missing[:8]}")
    return weights | dict(averages)


def export_ema_weights(checkpoint_path: str | Path, output_path: str | Path) -> Path:
    """Write the EMA model of a Composer checkpoint (`checkpoint_ema_state`) as a safetensors file, which
    `load_network_state` and `load_dit_weights(model.dit, path)` read."""
    weights = checkpoint_ema_state(load_checkpoint(checkpoint_path), str(checkpoint_path))
    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    save_file({key: value.detach().cpu().contiguous() for key, value in weights.items()}, str(output_path))
    return output_path


class TrainedWeights(NamedTuple):
    """Weights to load into a LatentDiffusion (`load_network_state`), which they are (a key of WEIGHT_KINDS) and
    a sentence naming them for the user."""

    state: dict[str, torch.Tensor]
    kind: str
    description: str


def read_trained_weights(path: str | Path, use_ema: bool = True) -> TrainedWeights:
    """The weights in `path` to sample with: a model folder's, a weights file's, or a Composer checkpoint's EMA
    (with `use_ema`, when it holds a started one) or raw weights; the description says which, and why not the
    EMA when a checkpoint's raw weights are used."""
    path = Path(path)
    if (path / MODEL_FOLDER_CONFIG).is_file():
        folder = read_model_folder(path)
        kind = folder.weights["kind"]
        return TrainedWeights(folder.state, kind, f"the {WEIGHT_KINDS[kind]} weights of the model folder {path}")
    content = _read_weights_file(path)
    if not _is_composer_checkpoint(content):
        return TrainedWeights(_flat_state(content, path), "file", f"the weights in {path}")
    reason = "as asked"
    if use_ema:
        try:
            ema = checkpoint_ema_state(content, str(path))
            return TrainedWeights(ema, "ema", f"the EMA weights of the checkpoint {path}")
        except KeyError as error:
            reason = error.args[0]
    return TrainedWeights(_flat_state(content, path), "raw", f"the raw weights of the checkpoint {path} ({reason})")


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


def trained_modules(model: nn.Module) -> nn.Module:
    """What a LatentDiffusion trains, as one module: its network (a plain network state dict), or, when it has a
    label embedder, the network and the embedding together in the layout above (`dit.*` and
    `label_embedder.weight`), since a class-conditional MicroDiT needs both to sample."""
    network = getattr(model, NETWORK_ATTRIBUTE)
    label_embedder = getattr(model, LABEL_EMBEDDER_ATTRIBUTE, None)
    if label_embedder is None:
        return network
    return nn.ModuleDict({NETWORK_ATTRIBUTE: network, LABEL_EMBEDDER_ATTRIBUTE: label_embedder})


def load_network_state(model: nn.Module, state: dict[str, torch.Tensor], source: str = "the state dict") -> None:
    """Load a LatentDiffusion's trained weights strictly from a state dict in any layout `dit_state_dict`
    accepts: the network, and the label embedding (num_classes, C) when the model has a label embedder (it is
    then required). `source` names the state dict in errors."""
    load_dit_state(getattr(model, NETWORK_ATTRIBUTE), state, source)
    label_embedder = getattr(model, LABEL_EMBEDDER_ATTRIBUTE, None)
    if label_embedder is None:
        return
    names = [f"{wrapper}{LABEL_EMBEDDING_KEY}" for wrapper in WRAPPER_PREFIXES]
    found = [name for name in names if name in state]
    if not found:
        raise KeyError(
            f"{source} holds no label embedding ({' or '.join(names)}): a class-conditional MicroDiT needs it "
            "besides the network weights; pass a training checkpoint, an exported EMA or a post-hoc EMA"
        )
    label_embedder.load_state_dict({"weight": state[found[0]]})


def leave_out_of_state_dict(model: nn.Module, names: Sequence[str]) -> None:
    """Keep the children `names` of `model` (frozen networks, rebuilt from their names) out of its state dict.

    `model.state_dict()` (and so every Composer checkpoint, with or without FSDP) omits their entries;
    `model.load_state_dict()` takes them from the children themselves, so a state dict without them loads under
    strict=True, while every other missing key is still an error. The copies that older checkpoints hold are
    ignored, with a log note: the children keep the weights they were built with. A child set to None is skipped.
    """

    def drop(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
        for name in names:
            for key in [key for key in state_dict if key.startswith(f"{prefix}{name}.")]:
                del state_dict[key]

    def fill_in(module: nn.Module, state_dict: dict, prefix: str, *args: object) -> None:
        for name in names:
            child = getattr(module, name, None)
            if child is None:
                continue
            child_prefix = f"{prefix}{name}."
            own = child.state_dict(prefix=child_prefix, keep_vars=True)
            # torch.distributed.checkpoint fills the keys a full state dict lacks with the module's own tensors.
            saved = [key for key in state_dict if key.startswith(child_prefix) and state_dict[key] is not own.get(key)]
            if saved:
                log.warning("ignored %d entries of the frozen %r in the loaded state (a checkpoint of an older "
                            "version): it keeps the weights it was built with", len(saved), name)
            for key in saved:
                del state_dict[key]
            state_dict.update(own)

    model.register_state_dict_post_hook(drop)
    model.register_load_state_dict_pre_hook(fill_in)


def accept_network_state_dict(model: nn.Module) -> None:
    """Let `model.load_state_dict` take a plain network state dict (the released MicroDiT checkpoints: keys such
    as `pos_embed`, without the `dit.` prefix) as well as the model's own layout.

    A state dict with no key under `dit.` gets that prefix on every key that lies under none of the model's
    children; the load then checks it as strictly as any other (a class-conditional model still needs its label
    embedding, and a key the network does not have is still unexpected).
    """

    def add_prefix(module: nn.Module, state_dict: dict, prefix: str, *args: object) -> None:
        if any(key.startswith(f"{prefix}{NETWORK_ATTRIBUTE}.") for key in state_dict):
            return
        children = tuple(f"{prefix}{name}." for name, _ in module.named_children())
        for key in [key for key in state_dict if key.startswith(prefix) and not key.startswith(children)]:
            state_dict[f"{prefix}{NETWORK_ATTRIBUTE}.{key[len(prefix):]}"] = state_dict.pop(key)

    model.register_load_state_dict_pre_hook(add_prefix)


class ModelFolder(NamedTuple):
    """A model folder's contents: `create_latent_diffusion` arguments, the latent statistics the network was
    trained on ({"scale": [...], "shift": [...]}, one value or one per channel), which weights it holds
    ({"kind": a key of WEIGHT_KINDS, "source": ..., and sigma_rel / t_images for a post-hoc EMA}) and the weights
    (a LatentDiffusion state dict, `trained_modules` layout)."""

    arguments: dict[str, Any]
    latent_statistics: dict[str, list[float]]
    weights: dict[str, Any]
    state: dict[str, torch.Tensor]


def is_model_folder(path: str | Path) -> bool:
    return (Path(path) / MODEL_FOLDER_CONFIG).is_file()


def save_model_folder(folder: str | Path, contents: ModelFolder) -> Path:
    """Write `contents` to `folder`: MODEL_FOLDER_CONFIG (JSON) and MODEL_FOLDER_WEIGHTS (safetensors)."""
    if contents.weights.get("kind") not in WEIGHT_KINDS:
        raise ValueError(f"weights kind must be one of {sorted(WEIGHT_KINDS)}, got {contents.weights.get('kind')!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {key: value.detach().cpu().contiguous() for key, value in contents.state.items()}
    save_file(tensors, str(folder / MODEL_FOLDER_WEIGHTS), metadata={"format": MODEL_FOLDER_FORMAT})
    description = {
        "format": MODEL_FOLDER_FORMAT, "arguments": contents.arguments,
        "latent_statistics": contents.latent_statistics, "weights": contents.weights,
        "weights_file": MODEL_FOLDER_WEIGHTS,
    }
    (folder / MODEL_FOLDER_CONFIG).write_text(json.dumps(description, indent=2) + "\n")
    return folder


def read_model_folder(folder: str | Path) -> ModelFolder:
    """Read a folder written by `save_model_folder`; a missing file or another format raises naming it."""
    folder = Path(folder)
    description = read_model_description(folder)
    state = read_state_dict(folder / description["weights_file"])
    return ModelFolder(description["arguments"], description["latent_statistics"], description["weights"], state)


def read_model_description(folder: str | Path) -> dict[str, Any]:
    """A model folder's MODEL_FOLDER_CONFIG (its arguments, latent statistics and weights entry), without reading
    the weights."""
    config_path = Path(folder) / MODEL_FOLDER_CONFIG
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder} is not a model folder: it has no {MODEL_FOLDER_CONFIG} "
                                "(write one with `micro-diffusion export`)")
    description = json.loads(config_path.read_text())
    if not isinstance(description, dict) or description.get("format") != MODEL_FOLDER_FORMAT:
        found = description.get("format") if isinstance(description, dict) else None
        raise ValueError(f"{config_path} is not a {MODEL_FOLDER_FORMAT} description (format {found!r})")
    return description


def save_dit_weights(dit: nn.Module, path: str | Path) -> Path:
    """Write the DiT state dict as safetensors (contiguous CPU tensors)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in dit.state_dict().items()}, str(path))
    return path
