"""Streaming, sharded evaluation and one file per sample, on a tiny class-conditional EDM2 U-Net in pixel space.

- Feature statistics of disjoint shards merge into those of the whole set (moments and the KID feature sample).
- `generate --outdir --seeds` writes DIR/<seed>.png equal to LatentDiffusion.generate, and a manifest; a killed
  run resumes (existing files are kept, missing ones made).
- `composer -n 2 -m micro_diffusion.cli eval` reports the numbers of a one-process run, and writes the samples;
  `eval --images DIR` scores that folder to the same numbers.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from micro_diffusion.cli.evaluate import main as eval_main
from micro_diffusion.cli.generate import main as generate_main
from micro_diffusion.eval.frechet import FeatureStatistics
from micro_diffusion.eval.sample_folder import parse_seeds, read_sample_folder
from micro_diffusion.models.checkpoints import save_dit_weights
from micro_diffusion.models.model import LatentDiffusion, create_latent_diffusion

TINY_UNET = {
    "vae_name": "identity", "text_encoder_name": None, "num_classes": 4, "latent_res": 8, "in_channels": 3,
    "dtype": "float32", "unet_preset": "cifar-XXS",
    "unet_kwargs": {"model_channels": 16, "num_blocks": 1, "channel_mult": [1, 2], "attn_resolutions": [],
                    "channels_per_head": 16, "dropout": 0.0},
}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[LatentDiffusion, Path, Path]:
    """(model, its model config, its weights file): the tiny U-Net with perturbed (non-zero-output) weights."""
    folder = tmp_path_factory.mktemp("unet")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = create_latent_diffusion(**TINY_UNET).eval()
        with torch.no_grad():
            for parameter in model.dit.parameters():
                parameter.add_(torch.randn_like(parameter) * 0.2)
    config = folder / "model.yaml"
    config.write_text(yaml.safe_dump(TINY_UNET))
    return model, config, save_dit_weights(model.dit, folder / "unet.safetensors")


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("reference")
    generator = np.random.default_rng(0)
    for index in range(16):
        Image.fromarray(generator.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)).save(folder / f"{index:02d}.png")
    return folder


def test_shard_statistics_merge_into_those_of_the_whole_set() -> None:
    features = torch.randn(3000, 5, dtype=torch.float64) * 3 + 50
    whole = FeatureStatistics(5, max_stored=500)
    whole.update(features)
    ids = torch.arange(3000)
    shards = [FeatureStatistics(5, max_stored=500) for _ in range(3)]
    for rank, shard in enumerate(shards):
        for chunk in ids[rank::3].split(64):
            shard.update(features[chunk], chunk)
    merged = shards[0]
    for shard in shards[1:]:
        merged.merge(shard)
    assert merged.count == 3000
    torch.testing.assert_close(merged.mean, whole.mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(merged.covariance, whole.covariance, rtol=1e-10, atol=1e-10)
    assert torch.equal(merged.stored_features, whole.stored_features)  # the same ids are kept


def test_seed_lists_parse_like_edm2() -> None:
    assert parse_seeds("0-3,7") == [0, 1, 2, 3, 7]
    for bad in ("3-1", "a", "1,1"):
        with pytest.raises(ValueError):
            parse_seeds(bad)


def test_generate_writes_one_file_per_seed_and_resumes(run, tmp_path: Path) -> None:
    model, config, weights = run
    outdir = tmp_path / "samples"
    command = ["--weights", str(weights), "--model-config", str(config), "--class-label", "1", "--class-label", "3",
               "--steps", "2", "--guidance", "2", "--outdir", str(outdir), "--seeds", "5-9", "--batch-size", "2"]
    generate_main(command)
    samples = read_sample_folder(outdir)
    assert samples.files == [f"{seed:06d}.png" for seed in range(5, 10)]
    assert samples.conditions == [1, 3, 1, 3, 1]  # the class labels, cycled over the seeds
    expected = model.generate(class_labels=[1, 3, 1, 3, 1], seeds=list(range(5, 10)), guidance_scale=2.0,
                              num_inference_steps=2)
    pixels = np.stack([np.asarray(Image.open(outdir / file)) for file in samples.files])
    assert np.abs(pixels.astype(int) - (expected.permute(0, 2, 3, 1).numpy() * 255).round()).max() <= 1

    kept = (outdir / "000005.png").stat().st_mtime_ns
    (outdir / "000007.png").unlink()  # a run killed before this file
    generate_main(command)
    assert (outdir / "000007.png").is_file() and (outdir / "000005.png").stat().st_mtime_ns == kept
    with pytest.raises(ValueError, match="other samples"):
        generate_main([*command[:-4], "--seeds", "0-4", "--batch-size", "2"])


@pytest.mark.slow
def test_two_processes_report_what_one_process_does(run, reference, tmp_path: Path) -> None:
    _, config, weights = run
    common = ["--weights", str(weights), "--model-config", str(config), "--metrics", "fd", "kid",
              "--num-samples", "14", "--batch-size", "3", "--steps", "2", "--reference-source", "folder",
              "--reference-option", f"root={reference}", "--reference-count", "16", "--cache-dir",
              str(tmp_path / "cache")]
    eval_main([*common, "--out", str(tmp_path / "one")])
    command = [
        sys.executable, "-m", "composer.cli.launcher", "-n", "2", "--master_port", str(free_port()),
        "--stdout", str(tmp_path / "rank{rank}.out"), "--stderr", str(tmp_path / "rank{rank}.err"),
        "-m", "micro_diffusion.cli", "eval", *common, "--out", str(tmp_path / "two"),
        "--outdir", str(tmp_path / "samples"),
    ]  # fmt: skip
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    logs = "".join(path.read_text() for path in tmp_path.glob("rank*.*"))
    assert result.returncode == 0, result.stdout + result.stderr + logs

    def values(folder: Path) -> dict[str, float]:
        report = json.loads((folder / "report.json").read_text())
        return {record["metric"]: record["value"] for record in report["results"]}

    one, two = values(tmp_path / "one"), values(tmp_path / "two")
    assert one.keys() == two.keys() == {"fd_efficientnet-lite0", "kid_mean", "kid_std"}
    for name in one:
        assert two[name] == pytest.approx(one[name], rel=1e-5, abs=1e-6), name
    assert len(read_sample_folder(tmp_path / "samples").files) == 14

    eval_main(["--images", str(tmp_path / "samples"), *common[4:], "--out", str(tmp_path / "folder")])
    for name, value in values(tmp_path / "folder").items():
        assert value == pytest.approx(one[name], rel=1e-5, abs=1e-6), name
