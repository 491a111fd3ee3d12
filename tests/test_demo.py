"""`make demo` is yamls/demo.yaml: the file holds the measured demo's settings, and the same file run end to end at
toy lengths (sizes from the command line) writes what README promises and resumes without redoing a step."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import yaml
from PIL import Image
from training_runs import read_mds

from micro_diffusion import compat
from micro_diffusion.cli import demo
from micro_diffusion.data.sources.shapes import Holdout, iter_shapes, parse_caption
from micro_diffusion.pipeline import DONE_MARKER, STAGE_CONFIG, compose_stage, load_pipeline

REPO = Path(__file__).resolve().parents[1]
PIPELINE = REPO / "yamls" / "demo.yaml"
TOY = [
    "--var", "num_train=512", "--var", "num_val=64",
    "demo_autoencoder:trainer.max_duration=3ba", "demo_dit_pretrain:trainer.max_duration=3ba",
    "demo_dit_finetune:trainer.max_duration=5ba", "demo_dit_finetune:callbacks.ema.ema_start=3ba",
    "report:--num-samples=6", "report:--steps=2", "report:--grid-per-set=4",
]  # fmt: skip
PROMPT_SETS = ("seen_single", "held_out_relations", "held_out_pairs")


def report_arguments() -> list[str]:
    stages = yaml.safe_load(PIPELINE.read_text())["stages"]
    return next(stage for stage in stages if stage.get("name") == "report")["args"]


def test_the_pipeline_file_holds_the_measured_demo(monkeypatch):
    """The settings of the demo measured in benchmarks/RESULTS.md, read from the files `make demo` runs."""
    pipeline = load_pipeline(PIPELINE)
    assert [stage.name for stage in pipeline.stages] == [
        "data_train", "data_val", "demo_autoencoder", "latent_stats", "latents_train", "latents_val",
        "demo_dit_pretrain", "demo_dit_finetune", "report",
    ]
    assert pipeline.train_script == REPO / "train.py" and pipeline.nproc == 2
    assert pipeline.variables["num_train"] == "8000" and pipeline.variables["num_val"] == "256"
    autoencoder, pretrain, finetune = (compose_stage(pipeline.config_dir, s) for s in pipeline.training_stages)
    assert autoencoder.data.source_options.num_samples == 8000 and autoencoder.data.source_options.max_groups == 2
    assert autoencoder.data.source_options.holdout_pairs == pipeline.variables["holdout_pairs"]
    assert float(autoencoder.data.source_options.holdout_captions) == 0.15
    for amx in (False, True):  # bf16 autocast where the CPU has AMX, resolved where the config is read
        monkeypatch.setattr(compat, "cpu_has_amx", lambda amx=amx: amx)
        assert autoencoder.model.cpu_bf16 is amx
    assert [autoencoder.trainer[key] for key in ("max_duration", "eval_interval", "save_interval")] == ["1200ba"] * 3
    assert pretrain.trainer.max_duration == "1500ba" and pretrain.model.train_mask_ratio == 0.5
    assert finetune.trainer.max_duration == "1950ba" and finetune.callbacks.ema.ema_start == "1500ba"
    assert pretrain.model.text_encoder_name == finetune.model.text_encoder_name == "minilm-16"
    args = report_arguments()
    settings = {name: args[args.index(name) + 1] for name in ("--num-samples", "--steps", "--guidance")}
    assert settings == {"--num-samples": "200", "--steps": "20", "--guidance": "3.0"}
    holdout = Holdout.from_options(pipeline.variables["holdout_pairs"], float(pipeline.variables["holdout_captions"]))
    assert len(holdout.pairs) == 3 and holdout.caption_share >= 0.15


def test_help_names_the_pipeline_and_an_installed_package_asks_for_it(capsys, monkeypatch):
    with pytest.raises(SystemExit):
        demo.main(["--help"])
    assert str(PIPELINE) in capsys.readouterr().out
    monkeypatch.setattr(demo, "find_pipeline", lambda: None)
    with pytest.raises(SystemExit):
        demo.main([])
    assert "pass --pipeline <checkout>/yamls/demo.yaml" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_writes_its_outputs_and_skips_finished_steps(tmp_path: Path, capfd):
    out = tmp_path / "demo"
    demo.main(["--out", str(out), *TOY])
    printed = capfd.readouterr().out
    for name in ("grid.png", "metrics.json", "scores.png", "loss.png"):
        assert (out / name).stat().st_size > 0 and str(out / name) in printed
    assert (out / "dit_ema.safetensors").stat().st_size > 0
    assert Image.open(out / "grid.png").width == 4 * (32 * 4 + 4) + 4  # 4 samples a set, upscaled 4x
    for name in PROMPT_SETS:
        assert len(list((out / "samples" / name).glob("*.png"))) == 6
    report = json.loads((out / "metrics.json").read_text())
    records = {record["metric"]: record for record in report["results"]}
    assert {f"shapes/{name}/all" for name in PROMPT_SETS} <= set(records)
    assert {"shapes/held_out_relations/position", "shapes/held_out_pairs/through_autoencoder/all"} <= set(records)
    assert all(record["num_samples"] == 6 and 0 <= record["value"] <= 1 for record in records.values())
    assert all(record["steps"] == (None if "through_autoencoder" in metric else 2)
               for metric, record in records.items())
    assert "held-out pairs: blue triangle" in records["shapes/held_out_pairs/all"]["reference_set"]

    # The held-out pairs and captions never reach training: not in the rendered data, nor in the latents' captions
    pipeline = load_pipeline(PIPELINE)
    holdout = Holdout.from_options(pipeline.variables["holdout_pairs"], float(pipeline.variables["holdout_captions"]))
    for split in ("latents_train", "latents_val"):
        specs = [parse_caption(row["caption"]) for row in read_mds(out / "data" / split)]
        assert len(specs) == {"latents_train": 512, "latents_val": 64}[split]
        assert not any(holdout.excludes(spec) for spec in specs)
        assert sum(len(spec.groups) == 2 for spec in specs) > len(specs) / 4  # the whole grammar, not one group
    autoencoder_options = compose_stage(pipeline.config_dir, pipeline.training_stages[0]).data.source_options
    autoencoder_records = itertools.islice(iter_shapes(**autoencoder_options), 512)
    assert not any(holdout.excludes(parse_caption(record.caption)) for record in autoencoder_records)
    shard = json.loads((out / "data" / "latents_train" / "index.json").read_text())["shards"][0]
    bytes_per_sample = shard["raw_data"]["bytes"] / shard["samples"]
    assert 16 * 384 * 2 <= bytes_per_sample < 32 * 384 * 2  # float16 MiniLM states of 16 tokens, not 32
    raw_train = json.loads((out / "data" / "raw_train" / "index.json").read_text())["shards"]
    assert sum(shard["samples"] for shard in raw_train) == 512  # num_train from the command line
    run = out / "runs" / "demo_dit_mask_0_finetune"
    assert yaml.safe_load((run / STAGE_CONFIG).read_text())["trainer"]["max_duration"] == "5ba"
    assert (run / DONE_MARKER).exists() and (out / "steps_done" / "report.done.json").exists()

    finished = (run / "latest-rank0.pt").stat().st_mtime_ns
    demo.main(["--out", str(out), *TOY])  # every step is done: nothing runs again
    assert (run / "latest-rank0.pt").stat().st_mtime_ns == finished
    assert capfd.readouterr().out.count("skipped") == 9
