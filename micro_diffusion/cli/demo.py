"""`micro-diffusion demo`: run the demo's pipeline file, yamls/demo.yaml, and its report step.

    micro-diffusion demo                                 # yamls/demo.yaml of the source checkout, into outputs/demo
    micro-diffusion demo --out /tmp/demo --var num_train=2000 demo_dit_pretrain:trainer.max_duration=300ba
    micro-diffusion demo --pipeline my_demo.yaml         # a copy, edited
    micro-diffusion demo report --runs RUN [RUN ...] --out DIR ...   # the pipeline's last step (see its --help)

Everything the demo does, with every setting, is in the pipeline file and the configs it names: rendered shapes
-> raw MDS (convert), the autoencoder (configs/demo_autoencoder.yaml) and its latent statistics (latent-stats),
latents (precompute), two MicroDiT stages (configs/demo_dit_pretrain.yaml, demo_dit_finetune.yaml), and the
report: EMA weights exported, and for each of three prompt sets (seen single groups, held-out relation captions,
held-out colour-shape pairs) the shapes score with its protocol (metrics.json), captioned samples in grid.png and
samples/, a score-by-set chart and the loss curves. Each step is skipped once done, so an interrupted demo resumes.
Arguments after the options go to the pipeline runner (micro_diffusion/pipeline.py): `KEY=VALUE` is a Hydra
override for every training stage, `STAGE:ARGUMENT` one for a single stage (a config or command argument).

The pipeline file, its configs and train.py live in the source repository, not in an installed package: from an
installed package, pass `--pipeline <checkout>/yamls/demo.yaml` (or run from the checkout's root).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

from micro_diffusion.pipeline import FINAL_CHECKPOINT, STAGE_CONFIG, load_pipeline, parse_variables, run_pipeline

PIPELINE = Path("yamls") / "demo.yaml"


def find_pipeline() -> Path | None:
    """yamls/demo.yaml of the checkout this package runs from, else of the current directory; None if neither."""
    for root in (Path(__file__).resolve().parents[2], Path.cwd()):
        if (root / PIPELINE).is_file():
            return root / PIPELINE
    return None


def run_demo(argv: list[str] | None) -> None:
    """Load the pipeline file with the command line's variables and overrides, and run what is not done yet."""
    found = find_pipeline()
    where = (f"default: {found}, with the configs of {found.parents[1] / 'configs'}" if found
             else f"none found: no {PIPELINE} beside the package or here")
    parser = argparse.ArgumentParser(prog="micro-diffusion demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", type=Path, default=found, help=f"the demo's pipeline file ({where})")
    parser.add_argument("--out", type=Path, help="output folder (sets the file's `out` variable)")
    parser.add_argument("--var", action="append", metavar="NAME=VALUE", help="a value of the file's vars, repeatable")
    parser.add_argument("--nproc", type=int, help="processes of the training stages (default: the file's)")
    parser.add_argument("overrides", nargs="*", help="KEY=VALUE for every training stage, STAGE:ARGUMENT for one")
    args = parser.parse_intermixed_args(argv)
    if args.pipeline is None:
        parser.error(f"the demo's pipeline file ({PIPELINE}), the configs it names and train.py are in the source "
                     "repository, not in the installed package: pass --pipeline <checkout>/yamls/demo.yaml")
    try:
        variables = parse_variables(args.var) | ({"out": str(args.out.resolve())} if args.out else {})
        pipeline = load_pipeline(args.pipeline, args.overrides, args.nproc, variables)
    except (OSError, ValueError) as error:
        parser.error(str(error))
    start = time.time()
    run_pipeline(pipeline)
    print(f"[demo] done in {(time.time() - start) / 60:.1f} min; outputs in {pipeline.variables.get('out')}")


def report(argv: list[str] | None) -> None:
    """The demo's evaluation of the final run's EMA weights on three prompt sets (seen single groups, held-out
    relation captions, held-out colour-shape pairs): their shapes scores with the protocol, and the scores of the
    same prompts' ground-truth renders through the autoencoder, the ceiling it sets (metrics.json); a
    captioned grid of each set's first samples (grid.png), a score-by-set chart (scores.png), sample images and the
    loss curves (loss.png)."""
    import torch
    from torchvision.utils import save_image

    from micro_diffusion.data.sources.shapes import PROMPT_SETS, Holdout, prompt_set, render_prompts
    from micro_diffusion.eval.report import (
        EvalProtocol,
        metric_records,
        plot_loss_curves,
        plot_scores_by_set,
        save_captioned_grid,
        write_report,
    )
    from micro_diffusion.eval.shapes_score import shapes_score
    from micro_diffusion.models.checkpoints import export_ema_weights
    from micro_diffusion.models.sampling import build_model, generate_samples, model_arguments

    parser = report_parser()
    args = parser.parse_args(argv)
    try:
        holdout = Holdout.from_options(args.holdout_pairs, args.holdout_captions)
    except ValueError as error:
        parser.error(f"--holdout-pairs/--holdout-captions: {error}")
    try:
        targets = {name: float(value) for name, value in (pair.split("=") for pair in args.targets or [])}
    except ValueError as error:
        parser.error(f"{error}; --targets takes SET=RATE pairs, e.g. seen_single=0.8")
    unknown = sorted(set(targets) - set(PROMPT_SETS))
    if unknown:
        parser.error(f"--targets names unknown prompt sets {unknown}; known: {list(PROMPT_SETS)}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    run, out = args.runs[-1], args.out
    out.mkdir(parents=True, exist_ok=True)
    weights = export_ema_weights(run / FINAL_CHECKPOINT, out / "dit_ema.safetensors")
    model = build_model(model_arguments(run / STAGE_CONFIG), weights, device)
    sampling = {"num_inference_steps": args.steps, "guidance_scale": args.guidance}

    records, scores, sections = [], {}, []
    for name, description in PROMPT_SETS.items():
        prompts = prompt_set(name, args.num_samples, args.seed, holdout)
        images = generate_samples(model, prompts, args.seed, args.batch_size, **sampling)
        samples = out / "samples" / name
        samples.mkdir(parents=True, exist_ok=True)
        for i, (image, prompt) in enumerate(itertools.islice(zip(images, prompts), args.save_images)):
            save_image(image, samples / f"{i:03d}_{prompt.replace(' ', '_')}.png")
        score = shapes_score(images, prompts)
        count = int(score.pop("num_images"))
        scores[name] = {key: value for key, value in score.items() if not key.startswith("category/")}
        protocol = EvalProtocol("shapes-checker", count, f"{name}: {description} ({holdout.describe()}; prompt "
                                f"seed {args.seed})", "edm-heun", args.steps, args.guidance, args.seed)
        records += metric_records({f"shapes/{name}/{key}": value for key, value in score.items()}, protocol)
        # The autoencoder's ceiling: ground-truth renders of the same prompts, encoded and decoded (posterior mean)
        truth = torch.from_numpy(render_prompts(prompts, images.shape[-1], args.seed)).permute(0, 3, 1, 2)
        round_trip = model.vae.decode(model.vae.encode(truth.to(device).float() / 127.5 - 1, sample=False))
        ceiling = shapes_score(((round_trip.float().cpu() + 1) / 2).clamp(0, 1), prompts)
        ceiling_protocol = EvalProtocol("shapes-checker", count, f"{protocol.reference_set}; ground-truth renders "
                                        "through the autoencoder", "none", None, None, args.seed)
        records += metric_records({f"shapes/{name}/through_autoencoder/{key}": ceiling[key]
                                   for key in score if not key.startswith("category/")}, ceiling_protocol)
        sections.append((f"{name}: {description}", images[: args.grid_per_set], prompts[: args.grid_per_set]))
        print(f"[report] {name}: all correct {score['all']:.3f} of {count} prompts (ground truth through the "
              f"autoencoder: {ceiling['all']:.3f})")

    save_captioned_grid(sections, out / "grid.png", columns=args.grid_per_set)
    written = write_report(out / "metrics.json", records, sample_grid=out / "grid.png")
    chart = plot_scores_by_set(scores, out / "scores.png", title="MicroDiT demo: shapes score by prompt set",
                               targets=targets)
    plot = plot_loss_curves(args.runs, out / "loss.png", title="MicroDiT demo on shapes")

    print(json.dumps({record["metric"]: round(record["value"], 3) for record in written["results"]}, indent=2))
    print(f"grid: {out / 'grid.png'}\nsamples: {out / 'samples'}\nmetrics: {out / 'metrics.json'}\n"
          f"scores by set: {chart}\nloss curves: {plot}")


def report_parser() -> argparse.ArgumentParser:
    """Options of `micro-diffusion demo report`; every setting comes from the pipeline file (yamls/demo.yaml)."""
    parser = argparse.ArgumentParser(
        prog="micro-diffusion demo report", description=report.__doc__ + " Its settings: yamls/demo.yaml."
    )
    parser.add_argument("--runs", type=Path, nargs="+", required=True,
                        help="training runs in order: all have their losses plotted; the last is evaluated (its "
                             f"{STAGE_CONFIG} from the pipeline runner and {FINAL_CHECKPOINT}, with EMA weights)")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--holdout-pairs", default="", metavar="PAIRS",
                        help="the colour-shape pairs training never saw, comma-separated: 'blue triangle,orange "
                             "circle' (the data's own)")
    parser.add_argument("--holdout-captions", type=float, default=0.0,
                        help="the share of two-group captions training never saw (the data's own)")
    parser.add_argument("--num-samples", type=int, required=True, help="prompts scored per set")
    parser.add_argument("--seed", type=int, required=True, help="seed of the scored prompts; sample i uses seed + i")
    parser.add_argument("--grid-per-set", type=int, required=True, help="samples of each set shown in grid.png")
    parser.add_argument("--save-images", type=int, required=True, help="scored samples saved as PNG files, per set")
    parser.add_argument("--steps", type=int, required=True, help="EDM Heun steps")
    parser.add_argument("--guidance", type=float, required=True, help="classifier-free guidance scale")
    parser.add_argument("--batch-size", type=int, required=True, help="samples per generation call")
    parser.add_argument("--targets", nargs="*", metavar="SET=RATE", help="all-correct targets marked on the chart")
    parser.add_argument("--device", help="default: cuda when available, else cpu")
    return parser


def main(argv: list[str] | None = None) -> None:
    """`micro-diffusion demo [options]` runs the pipeline; `micro-diffusion demo report ...` is its last step."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["report"]:
        report(argv[1:])
    else:
        run_demo(argv)


if __name__ == "__main__":
    main()
