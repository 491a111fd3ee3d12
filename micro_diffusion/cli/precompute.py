"""`micro-diffusion precompute`: raw MDS -> latent MDS (`micro_diffusion.data.precompute`), one pass of the VAE and
the text encoder, distributed and resumable. Launch with one process per GPU:

    composer -n 8 -m micro_diffusion.cli precompute --input datadir/cc12m/mds \\
        --output datadir/cc12m/latents --vae stabilityai/stable-diffusion-xl-base-1.0 \\
        --text-encoder openclip:hf-hub:apple/DFN5B-CLIP-ViT-H-14-378
    micro-diffusion precompute --input datadir/emoji/mds --output datadir/emoji/latents \\
        --resolutions 32 64 --vae identity --text-encoder minilm
"""

from __future__ import annotations

import argparse
from pathlib import Path

from micro_diffusion.cli.options import parse_with_config
from micro_diffusion.data.precompute import precompute
from micro_diffusion.dtypes import DTYPES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="micro-diffusion precompute",
        description="Encode a raw MDS folder into latent MDS shards (distributed and resumable).",
    )
    parser.add_argument("--input", type=Path, help="raw MDS folder written by `micro-diffusion convert`")
    parser.add_argument("--output", type=Path, help="latent MDS folder (reruns resume into it)")
    parser.add_argument("--resolutions", type=int, nargs="+", default=[256, 512], help="crop sizes in pixels")
    parser.add_argument("--vae", default="identity", help="'identity', a diffusers folder or a hub id")
    parser.add_argument("--text-encoder", default="minilm", help="see micro_diffusion.encoders.text")
    parser.add_argument("--moments", action="store_true", help="store posterior mean and std, not a sample")
    parser.add_argument("--batch-size", type=int, default=32, help="images per encoder call")
    parser.add_argument("--chunk-size", type=int, default=4096, help="samples per resumable chunk")
    parser.add_argument("--seed", type=int, default=2024, help="posterior sampling seed (+ chunk index)")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="encoder dtype")
    parser.add_argument("--device", help="default: cuda:LOCAL_RANK when available, else cpu")
    parser.add_argument("--workers", type=int, default=2, help="image decoding worker processes")
    parser.add_argument(
        "--max-chunks", type=int, help="encode at most this many chunks per process, then stop"
    )
    parser.add_argument("--overwrite", action="store_true", help="delete the output folder first")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> None:
    """Entry point of `micro-diffusion precompute`."""
    args = parse_with_config(build_parser(), argv, required=("input", "output"))
    precompute(
        args.input, args.output, args.resolutions, args.vae, args.text_encoder, args.moments,
        batch_size=args.batch_size, chunk_size=args.chunk_size, seed=args.seed, dtype=args.dtype,
        device=args.device, num_workers=args.workers, max_chunks=args.max_chunks, overwrite=args.overwrite,
        progress=not args.no_progress,
    )  # fmt: skip
