"""`micro-diffusion posthoc-ema`: post-hoc EMA reconstruction from power-function EMA snapshots (EDM2).

The PowerEMA training callback writes snapshots (phema-<images>-<sigma_rel>.safetensors). This command solves for
the weights that turn them into the power-function EMA of any sigma_rel at any snapshot time (see
micro_diffusion.diffusion.power_ema) and writes the result as a plain network state dict (safetensors) that
`load_dit_weights(model.dit, path)` or `network.load_state_dict(load_file(path))` loads.

    micro-diffusion posthoc-ema runs/x/phema --sigma-rel 0.08 --output ema-0.080.safetensors
    micro-diffusion posthoc-ema runs/x/phema --sigma-rel 0.05,0.10,0.15 --at-images 8000000 --out-dir ema/

`micro-diffusion eval --posthoc-snapshots` scores a list of sigma_rels instead (`power_ema.sweep`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from micro_diffusion.diffusion.power_ema import find_snapshots, reconstruct, save_reconstruction, sigma_rel_to_gamma
from micro_diffusion.dtypes import DTYPES


def parse_sigma_rels(text: str) -> list[float]:
    """'0.05,0.10' -> [0.05, 0.1], each checked to be a valid sigma_rel."""
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: {text!r}") from error
    for value in values:
        try:
            sigma_rel_to_gamma(value)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from error
    if not values:
        raise argparse.ArgumentTypeError("need at least one sigma_rel")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="micro-diffusion posthoc-ema",
        description="Reconstruct power-function EMAs of any length from the snapshots of a training run.",
    )
    parser.add_argument("snapshots", type=Path, help="folder of phema-*.safetensors snapshots (PowerEMA callback)")
    parser.add_argument("--sigma-rel", type=parse_sigma_rels, required=True, help="target EMA length(s): 0.05,0.1")
    parser.add_argument("--at-images", type=int, help="snapshot time to reconstruct at (default: the latest)")
    output = parser.add_mutually_exclusive_group(required=True)
    output.add_argument("--output", type=Path, help="weights file to write (one sigma_rel)")
    output.add_argument("--out-dir", type=Path, help="folder for one ema-<images>-<sigma_rel>.safetensors per target")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype of the written weights")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.output is not None and len(args.sigma_rel) != 1:
        parser.error("--output takes one --sigma-rel; use --out-dir for several")
    try:
        results = reconstruct(find_snapshots(args.snapshots), args.sigma_rel, args.at_images)
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    for result in results:
        name = f"ema-{result.t_images:012d}-{result.sigma_rel:.3f}.safetensors"
        path = args.output if args.output is not None else args.out_dir / name
        save_reconstruction(path, result, DTYPES[args.dtype])
        print(
            f"sigma_rel {result.sigma_rel:.4f} at {result.t_images:,} images -> {path} "
            f"(profile fit error {result.fit_error:.2e})"
        )
