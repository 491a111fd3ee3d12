"""The GPU training path end to end through `composer train.py`: FSDP (the original's SHARD_GRAD_OP), activation
checkpointing, bf16 autocast and torch.compile, on synthetic pixel-space data, so it needs no weights.

Writes class-conditional 32x32x3 "latents" (one bright channel per class, identity autoencoder) to an MDS folder,
then trains the miniLDM recipe's class-conditional MicroDiT on them for a few hundred batches with the throughput
monitor on, and prints the run's last throughput/MFU metrics. What it checks is that the path runs and learns
(training loss falls); the throughput it prints is that of a small model, not a tuned figure.

    python benchmarks/train_gpu_smoke.py --workdir /tmp/smoke [--arch MicroDiT_XS_2] [--batches 300]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
from streaming import MDSWriter

from micro_diffusion.data import schema

REPO = Path(__file__).resolve().parents[1]
CAPTION_SHAPE = (32, 384)  # what the miniLDM recipe's loader checks; the class-conditional model ignores it


def write_pixel_shards(folder: Path, count: int, seed: int) -> None:
    """`count` samples of 3x32x32 pixel latents: noise plus one bright channel chosen by the label (0, 1, 2)."""
    rng = np.random.default_rng(seed)
    with MDSWriter(out=str(folder), columns=schema.latent_columns([32]), size_limit=1 << 24) as writer:
        for index in range(count):
            label = int(rng.integers(0, 3))
            image = 0.2 * rng.standard_normal((3, 32, 32))
            image[label] += 0.8
            writer.write({
                schema.KEY: f"sample{index}", schema.CAPTION: f"class {label}", schema.LABEL: label,
                schema.CAPTION_LATENTS: schema.to_fp16_bytes(np.zeros((1, *CAPTION_SHAPE))),
                schema.CAPTION_MASK: np.ones(CAPTION_SHAPE[0], np.uint8).tobytes(),
                schema.latents_column(32): schema.to_fp16_bytes(image),
            })


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--arch", default="MicroDiT_XS_2")
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--samples", type=int, default=8192)
    parser.add_argument("--device", default="gpu", choices=["gpu", "cpu"], help="cpu: a quick check of the script")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="torch.compile the training forward (GPU only)")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak for MFU (H100 SXM)")
    args = parser.parse_args()

    data = args.workdir / "data"
    if not (data / "train" / "index.json").exists():
        write_pixel_shards(data / "train", args.samples, seed=0)
        write_pixel_shards(data / "val", 512, seed=1)
    run_folder = args.workdir / "run"
    command = [
        sys.executable, "-m", "composer.cli", "-n", "1", str(REPO / "train.py"),
        "--config-path", str(REPO / "configs"), "--config-name", "minildm_fashion_mnist",
        "exp_name=gpu_smoke", f"trainer.save_folder={run_folder}", "model.vae_name=identity", "model.in_channels=3",
        "model.latent_res=32", f"model.dit_arch={args.arch}", "model.dit_kwargs.patch_size=2", "model.num_classes=3",
        "data.image_size=32", f"data.datadir={data}", "data.train_streams=[train]", "data.eval_streams=[val]",
        f"data.train_batch_size={args.batch_size}", f"data.eval_batch_size={args.batch_size}",
        f"+data.num_workers={4 if args.device == 'gpu' else 0}",
        f"trainer.device={args.device}", f"trainer.precision={'amp_bf16' if args.device == 'gpu' else 'fp32'}",
        f"trainer.compile={args.compile and args.device == 'gpu'}",
        f"trainer.max_duration={args.batches}ba", f"trainer.eval_interval={args.batches}ba",
        f"trainer.save_interval={args.batches}ba", "trainer.progress_bar=false", "trainer.console_log_interval=50ba",
        "callbacks.image_grid.class_labels=[0,1,2]", "callbacks.throughput.log_interval=50",
        f"+callbacks.throughput.peak_flops_per_device={args.peak_tflops * 1e12}", "scheduler.t_warmup=20ba",
    ]
    if args.device == "gpu":
        command.append("+trainer.fsdp_config={sharding_strategy:SHARD_GRAD_OP,activation_checkpointing:true}")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, cwd=args.workdir, env=env, capture_output=True, text=True)
    output = result.stdout + result.stderr
    print(output[-6000:])
    if result.returncode != 0:
        raise SystemExit(f"training failed with exit code {result.returncode}")
    losses = [float(v) for v in re.findall(r"loss/train/total: ([0-9.]+)", output)]
    print(f"first/last logged training loss: {losses[0]:.4f} -> {losses[-1]:.4f}" if losses else "no loss logged")


if __name__ == "__main__":
    main()
