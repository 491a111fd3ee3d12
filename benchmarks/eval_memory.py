"""Peak memory and speed of streaming `micro-diffusion eval` against the number of samples N, on CPU.

A tiny class-conditional EDM2 U-Net in pixel space (64 px, random weights, 1 Euler step, guidance 1 so no
unconditional half of the batch) is scored by FD (and KID, which keeps a sample of at most 10,000 features) with
EfficientNet-Lite0 at its 224 px input against 64 random reference images, in 1 process or `composer -n P`.
Prints one JSON line per run: N, processes, metrics, peak RSS of the largest process (MiB), wall seconds and
samples/s.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python benchmarks/eval_memory.py --num-samples 1000 10000 --processes 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

from micro_diffusion.models.checkpoints import save_dit_weights
from micro_diffusion.models.model import create_latent_diffusion

TINY_UNET = {
    "vae_name": "identity", "text_encoder_name": None, "num_classes": 10, "latent_res": 64, "in_channels": 3,
    "dtype": "float32", "unet_preset": "cifar-XXS",
    "unet_kwargs": {"model_channels": 16, "num_blocks": 1, "channel_mult": [1, 2], "attn_resolutions": [],
                    "channels_per_head": 16, "dropout": 0.0},
}


# Runs the command given as arguments and prints the peak RSS (KiB) of the largest process it started.
PEAK_RSS_OF_CHILDREN = (
    "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def prepare(folder: Path) -> list[str]:
    """Model config, weights and reference images in `folder`; returns the eval options that use them."""
    torch.manual_seed(0)
    model = create_latent_diffusion(**TINY_UNET)
    (folder / "model.yaml").write_text(yaml.safe_dump(TINY_UNET))
    weights = save_dit_weights(model.dit, folder / "unet.safetensors")
    reference = folder / "reference"
    reference.mkdir()
    generator = np.random.default_rng(0)
    for index in range(64):
        pixels = generator.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(reference / f"{index:03d}.png")
    return ["--weights", str(weights), "--model-config", str(folder / "model.yaml"), "--steps", "1",
            "--sampler", "euler", "--guidance", "1", "--reference-source", "folder",
            "--reference-option", f"root={reference}",
            "--reference-count", "64", "--cache-dir", str(folder / "cache"), "--batch-size", "64"]


def run(options: list[str], num_samples: int, processes: int, metrics: list[str], folder: Path) -> dict:
    """One eval in a fresh process tree; peak RSS is that of its largest process, read by a wrapper process (the
    getrusage of its children, which covers the launcher's workers), so each run's figure is its own."""
    out = folder / f"out-{num_samples}-{processes}-{'-'.join(metrics)}"
    arguments = [*options, "--num-samples", str(num_samples), "--metrics", *metrics, "--out", str(out)]
    if processes == 1:
        command = [sys.executable, "-m", "micro_diffusion.cli", "eval", *arguments]
    else:
        command = [sys.executable, "-m", "composer.cli.launcher", "-n", str(processes), "--master_port",
                   str(free_port()), "-m", "micro_diffusion.cli", "eval", *arguments]
    start = time.perf_counter()
    wrapped = subprocess.run([sys.executable, "-c", PEAK_RSS_OF_CHILDREN, *command], check=True, capture_output=True,
                             text=True, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    seconds = time.perf_counter() - start
    peak_mib = int(wrapped.stdout.split()[-1]) / 1024
    return {"num_samples": num_samples, "processes": processes, "metrics": metrics, "peak_rss_mib": round(peak_mib),
            "wall_s": round(seconds, 1), "samples_per_s": round(num_samples / seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-samples", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--processes", type=int, nargs="+", default=[1])
    parser.add_argument("--metrics", nargs="+", default=["fd", "kid"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        options = prepare(folder)
        for processes in args.processes:
            for num_samples in args.num_samples:
                print(json.dumps(run(options, num_samples, processes, args.metrics, folder)), flush=True)


if __name__ == "__main__":
    main()
