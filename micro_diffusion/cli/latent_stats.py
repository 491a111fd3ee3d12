"""`micro-diffusion latent-stats`: per-channel latent mean and std of a trained autoencoder over a dataset.

The statistics are written as `latent_stats.json` next to the autoencoder's `config.json`
(`micro_diffusion.models.autoencoder.measure_latent_stats`); from then on `load_vae(folder)` returns normalised
latents (z - mean) / std, so precompute and generation need no scale factors by hand:

    micro-diffusion latent-stats --autoencoder trained_models/ae_shapes/autoencoder \\
        --source shapes --source-option num_samples=20000 --image-size 32

The images are read as autoencoder training reads them (`micro_diffusion.data.images.load_source_images`), so
that the statistics come from exactly the images (and the resize and crop) the autoencoder was trained on.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from micro_diffusion.cli.options import parse_key_values, parse_with_config
from micro_diffusion.data.images import load_source_images
from micro_diffusion.data.sources import available_sources
from micro_diffusion.dtypes import DTYPES


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
    from micro_diffusion.models.autoencoder import measure_latent_stats  # imported here: it loads diffusers

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
    batches = tqdm(
        images.batches(args.batch_size),
        desc="encoding",
        total=-(-len(images) // args.batch_size),
        disable=args.no_progress,
    )
    mean, std, path = measure_latent_stats(args.autoencoder, batches, args.device, DTYPES[args.dtype])
    print(f"latent statistics of {len(images)} images written to {path}", file=sys.stderr)
    print(f"mean {[round(x, 4) for x in mean.tolist()]}\nstd  {[round(x, 4) for x in std.tolist()]}")
