"""Run a multi-stage training pipeline (yamls/*.yaml) stage by stage with the Composer launcher.

    python scripts/train_pipeline.py yamls/microdit_xl2.yaml data.datadir=/mnt/latents
    python scripts/train_pipeline.py yamls/tiny.yaml --nproc 2 data.datadir=datadir/tiny

A pipeline file lists the stages in order:

    config_dir: ../configs          # Hydra config folder, relative to the pipeline file
    nproc: 8                        # processes per node (composer -n)
    overrides: [...]                # Hydra overrides for every stage
    stages:
      - config: res_256_pretrain    # a config of config_dir
        overrides: [exp_name=..., model.train_mask_ratio=0.75]
      - config: res_256_finetune
        overrides: [...]
        load_from_previous: true    # trainer.load_path = the previous stage's final checkpoint

Each stage runs `composer -n <nproc> train.py --config-path <config_dir> --config-name <config> <overrides>` with
`trainer.autoresume=true`, and when it exits cleanly the runner writes a marker file into the stage's
`trainer.save_folder`. On a rerun, a stage with a marker is skipped; a stage that was interrupted (no marker)
resumes from the latest checkpoint in its save folder (Composer autoresume, which then ignores `load_path`).
Command-line overrides after the pipeline file apply to every stage, after the file's own. Relative paths (data,
save folders) are relative to the directory the runner is started from, as for train.py.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from hydra import compose, initialize_config_dir

TRAIN_SCRIPT = Path(__file__).resolve().parents[1] / "train.py"
DONE_MARKER = "pipeline_stage_done.json"
FINAL_CHECKPOINT = "latest-rank0.pt"
PIPELINE_KEYS = {"config_dir", "nproc", "overrides", "stages"}
STAGE_KEYS = {"config", "overrides", "load_from_previous"}


@dataclass(frozen=True)
class Stage:
    """One training run of a pipeline, with every override it gets (pipeline-wide ones first)."""

    config: str
    overrides: tuple[str, ...]
    load_from_previous: bool


@dataclass(frozen=True)
class Pipeline:
    """A pipeline file, resolved: the config folder, processes per node and the stages in order."""

    config_dir: Path
    nproc: int
    stages: tuple[Stage, ...]


def load_pipeline(path: Path, extra_overrides: list[str], nproc: int | None = None) -> Pipeline:
    """Read a pipeline file; unknown keys are errors, as in the training configs."""
    spec = yaml.safe_load(path.read_text()) or {}
    _check_keys(spec, PIPELINE_KEYS, str(path))
    common = [*spec.get("overrides", []), *extra_overrides]
    stages = []
    for index, stage in enumerate(spec.get("stages") or []):
        _check_keys(stage, STAGE_KEYS, f"{path}: stages[{index}]")
        if "config" not in stage:
            raise ValueError(f"{path}: stages[{index}] has no config")
        if index == 0 and stage.get("load_from_previous"):
            raise ValueError(f"{path}: the first stage has no previous stage to load from")
        stages.append(Stage(
            stage["config"], (*common, *stage.get("overrides", [])), bool(stage.get("load_from_previous", False))
        ))
    if not stages:
        raise ValueError(f"{path}: no stages")
    config_dir = (path.parent / spec.get("config_dir", "../configs")).resolve()
    return Pipeline(config_dir, nproc or int(spec.get("nproc", 1)), tuple(stages))


def _check_keys(mapping: dict, allowed: set[str], where: str) -> None:
    unknown = sorted(set(mapping) - allowed)
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]!r}; allowed: {', '.join(sorted(allowed))}")


def save_folder(config_dir: Path, stage: Stage) -> Path:
    """The stage's resolved `trainer.save_folder` (composed exactly as train.py will compose it)."""
    import micro_diffusion.training.config  # noqa: F401  (registers the config schema with Hydra)

    with initialize_config_dir(config_dir=str(config_dir), version_base=None):
        cfg = compose(config_name=stage.config, overrides=list(stage.overrides))
    return Path(str(cfg.trainer.save_folder))


def launch_command(pipeline: Pipeline, stage: Stage, load_path: Path | None) -> list[str]:
    """`composer -n <nproc> train.py ...` for a stage, with autoresume on and the checkpoint to start from."""
    command = [
        sys.executable, "-m", "composer.cli", "-n", str(pipeline.nproc), str(TRAIN_SCRIPT),
        "--config-path", str(pipeline.config_dir), "--config-name", stage.config, *stage.overrides,
        "trainer.autoresume=true",
    ]
    if load_path is not None:
        command.append(f"trainer.load_path={load_path}")
    return command


def run_pipeline(pipeline: Pipeline, launch: Callable[[list[str]], Any] = subprocess.run) -> list[Path]:
    """Run every stage not yet done, in order, each with `launch(command)` (which returns an object with a
    `returncode`); returns the stages' save folders."""
    folders = [save_folder(pipeline.config_dir, stage) for stage in pipeline.stages]
    for index, (stage, folder) in enumerate(zip(pipeline.stages, folders)):
        marker = folder / DONE_MARKER
        name = f"stage {index + 1}/{len(pipeline.stages)} ({stage.config})"
        if marker.exists():
            print(f"[pipeline] {name}: done already ({marker}), skipped", flush=True)
            continue
        load_path = None
        if stage.load_from_previous:
            load_path = folders[index - 1] / FINAL_CHECKPOINT
            if not load_path.exists():
                raise FileNotFoundError(f"{name} loads {load_path}, which does not exist")
        resuming = (folder / FINAL_CHECKPOINT).exists()
        print(f"[pipeline] {name}: {'resuming' if resuming else 'starting'} in {folder}", flush=True)
        command = launch_command(pipeline, stage, load_path)
        started = time.time()
        result = launch(command)
        if result.returncode != 0:
            raise SystemExit(f"[pipeline] {name} failed (exit code {result.returncode}): {' '.join(command)}")
        marker.write_text(json.dumps({
            "config": stage.config, "overrides": list(stage.overrides), "load_path": str(load_path or ""),
            "seconds": round(time.time() - started, 1),
        }, indent=2))
    return folders


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pipeline", type=Path, help="pipeline file, e.g. yamls/microdit_xl2.yaml")
    parser.add_argument("--nproc", type=int, default=None, help="processes per node (default: the file's nproc)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every stage")
    args = parser.parse_args(argv)
    run_pipeline(load_pipeline(args.pipeline, args.overrides, args.nproc))


if __name__ == "__main__":
    main()
