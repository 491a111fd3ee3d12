"""MDS column names, dtypes and shapes of the raw and latent shards, in one place.

Raw shards (written by `convert`): one row per image, the encoded image plus its text and size.
Latent shards (written by `precompute`): the columns of the original MicroDiT shards, generalised to any list of
resolutions: `caption_latents` (fp16 bytes of shape (1, L, C)), `latents_<res>` (fp16 bytes of shape
(C_lat, res / f, res / f)), `caption` and `label`; optionally `latents_<res>_std` when the VAE posterior mean and
std are stored instead of a sample (EDM2 style).
"""

from __future__ import annotations

import numpy as np

# Raw shards.
RAW_IMAGE = "image"  # encoded image bytes (PNG or JPEG, as read)
RAW_CAPTION = "caption"
RAW_LABEL = "label"
RAW_WIDTH = "width"
RAW_HEIGHT = "height"
RAW_KEY = "key"
RAW_EXTRA = "extra"  # JSON text with source-specific ground truth ("{}" when none)
RAW_COLUMNS: dict[str, str] = {
    RAW_KEY: "str",
    RAW_IMAGE: "bytes",
    RAW_CAPTION: "str",
    RAW_LABEL: "int",
    RAW_WIDTH: "int32",
    RAW_HEIGHT: "int32",
    RAW_EXTRA: "json",
}

# Latent shards.
CAPTION = "caption"
LABEL = "label"
KEY = "key"
CAPTION_LATENTS = "caption_latents"
CAPTION_MASK = "caption_mask"  # uint8 bytes (L,), 1 = real token; written for encoders that pad (T5, MiniLM)
LATENT_DTYPE = np.float16

# Training batches (the keys of a collated batch, read by `LatentDiffusion`).
BATCH_IMAGE_LATENTS = "image_latents"  # (B, C_lat, h, w) float32, from latents_column(image_size)
BATCH_CAPTION_LATENTS = CAPTION_LATENTS  # (B, 1, L, C_txt) float32
BATCH_CAPTION_MASK = CAPTION_MASK  # (B, L) bool, True on real tokens
BATCH_DROP_CAPTION = "drop_caption_mask"  # (B,) float32, 0 = replace the caption by the null condition
BATCH_CAPTION = CAPTION  # B strings (the text of the caption)
BATCH_LABEL = LABEL  # (B,) int64 class labels (-1 for shards without labels)
BATCH_IMAGE = "image"  # (B, 3, H, W) in [-1, 1], when latents are encoded on the fly
BATCH_CAPTIONS = "captions"  # B strings, when caption states are encoded on the fly


def latents_column(resolution: int) -> str:
    """Column holding the image latents of the `resolution`-pixel centre crop, e.g. `latents_256`."""
    return f"latents_{resolution}"


def latents_std_column(resolution: int) -> str:
    """Column holding the VAE posterior std next to the mean in `latents_column(resolution)`."""
    return f"latents_{resolution}_std"


def latent_columns(resolutions: list[int], with_std: bool = False) -> dict[str, str]:
    """MDS column spec of a latent shard for the given image resolutions."""
    columns = {KEY: "str", CAPTION: "str", LABEL: "int", CAPTION_LATENTS: "bytes", CAPTION_MASK: "bytes"}
    for resolution in resolutions:
        columns[latents_column(resolution)] = "bytes"
        if with_std:
            columns[latents_std_column(resolution)] = "bytes"
    return columns


def to_fp16_bytes(array: np.ndarray) -> bytes:
    """Serialise an array as contiguous little-endian float16 bytes."""
    return np.ascontiguousarray(array, dtype=LATENT_DTYPE).tobytes()


def from_fp16_bytes(data: bytes, shape: tuple[int, ...], column: str) -> np.ndarray:
    """Decode float16 bytes into `shape`, with an error naming the column when the size does not match.

    A leading -1 in `shape` is inferred (used for the latent channel count).
    """
    array = np.frombuffer(data, dtype=LATENT_DTYPE)
    known = int(np.prod([s for s in shape if s != -1]))
    if array.size % known or (-1 not in shape and array.size != known):
        raise ValueError(
            f"column {column!r}: {array.size} float16 values cannot be shaped as {tuple(shape)}; "
            "the shard was written for another resolution or encoder"
        )
    return array.reshape(shape)
