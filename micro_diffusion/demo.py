"""`make demo` / `micro-diffusion demo`: the whole pipeline on the built-in shapes, on CPU, with real components.

1. data         built-in shapes at 32 px (single-object prompts: colour, shape, count) -> raw MDS shards
2. autoencoder  `composer -n 2 train.py --config-name demo_autoencoder.yaml` (32x32 -> 8x8x4; bf16 autocast on
                CPUs with AMX), then its latent statistics (`micro-diffusion latent-stats`), so the VAE
                interface normalises latents by itself
3. latents      `micro-diffusion precompute` with that autoencoder and MiniLM caption states (16 tokens)
4. MicroDiT     `scripts/train_pipeline.py yamls/demo.yaml`: the staged recipe (masked pretrain, unmasked
                finetune with EMA) through `composer -n 2` (gloo)
5. results      EMA weights exported, a grid for fixed prompts, sample images, the shapes score of N samples
                (with its protocol) and the loss curves, in `outputs/demo/`

Each step skips itself when its output exists, so an interrupted demo resumes where it stopped.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
GRID_PROMPTS = [
    "a red circle", "a blue square", "a green triangle", "a yellow circle",
    "two magenta squares", "three cyan circles", "two orange triangles", "a white square",
    "a red triangle", "two blue circles", "a green square", "three yellow triangles",
    "a magenta circle", "a cyan triangle", "three orange squares", "two white circles",
]
SHAPES_OPTIONS = {"resolution": 32, "max_groups": 1}
FINAL_STAGE = "demo_dit_mask_0_finetune"
TEXT_ENCODER = "minilm-16"  # configs/base/demo.yaml's; the shapes prompts are at most 12 tokens


def log(message: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {message}", flush=True)


def run(command: list[str]) -> None:
    """Run a step's command from the repository root, streaming its output; a failure stops the demo.

    The launcher starts one process per core, so each gets one intra-op thread: more threads than cores makes
    small CPU kernels spin and run several times slower. The steps that run in this process (latent statistics,
    precompute, sampling) keep torch's default of one thread per core, while the launched processes are idle.
    """
    log("$ " + " ".join(command))
    subprocess.run(command, cwd=REPO, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def cpu_has_amx() -> bool:
    """True on CPUs with AMX tiles (Intel Sapphire Rapids and later), where bf16 autocast trains the demo's
    autoencoder 1.5x faster; without native bf16 it would be slower, so it stays float32 there."""
    check = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(check is not None and check())


def make_data(out: Path, num_train: int, num_val: int) -> None:
    from micro_diffusion.data.convert import convert
    from micro_diffusion.data.sources.shapes import iter_shapes

    for split, count, seed in (("train", num_train, 1), ("val", num_val, 2)):
        folder = out / "data" / f"raw_{split}"
        if (folder / "index.json").exists():
            continue
        log(f"rendering {count} shapes images for {split} -> {folder}")
        convert(iter_shapes(count, seed=seed, **SHAPES_OPTIONS), folder, num_workers=0, overwrite=True)


def train_autoencoder(out: Path, num_train: int, batches: int) -> Path:
    run_folder = out / "autoencoder_run"
    autoencoder = run_folder / "autoencoder"
    if not (autoencoder / "config.json").exists():
        run([sys.executable, "-m", "composer.cli", "-n", "2", "train.py", "--config-path", "configs",
             "--config-name", "demo_autoencoder.yaml", f"trainer.save_folder={run_folder}",
             f"data.source_options.num_samples={num_train}", f"trainer.max_duration={batches}ba",
             f"trainer.eval_interval={batches}ba", f"trainer.save_interval={batches}ba",
             f"model.grid_interval={batches}ba", f"model.cpu_bf16={cpu_has_amx()}"])
    if not (autoencoder / "latent_stats.json").exists():
        from micro_diffusion.autoencoder_stats import main as latent_stats

        source = {**SHAPES_OPTIONS, "num_samples": num_train, "seed": 1}
        options = [f"--source-option={key}={value}" for key, value in source.items()]
        latent_stats(["--autoencoder", str(autoencoder), "--source", "shapes", *options, "--device", "cpu"])
    return autoencoder


def precompute_latents(out: Path, autoencoder: Path) -> None:
    from micro_diffusion.data.precompute import precompute

    for split in ("train", "val"):
        target = out / "data" / f"latents_{split}"
        if (target / "index.json").exists():
            continue
        log(f"precomputing {split} latents with {autoencoder.name} and {TEXT_ENCODER} -> {target}")
        precompute(out / "data" / f"raw_{split}", target, resolutions=[32], vae=str(autoencoder),
                   text_encoder=TEXT_ENCODER, batch_size=128, num_workers=0)


def train_dit(out: Path, autoencoder: Path, pretrain_batches: int, finetune_batches: int) -> Path:
    """The two stages of yamls/demo.yaml, with this demo's folders and lengths, through the pipeline runner."""
    import yaml

    total = pretrain_batches + finetune_batches
    pipeline = {
        "config_dir": str(REPO / "configs"),
        "nproc": 2,
        "overrides": [f"data.datadir={out / 'data'}", f"model.vae_name={autoencoder}",
                      f"trainer.save_folder={out / 'runs'}/${{exp_name}}"],
        "stages": [
            {"config": "demo_dit_pretrain", "overrides": [f"trainer.max_duration={pretrain_batches}ba"]},
            {"config": "demo_dit_finetune", "load_from_previous": True,
             "overrides": [f"trainer.max_duration={total}ba", f"callbacks.ema.ema_start={pretrain_batches}ba"]},
        ],
    }
    path = out / "pipeline.yaml"
    path.write_text(yaml.safe_dump(pipeline, sort_keys=False))
    run([sys.executable, "scripts/train_pipeline.py", str(path)])
    return out / "runs" / FINAL_STAGE


def loss_curves(out: Path) -> Path:
    """Plot the training loss and validation loss of both stages from their metric logs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pattern = re.compile(r"\[metric\]\[batch=(\d+)\]: (loss/train/total|metrics/eval/ValidationLoss): ([-\d.e+]+)")
    figure, axis = plt.subplots(figsize=(7, 4))
    for stage in sorted((out / "runs").iterdir()):
        series: dict[str, dict[int, float]] = {}
        log_text = (stage / "metrics.txt").read_text(errors="replace")  # captured progress bars may cut a character
        for match in pattern.finditer(log_text):
            series.setdefault(match[2], {})[int(match[1])] = float(match[3])  # a resumed run logs a step again
        for name, points in series.items():
            steps, values = zip(*sorted(points.items()))
            if name.startswith("loss"):
                smoothed = np.convolve(values, np.ones(25) / 25, mode="valid") if len(values) > 25 else values
                axis.plot(steps[len(steps) - len(smoothed):], smoothed, lw=1, label=f"{stage.name}: train (mean of 25)")
            else:
                axis.plot(steps, values, "o-", lw=2, label=f"{stage.name}: validation (fixed sigmas)")
    axis.set(xlabel="batch", ylabel="EDM loss", yscale="log", title="MicroDiT demo on shapes")
    axis.legend(fontsize=7)
    path = out / "loss.png"
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return path


def evaluate(out: Path, autoencoder: Path, run_folder: Path, num_samples: int, steps: int, guidance: float) -> dict:
    """Grid, sample images and the shapes score of the EMA weights."""
    from torchvision.utils import save_image

    from micro_diffusion.data.sources.shapes import sample_specs
    from micro_diffusion.eval.report import EvalProtocol, metric_records, save_sample_grid, write_report
    from micro_diffusion.eval.shapes_score import shapes_score
    from micro_diffusion.evaluate import generate_samples
    from micro_diffusion.models.checkpoints import load_dit_weights
    from micro_diffusion.models.model import create_latent_diffusion
    from micro_diffusion.training.callbacks import export_ema_weights

    weights = export_ema_weights(run_folder / "latest-rank0.pt", out / "dit_ema.safetensors")
    model = create_latent_diffusion(
        vae_name=str(autoencoder), text_encoder_name=TEXT_ENCODER, dit_arch="MicroDiT_XXS_2", latent_res=8,
        in_channels=4, dtype="float32", dit_kwargs={"patch_size": 1},
    )
    load_dit_weights(model.dit, weights)
    model.eval()
    sampling = {"num_inference_steps": steps, "guidance_scale": guidance}
    grid = generate_samples(model, GRID_PROMPTS, seed=0, batch_size=16, **sampling)
    save_sample_grid(grid, out / "grid.png", nrow=4)
    (out / "grid_prompts.txt").write_text("\n".join(GRID_PROMPTS) + "\n")

    prompts = [spec.caption() for spec in sample_specs(num_samples, seed=1000, max_groups=1)]
    images = generate_samples(model, prompts, seed=1000, batch_size=50, **sampling)
    samples = out / "samples"
    samples.mkdir(exist_ok=True)
    for i, (image, prompt) in enumerate(itertools.islice(zip(images, prompts), 32)):
        save_image(image, samples / f"{i:03d}_{prompt.replace(' ', '_')}.png")
    score = shapes_score(images, prompts)
    count = int(score.pop("num_images"))
    protocol = EvalProtocol("shapes-checker", count, "shapes grammar, single-object prompts (seed 1000)",
                            "edm-heun", steps, guidance, 1000)
    report = write_report(out / "metrics.json", metric_records({f"shapes/{k}": v for k, v in score.items()},
                                                                 protocol), sample_grid=out / "grid.png")
    return {record["metric"]: record["value"] for record in report["results"]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="micro-diffusion demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("outputs/demo"))
    parser.add_argument("--num-train", type=int, default=8000, help="training images")
    parser.add_argument("--num-val", type=int, default=256, help="held-out images (validation loss)")
    parser.add_argument("--ae-batches", type=int, default=600, help="autoencoder training batches")
    parser.add_argument("--pretrain-batches", type=int, default=1000, help="MicroDiT batches at 50%% masking")
    parser.add_argument("--finetune-batches", type=int, default=300, help="MicroDiT batches unmasked (with EMA)")
    parser.add_argument("--eval-samples", type=int, default=200, help="samples scored by the shapes checker")
    parser.add_argument("--steps", type=int, default=20, help="EDM Heun steps")
    parser.add_argument("--guidance", type=float, default=3.0)
    args = parser.parse_args(argv)
    if not (REPO / "train.py").exists():
        raise SystemExit("the demo runs from a source checkout (it needs train.py, configs/ and yamls/)")
    out = args.out.resolve()
    start = time.time()
    make_data(out, args.num_train, args.num_val)
    autoencoder = train_autoencoder(out, args.num_train, args.ae_batches)
    precompute_latents(out, autoencoder)
    run_folder = train_dit(out, autoencoder, args.pretrain_batches, args.finetune_batches)
    log("evaluating the EMA weights")
    metrics = evaluate(out, autoencoder, run_folder, args.eval_samples, args.steps, args.guidance)
    plot = loss_curves(out)
    log(f"done in {(time.time() - start) / 60:.1f} min")
    print(json.dumps({k: round(v, 3) for k, v in metrics.items()}, indent=2))
    print(f"grid: {out / 'grid.png'} (prompts in grid_prompts.txt)\nsamples: {out / 'samples'}\n"
          f"metrics: {out / 'metrics.json'}\nloss curves: {plot}")


if __name__ == "__main__":
    main()
