"""`scripts/fid_coco.sh`, the paper's COCO protocol, run as a user runs it (bash, 2 processes under the Composer
launcher) on a COCO-shaped fixture: `captions_val2014.json` in COCO's format, a few val2014-named JPEGs of
several sizes, a random Inception-v3 in torch-fidelity's weights file, and a tiny text-to-image MicroDiT."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from micro_diffusion.eval.sample_folder import read_sample_folder
from micro_diffusion.models.checkpoints import save_dit_weights
from micro_diffusion.models.model import create_latent_diffusion

REPO = Path(__file__).resolve().parents[1]
# (image id, width, height, captions in annotation order): ids out of order, two captions each, one with stray spaces.
COCO_IMAGES = [
    (393, 20, 14, ["a red  square on a road", "a square"]),
    (42, 12, 16, ["a cat on the road ", "a cat"]),
    (7, 16, 16, ["a blue car", "a car near a dog"]),
    (1000, 10, 10, ["the dog", "a dog on a road"]),
    (512, 18, 12, ["a photo of a car", "an old car"]),
    (96, 14, 20, ["two cats", "cats on a car"]),
]


@pytest.fixture
def coco_root(tmp_path: Path) -> Path:
    """COCO-2014's layout: val2014/COCO_val2014_<id>.jpg and annotations/captions_val2014.json."""
    root = tmp_path / "coco2014"
    (root / "val2014").mkdir(parents=True)
    (root / "annotations").mkdir()
    generator = np.random.default_rng(0)
    images, annotations = [], []
    for image_id, width, height, captions in COCO_IMAGES:
        name = f"COCO_val2014_{image_id:012d}.jpg"
        Image.fromarray(generator.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(root / "val2014" / name)
        images.append({"id": image_id, "file_name": name, "width": width, "height": height})
        for caption in captions:
            annotations.append({"id": 10 * image_id + len(annotations) % 2, "image_id": image_id, "caption": caption})
    annotations.reverse()  # the script orders them itself
    coco = {"info": {}, "licenses": [], "images": images, "annotations": annotations}
    (root / "annotations" / "captions_val2014.json").write_text(json.dumps(coco))
    return root


@pytest.fixture
def text_model(tmp_path: Path, tiny_hf_clip_dir) -> tuple[Path, Path]:
    """(weights, model config) of a tiny text-to-image MicroDiT in pixel space (8 px), random weights."""
    config = {"vae_name": "identity", "text_encoder_name": tiny_hf_clip_dir.name, "dit_arch": "MicroDiT_XXS_2",
              "in_channels": 3, "latent_res": 8, "dtype": "float32"}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = create_latent_diffusion(**config)
    (tmp_path / "model.yaml").write_text(yaml.safe_dump(config))
    return save_dit_weights(model.dit, tmp_path / "dit.safetensors"), tmp_path / "model.yaml"


@pytest.mark.slow
def test_fid_coco_script_runs_the_protocol_sharded(coco_root, text_model, random_inception_weights, tmp_path):
    weights, config = text_model
    out = tmp_path / "fid"
    env = dict(
        os.environ, COCO_ROOT=str(coco_root), NUM_SAMPLES="4", STEPS="2", GUIDANCE="2.0", SEED="7", OUT=str(out),
        NPROC="2", MICRO_DIFFUSION_INCEPTION_WEIGHTS=str(random_inception_weights), CUDA_VISIBLE_DEVICES="",
        OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    )
    command = ["bash", str(REPO / "scripts" / "fid_coco.sh"), str(weights), "--model-config", str(config),
               "--batch-size", "2", "--cache-dir", str(tmp_path / "cache")]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr

    # The first caption of each of the first 4 images by id, whitespace normalised.
    expected_prompts = ["a blue car", "a cat on the road", "two cats", "a red square on a road"]
    assert (out / "prompts.txt").read_text().splitlines() == expected_prompts
    samples = read_sample_folder(out / "samples")
    assert samples.seeds == [7, 8, 9, 10] and samples.conditions == expected_prompts
    assert sorted(path.name for path in (out / "samples").glob("*.png")) == [f"{s:06d}.png" for s in range(7, 11)]

    report = json.loads((out / "report.json").read_text())
    results = {record["metric"]: record for record in report["results"]}
    assert set(results) == {"fd_inception-v3", "kid_mean", "kid_std"}
    fd = results["fd_inception-v3"]
    assert fd["value"] > 0 and fd["extractor"] == "inception" and fd["num_samples"] == 4
    assert (fd["steps"], fd["guidance"], fd["seed"]) == (2, 2.0, 7)
    # The reference is every val2014 image of the annotations, prepared at the samples' resolution.
    assert "(6 images, 8px)" in fd["reference_set"] and "captions_val2014.json" in fd["reference_set"]
    assert "2 processes" in result.stdout
