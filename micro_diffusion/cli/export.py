"""`micro-diffusion export`: trained weights -> a self-describing model folder (`micro_diffusion.models.export`).

    micro-diffusion export trained_models/run/latest-rank0.pt exported/ --model-config run.yaml
    micro-diffusion export trained_models/run/latest-rank0.pt exported_raw/ --model-config run.yaml --raw
    micro-diffusion export trained_models/run/phema exported_0.08/ --model-config run.yaml --posthoc-sigma-rel 0.08

SOURCE is a Composer checkpoint (its EMA weights by default; --raw for its model weights), a weights file
(exported as it is), or, with --posthoc-sigma-rel, a folder of PowerEMA snapshots. The model is described as for
`micro-diffusion generate`: --model-config (a resolved training config, `python train.py ... --cfg job --resolve`)
and the model flags, which default to the released model. OUTDIR then holds micro_diffusion.json (the
create_latent_diffusion arguments, hence the VAE and text-encoder names, the latent statistics and which weights
these are) and model.safetensors, and loads with one argument:

    micro-diffusion generate --weights exported/ --prompt "a watercolor fox"
    model = LatentDiffusion.from_pretrained("exported/")
    pipe = MicroDiTPipeline.from_pretrained("exported/")
"""

from __future__ import annotations

import argparse
from pathlib import Path

from micro_diffusion.cli.generate import add_model_flags, resolve_model_arguments
from micro_diffusion.cli.posthoc_ema import parse_sigma_rels
from micro_diffusion.models.checkpoints import MODEL_FOLDER_CONFIG, MODEL_FOLDER_WEIGHTS, WEIGHT_KINDS
from micro_diffusion.models.export import export_model


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="micro-diffusion export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="Composer checkpoint, weights file or PowerEMA snapshot folder")
    parser.add_argument("outdir", type=Path, help="the model folder to write")
    choice = parser.add_mutually_exclusive_group()
    choice.add_argument("--raw", action="store_true", help="a checkpoint's raw weights instead of its EMA")
    choice.add_argument("--posthoc-sigma-rel", type=parse_sigma_rels,
                        help="SOURCE is a PowerEMA snapshot folder: reconstruct the EMA of this sigma_rel")
    parser.add_argument("--at-images", type=int, help="with --posthoc-sigma-rel: the snapshot time (default: latest)")
    add_model_flags(parser)
    args = parser.parse_args(argv)
    if args.posthoc_sigma_rel is not None and len(args.posthoc_sigma_rel) != 1:
        parser.error("--posthoc-sigma-rel takes one sigma_rel")
    if args.at_images is not None and args.posthoc_sigma_rel is None:
        parser.error("--at-images picks a snapshot time: give --posthoc-sigma-rel too")
    resolve_model_arguments(parser, args)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    sigma_rel = None if args.posthoc_sigma_rel is None else args.posthoc_sigma_rel[0]
    try:
        exported = export_model(args.model, args.source, args.outdir, weights="raw" if args.raw else "ema",
                                sigma_rel=sigma_rel, at_images=args.at_images)
    except (FileNotFoundError, KeyError, ValueError) as error:
        raise SystemExit(f"micro-diffusion export: {error}") from None
    weights = exported.weights
    detail = f" (sigma_rel {weights['sigma_rel']:.4f} at {weights['t_images']:,} images)" if sigma_rel else ""
    print(f"wrote the {WEIGHT_KINDS[weights['kind']]} weights of {args.source}{detail} to "
          f"{args.outdir / MODEL_FOLDER_WEIGHTS}, described in {args.outdir / MODEL_FOLDER_CONFIG}")
