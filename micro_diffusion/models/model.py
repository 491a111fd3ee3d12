"""LatentDiffusion: MicroDiT + a frozen VAE + a frozen text encoder as a Composer model, with `generate()`.

The denoising network is a MicroDiT, or the EDM2 U-Net behind the same interface (`UNetNetwork`), class-conditional
or unconditional, in pixel space (the identity autoencoder) or in a latent space.

Training runs on precomputed latents (the normal path) or encodes raw images and captions on the fly. The loss
is EDM's, averaged over the patches the DiT kept when patch masking is on. Evaluation reports the loss at fixed
noise levels with fixed noise, so validation curves are comparable across runs and checkpoints.

`create_latent_diffusion(...)` keeps the original's import path and arguments, so its usage snippet runs as
written given local model names:

    model = create_latent_diffusion(latent_res=64, in_channels=4, pos_interp_scale=2.0)
    model.dit.load_state_dict(torch.load(ckpt, weights_only=True))
    images = model.generate(prompt=["An elegant squirrel pirate on a ship"] * 4, num_inference_steps=30,
                            guidance_scale=5.0, seed=2024)          # (4, 3, 512, 512) floats in [0, 1]
"""

from __future__ import annotations

import inspect
import random
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import torch
import torch.nn.functional as F
from composer.models import ComposerModel
from torch import Tensor, nn
from torchmetrics import MeanMetric, Metric

from micro_diffusion.config_checks import FRACTION, POSITIVE
from micro_diffusion.data import schema
from micro_diffusion.diffusion.edm import (
    EDMConfig,
    LearnedLossWeighting,
    edm_denoise,
    edm_loss,
    sample_training_sigmas,
)
from micro_diffusion.diffusion.samplers import (
    edm_heun_sampler,
    euler_sampler,
    generators_from_seeds,
    guided_denoiser,
    noise_from_seeds,
)
from micro_diffusion.dtypes import DTYPES, torch_dtype
from micro_diffusion.encoders.text import TextEncoder, load_text_encoder, prompt_warnings, text_encoder_format
from micro_diffusion.encoders.vae import ImageAutoencoder, load_vae
from micro_diffusion.models.checkpoints import (
    accept_network_state_dict,
    leave_out_of_state_dict,
    load_network_state,
    read_model_folder,
)
from micro_diffusion.models.dit import DiT, create_dit
from micro_diffusion.models.edm2_unet import EDM2UNet, create_edm2_unet

__all__ = [
    "DTYPES", "SAMPLERS", "LatentDiffusion", "UNetNetwork", "create_latent_diffusion", "default_arguments",
    "released_model_arguments",
]
SAMPLERS = ("heun", "euler")
UNET_FIELDS_SET_BY_THE_MODEL = ("img_resolution", "img_channels", "label_dim")
# create_latent_diffusion's arguments that configure only one kind of network.
DIT_ARGUMENTS = ("dit_arch", "pos_interp_scale", "train_mask_ratio", "train_route_ratio", "label_embedding_dim",
                 "dit_kwargs", "use_caption_mask")
UNET_ARGUMENTS = ("unet_config", "unet_kwargs")
# The create_latent_diffusion arguments that describe a trained network and its encoders (the rest: training).
MODEL_DESCRIPTION = ("dit_arch", "latent_res", "in_channels", "pos_interp_scale", "vae_name", "text_encoder_name",
                     "dtype")
# The frozen encoders (attributes of LatentDiffusion): rebuilt from their names, never in its state dict, so a
# checkpoint holds only what training changes (the network, a label embedding, the learned loss weighting).
FROZEN_ENCODERS = ("vae", "text_encoder")
# The released MicroDiT_XL_2 checkpoints are those of the 512-px stage: create_latent_diffusion's defaults (the
# original's, which describe the 256-px model) on the 64 x 64 latent grid, positions interpolated 2x.
RELEASED_RESOLUTION: dict[str, Any] = {"latent_res": 64, "pos_interp_scale": 2.0}


class UNetNetwork(nn.Module):
    """The EDM2 U-Net behind the network interface LatentDiffusion uses (that of MicroDiT).

    forward(x (B, C, h, w), c_noise (B,), condition (B, 1, 1, label_dim)) -> {"sample": F (B, C, h, w), "mask": None}.
    The condition holds one-hot class rows (an all-zero row is the null class of classifier-free guidance), which
    the U-Net embeds with its own label layer; an unconditional U-Net (label_dim 0) gets an empty (B, 1, 1, 0)
    condition. There are no patches to mask nor tokens to route: mask_ratio and route_ratio must be 0.
    """

    patch_size = 1  # the loss is averaged over pixels (no patch masking)

    def __init__(self, unet: EDM2UNet) -> None:
        super().__init__()
        self.unet = unet
        self.in_channels = unet.img_channels
        self.caption_channels = unet.label_dim

    def forward(
        self, x: Tensor, t: Tensor, y: Tensor, mask_ratio: float = 0.0, route_ratio: float = 0.0
    ) -> dict[str, Tensor | None]:
        if mask_ratio or route_ratio:
            raise ValueError(f"the EDM2 U-Net has no patches to mask or route; got mask_ratio {mask_ratio}, "
                             f"route_ratio {route_ratio}")
        labels = y.reshape(y.shape[0], self.caption_channels) if self.caption_channels else None
        return {"sample": self.unet(x, t, labels), "mask": None}


class LatentDiffusion(ComposerModel):
    """EDM latent diffusion with a MicroDiT (or EDM2 U-Net) denoiser.

    Args:
        dit: the denoising network F: a MicroDiT, or a `UNetNetwork`. A network with caption_channels 0 is
            unconditional: its condition is an empty (B, 1, 1, 0) tensor and `generate` takes only seeds.
        vae: frozen image <-> latent map (its latent scale and shift live in it).
        text_encoder: frozen captions -> token states; None for class-conditional models or when training only
            on precomputed caption latents.
            Neither frozen encoder is in `state_dict()`, so neither is in a checkpoint; `load_state_dict` keeps the
            ones the model was built with (`models.checkpoints.leave_out_of_state_dict`). It also takes a plain
            network state dict, as the released checkpoints are (`models.checkpoints.accept_network_state_dict`).
        edm: sigma_data, training noise distribution and sampling schedule.
        train_mask_ratio: fraction of patches dropped after the patch-mixer in training (0 in evaluation).
        train_route_ratio: token routing in training (0 in evaluation): the fraction of the backbone's tokens that
            skip the MicroDiT's `route_span` blocks (see `DiT`); it needs a DiT built with a route_span.
        latent_res: latent side used by `generate`.
        precomputed_latents: train from `image_latents` / `caption_latents` in the batch (else encode
            `image` / `captions` on the fly).
        dtype: autocast dtype of generation on GPU (training precision is the Trainer's `precision`).
        learned_loss_weighting: EDM2's learned per-sigma uncertainty weighting.
        validation_sigmas: the fixed noise levels of the validation loss.
        validation_seed: seed of the fixed validation noise.
        num_classes: class-conditional model (miniLDM recipe): a learned label embedder turns `label` (B,) into a
            one-token condition (B, 1, 1, caption_channels); label dropout gives the null (all-zeros) condition.
        one_hot_labels: with num_classes, pass labels to the network as one-hot rows (B, 1, 1, num_classes)
            instead of through a learned label embedder, for a network with its own label layer (the EDM2 U-Net).
        use_caption_mask: text-to-image MicroDiT only: padded caption tokens (`caption_mask` of the batch, or the
            text encoder's attention mask) are not attended to nor pooled. Off by default, the original's
            behaviour (and the released checkpoints', which were trained attending to padding).
    Batch keys (`micro_diffusion.data.schema.BATCH_*`): `image_latents` (B, C, h, w), `caption_latents`
    (B, 1, L, C_txt), `caption_mask` (B, L) bool (read with use_caption_mask), optional `drop_caption_mask` (B,)
    with 0 = replace the caption by the null (all-zeros) embedding; or `image` (B, 3, H, W) in [-1, 1] and
    `captions` (list of B strings) when latents are not precomputed; `label` (B,) for class-conditional models.
    """

    def __init__(
        self,
        dit: DiT | UNetNetwork,
        vae: ImageAutoencoder,
        text_encoder: TextEncoder | None,
        edm: EDMConfig | None = None,
        train_mask_ratio: float = 0.0,
        latent_res: int = 32,
        precomputed_latents: bool = True,
        dtype: torch.dtype = torch.bfloat16,
        learned_loss_weighting: bool = False,
        validation_sigmas: Sequence[float] = (0.1, 0.4, 1.0, 2.5, 8.0),
        validation_seed: int = 0,
        num_classes: int | None = None,
        one_hot_labels: bool = False,
        use_caption_mask: bool = False,
        train_route_ratio: float = 0.0,
    ) -> None:
        super().__init__()
        for name, ratio in (("train_mask_ratio", train_mask_ratio), ("train_route_ratio", train_route_ratio)):
            if not 0.0 <= ratio < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {ratio}")
        if train_route_ratio and getattr(dit, "route_span", None) is None:
            raise ValueError(f"train_route_ratio {train_route_ratio} routes tokens around the MicroDiT's route_span "
                             "blocks: build the DiT with a route_span (dit_kwargs.route_span)")
        if vae.latent_channels != dit.in_channels:
            raise ValueError(
                f"the VAE makes {vae.latent_channels}-channel latents but the DiT takes {dit.in_channels} channels"
            )
        if num_classes is not None and text_encoder is not None:
            raise ValueError("a class-conditional model (num_classes set) takes no text encoder")
        if dit.caption_channels == 0 and (num_classes is not None or text_encoder is not None):
            raise ValueError("the network is unconditional (caption_channels 0): give no num_classes, no text encoder")
        if one_hot_labels and (num_classes or 0) != dit.caption_channels:
            raise ValueError(
                f"one-hot labels of {num_classes} classes need a network with caption_channels {num_classes}, "
                f"not {dit.caption_channels}"
            )
        if use_caption_mask and (num_classes is not None or not isinstance(dit, DiT) or dit.caption_channels == 0):
            raise ValueError("use_caption_mask masks padded caption tokens: it needs a text-to-image MicroDiT")
        if text_encoder is not None and text_encoder.width != dit.caption_channels:
            raise ValueError(
                f"the text encoder is {text_encoder.width} wide but the DiT expects {dit.caption_channels}"
            )
        self.dit = dit
        self.vae = vae
        self.text_encoder = text_encoder
        self.edm = edm or EDMConfig()
        self.train_mask_ratio = train_mask_ratio
        self.train_route_ratio = train_route_ratio
        self.latent_res = latent_res
        self.precomputed_latents = precomputed_latents
        self.dtype = dtype
        self.loss_weighting = LearnedLossWeighting() if learned_loss_weighting else None
        self.validation_sigmas = tuple(float(s) for s in validation_sigmas)
        self.validation_seed = validation_seed
        self.num_classes = num_classes
        self.use_caption_mask = use_caption_mask
        self.label_embedder = None
        if num_classes and not one_hot_labels:
            self.label_embedder = nn.Embedding(num_classes, dit.caption_channels)
        if self.label_embedder is not None:
            nn.init.normal_(self.label_embedder.weight, std=1.0)  # unit scale, like normalised text states
        for frozen in (vae, text_encoder):
            if frozen is not None:
                frozen.requires_grad_(False)
                frozen._fsdp_wrap = False  # Composer FSDP: shard only the DiT
        self.dit._fsdp_wrap = True
        leave_out_of_state_dict(self, FROZEN_ENCODERS)
        accept_network_state_dict(self)

    @classmethod
    def from_pretrained(cls, folder: str | Path, **overrides: Any) -> LatentDiffusion:
        """The model of a model folder (`micro-diffusion export`, `MicroDiTPipeline.save_pretrained`), in eval mode.

        `overrides` replace `create_latent_diffusion` arguments of the folder, e.g. `vae_name` for a local copy of
        its VAE. The VAE must normalise latents with the statistics the network was trained on (those recorded
        in the folder): other ones raise a ValueError naming both.
        """
        exported = read_model_folder(folder)
        arguments = exported.arguments | overrides
        model = create_latent_diffusion(**arguments)
        load_network_state(model, exported.state, str(folder))
        recorded = {name: torch.tensor(values) for name, values in exported.latent_statistics.items()}
        own = {name: torch.tensor(values) for name, values in model.latent_statistics().items()}
        if recorded.keys() != own.keys() or not all(
            torch.allclose(own[name], recorded[name], rtol=1e-5, atol=0.0) for name in own
        ):
            raise ValueError(
                f"the VAE {arguments['vae_name']!r} normalises latents with {model.latent_statistics()}, but the "
                f"network of {folder} was trained on latents normalised with {exported.latent_statistics}: pass the "
                "VAE it was trained with"
            )
        return model.eval()

    def latent_statistics(self) -> dict[str, list[float]]:
        """The VAE's latent normalisation (z - shift) * scale: {"scale": [...], "shift": [...]}, one value or one
        per channel each."""
        return {"scale": self.vae.latent_scale.flatten().tolist(), "shift": self.vae.latent_shift.flatten().tolist()}

    # ----------------------------------------------------------------------------------------------------------
    # Inputs
    # ----------------------------------------------------------------------------------------------------------

    def _require_text_encoder(self) -> TextEncoder:
        if self.text_encoder is None:
            raise RuntimeError("this model was built without a text encoder; pass caption latents instead")
        return self.text_encoder

    def image_latents(self, batch: dict) -> Tensor:
        """(B, C, h, w) float32 normalised latents from the batch, encoding images when not precomputed."""
        if schema.BATCH_IMAGE_LATENTS in batch:
            return batch[schema.BATCH_IMAGE_LATENTS].float()
        if self.precomputed_latents:
            raise KeyError(
                f"precomputed_latents=True but the batch has no {schema.BATCH_IMAGE_LATENTS!r} (keys: {sorted(batch)})"
            )
        return self.vae.encode(batch[schema.BATCH_IMAGE].to(self.vae.dtype)).float()

    @property
    def unconditional(self) -> bool:
        """Whether the network takes no condition at all (caption_channels 0)."""
        return self.dit.caption_channels == 0

    def label_condition(self, labels: Tensor) -> Tensor:
        """Class labels (B,) -> one-token condition (B, 1, 1, caption_channels) float32: the learned label
        embedding, or one-hot rows (caption_channels = num_classes) when the network embeds labels itself."""
        if self.num_classes is None:
            raise RuntimeError("this model is not class-conditional (built without num_classes)")
        embedder = self.label_embedder
        device = embedder.weight.device if embedder is not None else next(self.dit.parameters()).device
        labels = torch.as_tensor(labels, device=device).long()
        if labels.min() < 0 or labels.max() >= self.num_classes:
            raise ValueError(f"class labels must be in [0, {self.num_classes}), got {labels.tolist()}")
        if embedder is None:
            return F.one_hot(labels, self.num_classes).float()[:, None, None, :]
        return embedder(labels).float()[:, None, None, :]

    def caption_latents(self, batch: dict) -> Tensor:
        """(B, 1, L, C_txt) float32 caption states, with dropped captions replaced by the null embedding;
        (B, 1, 1, 0) for an unconditional network."""
        if self.unconditional:
            images = batch[schema.BATCH_IMAGE_LATENTS if schema.BATCH_IMAGE_LATENTS in batch else schema.BATCH_IMAGE]
            return torch.zeros(images.shape[0], 1, 1, 0, device=images.device)
        if self.num_classes is not None:
            caption = self.label_condition(batch[schema.BATCH_LABEL])
        elif schema.BATCH_CAPTION_LATENTS in batch:
            caption = batch[schema.BATCH_CAPTION_LATENTS].float()
        elif self.precomputed_latents:
            raise KeyError(
                f"precomputed_latents=True but the batch has no {schema.BATCH_CAPTION_LATENTS!r} "
                f"(keys: {sorted(batch)})"
            )
        else:
            states, _ = self._require_text_encoder()(list(batch[schema.BATCH_CAPTIONS]))
            caption = states.float().unsqueeze(1)
        if caption.dim() == 3:
            caption = caption.unsqueeze(1)
        if schema.BATCH_DROP_CAPTION in batch:
            caption = caption * batch[schema.BATCH_DROP_CAPTION].float().view(-1, 1, 1, 1)
        return caption

    def caption_mask(self, batch: dict) -> Tensor | None:
        """(B, L) bool, True on real caption tokens, when the model masks padding (use_caption_mask); else None."""
        if not self.use_caption_mask:
            return None
        if schema.BATCH_CAPTION_MASK in batch:
            return batch[schema.BATCH_CAPTION_MASK].bool()
        if self.precomputed_latents:
            raise KeyError(
                f"use_caption_mask=True but the batch has no {schema.BATCH_CAPTION_MASK!r} (keys: {sorted(batch)})"
            )
        _, mask = self._require_text_encoder()(list(batch[schema.BATCH_CAPTIONS]))
        return mask.bool()

    # ----------------------------------------------------------------------------------------------------------
    # Loss
    # ----------------------------------------------------------------------------------------------------------

    def diffusion_loss(
        self,
        latents: Tensor,
        caption: Tensor,
        sigma: Tensor,
        noise: Tensor,
        mask_ratio: float,
        caption_mask: Tensor | None = None,
        route_ratio: float = 0.0,
    ) -> Tensor:
        """EDM loss of the denoiser at noise levels sigma (B,) with the given noise (B, C, h, w); caption (B, 1, L,
        C_txt) with an optional (B, L) bool mask of its real tokens; patch masking and token routing ratios."""
        token_mask: list[Tensor | None] = []
        extra = {} if caption_mask is None else {"caption_mask": caption_mask}

        def network(x_in: Tensor, c_noise: Tensor) -> Tensor:
            out = self.dit(x_in, c_noise, caption, mask_ratio=mask_ratio, route_ratio=route_ratio, **extra)
            token_mask.append(out["mask"])
            return out["sample"]

        denoised = edm_denoise(network, latents + noise * sigma.view(-1, 1, 1, 1), sigma, self.edm.sigma_data)
        log_var = self.loss_weighting(sigma) if self.loss_weighting is not None else None
        loss, _ = edm_loss(
            denoised, latents, sigma, self.edm.sigma_data, token_mask=token_mask[0],
            patch_size=self.dit.patch_size, log_var=log_var,
        )
        return loss

    def forward(self, batch: dict) -> tuple[Tensor, Tensor, Tensor]:
        """Training forward: (loss, latents, caption states). Masking and routing only apply in training mode."""
        latents = self.image_latents(batch)
        caption = self.caption_latents(batch)
        sigma = sample_training_sigmas(latents.shape[0], self.edm.p_mean, self.edm.p_std, device=latents.device)
        mask_ratio = self.train_mask_ratio if self.training else 0.0
        route_ratio = self.train_route_ratio if self.training else 0.0
        loss = self.diffusion_loss(latents, caption, sigma, torch.randn_like(latents), mask_ratio,
                                   self.caption_mask(batch), route_ratio)
        return loss, latents, caption

    def loss(self, outputs: tuple[Tensor, Tensor, Tensor], batch: dict) -> Tensor:
        return outputs[0]

    @torch.no_grad()
    def validation_loss(self, batch: dict) -> Tensor:
        """Mean loss over the fixed validation sigmas with fixed noise: deterministic for a given batch."""
        latents = self.image_latents(batch)
        caption = self.caption_latents(batch)
        caption_mask = self.caption_mask(batch)
        generator = torch.Generator(device=latents.device).manual_seed(self.validation_seed)
        losses = []
        for sigma_value in self.validation_sigmas:
            noise = torch.randn(latents.shape, generator=generator, device=latents.device)
            sigma = torch.full((latents.shape[0],), sigma_value, device=latents.device)
            losses.append(self.diffusion_loss(latents, caption, sigma, noise, 0.0, caption_mask))
        return torch.stack(losses).mean()

    def eval_forward(self, batch: dict, outputs: Tensor | None = None) -> Tensor:
        return outputs if outputs is not None else self.validation_loss(batch)

    def get_metrics(self, is_train: bool = False) -> dict[str, Metric]:
        return {} if is_train else {"ValidationLoss": MeanMetric()}

    def update_metric(self, batch: dict, outputs: Tensor, metric: Metric) -> None:
        metric.update(outputs, weight=self.image_latents(batch).shape[0])

    # ----------------------------------------------------------------------------------------------------------
    # Generation
    # ----------------------------------------------------------------------------------------------------------

    def encode_prompts(
        self,
        prompt: str | Sequence[str] | None,
        tokenized_prompts: Tensor | None,
        attention_mask: Tensor | None,
        class_labels: Sequence[int] | Tensor | None = None,
    ) -> Tensor:
        """Prompts, token ids or class labels -> condition (B, 1, L, C_txt). Over-long prompts are truncated to L,
        with a warning saying how many tokens were dropped; an empty prompt is warned of too."""
        return self._encode_prompts(prompt, tokenized_prompts, attention_mask, class_labels)[0]

    def _encode_prompts(
        self,
        prompt: str | Sequence[str] | None,
        tokenized_prompts: Tensor | None,
        attention_mask: Tensor | None,
        class_labels: Sequence[int] | Tensor | None,
    ) -> tuple[Tensor, Tensor | None]:
        """`encode_prompts`, with the (B, L) bool mask of real tokens when the model masks padding (else None)."""
        if class_labels is not None:
            return self.label_condition(class_labels), None
        encoder = self._require_text_encoder()
        if tokenized_prompts is not None:
            if attention_mask is None:
                attention_mask = torch.ones_like(tokenized_prompts)
            states = encoder.encode(tokenized_prompts, attention_mask)
        else:
            if prompt is None:
                raise ValueError("generate() needs `prompt` (a string or a list of strings) or `tokenized_prompts`")
            prompts = [prompt] if isinstance(prompt, str) else prompt
            if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
                raise TypeError(f"prompt must be a string or a list of strings, got {type(prompt).__name__}")
            if len(prompts) == 0:
                raise ValueError("prompt is an empty list: nothing to generate")
            for message in prompt_warnings(encoder, list(prompts)):
                warnings.warn(message, stacklevel=2)
            states, attention_mask = encoder(list(prompts))
        caption_mask = attention_mask.bool().to(states.device) if self.use_caption_mask else None
        return states.unsqueeze(1), caption_mask

    def denoiser(self, x: Tensor, sigma: Tensor, caption: Tensor, caption_mask: Tensor | None = None) -> Tensor:
        """D(x; sigma, caption) for the samplers: x (B, C, h, w), sigma (B,), caption (B, 1, L, C_txt) with an
        optional (B, L) bool mask of its real tokens -> denoised float32."""
        extra = {} if caption_mask is None else {"caption_mask": caption_mask}
        return edm_denoise(
            lambda x_in, c_noise: self.dit(x_in.to(caption.dtype), c_noise, caption, **extra)["sample"],
            x, sigma, self.edm.sigma_data,
        )

    @torch.no_grad()
    def generate(
        self,
        prompt: str | Sequence[str] | None = None,
        tokenized_prompts: Tensor | None = None,
        attention_mask: Tensor | None = None,
        guidance_scale: float = 5.0,
        num_inference_steps: int = 30,
        seed: int | None = None,
        return_only_latents: bool = False,
        seeds: Sequence[int] | None = None,
        sampler: str = "heun",
        guidance_interval: tuple[float, float] | None = None,
        progress: bool = False,
        class_labels: Sequence[int] | Tensor | None = None,
    ) -> Tensor:
        """Sample images for prompts (or class labels): (B, 3, H, W) float32 in [0, 1] (or latents (B, C, h, w)).

        Image i uses seed `seed + i` (or `seeds[i]`), so an image depends only on its own seed, never on the
        batch it is generated in; seed 0 is a seed like any other, and every seed is an integer in [0, 2**64)
        (`check_seeds`). seed=None draws random seeds. Empty and over-long (truncated) prompts are warned of.
        Guidance (scale > 1) runs conditional and null-caption predictions in one batched forward, optionally
        only for sigmas inside `guidance_interval`. `sampler` is "heun" (EDM, 2N - 1 evaluations) or "euler".
        An unconditional model takes only `seeds` (one image each) and guidance_scale 1.
        """
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        device = next(self.dit.parameters()).device
        if self.unconditional:
            conditions = (prompt, tokenized_prompts, class_labels)
            if seeds is None or guidance_scale != 1.0 or any(c is not None for c in conditions):
                raise ValueError(
                    "an unconditional model generates one image per seed: pass `seeds` and guidance_scale=1.0, "
                    "and no prompts or class labels"
                )
            caption, caption_mask = torch.zeros(len(seeds), 1, 1, 0, device=device), None
        else:
            caption, caption_mask = self._encode_prompts(prompt, tokenized_prompts, attention_mask, class_labels)
            caption = caption.to(device).float()
        batch_size = caption.shape[0]
        if seeds is None:
            base = random.randrange(2**31) if seed is None else int(seed)
            seeds = [base + i for i in range(batch_size)]
        if len(seeds) != batch_size:
            raise ValueError(f"got {len(seeds)} seeds for {batch_size} prompts")
        shape = (self.dit.in_channels, self.latent_res, self.latent_res)
        noise = noise_from_seeds(seeds, shape, device=device, dtype=torch.float32)
        cond, null = {"caption": caption}, {"caption": torch.zeros_like(caption)}
        if caption_mask is not None:
            cond["caption_mask"] = null["caption_mask"] = caption_mask.to(device)
        denoise = guided_denoiser(lambda x, sigma, condition: self.denoiser(x, sigma, **condition), cond, null,
                                  guidance_scale, guidance_interval)
        schedule = dict(sigma_min=self.edm.sigma_min, sigma_max=self.edm.sigma_max, rho=self.edm.rho)
        use_autocast = device.type == "cuda" and self.dtype != torch.float32
        with torch.autocast(device.type, dtype=self.dtype, enabled=use_autocast):
            if sampler == "heun":
                latents = edm_heun_sampler(denoise, noise, num_inference_steps, **schedule,
                                           generators=generators_from_seeds(seeds, device), progress=progress)
            else:
                latents = euler_sampler(denoise, noise, num_inference_steps, **schedule, progress=progress)
        if return_only_latents:
            return latents
        images = self.vae.decode(latents.to(self.vae.dtype)).float()
        return ((images + 1) / 2).clamp(0, 1)


def create_latent_diffusion(
    vae_name: str = "stabilityai/stable-diffusion-xl-base-1.0",
    text_encoder_name: str | None = "openclip:hf-hub:apple/DFN5B-CLIP-ViT-H-14-378",
    dit_arch: str = "MicroDiT_XL_2",
    latent_res: Annotated[int, POSITIVE] = 32,
    in_channels: Annotated[int, POSITIVE] = 4,
    pos_interp_scale: Annotated[float, POSITIVE] = 1.0,
    dtype: str = "bfloat16",
    precomputed_latents: bool = True,
    p_mean: float = EDMConfig.p_mean,
    p_std: Annotated[float, POSITIVE] = EDMConfig.p_std,
    train_mask_ratio: Annotated[float, FRACTION] = 0.0,
    sigma_data: Annotated[float, POSITIVE] = EDMConfig.sigma_data,
    learned_loss_weighting: bool = False,
    load_text_encoder_weights: bool = True,
    num_classes: Annotated[int | None, POSITIVE] = None,
    label_embedding_dim: Annotated[int, POSITIVE] = 256,
    dit_kwargs: dict | None = None,
    unet_preset: str | None = None,
    unet_config: str | None = None,
    unet_kwargs: dict | None = None,
    use_caption_mask: bool = False,
    train_route_ratio: Annotated[float, FRACTION] = 0.0,
) -> LatentDiffusion:
    """Build a LatentDiffusion by names, with the original's arguments and defaults (plus a few of ours).

    The defaults describe the original's 256-px MicroDiT_XL_2 (its EDM values are `EDMConfig`'s);
    `released_model_arguments()` gives the released 512-px checkpoints'. `use_caption_mask` masks padded caption
    tokens (see `LatentDiffusion`); `train_route_ratio` routes that share of the backbone's tokens around the
    blocks of `dit_kwargs["route_span"]` in training (token routing, see `DiT`). The ranges in the annotations are
    checked where a config is read (`micro_diffusion.config_checks.check_arguments`).

    The DiT is built with input_size = latent_res and caption_channels = the text encoder's width (from the
    format table, without loading weights). `load_text_encoder_weights=False` skips loading the text encoder,
    for training on precomputed caption latents only (`generate` then raises). `dit_kwargs` go to the DiT
    constructor (e.g. `{"use_patch_mixer": False}`). Class-conditional models (the miniLDM recipe) pass
    `num_classes` and `text_encoder_name=None`; labels are embedded to `label_embedding_dim` channels.

    `unet_preset` (a key of `edm2_unet.PRESETS`, e.g. "cifar-XXS") replaces the DiT by the EDM2 U-Net in
    configuration `unet_config` ("C", "E" or "G"; default "G"), with preset fields overridden by `unet_kwargs`
    (model_channels, num_blocks, ...); its resolution, channels and classes are latent_res, in_channels and
    num_classes. It is class-conditional (one-hot labels into its own label layer) or, with num_classes and
    text_encoder_name both None, unconditional. The DiT's own arguments (DIT_ARGUMENTS) and patch masking do not
    apply to it: setting one of them to other than its default raises, as does setting unet_config or unet_kwargs
    without unet_preset.
    """
    network_arguments = dict(
        dit_arch=dit_arch, pos_interp_scale=pos_interp_scale, train_mask_ratio=train_mask_ratio,
        train_route_ratio=train_route_ratio, label_embedding_dim=label_embedding_dim, dit_kwargs=dit_kwargs,
        use_caption_mask=use_caption_mask, unet_config=unet_config, unet_kwargs=unet_kwargs,
    )
    _check_network_arguments(unet_preset, network_arguments)
    if train_route_ratio and "route_span" not in (dit_kwargs or {}):
        raise ValueError(f"train_route_ratio {train_route_ratio} routes tokens around the backbone blocks of "
                         "dit_kwargs['route_span'] ([start, end]), which is not set")
    weights_dtype = torch_dtype(dtype)
    if unet_preset is None:
        network = _create_dit_network(
            dit_arch, text_encoder_name, num_classes, label_embedding_dim, latent_res, in_channels, pos_interp_scale,
            dit_kwargs,
        )
    else:
        if text_encoder_name is not None:
            raise ValueError("the EDM2 U-Net is class-conditional or unconditional: set text_encoder_name to None")
        network = _create_unet_network(unet_preset, unet_config or "G", unet_kwargs or {}, latent_res, in_channels,
                                       num_classes)
    vae = load_vae(vae_name, dtype=weights_dtype)
    text_encoder = None
    if text_encoder_name is not None and load_text_encoder_weights:
        text_encoder = load_text_encoder(text_encoder_name, dtype=weights_dtype)
    edm = EDMConfig(sigma_data=sigma_data, p_mean=p_mean, p_std=p_std)
    return LatentDiffusion(
        network, vae, text_encoder, edm=edm, train_mask_ratio=train_mask_ratio, latent_res=latent_res,
        precomputed_latents=precomputed_latents, dtype=weights_dtype, learned_loss_weighting=learned_loss_weighting,
        num_classes=num_classes, one_hot_labels=unet_preset is not None, use_caption_mask=use_caption_mask,
        train_route_ratio=train_route_ratio,
    )


def default_arguments() -> dict[str, Any]:
    """`create_latent_diffusion`'s arguments and their defaults."""
    return {name: p.default for name, p in inspect.signature(create_latent_diffusion).parameters.items()}


def released_model_arguments() -> dict[str, Any]:
    """The MODEL_DESCRIPTION arguments of the released MicroDiT_XL_2 checkpoints (512 px, 64 x 64 latents)."""
    defaults = default_arguments()
    return {name: defaults[name] for name in MODEL_DESCRIPTION} | RELEASED_RESOLUTION


def _check_network_arguments(unet_preset: str | None, arguments: dict[str, Any]) -> None:
    """Raise a ValueError naming the arguments set (to other than their default) for the network not built:
    DIT_ARGUMENTS with unet_preset, UNET_ARGUMENTS without it."""
    defaults = default_arguments()
    ignored = DIT_ARGUMENTS if unet_preset is not None else UNET_ARGUMENTS
    given = [f"{name}={arguments[name]!r}" for name in ignored if arguments[name] != defaults[name]]
    if not given:
        return
    if unet_preset is not None:
        raise ValueError(
            f"{', '.join(given)} configure the MicroDiT, which unet_preset replaces by the EDM2 U-Net "
            f"{unet_preset!r}: remove them"
        )
    raise ValueError(f"{', '.join(given)} configure the EDM2 U-Net: set unet_preset too, or remove them")


def _create_dit_network(
    dit_arch: str,
    text_encoder_name: str | None,
    num_classes: int | None,
    label_embedding_dim: int,
    latent_res: int,
    in_channels: int,
    pos_interp_scale: float,
    dit_kwargs: dict | None,
) -> DiT:
    """The MicroDiT of `create_latent_diffusion`, conditioned on text or on class labels."""
    if (num_classes is None) == (text_encoder_name is None):
        raise ValueError("set exactly one of text_encoder_name (text-to-image) and num_classes (class-conditional)")
    if num_classes is None:
        _, caption_channels = text_encoder_format(text_encoder_name)
    else:
        caption_channels = label_embedding_dim
    return create_dit(
        dit_arch, input_size=latent_res, in_channels=in_channels, pos_interp_scale=pos_interp_scale,
        caption_channels=caption_channels, **(dit_kwargs or {}),
    )


def _create_unet_network(
    preset: str, config: str, overrides: dict, latent_res: int, in_channels: int, num_classes: int | None
) -> UNetNetwork:
    """The EDM2 U-Net of `create_latent_diffusion` on latent_res x latent_res x in_channels inputs."""
    fixed = sorted(set(overrides) & set(UNET_FIELDS_SET_BY_THE_MODEL))
    if fixed:
        raise ValueError(f"unet_kwargs {fixed} are set by latent_res, in_channels and num_classes")
    unet = create_edm2_unet(
        preset, config, img_resolution=latent_res, img_channels=in_channels, label_dim=num_classes or 0, **overrides
    )
    return UNetNetwork(unet)
