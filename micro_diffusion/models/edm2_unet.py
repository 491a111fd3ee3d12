"""The EDM2 U-Net (Karras et al. 2024) with the ablation configurations C, E and G of the paper's Table 1.

Forward pass (all configurations):
  x (N, img_channels, R, R) ++ a constant-ones channel -> 3x3 conv -> encoder blocks (skips kept)
  noise_labels (N,) -> Fourier features -> embedding MLP; + class labels -> emb (N, C_emb)
  -> decoder blocks, each (but the resampling ones) fed the next skip by concatenation -> output head
  -> F (N, img_channels, R, R), the raw network output that EDM preconditioning turns into a denoiser.

Layout: channels model_channels x channel_mult per level, resolutions R, R/2, ...; level 0 opens with a 3x3
conv and every other level with a downsampling block, then num_blocks blocks. The decoder mirrors it: the lowest
level opens with two blocks (the first with attention), the others with an upsampling block, then num_blocks + 1
blocks. Attention runs in the blocks at attn_resolutions. No layer has a bias.

Configurations (`config=`), each building on the one before:
  C  architectural streamlining: bias-free conv/linear layers with He-normal init (N(0, 1/fan_in)), GroupNorm
     without affine before every conv, SiLU, scale-only conditioning (1 + Linear(emb)), cosine attention, plain
     residual sums and concatenations, a two-layer embedding MLP on Fourier features, and a
     GroupNorm -> SiLU -> conv output head.
  E  magnitude-preserving learned layers: every conv/linear an MPConv (in-graph weight normalisation scaled by
     1/sqrt(fan_in), forced weight normalisation while training), block outputs clipped to +-256. The paper's E
     also switches to an inverse-square-root learning rate, which belongs to the optimiser, not the network.
  G  the final network: no GroupNorm (pixel norm on the encoder main path, none in the decoder), MP-SiLU,
     MP-sum (t = 0.3) for residuals and attention, MP-cat (t = 0.5) for skips, one-layer embedding on
     MP-Fourier features, label/noise embeddings joined by MP-sum (t = 0.5), zero-initialised learned gains on
     the conditioning and the output conv.
C and E follow the CIFAR reimplementation's block layout (residual branch conv in -> out, channel-changing 1x1
conv on the main path after the branch); G follows EDM2's (the encoder applies the 1x1 conv first). Both the C/E
and G networks use MP-Fourier features (the sqrt(2) only rescales the input of a learned layer). The paper's
configurations A, B, D and F are not built here; B's layout changes (for 64x64 latents: no 4x4 level, attention
at 16x16 and 8x8 only) are in the img512 presets. Class labels are one-hot vectors scaled to unit RMS in every
configuration; an all-zero row means "no class" (label dropout for classifier-free guidance).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from micro_diffusion.diffusion.edm import edm_denoise
from micro_diffusion.models.mp_layers import (
    RES_BALANCE,
    MPConv,
    MPFourier,
    clip_activations,
    cosine_attention,
    mp_cat,
    mp_silu,
    mp_sum,
    pixel_norm,
)

Config = Literal["C", "E", "G"]
Flavor = Literal["enc", "dec"]
Resample = Literal["keep", "down", "up"]

ATTN_BALANCE = 0.3  # weight of the attention branch in MP-sum
LABEL_BALANCE = 0.5  # weight of the class embedding against the noise embedding
CONCAT_BALANCE = 0.5  # weight of the skip connection in MP-cat
CLIP_ACT = 256.0
NORM_GROUPS = 32  # GroupNorm groups in blocks (C, E)
OUT_NORM_GROUPS = 8  # GroupNorm groups of the output head (C, E), as in the CIFAR reimplementation
SIGMA_DATA = 0.5


@dataclass(frozen=True)
class Ablation:
    """The switches that distinguish configurations C, E and G."""

    mp_layers: bool  # MPConv with forced weight normalisation (E, G); else bias-free He-init layers (C)
    group_norm: bool  # GroupNorm in the blocks and output head (C, E); else pixel norm on the encoder path (G)
    mp_fixed: bool  # MP-SiLU/-sum/-cat, one-layer embedding, learned zero-init gains (G)
    clip: bool  # clamp block outputs to +-CLIP_ACT (E, G)


ABLATIONS: dict[str, Ablation] = {
    "C": Ablation(mp_layers=False, group_norm=True, mp_fixed=False, clip=False),
    "E": Ablation(mp_layers=True, group_norm=True, mp_fixed=False, clip=True),
    "G": Ablation(mp_layers=True, group_norm=False, mp_fixed=True, clip=True),
}


# --------------------------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------------------------


class HeConv(nn.Module):
    """Config C's bias-free convolution (kernel (k, k), 'same' padding) or linear layer (kernel ()).

    Weight (out, in, *kernel) initialised N(0, 1 / fan_in), so unit-variance inputs start with unit-variance
    outputs; it is used as is (no normalisation). Same interface as MPConv; input (N, in, H, W) or (..., in).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: tuple[int, ...]) -> None:
        super().__init__()
        weight = torch.randn(out_channels, in_channels, *kernel)
        self.weight = nn.Parameter(weight / math.sqrt(weight[0].numel()))

    def forward(self, x: Tensor) -> Tensor:
        weight = self.weight.to(x.dtype)
        if weight.ndim == 2:
            return F.linear(x, weight)
        return F.conv2d(x, weight, padding=weight.shape[-1] // 2)


def make_conv(arch: Ablation, in_channels: int, out_channels: int, kernel: tuple[int, ...]) -> nn.Module:
    """The configuration's conv (kernel (k, k)) or linear layer (kernel ())."""
    if arch.mp_layers:
        return MPConv(in_channels, out_channels, kernel)
    return HeConv(in_channels, out_channels, kernel)


def make_norm(arch: Ablation, channels: int, groups: int = NORM_GROUPS) -> nn.Module:
    """GroupNorm without affine (C, E; fewer groups when `channels` is not a multiple) or the identity (G)."""
    if arch.group_norm:
        return nn.GroupNorm(math.gcd(groups, channels), channels, affine=False)
    return nn.Identity()


def resample(x: Tensor, mode: Resample) -> Tensor:
    """(N, C, H, W) -> 2x2 average pooling ('down'), nearest-neighbour x2 ('up') or unchanged ('keep')."""
    if mode == "down":
        return F.avg_pool2d(x, 2)
    if mode == "up":
        return F.interpolate(x, scale_factor=2, mode="nearest")
    return x


# --------------------------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------------------------


class UNetBlock(nn.Module):
    """A residual block with scale-only conditioning and optional cosine self-attention.

    Input x (N, in_channels, H, W) and emb (N, emb_channels); output (N, out_channels, H', W') with H' = H / 2,
    H or 2H for resample 'down', 'keep' or 'up'. Residual branch: act -> 3x3 conv -> x (1 + Linear(emb)) ->
    act -> dropout -> 3x3 conv. In G's encoder blocks the main path is first mapped to out_channels (1x1 conv)
    and pixel-normalised; elsewhere the 1x1 conv maps the main path after the branch.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        flavor: Flavor,
        arch: Ablation,
        resample_mode: Resample = "keep",
        attention: bool = False,
        channels_per_head: int = 64,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if attention and out_channels % channels_per_head:
            raise ValueError(f"attention needs channels ({out_channels}) divisible by {channels_per_head}")
        self.arch = arch
        self.resample_mode = resample_mode
        self.pixel_norm_input = arch.mp_fixed and flavor == "enc"
        self.num_heads = out_channels // channels_per_head if attention else 0
        res_in = out_channels if self.pixel_norm_input else in_channels
        self.norm0 = make_norm(arch, res_in)
        self.conv_res0 = make_conv(arch, res_in, out_channels, (3, 3))
        if arch.mp_fixed:
            self.emb_linear = MPConv(emb_channels, out_channels, (), learned_gain=True)
        else:
            self.emb_linear = make_conv(arch, emb_channels, out_channels, ())
        self.norm1 = make_norm(arch, out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv_res1 = make_conv(arch, out_channels, out_channels, (3, 3))
        self.conv_skip = make_conv(arch, in_channels, out_channels, (1, 1)) if in_channels != out_channels else None
        if self.num_heads:
            self.norm_attn = make_norm(arch, out_channels)
            self.attn_qkv = make_conv(arch, out_channels, 3 * out_channels, (1, 1))
            self.attn_proj = make_conv(arch, out_channels, out_channels, (1, 1))

    def activation(self, x: Tensor) -> Tensor:
        return mp_silu(x) if self.arch.mp_fixed else F.silu(x)

    def join(self, x: Tensor, branch: Tensor, t: float) -> Tensor:
        """Add a branch to the main path: MP-sum with branch weight t (G) or a plain sum (C, E)."""
        return mp_sum(x, branch, t) if self.arch.mp_fixed else x + branch

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        x = resample(x, self.resample_mode)
        if self.pixel_norm_input:
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = pixel_norm(x)
        y = self.conv_res0(self.activation(self.norm0(x)))
        scale = 1 + self.emb_linear(emb)  # (N, out_channels)
        y = self.activation(self.norm1(y) * scale[:, :, None, None].to(y.dtype))
        y = self.conv_res1(self.dropout(y))
        if not self.pixel_norm_input and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = self.join(x, y, RES_BALANCE)
        if self.num_heads:
            y = self.attn_proj(cosine_attention(self.attn_qkv(self.norm_attn(x)), self.num_heads))
            x = self.join(x, y, ATTN_BALANCE)
        if self.arch.clip:
            x = clip_activations(x, CLIP_ACT)
        return x


class ConditioningEmbedding(nn.Module):
    """Noise (and class) embedding: c_noise (N,), class_labels (N, label_dim) or None -> emb (N, emb_channels).

    G: MP-Fourier -> MPConv, MP-summed with MPConv(one-hot * sqrt(label_dim)), then MP-SiLU.
    C, E: Fourier -> linear -> SiLU -> linear, plus linear(one-hot * sqrt(label_dim)), then SiLU.
    The U-Net uses model_channels * channel_mult[0] Fourier features (emb_channels / 4 in every preset).
    """

    def __init__(self, noise_channels: int, emb_channels: int, label_dim: int, arch: Ablation) -> None:
        super().__init__()
        self.arch = arch
        self.fourier = MPFourier(noise_channels)
        self.noise_linear = make_conv(arch, noise_channels, emb_channels, ())
        self.noise_linear2 = None if arch.mp_fixed else make_conv(arch, emb_channels, emb_channels, ())
        self.label_linear = make_conv(arch, label_dim, emb_channels, ()) if label_dim else None

    def forward(self, noise_labels: Tensor, class_labels: Tensor | None) -> Tensor:
        emb = self.noise_linear(self.fourier(noise_labels))
        if self.noise_linear2 is not None:
            emb = self.noise_linear2(F.silu(emb))
        if self.label_linear is not None:
            labels = self.label_linear(class_labels * math.sqrt(class_labels.shape[1]))
            emb = mp_sum(emb, labels, LABEL_BALANCE) if self.arch.mp_fixed else emb + labels
        return mp_silu(emb) if self.arch.mp_fixed else F.silu(emb)


class OutputHead(nn.Module):
    """(N, C, H, W) -> (N, img_channels, H, W): G: a 3x3 MPConv times a learned gain initialised to 0 (so F = 0
    at initialisation); C, E: GroupNorm -> SiLU -> 3x3 conv."""

    def __init__(self, channels: int, img_channels: int, arch: Ablation) -> None:
        super().__init__()
        self.norm = make_norm(arch, channels, OUT_NORM_GROUPS)
        if arch.mp_fixed:
            self.conv = MPConv(channels, img_channels, (3, 3), learned_gain=True)
        else:
            self.conv = make_conv(arch, channels, img_channels, (3, 3))
        self.activate = not arch.mp_fixed

    def forward(self, x: Tensor) -> Tensor:
        if self.activate:
            x = F.silu(self.norm(x))
        return self.conv(x)


# --------------------------------------------------------------------------------------------------------------
# Network
# --------------------------------------------------------------------------------------------------------------


class EDM2UNet(nn.Module):
    """The EDM2 U-Net F(x, c_noise, class): see the module docstring for the layout and configurations.

    Args:
        img_resolution: input side R (a multiple of 2^(levels - 1)).
        img_channels: input/output channels (4 for SD-VAE latents, 3 for pixels).
        label_dim: number of classes; 0 for an unconditional network.
        model_channels: base width C; level i has C * channel_mult[i] channels.
        channel_mult, num_blocks, attn_resolutions: the layout (see the module docstring).
        channel_mult_emb: the embedding has C * channel_mult_emb channels (C * max(channel_mult) when None).
        dropout: dropout probability inside the residual branches.
        config: ablation configuration 'C', 'E' or 'G'.
        channels_per_head: attention head width.
    """

    def __init__(
        self,
        img_resolution: int,
        img_channels: int,
        label_dim: int = 0,
        model_channels: int = 192,
        channel_mult: tuple[int, ...] = (1, 2, 3, 4),
        channel_mult_emb: int | None = None,
        num_blocks: int = 3,
        attn_resolutions: tuple[int, ...] = (16, 8),
        dropout: float = 0.0,
        config: Config = "G",
        channels_per_head: int = 64,
    ) -> None:
        super().__init__()
        if config not in ABLATIONS:
            raise ValueError(f"config must be one of {sorted(ABLATIONS)}, got {config!r}")
        if img_resolution % 2 ** (len(channel_mult) - 1):
            raise ValueError(f"img_resolution {img_resolution} is not divisible by 2^{len(channel_mult) - 1}")
        arch = ABLATIONS[config]
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.config = config
        widths = [model_channels * mult for mult in channel_mult]
        emb_channels = model_channels * (channel_mult_emb or max(channel_mult))
        self.embedding = ConditioningEmbedding(widths[0], emb_channels, label_dim, arch)

        def block(cin: int, cout: int, flavor: Flavor, **kwargs) -> UNetBlock:
            return UNetBlock(
                cin, cout, emb_channels, flavor, arch, channels_per_head=channels_per_head, dropout=dropout, **kwargs
            )

        self.input_conv = make_conv(arch, img_channels + 1, widths[0], (3, 3))
        self.encoder = nn.ModuleDict()
        skip_channels = [widths[0]]
        channels = widths[0]
        for level, width in enumerate(widths):
            res = img_resolution >> level
            if level > 0:
                self.encoder[f"{res}x{res}_down"] = block(channels, channels, "enc", resample_mode="down")
                skip_channels.append(channels)
            for index in range(num_blocks):
                attention = res in attn_resolutions
                self.encoder[f"{res}x{res}_block{index}"] = block(channels, width, "enc", attention=attention)
                channels = width
                skip_channels.append(channels)

        self.decoder = nn.ModuleDict()
        for level, width in reversed(list(enumerate(widths))):
            res = img_resolution >> level
            if level == len(widths) - 1:
                self.decoder[f"{res}x{res}_in0"] = block(channels, channels, "dec", attention=True)
                self.decoder[f"{res}x{res}_in1"] = block(channels, channels, "dec")
            else:
                self.decoder[f"{res}x{res}_up"] = block(channels, channels, "dec", resample_mode="up")
            for index in range(num_blocks + 1):
                attention = res in attn_resolutions
                cin = channels + skip_channels.pop()
                self.decoder[f"{res}x{res}_block{index}"] = block(cin, width, "dec", attention=attention)
                channels = width
        self.mp_cat = arch.mp_fixed
        self.output = OutputHead(channels, img_channels, arch)

    def forward(self, x: Tensor, noise_labels: Tensor, class_labels: Tensor | None = None) -> Tensor:
        """x: (N, img_channels, R, R); noise_labels: (N,) c_noise; class_labels: (N,) int64 class ids or
        (N, label_dim) one-hot (all-zero rows = no class, for classifier-free guidance), None if unconditional.
        Returns F: (N, img_channels, R, R) in x's dtype."""
        emb = self.embedding(noise_labels, self._one_hot(class_labels, x.shape[0]))
        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        x = self.input_conv(x)
        skips = [x]
        for block in self.encoder.values():
            x = block(x, emb)
            skips.append(x)
        for name, block in self.decoder.items():
            if "block" in name:  # every decoder block but the 'in' and 'up' ones takes the next skip
                skip = skips.pop()
                x = mp_cat(x, skip, t=CONCAT_BALANCE) if self.mp_cat else torch.cat([x, skip], dim=1)
            x = block(x, emb)
        return self.output(x)

    def _one_hot(self, class_labels: Tensor | None, batch_size: int) -> Tensor | None:
        """Class ids (N,) or one-hot (N, label_dim) -> float (N, label_dim); None for unconditional networks."""
        if self.label_dim == 0:
            if class_labels is not None:
                raise ValueError("this network is unconditional (label_dim 0) but got class_labels")
            return None
        if class_labels is None:
            raise ValueError(f"this network is class-conditional (label_dim {self.label_dim}); pass class_labels")
        if class_labels.ndim == 1 and not class_labels.is_floating_point():
            class_labels = F.one_hot(class_labels, self.label_dim)
        if class_labels.shape != (batch_size, self.label_dim):
            raise ValueError(
                f"class_labels must be ({batch_size},) ids or ({batch_size}, {self.label_dim}) one-hot, "
                f"got {tuple(class_labels.shape)}"
            )
        return class_labels.float()


# --------------------------------------------------------------------------------------------------------------
# Preconditioning
# --------------------------------------------------------------------------------------------------------------


class EDM2Denoiser(nn.Module):
    """EDM preconditioning around an EDM2 U-Net: D(x; sigma) = c_skip x + c_out F(c_in x, ln(sigma) / 4, class).

    x: (N, C, R, R) noisy input; sigma: (N,) noise levels; class_labels as in EDM2UNet.forward.
    Returns the denoised estimate (N, C, R, R) in float32 (the skip combination runs in float32).
    The call signature is the samplers' conditional denoiser (x, sigma, condition).
    """

    def __init__(self, unet: EDM2UNet, sigma_data: float = SIGMA_DATA) -> None:
        super().__init__()
        self.unet = unet
        self.sigma_data = sigma_data

    def forward(self, x: Tensor, sigma: Tensor, class_labels: Tensor | None = None) -> Tensor:
        return edm_denoise(lambda x_in, c_noise: self.unet(x_in, c_noise, class_labels), x, sigma, self.sigma_data)


# --------------------------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UNetPreset:
    """The constructor arguments of EDM2UNet that define a model size (the configuration is chosen apart)."""

    img_resolution: int
    img_channels: int
    model_channels: int
    label_dim: int = 0
    channel_mult: tuple[int, ...] = (1, 2, 3, 4)
    channel_mult_emb: int | None = None
    num_blocks: int = 3
    attn_resolutions: tuple[int, ...] = (16, 8)
    dropout: float = 0.0
    channels_per_head: int = 64


def _img512(model_channels: int, dropout: float) -> UNetPreset:
    return UNetPreset(img_resolution=64, img_channels=4, model_channels=model_channels, label_dim=1000, dropout=dropout)


def _cifar(model_channels: int) -> UNetPreset:
    return UNetPreset(
        img_resolution=32,
        img_channels=3,
        model_channels=model_channels,
        channel_mult=(1, 2, 2, 2),
        channel_mult_emb=4,
        num_blocks=2,
        attn_resolutions=(16,),
        dropout=0.13,
    )


# img512-*: ImageNet-512 as SD-VAE latents (64x64x4), class-conditional; config G has the paper's sizes
# (XS 125M, S 280M, M 498M, L 777M, XL 1119M, XXL 1523M parameters). cifar-*: 32x32 RGB pixels, unconditional,
# the CIFAR reimplementation's network (cifar-XS: 39.5M parameters in configs C and E) and a half-width one.
# The width letter always names model_channels: XXS 64, XS 128, S 192, M 256, L 320, XL 384, XXL 448.
PRESETS: dict[str, UNetPreset] = {
    "img512-XXS": _img512(64, 0.0),
    "img512-XS": _img512(128, 0.0),
    "img512-S": _img512(192, 0.0),
    "img512-M": _img512(256, 0.1),
    "img512-L": _img512(320, 0.1),
    "img512-XL": _img512(384, 0.1),
    "img512-XXL": _img512(448, 0.1),
    "cifar-XXS": _cifar(64),
    "cifar-XS": _cifar(128),
}


def create_edm2_unet(preset: str, config: Config = "G", **overrides) -> EDM2UNet:
    """Build a preset network in configuration C, E or G; keyword overrides replace preset fields, e.g.
    create_edm2_unet("cifar-XS", config="E", label_dim=10, img_channels=1)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown EDM2 U-Net preset {preset!r}; choose from {sorted(PRESETS)}")
    known = {field.name for field in fields(UNetPreset)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown preset fields {unknown}; the fields are {sorted(known)}")
    spec = replace(PRESETS[preset], **overrides)
    return EDM2UNet(**vars(spec), config=config)
