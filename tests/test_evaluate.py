"""The eval command on a tiny checkpoint writes a complete report offline."""

from __future__ import annotations

import json

import pytest

from micro_diffusion.cli.evaluate import load_prompts, main
from micro_diffusion.models.checkpoints import save_dit_weights
from micro_diffusion.models.dit import create_dit


def test_eval_cli_writes_a_complete_report(tmp_path, tiny_vae_dir, tiny_hf_clip_dir, tiny_openclip_checkpoint):
    dit = create_dit("MicroDiT_XXS_2", input_size=8, caption_channels=32)
    weights = save_dit_weights(dit, tmp_path / "w.safetensors")
    out = tmp_path / "eval"
    main([
        "--weights", str(weights), "--dit-arch", "MicroDiT_XXS_2", "--latent-res", "8", "--pos-interp-scale", "1",
        "--vae", str(tiny_vae_dir), "--text-encoder", tiny_hf_clip_dir.name, "--dtype", "float32",
        "--num-samples", "12", "--batch-size", "6", "--steps", "2", "--guidance", "2.0",
        "--metrics", "fd", "kid", "shapes", "clip", "--reference-source", "shapes",
        "--clip-weights", str(tiny_openclip_checkpoint.path.parent),
        "--reference-option", "resolution=32", "--reference-option", "num_samples=24", "--reference-count", "24",
        "--cache-dir", str(tmp_path / "cache"),
        "--out", str(out),
    ])
    report = json.loads((out / "report.json").read_text())
    metrics = {record["metric"]: record for record in report["results"]}
    assert {"fd_efficientnet-lite0", "kid_mean", "shapes/all", "clip_score"} <= set(metrics)
    for record in report["results"]:
        assert {"extractor", "num_samples", "reference_set", "sampler", "steps", "guidance", "seed"} <= set(record)
        assert record["steps"] == 2 and record["guidance"] == 2.0 and record["sampler"] == "edm-heun"
    assert metrics["fd_efficientnet-lite0"]["num_samples"] == 12
    assert "24 images" in metrics["kid_mean"]["reference_set"]
    assert (out / report["sample_grid"]).is_file()
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1  # reference statistics cached


def test_prompt_files_are_cycled_and_bad_specs_rejected(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a cat\n\na dog\n")
    assert load_prompts(str(path), 5, seed=0) == ["a cat", "a dog", "a cat", "a dog", "a cat"]
    assert len(set(load_prompts("shapes", 20, seed=0))) > 1
    with pytest.raises(FileNotFoundError, match="shapes"):
        load_prompts(str(tmp_path / "missing.txt"), 3, seed=0)
