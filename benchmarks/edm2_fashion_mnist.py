"""EDM2 configurations C, E, G and MicroDiT with and without MP layers, class-conditional on Fashion-MNIST pixels,
at equal training time on one device; Frechet distance with a post-hoc EMA sweep, and images/s.

Protocol (printed with the results):
  data        Fashion-MNIST train split, 28 px zero-padded to 32 px, one channel in [-1, 1], labels as classes
  training    every network for the same wall-clock budget (--seconds) on the same device, batch --batch,
              bf16 autocast on GPU; EDM loss with sigma_data 0.5, ln sigma ~ N(-1.2, 1.2^2) (EDM's CIFAR values,
              as in the CIFAR reimplementation) and EDM2's learned per-sigma loss weighting; Adam without weight
              decay. MP networks (U-Net E/G, MicroDiT-MP): lr 5e-3, betas (0.9, 0.99), inverse-sqrt decay after
              t_ref images; standard networks (U-Net C, MicroDiT): lr 4e-4 (C's CIFAR value), betas
              (0.9, 0.999), constant; all with a linear warm-up over --warmup-images
  EMA         power-function EMAs at sigma_rel 0.05 and 0.10, fp16 snapshots every --snapshot-images images;
              post-hoc reconstruction at the last snapshot for each sigma_rel of --sweep
  sampling    EDM Heun, 18 steps (35 evaluations), sigma 0.002..80, rho 7, no guidance; sample i has seed i and
              class i mod 10
  metric      FD on EfficientNet-Lite0 features (offline, ImageNet weights; not comparable with published FID):
              --fd-samples generated images vs the same number of test-split images

    python benchmarks/edm2_fashion_mnist.py --seconds 45 --out /tmp/edm2_bench            # GPU
    python benchmarks/edm2_fashion_mnist.py --device cpu --seconds 20 --fd-samples 200 --batch 32 \\
        --networks unet-G microdit-mp --out /tmp/edm2_bench                               # a CPU check
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from micro_diffusion.data.sources.fashion_mnist import FASHION_MNIST_DIR, load_fashion_mnist
from micro_diffusion.diffusion.edm import LearnedLossWeighting, edm_denoise, edm_loss, sample_training_sigmas
from micro_diffusion.diffusion.power_ema import PowerFunctionEMA, find_snapshots, reconstruct, save_snapshot
from micro_diffusion.diffusion.samplers import edm_heun_sampler, generators_from_seeds, noise_from_seeds
from micro_diffusion.eval.features import get_feature_extractor
from micro_diffusion.eval.frechet import compute_feature_statistics, frechet_distance
from micro_diffusion.models.dit import create_dit
from micro_diffusion.models.edm2_unet import create_edm2_unet

SIGMA_DATA, P_MEAN, P_STD = 0.5, -1.2, 1.2
NUM_CLASSES = 10
TRACKED_SIGMA_RELS = (0.05, 0.10)


class ClassConditionalNetwork(nn.Module):
    """F(x_in, c_noise, labels) -> (N, 1, 32, 32) for the EDM2 U-Net (one-hot labels, its own label layer) or a
    MicroDiT (labels embedded to a one-token caption)."""

    def __init__(self, kind: str, mp: bool | None = None, config: str | None = None) -> None:
        super().__init__()
        self.kind = kind
        if kind == "unet":
            self.net = create_edm2_unet("cifar-XXS", config=config, img_channels=1, label_dim=NUM_CLASSES)
        else:
            self.net = create_dit("MicroDiT_XS_2", input_size=32, in_channels=1, patch_size=2,
                                  caption_channels=128, mp=mp)
            self.label_embedding = nn.Embedding(NUM_CLASSES, 128)
            nn.init.normal_(self.label_embedding.weight)

    def forward(self, x: Tensor, c_noise: Tensor, labels: Tensor) -> Tensor:
        if self.kind == "unet":
            return self.net(x, c_noise, labels)
        caption = self.label_embedding(labels)[:, None, None, :].to(x.dtype)
        return self.net(x, c_noise, caption)["sample"]


NETWORKS: dict[str, Callable[[], ClassConditionalNetwork]] = {
    "unet-C": lambda: ClassConditionalNetwork("unet", config="C"),
    "unet-E": lambda: ClassConditionalNetwork("unet", config="E"),
    "unet-G": lambda: ClassConditionalNetwork("unet", config="G"),
    "microdit": lambda: ClassConditionalNetwork("dit", mp=False),
    "microdit-mp": lambda: ClassConditionalNetwork("dit", mp=True),
}
MAGNITUDE_PRESERVING = {"unet-E", "unet-G", "microdit-mp"}


def load_split(folder: Path, split: str, device: str) -> tuple[Tensor, Tensor]:
    """(images (N, 1, 32, 32) float in [-1, 1], labels (N,) int64) on `device`."""
    images, labels = load_fashion_mnist(folder, split)
    pixels = torch.tensor(images).float().div(127.5).sub(1)[:, None]
    return F.pad(pixels, (2, 2, 2, 2), value=-1.0).to(device), torch.from_numpy(labels.astype(np.int64)).to(device)


def learning_rate(name: str, images: int, warmup_images: int, t_ref_images: int) -> float:
    warmup = min(images / warmup_images, 1.0)
    if name in MAGNITUDE_PRESERVING:
        return 5e-3 * warmup / math.sqrt(max(images / t_ref_images, 1.0))
    return 4e-4 * warmup


def denoise(network: ClassConditionalNetwork, x: Tensor, sigma: Tensor, labels: Tensor) -> Tensor:
    return edm_denoise(lambda x_in, c_noise: network(x_in, c_noise, labels), x, sigma, SIGMA_DATA)


def save_snapshots(ema: PowerFunctionEMA, folder: Path) -> None:
    for index, sigma_rel in enumerate(ema.sigma_rels):
        save_snapshot(folder, ema.averaged_state_dict(index), ema.t_images, sigma_rel, ema.buffer_names(),
                      dtype=torch.float16)


def train(name: str, args: argparse.Namespace, images: Tensor, labels: Tensor, snapshot_dir: Path) -> dict:
    """Train one network for args.seconds; returns its throughput figures. Snapshots go to snapshot_dir."""
    torch.manual_seed(0)
    network = NETWORKS[name]().to(args.device)
    weighting = LearnedLossWeighting().to(args.device)
    betas = (0.9, 0.99) if name in MAGNITUDE_PRESERVING else (0.9, 0.999)
    optimizer = torch.optim.Adam([*network.parameters(), *weighting.parameters()], lr=0.0, betas=betas)
    ema = PowerFunctionEMA(network, TRACKED_SIGMA_RELS)
    use_bf16 = args.device == "cuda"
    seen, steps, start = 0, 0, time.perf_counter()
    while time.perf_counter() - start < args.seconds:
        index = torch.randint(len(images), (args.batch,), device=args.device)
        clean, batch_labels = images[index], labels[index]
        sigma = sample_training_sigmas(args.batch, P_MEAN, P_STD, device=args.device)
        noisy = clean + torch.randn_like(clean) * sigma.view(-1, 1, 1, 1)
        with torch.autocast(args.device, dtype=torch.bfloat16, enabled=use_bf16):
            denoised = denoise(network, noisy, sigma, batch_labels)
        loss, _ = edm_loss(denoised, clean, sigma, SIGMA_DATA, log_var=weighting(sigma))
        loss.backward()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(name, seen, args.warmup_images, args.t_ref_images)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seen += args.batch
        steps += 1
        ema.update(seen)
        if seen // args.snapshot_images > (seen - args.batch) // args.snapshot_images:
            save_snapshots(ema, snapshot_dir)
    if args.device == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    if seen % args.snapshot_images:
        save_snapshots(ema, snapshot_dir)  # the reconstructions are made at the end of training
    return {
        "network": name, "params_m": round(sum(p.numel() for p in network.parameters()) / 1e6, 2),
        "train_images": seen, "steps": steps, "images_per_s": round(seen / elapsed, 1),
        "final_loss": round(loss.item(), 4),
    }


@torch.no_grad()
def sample(network: ClassConditionalNetwork, count: int, device: str, batch: int) -> Tensor:
    """`count` images (count, 1, 32, 32) in [0, 1]; image i: seed i, class i mod 10."""
    network.eval()
    outputs = []
    for first in range(0, count, batch):
        seeds = list(range(first, min(first + batch, count)))
        labels = torch.tensor([s % NUM_CLASSES for s in seeds], device=device)
        noise = noise_from_seeds(seeds, (1, 32, 32), device=device, dtype=torch.float32)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            x = edm_heun_sampler(partial(denoise, network, labels=labels), noise, num_steps=18,
                                 generators=generators_from_seeds(seeds, device))
        outputs.append(((x.float() + 1) / 2).clamp(0, 1))
    return torch.cat(outputs)


def sweep_fd(name: str, args: argparse.Namespace, snapshot_dir: Path, reference, extractor) -> dict[str, float]:
    """FD of the post-hoc EMA for every sigma_rel of args.sweep, at the last snapshot."""
    network = NETWORKS[name]().to(args.device)
    results = {}
    for rec in reconstruct(find_snapshots(snapshot_dir), args.sweep):
        network.load_state_dict({k: v.to(args.device) for k, v in rec.state_dict.items()})
        generated = sample(network, args.fd_samples, args.device, args.sample_batch)
        stats = compute_feature_statistics(generated, extractor, batch_size=250)
        results[f"{rec.sigma_rel:.3f}"] = round(frechet_distance(reference, stats), 2)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--networks", nargs="+", default=list(NETWORKS), choices=list(NETWORKS))
    parser.add_argument("--seconds", type=float, default=45.0, help="training time per network")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--warmup-images", type=int, default=100_000)
    parser.add_argument("--t-ref-images", type=int, default=500_000)
    parser.add_argument("--snapshot-images", type=int, default=25_000)
    parser.add_argument("--sweep", nargs="+", type=float, default=[0.02, 0.05, 0.10, 0.15, 0.20])
    parser.add_argument("--fd-samples", type=int, default=2000)
    parser.add_argument("--sample-batch", type=int, default=1000)
    parser.add_argument("--data", type=Path, default=FASHION_MNIST_DIR, help="folder of the Fashion-MNIST .gz files")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    images, labels = load_split(args.data, "train", args.device)
    test_images, _ = load_split(args.data, "test", args.device)
    extractor = get_feature_extractor("efficientnet-lite0", device=args.device)
    reference = compute_feature_statistics((test_images[: args.fd_samples] + 1) / 2, extractor, batch_size=250)
    rows = []
    for name in args.networks:
        snapshot_dir = args.out / name
        shutil.rmtree(snapshot_dir, ignore_errors=True)
        row = train(name, args, images, labels, snapshot_dir)
        row["fd_by_sigma_rel"] = sweep_fd(name, args, snapshot_dir, reference, extractor)
        row["best_fd"] = min(row["fd_by_sigma_rel"].values())
        print(json.dumps(row), flush=True)
        rows.append(row)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    summary = {"device": device_name, "seconds_per_network": args.seconds, "batch": args.batch,
               "fd_samples": args.fd_samples, "results": rows}
    (args.out / "results.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps({r["network"]: r["best_fd"] for r in rows}))


if __name__ == "__main__":
    main()
