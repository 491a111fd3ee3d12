"""`micro-diffusion latent-stats`: per-channel latent mean and std of a trained autoencoder over a dataset.

The statistics are written as `latent_stats.json` next to the autoencoder's `config.json`
(`micro_diffusion.encoders.vae.save_latent_stats`); from then on `load_vae(folder)` returns normalised latents
(z - mean) / std, so precompute and generation need no scale factors by hand:

    micro-diffusion latent-stats --autoencoder trained_models/ae_shapes/autoencoder \\
        --source shapes --source-option num_samples=20000 --image-size 32

Also here: `load_source_images`, the in-memory image set that autoencoder training reads too, so that the
statistics come from exactly the images (and the resize and crop) the autoencoder was trained on.
"""

from __future__ import annotations

import argparse
import inspect
import sys
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset
from tqdm import tqdm

from micro_diffusion.data.cli_options import parse_key_values, parse_with_config
from micro_diffusion.data.precompute import DTYPES, crop_transform, to_rgb
from micro_diffusion.data.sources import available_sources, get_source


class ImageSet(Dataset):
    """Images held in memory as uint8 (N, 3, S, S); item i is a float32 (3, S, S) in [-1, 1]."""

    def __init__(self, pixels: Tensor):
        if pixels.dtype != torch.uint8 or pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"expected uint8 pixels (N, 3, S, S), got {pixels.dtype} {tuple(pixels.shape)}")
        self.pixels = pixels

    def __len__(self) -> int:
        return self.pixels.shape[0]

    def __getitem__(self, index: int) -> Tensor:
        return _to_unit_range(self.pixels[index])

    def batches(self, batch_size: int) -> Iterator[Tensor]:
        """All images in order, (B, 3, S, S) float32 in [-1, 1] with B <= batch_size."""
        for pixels in self.pixels.split(batch_size):
            yield _to_unit_range(pixels)


def _to_unit_range(pixels: Tensor) -> Tensor:
    """uint8 levels 0..255 -> float32 in [-1, 1] (the project's image convention)."""
    return pixels.float() / 127.5 - 1.0


def load_source_images(
    source: str,
    source_options: Mapping[str, Any] | None = None,
    image_size: int = 32,
    max_images: int | None = None,
    progress: bool = False,
) -> ImageSet:
    """Read a registered source (`micro_diffusion.data.sources`) into memory, as precompute prepares images:
    RGB (transparency on white), shorter side resized to `image_size` (bicubic), centre crop.

    Records whose image cannot be read are skipped, counted and reported in a warning.

    Args:
        source: a reader name (`available_sources()`), e.g. "shapes", "fashion_mnist", "emoji", "folder".
        source_options: the reader's keyword arguments.
        image_size: side S of the square images.
        max_images: read at most this many records (None: all).
        progress: show a progress bar.
    """
    reader = get_source(source)
    options = dict(source_options or {})
    try:
        inspect.signature(reader).bind(**options)
    except TypeError as error:
        raise ValueError(f"bad options {options} for source {source!r}: {error}") from None
    transform = crop_transform(image_size)
    images, skipped = [], []
    records = reader(**options)
    for record in tqdm(records, desc=f"reading {source}", total=max_images, disable=not progress):
        if max_images is not None and len(images) >= max_images:
            break
        try:
            image = to_rgb(record.open_image())
        except (OSError, ValueError) as error:
            skipped.append(f"{record.key} ({error})")
            continue
        images.append(transform(image).add(1).mul(127.5).round().to(torch.uint8))
    if skipped:
        warnings.warn(f"{source}: skipped {len(skipped)} unreadable record(s): {', '.join(skipped[:5])}", stacklevel=2)
    if not images:
        raise ValueError(f"source {source!r} with options {options} yielded no readable image")
    return ImageSet(torch.stack(images))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="micro-diffusion latent-stats",
        description="Compute per-channel latent mean/std of a trained autoencoder and store them next to it.",
    )
    parser.add_argument("--autoencoder", type=Path, help="diffusers AutoencoderKL folder (save_pretrained)")
    parser.add_argument("--source", help=f"reader name of the training images, one of {available_sources()}")
    parser.add_argument(
        "--source-option", dest="source_options", action="append", metavar="KEY=VALUE",
        help="reader argument, repeatable (e.g. --source-option num_samples=20000); YAML: a source_options mapping",
    )  # fmt: skip
    parser.add_argument("--image-size", type=int, default=32, help="side of the square images (default 32)")
    parser.add_argument("--max-images", type=int, help="use at most this many images (default: all)")
    parser.add_argument("--batch-size", type=int, default=256, help="images per encoder call (default 256)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="encoder device")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="encoder dtype (default float32)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def main(argv: list[str] | None = None) -> None:
    """Entry point of `micro-diffusion latent-stats`."""
    from diffusers import AutoencoderKL

    from micro_diffusion.encoders.vae import save_latent_stats
    from micro_diffusion.models.autoencoder import compute_latent_stats

    args = parse_with_config(build_parser(), argv, required=("autoencoder", "source"))
    if not (args.autoencoder / "config.json").is_file():
        raise SystemExit(f"micro-diffusion latent-stats: {args.autoencoder} is not a diffusers autoencoder folder")
    try:
        images = load_source_images(
            args.source,
            parse_key_values(args.source_options, "--source-option"),
            args.image_size,
            args.max_images,
            progress=not args.no_progress,
        )
    except (KeyError, ValueError) as error:
        raise SystemExit(f"micro-diffusion latent-stats: {error}") from None
    vae = AutoencoderKL.from_pretrained(args.autoencoder, torch_dtype=DTYPES[args.dtype], low_cpu_mem_usage=False)
    vae = vae.to(args.device).eval()
    batches = tqdm(
        images.batches(args.batch_size),
        desc="encoding",
        total=-(-len(images) // args.batch_size),
        disable=args.no_progress,
    )
    mean, std = compute_latent_stats(vae, batches)
    path = save_latent_stats(args.autoencoder, mean, std)
    print(f"latent statistics of {len(images)} images written to {path}", file=sys.stderr)
    print(f"mean {[round(x, 4) for x in mean.tolist()]}\nstd  {[round(x, 4) for x in std.tolist()]}")


if __name__ == "__main__":
    main()
