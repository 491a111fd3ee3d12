"""Does masking pay? The demo's MicroDiT trained at equal compute with masking, token routing, both, or neither.

    python benchmarks/token_budget.py --demo-out outputs/demo --out outputs/token_budget --budgets 0.15 0.3

It reuses a finished `make demo` (its latents, autoencoder and hold-out) and the demo's two stage configs
(configs/demo_dit_pretrain.yaml, demo_dit_finetune.yaml) through the real launcher, changing only the stage-1
token treatment and the lengths:

    arm                 stage 1 (masking, routing)        stage 2
    unmasked            none                              the same unmasked finetune with EMA for every arm,
    mask_50 / mask_75   50% / 75% of patches dropped      a fixed share of the budget (--finetune-share)
    route_50            50% of tokens skip ROUTE_SPAN
    route_50_mask_50    both (routing among kept tokens)

Equal compute: a budget B is a fraction of the demo's own MicroDiT training (its two stages, 1,500 batches at 50%
masking and 450 unmasked: about 11.4 minutes of the idle 2-core VM, DEMO_DIT_MINUTES), turned into batch counts
per arm from step times measured first, here, in one process (calibration: forward + backward + AdamW of the
demo's LatentDiffusion on the per-rank batch, one thread, median CPU time of --calibration-steps). Stage 1 gets
(1 - share) of the budget at its own step time, stage 2 the rest at the unmasked step time. CPU time on one thread
is nearly what the step takes on an idle core, and only the ratios of step times set the batch counts, so the
calibration and the runs may share the machine with other work without changing what the arms compute.
Each arm is scored on the demo's three prompt sets (`micro-diffusion demo report`); every run folder holds its
metrics.json with the protocol.

Writes <out>/calibration.json, <out>/budget_<B>/<arm>/ (runs and report), <out>/results.json, a markdown table
<out>/token_budget.md and the plot <out>/token_budget.png (all-correct rate per set and validation loss against
the budget).
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from micro_diffusion.data import schema
from micro_diffusion.data.sources.shapes import PROMPT_SETS
from micro_diffusion.pipeline import (
    DONE_MARKER,
    CommandStep,
    Pipeline,
    TrainingStage,
    compose_stage,
    load_pipeline,
    run_pipeline,
)

REPO = Path(__file__).resolve().parents[1]
DEMO_PIPELINE = REPO / "yamls" / "demo.yaml"
PRETRAIN, FINETUNE = "demo_dit_pretrain", "demo_dit_finetune"
ROUTE_SPAN = (1, 3)  # MicroDiT_XXS_2 has 4 backbone blocks: the first and the last see every token
WARMUP_BATCHES = 50  # the demo's stage-1 warm-up, shortened for runs under 5x that
DEMO_DIT_MINUTES = 11.4  # the demo's two MicroDiT stages, launchers included, on the idle VM (RESULTS.md: 8.1 + 3.4)


@dataclass(frozen=True)
class Arm:
    """Stage 1's token treatment."""

    mask_ratio: float
    route_ratio: float


ARMS: dict[str, Arm] = {
    "unmasked": Arm(0.0, 0.0),
    "mask_50": Arm(0.5, 0.0),
    "mask_75": Arm(0.75, 0.0),
    "route_50": Arm(0.0, 0.5),
    "route_50_mask_50": Arm(0.5, 0.5),
}


def stage_model(demo_out: Path, arm: Arm) -> torch.nn.Module:
    """The demo's stage-1 LatentDiffusion (from its resolved config) with the arm's masking and routing."""
    from micro_diffusion.models.model import create_latent_diffusion
    from micro_diffusion.models.sampling import model_arguments

    config = demo_out / "runs" / "demo_dit_mask_50_pretrain" / "config.yaml"
    arguments = model_arguments(config)
    arguments["dit_kwargs"] = {**(arguments["dit_kwargs"] or {}), "route_span": list(ROUTE_SPAN)}
    return create_latent_diffusion(**arguments | {
        "vae_name": str(demo_out / "autoencoder_run" / "autoencoder"), "load_text_encoder_weights": False,
        "train_mask_ratio": arm.mask_ratio, "train_route_ratio": arm.route_ratio,
    })


def training_step(model: torch.nn.Module, batch_size: int, caption_length: int) -> Callable[[], None]:
    """One training step (forward, backward, AdamW) of `model` on fixed random latents and caption states."""
    model.train()
    dit = model.dit
    batch = {
        schema.BATCH_IMAGE_LATENTS: torch.randn(batch_size, dit.in_channels, model.latent_res, model.latent_res),
        schema.BATCH_CAPTION_LATENTS: torch.randn(batch_size, 1, caption_length, dit.caption_channels),
    }
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        loss, _, _ = model(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def calibrate(demo_out: Path, batch_size: int, caption_length: int, steps: int) -> dict[str, dict[str, float]]:
    """Per arm: the median CPU seconds of one stage-1 training step on one thread (nearly what it takes on an idle
    core) and the analytic training FLOPs per image (`DiT.training_flops`). The arms take turns step by step, so
    a change in what else runs on the machine falls on all of them alike."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    models = {name: stage_model(demo_out, arm) for name, arm in ARMS.items()}
    steps_of = {name: training_step(model, batch_size, caption_length) for name, model in models.items()}
    times: dict[str, list[float]] = {name: [] for name in ARMS}
    for round_index in range(steps + 3):  # three warm-up rounds
        for name, step in steps_of.items():
            start = time.process_time()
            step()
            if round_index >= 3:
                times[name].append(time.process_time() - start)
    return {
        name: {"seconds_per_step": sorted(times[name])[steps // 2],
               "training_flops_per_image": models[name].dit.training_flops(arm.mask_ratio, caption_length,
                                                                          arm.route_ratio)}
        for name, arm in ARMS.items()
    }


def arm_pipeline(name: str, arm: Arm, batches: tuple[int, int], run_dir: Path, demo_out: Path, args) -> Pipeline:
    """The two demo stages with the arm's stage 1 and the given batch counts, then the demo's report."""
    demo = load_pipeline(DEMO_PIPELINE)
    first, second = batches
    common = [f"data.datadir={demo_out / 'data'}", f"model.vae_name={demo_out / 'autoencoder_run' / 'autoencoder'}",
              f"model.text_encoder_name={demo.variables['text_encoder']}",
              f"++model.dit_kwargs.route_span=[{ROUTE_SPAN[0]},{ROUTE_SPAN[1]}]"]
    pretrain = TrainingStage("pretrain", PRETRAIN, (
        *common, f"exp_name={name}_pretrain", f"trainer.save_folder={run_dir / 'pretrain'}",
        f"model.train_mask_ratio={arm.mask_ratio}", f"++model.train_route_ratio={arm.route_ratio}",
        f"trainer.max_duration={first}ba", f"trainer.save_interval={first}ba", f"trainer.eval_interval={first}ba",
        f"scheduler.t_warmup={min(WARMUP_BATCHES, first // 5)}ba",
    ), load_from_previous=False, env={"OMP_NUM_THREADS": "1"})
    total = first + second
    finetune = TrainingStage("finetune", FINETUNE, (
        *common, f"exp_name={name}_finetune", f"trainer.save_folder={run_dir / 'finetune'}",
        f"trainer.max_duration={total}ba", f"trainer.save_interval={total}ba", f"trainer.eval_interval={total}ba",
        f"callbacks.ema.ema_start={first}ba",
    ), load_from_previous=True, env={"OMP_NUM_THREADS": "1"})
    report = CommandStep("report", "demo", (
        "report", "--runs", str(run_dir / "pretrain"), str(run_dir / "finetune"), "--out", str(run_dir / "report"),
        "--holdout-pairs", demo.variables["holdout_pairs"], "--holdout-captions", demo.variables["holdout_captions"],
        "--num-samples", str(args.num_samples), "--seed", "1000", "--grid-per-set", "8", "--save-images", "0",
        "--steps", str(args.steps), "--guidance", str(args.guidance), "--batch-size", "50",
    ))
    return Pipeline(config_dir=REPO / "configs", train_script=REPO / "train.py", nproc=args.nproc,
                    marker_dir=run_dir / "steps_done", variables={}, stages=(pretrain, finetune, report))


def demo_compute(demo: Pipeline, calibration: dict) -> float:
    """Calibrated seconds of the demo's own two MicroDiT stages (their batch counts, at their step times)."""
    pretrain, finetune = (compose_stage(demo.config_dir, stage) for stage in demo.training_stages[1:3])
    first = int(str(pretrain.trainer.max_duration).removesuffix("ba"))
    second = int(str(finetune.trainer.max_duration).removesuffix("ba")) - first
    masked = next(name for name, arm in ARMS.items() if (arm.mask_ratio, arm.route_ratio) ==
                  (pretrain.model.train_mask_ratio, 0.0))
    return first * calibration[masked]["seconds_per_step"] + second * calibration["unmasked"]["seconds_per_step"]


def batch_counts(budget: float, share: float, calibration: dict, name: str, demo_seconds: float) -> tuple[int, int]:
    """(stage-1 batches at the arm's step time, stage-2 batches at the unmasked step time) for a budget that is a
    fraction of the demo's MicroDiT compute."""
    seconds = budget * demo_seconds
    return (round((1 - share) * seconds / calibration[name]["seconds_per_step"]),
            max(1, round(share * seconds / calibration["unmasked"]["seconds_per_step"])))


def run_seconds(run_dir: Path) -> float:
    """Wall seconds of the two training stages, launcher start included (their pipeline done-markers)."""
    return sum(json.loads((run_dir / stage / DONE_MARKER).read_text())["seconds"]
               for stage in ("pretrain", "finetune"))


def validation_loss(run_dir: Path) -> float:
    """The finetune stage's last validation loss (fixed sigmas and noise): at budgets too small for the shapes
    score to tell the arms apart, the finer measure of what each arm learned."""
    logged = re.findall(r"metrics/eval/ValidationLoss: ([-\d.e+]+)", (run_dir / "finetune" / "metrics.txt").read_text())
    return float(logged[-1])


def scores(run_dir: Path) -> dict[str, float]:
    report = json.loads((run_dir / "report" / "metrics.json").read_text())
    return {record["metric"]: record["value"] for record in report["results"]}


def write_outputs(out: Path, results: list[dict], calibration: dict, args) -> None:
    """results.json, the markdown table, and the plot of all-correct rate per set and validation loss against
    budget minutes."""
    from micro_diffusion.eval.report import pyplot, save_figure

    (out / "results.json").write_text(json.dumps({"calibration": calibration, "results": results}, indent=2) + "\n")
    header = ["budget (x demo)", "~idle min", "arm", "stage-1 batches", "stage-2 batches", "stage-1 FLOPs/img (M)",
              "wall (min)", "validation loss", *PROMPT_SETS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        lines.append("| " + " | ".join([
            f"{r['budget']:g}", f"{r['budget'] * DEMO_DIT_MINUTES:.1f}", r["arm"], str(r["batches"][0]),
            str(r["batches"][1]),
            f"{calibration[r['arm']]['training_flops_per_image'] / 1e6:.1f}", f"{r['wall_seconds'] / 60:.1f}",
            f"{r['validation_loss']:.4f}",
            *(f"{r['scores'][f'shapes/{name}/all']:.3f}" for name in PROMPT_SETS),
        ]) + " |")
    protocol = (f"Protocol: shapes checker, {args.num_samples} prompts per set (seed 1000), EDM Heun {args.steps} "
                f"steps, guidance {args.guidance}; EMA weights of the finetune stage.")
    (out / "token_budget.md").write_text("\n".join(lines) + "\n\n" + protocol + "\n")
    panels = {f"{name}: all correct": (lambda r, name=name: r["scores"][f"shapes/{name}/all"]) for name in PROMPT_SETS}
    panels["validation loss (fixed sigmas)"] = lambda r: r["validation_loss"]
    figure, axes = pyplot().subplots(1, len(panels), figsize=(4.5 * len(panels), 3.8))
    for axis, (title, value) in zip(axes, panels.items()):
        for arm in ARMS:
            points = sorted((r["budget"] * DEMO_DIT_MINUTES, value(r)) for r in results if r["arm"] == arm)
            if points:
                axis.plot(*zip(*points), "o-", label=arm)
        axis.set(title=title, xlabel="budget (minutes of the idle 2-core VM)")
    axes[-1].legend(fontsize=8)
    save_figure(figure, out / "token_budget.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo-out", type=Path, required=True, help="a finished demo's output folder")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.5, 1.0],
                        help="compute per arm, as fractions of the demo's MicroDiT training")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--finetune-share", type=float, default=0.25, help="share of the budget in stage 2")
    parser.add_argument("--nproc", type=int, default=2, help="processes of each training stage (the demo's 2)")
    parser.add_argument("--num-samples", type=int, default=200, help="prompts scored per set")
    parser.add_argument("--steps", type=int, default=20, help="EDM Heun steps of the scored samples")
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--calibration-steps", type=int, default=25)
    args = parser.parse_args()
    if not (args.demo_out / "data" / "latents_train" / "index.json").is_file():
        parser.error(f"{args.demo_out} is not a finished demo's output folder (no data/latents_train)")
    if not 0 < args.finetune_share < 1:
        parser.error("--finetune-share must be in (0, 1)")
    args.out.mkdir(parents=True, exist_ok=True)

    demo = load_pipeline(DEMO_PIPELINE)
    config = compose_stage(demo.config_dir, demo.training_stages[1])  # demo_dit_pretrain
    per_rank = config.data.train_batch_size // args.nproc
    caption_length = int(demo.variables["text_encoder"].rsplit("-", 1)[1])
    calibration_file = args.out / "calibration.json"
    if calibration_file.is_file():  # a rerun keeps the batch counts of the first run
        calibration = json.loads(calibration_file.read_text())
    else:
        calibration = calibrate(args.demo_out, per_rank, caption_length, args.calibration_steps)
        calibration_file.write_text(json.dumps(calibration, indent=2) + "\n")
    print("[token_budget] calibration:", json.dumps(calibration))
    demo_seconds = demo_compute(demo, calibration)

    results = []
    for budget in args.budgets:
        for name in args.arms:
            arm, run_dir = ARMS[name], args.out / f"budget_{budget:g}" / name
            batches = batch_counts(budget, args.finetune_share, calibration, name, demo_seconds)
            print(f"[token_budget] budget {budget:g}, {name}: {batches[0]} + {batches[1]} batches", flush=True)
            run_pipeline(arm_pipeline(name, arm, batches, run_dir, args.demo_out, args))
            results.append({"budget": budget, "arm": name, "mask_ratio": arm.mask_ratio,
                            "route_ratio": arm.route_ratio, "batches": list(batches),
                            "wall_seconds": run_seconds(run_dir), "validation_loss": validation_loss(run_dir),
                            "scores": scores(run_dir)})
            write_outputs(args.out, results, calibration, args)
    print((args.out / "token_budget.md").read_text())


if __name__ == "__main__":
    main()
