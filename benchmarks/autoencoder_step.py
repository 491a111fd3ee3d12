"""The miniLDM efficiency table on our autoencoder: training iterations/s and reconstruction quality.

Speed: one training iteration of an autoencoder preset (forward, L1 + KL loss, backward, AdamW step) on random
images, in fp32, with bf16 autocast, and with bf16 autocast + torch.compile of forward and loss; one JSON line
per mode, then a summary line with the ratios to fp32 (measured in the same run, so they compare like with like).
miniLDM reports 2.13 / 2.85 / 4.76 it/s (1 / 1.3 / 2.2x) for its 3.5 M autoencoder at batch 256 on an RTX 3060.

Quality: PSNR and SSIM on held-out images after a fixed number of training steps from scratch, on
Fashion-MNIST at 32 px (minildm-32) and emoji at 64 px (small-64), one JSON line each; a dataset that is not
installed is reported as skipped.

    python benchmarks/autoencoder_step.py [--preset minildm-32] [--batch 256] [--steps 3]
        [--quality-steps 200] [--quality-batch 16] [--skip-speed | --skip-quality]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable

import torch
from diffusers import AutoencoderKL
from torch import Tensor
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from micro_diffusion.data.images import ImageSet, load_source_images
from micro_diffusion.data.sources import SourceUnavailableError
from micro_diffusion.models.autoencoder import (
    AUTOENCODER_PRESETS,
    AutoencoderLoss,
    AutoencoderLossConfig,
    autoencode,
    build_autoencoder,
)
from micro_diffusion.training.autoencoder_task import split_images

MODES = ("fp32", "bf16", "bf16+compile")
# (name, source, source options, image size, preset)
QUALITY_RUNS = (
    ("fashion_mnist", "fashion_mnist", {"split": "train"}, 32, "minildm-32"),
    ("emoji", "emoji", {}, 64, "small-64"),
)


def make_train_step(preset: str, mode: str, device: str, lr: float) -> tuple[AutoencoderKL, Callable[[Tensor], Tensor]]:
    """A fresh autoencoder, and a function images -> loss that runs one full training iteration of it."""
    torch.manual_seed(0)
    vae = build_autoencoder(preset).to(device)
    loss_fn = AutoencoderLoss(AutoencoderLossConfig())
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, fused=device == "cuda")

    def loss_of(images: Tensor) -> Tensor:
        return loss_fn(images, autoencode(vae, images, sample_posterior=True), step=0)["total"]

    compute_loss = torch.compile(loss_of) if mode.endswith("+compile") else loss_of
    autocast = mode.startswith("bf16")

    def train_step(images: Tensor) -> Tensor:
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=autocast):
            loss = compute_loss(images)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return vae, train_step


def iterations_per_second(train_step: Callable[[Tensor], Tensor], images: Tensor, warmup: int, steps: int) -> float:
    """Timed over `steps` iterations after `warmup` (which includes any compilation)."""
    for _ in range(warmup):
        train_step(images)
    _synchronize(images.device)
    start = time.perf_counter()
    for _ in range(steps):
        train_step(images)
    _synchronize(images.device)
    return steps / (time.perf_counter() - start)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def speed_table(args: argparse.Namespace) -> None:
    size = AUTOENCODER_PRESETS[args.preset].image_size
    images = torch.rand(args.batch, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    images = images.to(args.device)
    rates = {}
    for mode in MODES:
        _, train_step = make_train_step(args.preset, mode, args.device, lr=1e-4)
        start = time.perf_counter()
        rates[mode] = iterations_per_second(train_step, images, args.warmup, args.steps)
        print(json.dumps({
            "benchmark": "autoencoder_speed", "preset": args.preset, "mode": mode, "batch": args.batch,
            "image_size": size, "iterations_per_sec": round(rates[mode], 4),
            "images_per_sec": round(rates[mode] * args.batch, 1),
            "seconds_with_warmup": round(time.perf_counter() - start, 1), **_machine(args),
        }), flush=True)  # fmt: skip
    ratios = {f"{mode}_over_fp32": round(rates[mode] / rates["fp32"], 3) for mode in MODES[1:]}
    print(json.dumps({"benchmark": "autoencoder_speed_summary", "preset": args.preset, **ratios, **_machine(args)}))


def quality_table(args: argparse.Namespace) -> None:
    for name, source, options, size, preset in QUALITY_RUNS:
        try:
            images = load_source_images(source, options, size)
        except SourceUnavailableError as error:
            print(json.dumps({"benchmark": "autoencoder_quality", "dataset": name, "skipped": str(error)}))
            continue
        train, held_out = split_images(images, args.quality_eval_images, seed=0)
        start = time.perf_counter()
        psnr, ssim = train_and_evaluate(preset, train, held_out, args)
        print(json.dumps({
            "benchmark": "autoencoder_quality", "dataset": name, "image_size": size, "preset": preset,
            "train_images": len(train), "held_out_images": len(held_out), "steps": args.quality_steps,
            "batch": args.quality_batch, "lr": args.quality_lr, "psnr_db": round(psnr, 2), "ssim": round(ssim, 4),
            "seconds": round(time.perf_counter() - start, 1), **_machine(args),
        }), flush=True)  # fmt: skip


def train_and_evaluate(
    preset: str, train: ImageSet, held_out: ImageSet, args: argparse.Namespace
) -> tuple[float, float]:
    """Train a fresh preset for `quality_steps` (L1 + 1e-6 KL, AdamW), then the held-out PSNR (dB) and SSIM of
    reconstructions from the posterior mean, per image and averaged, as the task's eval metrics."""
    mode = "bf16" if args.device == "cuda" else "fp32"
    vae, train_step = make_train_step(preset, mode, args.device, args.quality_lr)
    generator = torch.Generator().manual_seed(0)
    for _ in range(args.quality_steps):
        indices = torch.randint(0, len(train), (args.quality_batch,), generator=generator)
        train_step(torch.stack([train[i] for i in indices.tolist()]).to(args.device))
    psnr = PeakSignalNoiseRatio(data_range=(-1.0, 1.0), dim=(1, 2, 3)).to(args.device)
    ssim = StructuralSimilarityIndexMeasure(data_range=(-1.0, 1.0)).to(args.device)
    vae.eval()
    with torch.no_grad():
        for images in held_out.batches(args.quality_batch):
            images = images.to(args.device)
            reconstructions = autoencode(vae, images, sample_posterior=False).reconstructions.float().clamp(-1, 1)
            psnr.update(reconstructions, images)
            ssim.update(reconstructions, images)
    return psnr.compute().item(), ssim.compute().item()


def _machine(args: argparse.Namespace) -> dict:
    machine = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine()
    return {"device": args.device, "machine": machine, "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="minildm-32", choices=sorted(AUTOENCODER_PRESETS))
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10, help="timed iterations per mode")
    parser.add_argument("--warmup", type=int, default=2, help="untimed iterations first (compilation included)")
    parser.add_argument("--quality-steps", type=int, default=200)
    parser.add_argument("--quality-batch", type=int, default=16)
    parser.add_argument("--quality-lr", type=float, default=1e-3)
    parser.add_argument("--quality-eval-images", type=int, default=256)
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not args.skip_speed:
        speed_table(args)
    if not args.skip_quality:
        quality_table(args)


if __name__ == "__main__":
    main()
