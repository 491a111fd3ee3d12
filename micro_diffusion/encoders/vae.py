"""One interface for images <-> latents: a diffusers AutoencoderKL, or pixel space (identity).

IMAGE CONVENTION: every image that goes in or comes out of this module is a float tensor
(B, 3, H, W) with values in [-1, 1] (that is, `uint8 / 127.5 - 1`), NOT [0, 1] and NOT [0, 255].
`encode` rejects values outside [-1, 1]; `decode` clamps its output to [-1, 1].

LATENT CONVENTION: every latent that goes in or comes out is *normalised*,

    z_norm = (z - shift) * scale

where z is the autoencoder's raw latent and scale/shift are scalars or per-channel (C,) values.
This module is the one place where scale and shift are applied; nothing else in the project
multiplies by a scaling factor. They come from, in order of priority:

1. a per-channel statistics file `latent_stats.json` next to the autoencoder's `config.json`
   ({"mean": [...], "std": [...]}, giving shift = mean and scale = 1 / std), written by the
   project's own autoencoder training through `save_latent_stats`;
2. the `KNOWN_VAES` preset of a hub id;
3. the `scaling_factor` / `shift_factor` of the autoencoder's diffusers config.

The autoencoders are frozen: parameters never require grad, the module stays in eval mode even
when a parent module calls `.train()`, and encoding/decoding runs without autograd.
"""

import json
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from torch import Tensor, nn

LATENT_STATS_FILE = "latent_stats.json"
IDENTITY_NAMES = ("identity", "pixel")
_RANGE_TOLERANCE = 1e-3


@dataclass(frozen=True)
class VaePreset:
    """How to load a known hub autoencoder.

    subfolder: folder of the autoencoder inside the hub repository (None: the repository root).
    scaling_factor, shift_factor: fixed normalisation; None means "use the checkpoint config's value".
    """

    subfolder: str | None
    scaling_factor: float | None = None
    shift_factor: float | None = None


KNOWN_VAES: dict[str, VaePreset] = {
    # SDXL-VAE, 4 channels, f = 8 (the original MicroDiT latents). No shift.
    "stabilityai/stable-diffusion-xl-base-1.0": VaePreset("vae", scaling_factor=0.13025, shift_factor=0.0),
    # 16-channel f = 8 VAE; scale and shift come from its own config.
    "ostris/vae-kl-f8-d16": VaePreset(subfolder=None),
}


class ImageAutoencoder(nn.Module, ABC):
    """Frozen image <-> normalised-latent map (see the module docstring for both conventions).

    Subclasses implement the raw autoencoder (`_raw_moments`, `_raw_decode`, `dtype`); this class
    owns validation and the latent normalisation.

    Attributes:
        latent_channels: C, channels of the latent.
        downsample_factor: f, so an (H, W) image has an (H / f, W / f) latent.
        latent_scale, latent_shift: float32 buffers of shape () or (C, 1, 1).
    """

    def __init__(
        self,
        latent_channels: int,
        downsample_factor: int,
        scale: float | Sequence[float] | Tensor = 1.0,
        shift: float | Sequence[float] | Tensor = 0.0,
    ):
        super().__init__()
        self.latent_channels = latent_channels
        self.downsample_factor = downsample_factor
        self.register_buffer("latent_scale", self._as_broadcastable(scale, "scale"), persistent=False)
        self.register_buffer("latent_shift", self._as_broadcastable(shift, "shift"), persistent=False)
        if not torch.all(self.latent_scale != 0):
            raise ValueError(f"latent scale must be non-zero, got {self.latent_scale.flatten().tolist()}")

    def _as_broadcastable(self, value: float | Sequence[float] | Tensor, what: str) -> Tensor:
        """A scalar or (C,) value -> float32 tensor of shape () or (C, 1, 1)."""
        tensor = torch.as_tensor(value, dtype=torch.float32).detach().clone()
        if tensor.ndim == 1 and tensor.numel() == self.latent_channels:
            tensor = tensor.view(-1, 1, 1)
        elif tensor.ndim != 0:
            raise ValueError(
                f"latent {what} must be a scalar or have one value per latent channel "
                f"({self.latent_channels}), got shape {tuple(tensor.shape)}"
            )
        if not torch.all(torch.isfinite(tensor)):
            raise ValueError(f"latent {what} must be finite, got {tensor.flatten().tolist()}")
        return tensor

    @property
    @abstractmethod
    def dtype(self) -> torch.dtype:
        """dtype the autoencoder computes in; encode/decode return tensors of this dtype."""

    @abstractmethod
    def _raw_moments(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """images (B, 3, H, W) in [-1, 1] -> raw posterior (mean, std), each (B, C, H/f, W/f)."""

    @abstractmethod
    def _raw_decode(self, latents: Tensor) -> Tensor:
        """raw latents (B, C, H/f, W/f), `self.dtype` -> images (B, 3, H, W), roughly in [-1, 1]."""

    def train(self, mode: bool = True) -> "ImageAutoencoder":
        """Frozen module: stays in eval mode whatever `mode` is."""
        return super().train(False)

    def freeze(self) -> None:
        """Turn off gradients for every parameter and switch to eval mode."""
        self.requires_grad_(False)
        self.eval()

    @torch.no_grad()
    def encode_moments(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """images (B, 3, H, W) in [-1, 1] -> posterior (mean, std) in normalised latent space.

        Both are (B, C, H/f, W/f) in `self.dtype` on the autoencoder's device; std is zero for a
        deterministic autoencoder.
        """
        self._check_images(images)
        mean, std = self._raw_moments(images.to(device=self.latent_scale.device, dtype=self.dtype))
        scale, shift = self.latent_scale.float(), self.latent_shift.float()
        return ((mean.float() - shift) * scale).to(self.dtype), (std.float() * scale.abs()).to(self.dtype)

    @torch.no_grad()
    def encode(self, images: Tensor, sample: bool = True, generator: torch.Generator | None = None) -> Tensor:
        """images (B, 3, H, W) in [-1, 1] -> normalised latents (B, C, H/f, W/f) in `self.dtype`.

        sample=True draws from the posterior (mean + std * noise, noise from `generator`), as the
        original precompute did; sample=False returns the posterior mean (deterministic).
        """
        mean, std = self.encode_moments(images)
        if not sample:
            return mean
        noise_device = generator.device if generator is not None else mean.device
        noise = torch.randn(mean.shape, generator=generator, device=noise_device, dtype=torch.float32)
        return (mean.float() + std.float() * noise.to(mean.device)).to(self.dtype)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Normalised latents (B, C, h, w) -> images (B, 3, h*f, w*f) in [-1, 1] (clamped), `self.dtype`."""
        if latents.ndim != 4 or latents.shape[1] != self.latent_channels:
            raise ValueError(
                f"decode expects latents of shape (B, {self.latent_channels}, h, w), "
                f"got {tuple(latents.shape)}"
            )
        latents = latents.to(self.latent_scale.device).float()
        raw = latents / self.latent_scale.float() + self.latent_shift.float()
        return self._raw_decode(raw.to(self.dtype)).clamp(-1.0, 1.0).to(self.dtype)

    def _check_images(self, images: Tensor) -> None:
        """Raise a ValueError unless images are float (B, 3, H, W) in [-1, 1] with H and W divisible by f."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"encode expects images of shape (B, 3, H, W), got {tuple(images.shape)}")
        if not images.is_floating_point():
            raise ValueError(
                f"encode expects float images in [-1, 1], got dtype {images.dtype}; "
                "convert uint8 images with images.float() / 127.5 - 1"
            )
        height, width = images.shape[-2:]
        factor = self.downsample_factor
        if height % factor or width % factor:
            raise ValueError(f"image size {height}x{width} not divisible by the downsample factor {factor}")
        low, high = images.min().item(), images.max().item()
        if low < -1 - _RANGE_TOLERANCE or high > 1 + _RANGE_TOLERANCE:
            raise ValueError(
                f"encode expects images in [-1, 1], got values in [{low:.3g}, {high:.3g}]; "
                "map [0, 1] images with 2 * x - 1 and uint8 images with x / 127.5 - 1"
            )


class IdentityAutoencoder(ImageAutoencoder):
    """Pixel space: the latent is the image itself (C = 3, f = 1, scale 1, shift 0).

    Lets the whole stack (precompute, training, sampling) run without any pretrained autoencoder.
    """

    def __init__(self, dtype: torch.dtype = torch.float32):
        super().__init__(latent_channels=3, downsample_factor=1)
        self._dtype = dtype

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    def _raw_moments(self, images: Tensor) -> tuple[Tensor, Tensor]:
        return images, torch.zeros_like(images)

    def _raw_decode(self, latents: Tensor) -> Tensor:
        return latents


class DiffusersAutoencoder(ImageAutoencoder):
    """A frozen diffusers `AutoencoderKL` with its latent normalisation.

    Args:
        vae: the autoencoder; its dtype and device are used as they are.
        scale, shift: latent normalisation, scalars or per-channel (C,) (see the module docstring).
    """

    def __init__(
        self,
        vae: AutoencoderKL,
        scale: float | Sequence[float] | Tensor,
        shift: float | Sequence[float] | Tensor = 0.0,
    ):
        config = vae.config
        super().__init__(
            latent_channels=config.latent_channels,
            downsample_factor=2 ** (len(config.block_out_channels) - 1),
            scale=scale,
            shift=shift,
        )
        self.vae = vae
        self.to(vae.device)
        self.freeze()

    @property
    def dtype(self) -> torch.dtype:
        return self.vae.dtype

    def _raw_moments(self, images: Tensor) -> tuple[Tensor, Tensor]:
        posterior = self.vae.encode(images).latent_dist
        return posterior.mean, posterior.std

    def _raw_decode(self, latents: Tensor) -> Tensor:
        return self.vae.decode(latents).sample

    @classmethod
    def from_pretrained(
        cls,
        name_or_folder: str | Path,
        subfolder: str | None = None,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> "DiffusersAutoencoder":
        """Load from a local diffusers folder (`save_pretrained` layout) or a hub id.

        For a hub id listed in `KNOWN_VAES`, the preset gives the subfolder (unless `subfolder` is
        passed) and the normalisation. A local folder may carry `latent_stats.json`, which wins.
        """
        name = str(name_or_folder)
        preset = KNOWN_VAES.get(name)
        if subfolder is None and preset is not None:
            subfolder = preset.subfolder
        vae = _load_autoencoder_kl(name, subfolder, dtype).to(device)
        weights_folder = Path(name, subfolder or "")
        if (weights_folder / LATENT_STATS_FILE).is_file():
            mean, std = load_latent_stats(weights_folder)
            return cls(vae, scale=1.0 / std, shift=mean)
        if preset is not None and preset.scaling_factor is not None:
            return cls(vae, scale=preset.scaling_factor, shift=preset.shift_factor or 0.0)
        return cls(vae, scale=vae.config.scaling_factor, shift=vae.config.shift_factor or 0.0)


def _load_autoencoder_kl(name: str, subfolder: str | None, dtype: torch.dtype) -> AutoencoderKL:
    """AutoencoderKL from a local folder or a hub id, with an actionable error when it cannot be had."""
    if not Path(name).is_dir() and _looks_like_path(name):
        raise FileNotFoundError(
            f"autoencoder '{name}' is neither an existing diffusers folder nor a hub id of the form "
            "'owner/name'; use 'identity' to train in pixel space"
        )
    try:
        return AutoencoderKL.from_pretrained(
            name, subfolder=subfolder, torch_dtype=dtype, low_cpu_mem_usage=False
        )
    except OSError as error:
        if Path(name).is_dir():
            raise
        include = f' --include "{subfolder}/*"' if subfolder else ""
        raise OSError(
            f"could not load the autoencoder '{name}' (subfolder {subfolder!r}) from the Hugging Face hub "
            f"or its cache ({error}). Download it once with `huggingface-cli download {name}{include}` "
            "(without HF_HUB_OFFLINE=1), or pass the path of a local diffusers folder instead."
        ) from error


def _looks_like_path(name: str) -> bool:
    """True when `name` cannot be a hub id ("owner/repo"), so it must be meant as a local folder."""
    return name.startswith(("/", ".", "~")) or name.count("/") != 1


def save_latent_stats(
    folder: str | Path, mean: Sequence[float] | Tensor, std: Sequence[float] | Tensor
) -> Path:
    """Write per-channel latent statistics (C,) to `folder/latent_stats.json`; returns the file path.

    `DiffusersAutoencoder.from_pretrained(folder)` then normalises with shift = mean, scale = 1 / std.
    """
    mean_list = [float(x) for x in torch.as_tensor(mean).flatten()]
    std_list = [float(x) for x in torch.as_tensor(std).flatten()]
    _check_latent_stats(mean_list, std_list, source="save_latent_stats")
    path = Path(folder) / LATENT_STATS_FILE
    path.write_text(json.dumps({"mean": mean_list, "std": std_list}, indent=2) + "\n")
    return path


def load_latent_stats(folder: str | Path) -> tuple[Tensor, Tensor]:
    """Read `folder/latent_stats.json` -> (mean, std), each a float32 (C,) tensor.

    Raises FileNotFoundError when the file is missing and ValueError when it is malformed.
    """
    path = Path(folder) / LATENT_STATS_FILE
    stats = json.loads(path.read_text())
    if not isinstance(stats, dict) or not {"mean", "std"} <= stats.keys():
        raise ValueError(f"{path} must hold a JSON object with 'mean' and 'std' lists")
    _check_latent_stats(stats["mean"], stats["std"], source=str(path))
    return torch.tensor(stats["mean"], dtype=torch.float32), torch.tensor(stats["std"], dtype=torch.float32)


def _check_latent_stats(mean: list, std: list, source: str) -> None:
    """Raise a ValueError unless mean and std are equally long non-empty lists, std finite and positive."""
    if not isinstance(mean, list) or not isinstance(std, list) or not mean or len(mean) != len(std):
        raise ValueError(f"{source}: 'mean' and 'std' must be non-empty lists of one value per channel")
    if not all(isinstance(x, int | float) and math.isfinite(x) for x in mean):
        raise ValueError(f"{source}: every mean must be a finite number, got {mean}")
    if not all(isinstance(x, int | float) and math.isfinite(x) and x > 0 for x in std):
        raise ValueError(f"{source}: every std must be a finite positive number, got {std}")


def load_vae(
    name: str,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    subfolder: str | None = None,
) -> ImageAutoencoder:
    """Load a frozen autoencoder by name.

    Args:
        name: "identity" or "pixel" (pixel space, no weights), a local diffusers folder, or a hub id
            (e.g. "stabilityai/stable-diffusion-xl-base-1.0"; needs network access or the HF cache).
        dtype: weights and output dtype (SDXL-VAE overflows in float16; prefer bfloat16 or float32).
        device: where the weights live.
        subfolder: folder inside `name`; defaults to the `KNOWN_VAES` preset, else the root.
    """
    if name in IDENTITY_NAMES:
        return IdentityAutoencoder(dtype=dtype).to(device)
    return DiffusersAutoencoder.from_pretrained(name, subfolder=subfolder, dtype=dtype, device=device)
