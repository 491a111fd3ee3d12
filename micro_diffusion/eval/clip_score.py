"""CLIP score of captioned images with an OpenCLIP model read from disk.

The score follows torchmetrics' CLIPScore: 100 * max(cos(image embedding, caption embedding), 0) per image,
averaged. torchmetrics' own metric only takes Hugging Face CLIP models, hence this small OpenCLIP version.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from micro_diffusion.eval.features import ClipImageFeatures, load_open_clip


class ClipScore(nn.Module):
    """Per-image CLIP score of (image, caption) pairs.

    Args:
        model: an OpenCLIP model (its text tower encodes captions, its image tower images).
        tokenizer: OpenCLIP tokenizer, list[str] -> (B, L) token ids.
        name: identifies the model in reports, e.g. "clip-ViT-B-32".
    """

    def __init__(self, model: nn.Module, tokenizer: Any, name: str):
        super().__init__()
        self.model = model.requires_grad_(False).eval()
        self.tokenizer = tokenizer
        self.image_features = ClipImageFeatures(model, name)

    @property
    def name(self) -> str:
        return self.image_features.name

    def forward(self, images: Tensor, captions: Sequence[str]) -> Tensor:
        """images (B, C, H, W) floats in [0, 1], B captions -> scores (B,) in [0, 100]."""
        if isinstance(captions, str) or len(captions) != len(images):
            raise ValueError(f"expected one caption per image, got {len(images)} images, {captions!r:.200}")
        image_embeddings = self.image_features(images)
        tokens = self.tokenizer(list(captions)).to(image_embeddings.device)
        text_embeddings = F.normalize(self.model.encode_text(tokens).float(), dim=-1)
        return 100 * (image_embeddings * text_embeddings).sum(dim=-1).clamp_min(0)


def load_clip_score(
    weights_path: str | os.PathLike | None = None,
    model_name: str | None = None,
    device: str | torch.device = "cpu",
) -> ClipScore:
    """Builds a `ClipScore` from a local OpenCLIP model folder or checkpoint file (default:
    $MICRO_DIFFUSION_CLIP_WEIGHTS); see `features.load_open_clip` for the accepted layouts."""
    model, tokenizer, name = load_open_clip(weights_path, model_name)
    return ClipScore(model, tokenizer, name).to(device)


def clip_score(pairs: Iterable[tuple[Tensor, Sequence[str]]], scorer: ClipScore) -> float:
    """Mean CLIP score over batches of (images (B, C, H, W) in [0, 1], B captions)."""
    total, count = 0.0, 0
    with torch.inference_mode():
        for images, captions in pairs:
            scores = scorer(images, captions)
            total += scores.double().sum().item()
            count += len(scores)
    if count == 0:
        raise ValueError("no (images, captions) pairs were given")
    return total / count
