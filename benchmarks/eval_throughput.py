"""Images per second of each evaluation feature extractor (resize + network), one JSON line per extractor.

Where real weights are not on disk (Inception-v3, DINOv2 ViT-L/14 and OpenCLIP ViT-B/32 here; see
micro_diffusion/eval/features.py for the environment variables), the same architecture runs with random
weights written to a temporary folder in the real file format: the speed is the same, the features are not.

    python benchmarks/eval_throughput.py [--extractors inception efficientnet-lite0 dinov2 clip]
                                         [--batch-size 16] [--image-size 256] [--batches 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch
from torch import nn

from micro_diffusion.eval.features import (
    CLIP_WEIGHTS_ENV,
    DINOV2_WEIGHTS_ENV,
    INCEPTION_WEIGHTS_ENV,
    ClipImageFeatures,
    FeatureExtractor,
    get_feature_extractor,
)

EXTRACTORS = ("inception", "efficientnet-lite0", "dinov2", "clip")


def random_inception_weights(folder: Path) -> Path:
    """torch-fidelity's Inception-v3 with He-initialised random weights (activations stay normal floats,
    not denormals, which would make the CPU timing meaningless), saved with torch.save."""
    from torch_fidelity import feature_extractor_inceptionv3 as fidelity_inception

    network_class = fidelity_inception.FeatureExtractorInceptionV3
    with (
        mock.patch.object(fidelity_inception, "load_state_dict_from_url", return_value={}),
        mock.patch.object(network_class, "load_state_dict"),
    ):
        network = network_class("inception-v3-compat", ["2048"])
    for module in network.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    path = folder / "weights-inception-2015-12-05-6726825d.pth"
    torch.save(network.state_dict(), path)
    return path


def random_dinov2_weights(folder: Path) -> Path:
    """timm's DINOv2 ViT-L/14 with random weights, saved as safetensors (as timm's hub files are)."""
    import timm
    from safetensors.torch import save_file

    path = folder / "dinov2_vitl14.safetensors"
    save_file(timm.create_model("vit_large_patch14_dinov2", num_classes=0).state_dict(), path)
    return path


def build_extractor(name: str, device: str, folder: Path) -> tuple[FeatureExtractor, str]:
    """The extractor and "real" or "random" for its weights."""
    if name == "efficientnet-lite0":
        return get_feature_extractor(name, device=device), "real"
    if name == "inception" and not os.environ.get(INCEPTION_WEIGHTS_ENV):
        return get_feature_extractor(name, random_inception_weights(folder), device), "random"
    if name == "dinov2" and not os.environ.get(DINOV2_WEIGHTS_ENV):
        return get_feature_extractor(name, random_dinov2_weights(folder), device), "random"
    if name == "clip" and not os.environ.get(CLIP_WEIGHTS_ENV):
        import open_clip

        return ClipImageFeatures(open_clip.create_model("ViT-B-32"), "clip-ViT-B-32").to(device), "random"
    return get_feature_extractor(name, device=device), "real"


def images_per_second(extractor: FeatureExtractor, images: torch.Tensor, batches: int) -> float:
    """Throughput over `batches` calls after one warm-up call."""
    with torch.inference_mode():
        extractor(images)
        if images.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(batches):
            extractor(images)
        if images.is_cuda:
            torch.cuda.synchronize()
    return batches * len(images) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--extractors", nargs="+", choices=EXTRACTORS, default=list(EXTRACTORS))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=256, help="side of the generated images")
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    generator = torch.Generator().manual_seed(0)
    images = torch.rand(args.batch_size, 3, args.image_size, args.image_size, generator=generator)
    images = images.to(args.device)
    with tempfile.TemporaryDirectory() as folder:
        for name in args.extractors:
            torch.manual_seed(0)
            extractor, weights = build_extractor(name, args.device, Path(folder))
            record = {
                "benchmark": "eval_throughput",
                "extractor": extractor.name,
                "weights": weights,
                "images_per_s": round(images_per_second(extractor, images, args.batches), 2),
                "input_size": extractor.input_size,
                "num_features": extractor.num_features,
                "batch_size": args.batch_size,
                "image_size": args.image_size,
                "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
                "threads": torch.get_num_threads(),
                "machine": platform.processor() or platform.machine(),
                "torch": torch.__version__,
            }
            print(json.dumps(record), flush=True)
            del extractor  # free it before the next one is built


if __name__ == "__main__":
    main()
