"""`micro-diffusion convert`: a source's records -> raw MDS shards (`micro_diffusion.data.convert`).

    micro-diffusion convert --source emoji --output datadir/emoji/mds
    micro-diffusion convert --source tar --source-option paths='cc12m/*.tar' \\
        --output datadir/cc12m/mds --min-size 256 --max-size 512
    micro-diffusion convert --config configs/data/diffusiondb.yaml
"""

from __future__ import annotations

import argparse
import inspect
import os
from pathlib import Path

from micro_diffusion.cli.options import parse_key_values, parse_with_config
from micro_diffusion.data.convert import RowRules, convert
from micro_diffusion.data.sources import available_sources, get_source


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="micro-diffusion convert", description="Convert an image source into raw MDS shards."
    )
    parser.add_argument("--source", help=f"reader name, one of {available_sources()}")
    parser.add_argument(
        "--source-option", dest="source_options", action="append", metavar="KEY=VALUE",
        help="reader argument, repeatable (e.g. --source-option root=images); YAML: a source_options mapping",
    )  # fmt: skip
    parser.add_argument("--output", type=Path, help="folder for the MDS shards (must be empty)")
    parser.add_argument("--min-size", type=int, default=0, help="skip images whose shorter side is smaller")
    parser.add_argument("--max-size", type=int, help="downscale so the shorter side is at most this")
    parser.add_argument("--allow-empty-captions", action="store_true", help="keep records without a caption")
    parser.add_argument(
        "--max-extra", action="append", metavar="NAME=VALUE",
        help="skip records whose extra field NAME is above VALUE, repeatable (e.g. image_nsfw=0.2)",
    )  # fmt: skip
    parser.add_argument(
        "--limit", type=int, help="convert at most this many records (e.g. for a quick subset)"
    )
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="worker processes (0: none)")
    parser.add_argument("--size-limit", default="256mb", help="shard size limit (MDS size string)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> None:
    """Entry point of `micro-diffusion convert`."""
    args = parse_with_config(build_parser(), argv, required=("source", "output"))
    max_extra = {
        name: float(value) for name, value in parse_key_values(args.max_extra, "--max-extra").items()
    }
    rules = RowRules(args.min_size, args.max_size, args.allow_empty_captions, max_extra)
    reader, options = get_source(args.source), parse_key_values(args.source_options, "--source-option")
    try:
        inspect.signature(reader).bind(**options)
    except TypeError as error:
        raise SystemExit(f"micro-diffusion convert: bad --source-option for {args.source}: {error}") from None
    records = reader(**options)
    convert(
        records, args.output, rules, num_workers=args.workers, size_limit=args.size_limit,
        overwrite=args.overwrite, limit=args.limit, progress=not args.no_progress,
    )  # fmt: skip
