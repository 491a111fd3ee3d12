"""Sampling from trained weights: rebuild a LatentDiffusion from its arguments, load weights, generate in batches.

What `micro-diffusion generate` and `eval`, the in-training sample-quality callback and the demo share:

- the model's arguments: those of `create_latent_diffusion`, from a YAML model config (top level or under
  `model:`) or the released model (`RELEASED_MODEL`), with overrides (`model_arguments`);
- its weights: a network state dict, a LatentDiffusion state dict or a Composer checkpoint, plus a
  class-conditional MicroDiT's learned label embedding (`load_weights`, `load_network_state`);
- batched, seeded generation: sample i uses seed + i whatever the batch size (`generate_samples`).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from micro_diffusion.config_checks import check_arguments
from micro_diffusion.models.checkpoints import (
    WEIGHT_KINDS,
    is_model_folder,
    load_network_state,
    read_model_description,
    read_state_dict,
    read_trained_weights,
)
from micro_diffusion.models.model import LatentDiffusion, create_latent_diffusion, released_model_arguments

# The released model (MicroDiT_XL_2 on SDXL latents, DFN5B CLIP), by `create_latent_diffusion` argument names.
RELEASED_MODEL: dict[str, Any] = released_model_arguments()
# What a model is conditioned on -> how it is named in messages.
CONDITIONINGS = {"text": "text-to-image", "class": "class-conditional", "unconditional": "unconditional"}
RESOLVED_CONFIG_COMMAND = "python train.py --config-path configs --config-name <name> --cfg job --resolve"
Condition = str | int | None  # a prompt, a class label, or None (unconditional model)
log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------------------


def model_arguments(model_config: Path | None = None, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Every `create_latent_diffusion` argument: its defaults, updated by the model config file (the released
    model when None; see `read_model_config`) or a model folder's arguments (`micro-diffusion export`), updated
    by `overrides`."""
    defaults = {name: p.default for name, p in inspect.signature(create_latent_diffusion).parameters.items()}
    if model_config is None:
        chosen = RELEASED_MODEL
    elif is_model_folder(model_config):
        chosen = read_model_description(model_config)["arguments"]
    else:
        chosen = read_model_config(model_config)
    return defaults | chosen | dict(overrides or {})


def read_model_config(path: Path) -> dict[str, Any]:
    """The `create_latent_diffusion` arguments in a YAML file (top level, or its `model:` section), checked:
    unknown keys, unresolved `${...}` interpolations and raw Hydra configs raise a ValueError naming the key."""
    from omegaconf import OmegaConf  # imported here: only a model config file needs it

    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    values = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    if not isinstance(values, dict):
        raise ValueError("must hold a mapping of create_latent_diffusion arguments (at top level or under model:)")
    if "defaults" in values:
        raise ValueError(
            "is a raw Hydra config (it has a defaults list): its model section lacks what the defaults add; "
            f"dump the composed, resolved config instead ({RESOLVED_CONFIG_COMMAND})"
        )
    if isinstance(values.get("model"), dict):
        values = values["model"]
    unresolved = next(_interpolations(values, "model"), None)
    if unresolved is not None:
        raise ValueError(
            f"{unresolved[0]} is an interpolation ({unresolved[1]!r}); the file must hold plain values: dump the "
            f"composed, resolved config ({RESOLVED_CONFIG_COMMAND})"
        )
    check_arguments(create_latent_diffusion, values, "model")
    return values


def _interpolations(value: Any, key: str) -> Iterator[tuple[str, str]]:
    """(dotted key, text) of the `${...}` strings in a nested mapping / list."""
    if isinstance(value, dict):
        for name, item in value.items():
            yield from _interpolations(item, f"{key}.{name}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _interpolations(item, f"{key}.{index}")
    elif isinstance(value, str) and "${" in value:
        yield key, value


def model_conditioning(arguments: Mapping[str, Any]) -> str:
    """What the model built from these `create_latent_diffusion` arguments samples from: "class" (num_classes
    set), "text" (a text encoder) or "unconditional" (neither: the EDM2 U-Net only)."""
    if arguments["num_classes"] is not None:
        return "class"
    return "text" if arguments["text_encoder_name"] is not None else "unconditional"


def build_model(arguments: Mapping[str, Any], weights: Path, device: str | torch.device) -> LatentDiffusion:
    """The LatentDiffusion of these `create_latent_diffusion` arguments with the weights in `weights`, on `device`
    in eval mode. The weights are read first: a missing or unreadable file fails before the encoders load.

    `weights` is a weights file, a Composer checkpoint (its EMA when it holds one, else its raw weights) or a model
    folder (`LatentDiffusion.from_pretrained`, with `arguments` as overrides); which weights were used is logged.
    """
    if is_model_folder(weights):
        model = LatentDiffusion.from_pretrained(weights, **arguments)
        description = read_model_description(weights)["weights"]
        log.info("sampling with the %s weights of the model folder %s (from %s)",
                 WEIGHT_KINDS[description["kind"]], weights, description["source"])
        return model.to(device).eval()
    trained = read_trained_weights(weights)
    model = create_latent_diffusion(**arguments)
    load_network_state(model, trained.state, str(weights))
    log.info("sampling with %s", trained.description)
    return model.to(device).eval()


def load_weights(model: LatentDiffusion, path: Path) -> None:
    """Load the network's weights strictly, and a class-conditional MicroDiT's label embedding (num_classes, C)."""
    load_network_state(model, read_state_dict(path), str(path))



# --------------------------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------------------------


def sample_images(model: LatentDiffusion, conditions: Sequence[Condition], seeds: Sequence[int], **sampling) -> Tensor:
    """Images (B, 3, H, W) in [0, 1]: image i from seeds[i] and conditions[i], a prompt (text-to-image model), a
    class label (class-conditional) or None (unconditional). `sampling`: the other `generate` arguments."""
    if model.unconditional:
        return model.generate(seeds=list(seeds), **sampling)
    keyword = "prompt" if model.num_classes is None else "class_labels"
    return model.generate(seeds=list(seeds), **{keyword: list(conditions)}, **sampling)


def generate_samples(
    model: LatentDiffusion, conditions: Sequence[Condition], seed: int, batch_size: int, **sampling
) -> Tensor:
    """Images (N, 3, H, W) in [0, 1] on the CPU, N = len(conditions): sample i uses seed + i and conditions[i]
    (a prompt, a class label or None, as the model takes; see `sample_images`) whatever the batch size."""
    batches = []
    for start in tqdm(range(0, len(conditions), batch_size), desc="generating", unit="batch"):
        chunk = conditions[start:start + batch_size]
        seeds = range(seed + start, seed + start + len(chunk))
        batches.append(sample_images(model, chunk, seeds, **sampling).cpu())
    return torch.cat(batches)
