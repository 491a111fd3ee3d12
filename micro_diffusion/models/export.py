"""Export trained weights as a self-describing model folder (`models.checkpoints.save_model_folder`).

The folder holds the weights to sample with (a Composer checkpoint's EMA by default, its raw weights, a post-hoc
EMA reconstructed from PowerEMA snapshots, or a weights file as it is) in one safetensors file, and beside them the
model's `create_latent_diffusion` arguments (so the names of its VAE and text encoder), the latent statistics its
network was trained on, and which weights these are. `LatentDiffusion.from_pretrained(folder)`,
`micro-diffusion generate --weights FOLDER`, `micro-diffusion eval --weights FOLDER` and
`MicroDiTPipeline.from_pretrained(folder)` load it with no other argument.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from micro_diffusion.diffusion.power_ema import find_snapshots, reconstruct
from micro_diffusion.models.checkpoints import (
    ModelFolder,
    load_network_state,
    read_trained_weights,
    save_model_folder,
    trained_modules,
)
from micro_diffusion.models.model import LatentDiffusion, create_latent_diffusion

EXPORTED_WEIGHTS = ("ema", "raw")


def export_model(
    arguments: Mapping[str, Any],
    source: str | Path,
    folder: str | Path,
    weights: str = "ema",
    sigma_rel: float | None = None,
    at_images: int | None = None,
) -> ModelFolder:
    """Write the model folder of `source` to `folder` and return what it holds.

    Args:
        arguments: every `create_latent_diffusion` argument of the model (`sampling.model_arguments`).
        source: a Composer checkpoint, a weights file (exported as it is), or, with `sigma_rel`, a folder of
            PowerEMA snapshots.
        weights: of a Composer checkpoint, "ema" (its EMA; one it lacks, or that had not started, is an error) or
            "raw" (its model weights).
        sigma_rel, at_images: the post-hoc EMA to reconstruct from the snapshots (`power_ema.reconstruct`).

    The weights are checked against the model (strictly, as `load_network_state` loads them) and written in the
    layout `trained_modules` gives; the text encoder's weights are not loaded for this.
    """
    if weights not in EXPORTED_WEIGHTS:
        raise ValueError(f"weights must be one of {EXPORTED_WEIGHTS}, got {weights!r}")
    if sigma_rel is not None:
        [result] = reconstruct(find_snapshots(source), [sigma_rel], at_images)
        state = result.state_dict
        description = {"kind": "posthoc", "source": str(source), "sigma_rel": result.sigma_rel,
                       "t_images": result.t_images}
    else:
        trained = read_trained_weights(source, use_ema=weights == "ema")
        if weights == "ema" and trained.kind == "raw":
            raise ValueError(f"{trained.description}: export its raw weights with weights='raw' (--raw)")
        state, description = trained.state, {"kind": trained.kind, "source": str(source)}
    arguments = dict(arguments) | {"load_text_encoder_weights": True}
    model = create_latent_diffusion(**(arguments | {"load_text_encoder_weights": False}))
    load_network_state(model, state, str(source))
    return save_model(model, arguments, description, folder)


def save_model(model: LatentDiffusion, arguments: Mapping[str, Any], weights: Mapping[str, Any],
               folder: str | Path) -> ModelFolder:
    """Write `model`'s trained weights, its `create_latent_diffusion` arguments, latent statistics and the
    `weights` entry (which weights these are) as a model folder; returns what was written."""
    state = trained_modules(model).state_dict()
    contents = ModelFolder(dict(arguments), model.latent_statistics(), dict(weights), state)
    save_model_folder(folder, contents)
    return contents
