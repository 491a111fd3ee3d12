"""`MicroDiTPipeline`: a model folder (`micro-diffusion export`) as a diffusers pipeline.

    from micro_diffusion.models.diffusers_pipeline import MicroDiTPipeline

    pipe = MicroDiTPipeline.from_pretrained("exported/").to("cuda")
    images = pipe(["An elegant squirrel pirate on a ship"] * 4, num_inference_steps=30, guidance_scale=5.0,
                  generator=torch.Generator().manual_seed(2024)).images      # 4 PIL images

The pipeline wraps a `LatentDiffusion` and samples with its `generate`: image i of a call with a generator seeded
with s is the image `LatentDiffusion.generate(..., seed=s)` makes for prompt i (the generator's seed is read, not
its random stream; a list of generators gives each image its own seed). `save_pretrained` writes the model folder
back, so `from_pretrained` reads what it wrote.
"""

from __future__ import annotations

import os
import random
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput

from micro_diffusion.models.checkpoints import read_model_description
from micro_diffusion.models.export import save_model
from micro_diffusion.models.model import LatentDiffusion
from micro_diffusion.models.sampling import sample_images

OUTPUT_TYPES = ("pil", "np", "pt")


class MicroDiTPipeline(DiffusionPipeline):
    """Text-to-image (or class-conditional, or unconditional) sampling from a LatentDiffusion, diffusers-style.

    Args:
        model: the LatentDiffusion, with its frozen VAE and text encoder.
        arguments: its `create_latent_diffusion` arguments, and `weights` the model folder's entry saying which
            weights it holds: what `save_pretrained` writes beside the weights.
    """

    def __init__(self, model: LatentDiffusion, arguments: Mapping[str, Any], weights: Mapping[str, Any]) -> None:
        super().__init__()
        self.register_modules(model=model)
        self.arguments, self.weights = dict(arguments), dict(weights)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **overrides: Any) -> MicroDiTPipeline:
        """The pipeline of a model folder; `overrides` replace its `create_latent_diffusion` arguments (e.g.
        `vae_name` for a local copy of its VAE), as in `LatentDiffusion.from_pretrained`."""
        description = read_model_description(pretrained_model_name_or_path)
        model = LatentDiffusion.from_pretrained(pretrained_model_name_or_path, **overrides)
        return cls(model, description["arguments"] | overrides, description["weights"])

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """Write the model folder (`micro_diffusion.json` and `model.safetensors`) that `from_pretrained` reads."""
        if kwargs:
            raise TypeError(f"MicroDiTPipeline.save_pretrained takes only the folder, not {sorted(kwargs)}")
        save_model(self.model, self.arguments, self.weights, save_directory)

    @property
    def device(self) -> torch.device:
        return next(self.model.dit.parameters()).device

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str] | None = None,
        num_inference_steps: int = 30,
        guidance_scale: float = 5.0,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        num_images_per_prompt: int = 1,
        class_labels: Sequence[int] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        **sampling: Any,
    ) -> ImagePipelineOutput | tuple:
        """Sample one image per prompt (or class label; an unconditional model: `num_images_per_prompt` images),
        each repeated `num_images_per_prompt` times.

        `generator`: one seeded generator (image i uses its seed + i) or one per image; None draws a random seed.
        `output_type`: "pil" (a list of PIL images), "np" ((B, H, W, 3) float32 in [0, 1]) or "pt" ((B, 3, H, W)
        float32 in [0, 1]). `sampling`: other `LatentDiffusion.generate` arguments (sampler, guidance_interval).
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if prompt is not None and class_labels is not None:
            raise ValueError("give prompt or class_labels, not both")
        chosen = [prompt] if isinstance(prompt, str) else prompt if prompt is not None else class_labels
        conditions = [c for c in chosen for _ in range(num_images_per_prompt)] if chosen is not None else (
            [None] * num_images_per_prompt)
        images = sample_images(self.model, conditions, image_seeds(generator, len(conditions)),
                               num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, **sampling)
        if output_type == "pt":
            output = images.cpu()
        else:
            output = images.permute(0, 2, 3, 1).cpu().numpy()
            if output_type == "pil":
                output = self.numpy_to_pil(output)
        return ImagePipelineOutput(images=output) if return_dict else (output,)


def image_seeds(generator: torch.Generator | Sequence[torch.Generator] | None, count: int) -> list[int]:
    """The seed of each of `count` images: a generator's seed + i, each generator's seed, or random + i."""
    if generator is None:
        base = random.randrange(2**31)
    elif isinstance(generator, torch.Generator):
        base = generator.initial_seed()
    else:
        if len(generator) != count:
            raise ValueError(f"got {len(generator)} generators for {count} images")
        return [g.initial_seed() for g in generator]
    return [base + i for i in range(count)]
