"""`make demo` end to end at toy lengths: every step runs for real (shapes data, the autoencoder and the two
MicroDiT stages through `composer -n 2`, latents, evaluation), writes what README promises, and resumes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from micro_diffusion.demo import GRID_PROMPTS
from micro_diffusion.demo import main as demo_main

pytestmark = pytest.mark.slow

TOY = ["--num-train", "512", "--num-val", "64", "--ae-batches", "3", "--pretrain-batches", "3",
       "--finetune-batches", "2", "--eval-samples", "6", "--steps", "2"]  # fmt: skip


def test_demo_writes_its_outputs_and_skips_finished_steps(tmp_path: Path, capsys):
    out = tmp_path / "demo"
    demo_main(["--out", str(out), *TOY])
    printed = capsys.readouterr().out
    for name in ("grid.png", "metrics.json", "loss.png"):
        assert (out / name).stat().st_size > 0 and str(out / name) in printed
    assert (out / "dit_ema.safetensors").stat().st_size > 0
    assert Image.open(out / "grid.png").size == (4 * 34 + 2, 4 * 34 + 2)  # 16 fixed prompts, 4 x 4
    assert (out / "grid_prompts.txt").read_text().splitlines() == GRID_PROMPTS
    assert len(list((out / "samples").glob("*.png"))) == 6
    report = json.loads((out / "metrics.json").read_text())
    records = {record["metric"]: record for record in report["results"]}
    assert {"shapes/all", "shapes/colour"} <= set(records)
    assert all(record["num_samples"] == 6 and 0 <= record["value"] <= 1 for record in records.values())
    shard = json.loads((out / "data" / "latents_train" / "index.json").read_text())["shards"][0]
    bytes_per_sample = shard["raw_data"]["bytes"] / shard["samples"]
    assert 16 * 384 * 2 <= bytes_per_sample < 32 * 384 * 2  # float16 MiniLM states of 16 tokens, not 32

    checkpoint = out / "runs" / "demo_dit_mask_0_finetune" / "latest-rank0.pt"
    finished = checkpoint.stat().st_mtime_ns
    demo_main(["--out", str(out), *TOY])  # every step's output exists: nothing trains again
    assert checkpoint.stat().st_mtime_ns == finished
