"""Multi-step pipelines (yamls/*.yaml): training stages through the Composer launcher, and `micro-diffusion`
commands between them, run in order, each skipped once done.

A pipeline file:

    vars:                           # ${name} in the strings below; `--var name=value` overrides a value
      out: outputs/demo
    config_dir: ../configs          # Hydra config folder, relative to the pipeline file (default ../configs)
    train_script: ../train.py       # relative to the pipeline file (default: train.py beside config_dir)
    nproc: 8                        # processes per node of the training stages (composer -n)
    overrides: [...]                # Hydra overrides for every training stage
    marker_dir: ${out}/steps        # done-markers of the command steps (needed when there are any)
    stages:
      - config: res_256_pretrain    # a training stage: a config of config_dir
        overrides: [exp_name=..., model.train_mask_ratio=0.75]
      - config: res_256_finetune
        load_from_previous: true    # trainer.load_path = the previous training stage's final checkpoint
        env: {OMP_NUM_THREADS: "1"} # environment variables of this stage's processes
      - name: latents               # a command step: `python -m micro_diffusion.cli <command> <args>`
        command: precompute
        args: [--input, "${out}/raw", --output, "${out}/latents"]

A training stage runs `composer -n <nproc> <train_script> --config-path <config_dir> --config-name <config>
<overrides>` with `trainer.autoresume=true`; before it starts, the composed and resolved config it runs with is
written to `config.yaml` in its `trainer.save_folder` (what `micro-diffusion generate --model-config` reads), and
when it exits cleanly a marker file is written there. A command step's marker is `<marker_dir>/<name>.done.json`.
On a rerun, a stage with a marker is skipped; an interrupted training stage (no marker) resumes from the latest
checkpoint in its save folder (Composer autoresume, which then ignores `load_path`), and an interrupted command
runs again (convert with --overwrite starts afresh, precompute resumes by chunk).

Every stage has a name: a command step's `name`, a training stage's `name` or else its config. Extra arguments
from the command line: `KEY=VALUE` is a Hydra override for every training stage, after the file's pipeline-wide
overrides; `NAME:ARGUMENT` goes to one stage, after its own overrides or arguments (for a command, a later
`--option=value` wins over an earlier one). Variables are substituted in the file's strings; in Hydra overrides a
`${name}` that is not a variable is left to Hydra (`${exp_name}`), in a command's arguments it is an error.
Relative paths in overrides, arguments and marker_dir are relative to the directory the runner is started from, as
for train.py. A command's name and arguments are checked by the command itself, when its step runs.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from micro_diffusion.training.launcher_watchdog import stop_with_parent

DONE_MARKER = "pipeline_stage_done.json"
STAGE_CONFIG = "config.yaml"
FINAL_CHECKPOINT = "latest-rank0.pt"
PIPELINE_KEYS = {"vars", "config_dir", "train_script", "nproc", "overrides", "marker_dir", "stages"}
TRAINING_KEYS = {"name", "config", "overrides", "load_from_previous", "env"}
COMMAND_KEYS = {"name", "command", "args", "env"}
VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
STAGE_ARGUMENT = re.compile(r"^([A-Za-z0-9_.-]+):(.+)$")


@dataclass(frozen=True)
class TrainingStage:
    """One training run of a pipeline, with every override it gets (pipeline-wide ones first)."""

    name: str
    config: str
    overrides: tuple[str, ...]
    load_from_previous: bool
    env: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class CommandStep:
    """One `micro-diffusion <command> <args>` of a pipeline."""

    name: str
    command: str
    args: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)


Stage = TrainingStage | CommandStep


@dataclass(frozen=True)
class Pipeline:
    """A pipeline file, resolved: folders, processes per node, variables and the stages in order."""

    config_dir: Path
    train_script: Path
    nproc: int
    marker_dir: Path | None
    variables: Mapping[str, str]
    stages: tuple[Stage, ...]

    @property
    def training_stages(self) -> tuple[TrainingStage, ...]:
        return tuple(stage for stage in self.stages if isinstance(stage, TrainingStage))


# --------------------------------------------------------------------------------------------------------------
# Reading a pipeline file
# --------------------------------------------------------------------------------------------------------------


def load_pipeline(
    path: Path, extra: Sequence[str] = (), nproc: int | None = None, variables: Mapping[str, str] | None = None
) -> Pipeline:
    """Read a pipeline file; unknown keys, variables and stage names are errors, as in the training configs.

    Args:
        path: the pipeline file.
        extra: command-line arguments, `KEY=VALUE` (every training stage) or `NAME:ARGUMENT` (one stage).
        nproc: processes per node, replacing the file's `nproc`.
        variables: values replacing those of the file's `vars`.
    """
    where = str(path)
    spec = yaml.safe_load(path.read_text()) or {}
    _check_keys(spec, PIPELINE_KEYS, where)
    values = _variables(spec.get("vars") or {}, variables or {}, where)

    def text(value: Any, key: str, strict: bool = True) -> str:
        return _substitute(str(value), values, f"{where}: {key}", strict)

    common, targeted = _split_extra(list(extra))
    common = [*(text(o, "overrides", strict=False) for o in spec.get("overrides") or []), *common]
    stages = [
        _read_stage(stage, f"{where}: stages[{index}]", f"stages[{index}]", text, common, targeted)
        for index, stage in enumerate(spec.get("stages") or [])
    ]
    if not stages:
        raise ValueError(f"{where}: no stages")
    _check_stages(stages, targeted, where)
    marker_dir = Path(text(spec["marker_dir"], "marker_dir")) if "marker_dir" in spec else None
    if marker_dir is None and any(isinstance(stage, CommandStep) for stage in stages):
        raise ValueError(f"{where}: command steps need marker_dir, the folder of their done-markers")
    config_dir = (path.parent / text(spec.get("config_dir", "../configs"), "config_dir")).resolve()
    return Pipeline(
        config_dir=config_dir,
        train_script=(config_dir.parent / "train.py" if "train_script" not in spec
                      else (path.parent / text(spec["train_script"], "train_script")).resolve()),
        nproc=nproc or int(spec.get("nproc", 1)),
        marker_dir=marker_dir,
        variables=values,
        stages=tuple(stages),
    )


def _read_stage(
    stage: Any, where: str, key: str, text: Callable, common: list[str], targeted: dict[str, list[str]]
) -> Stage:
    """One entry of `stages`: a command step when it has `command`, else a training stage; `common` are the
    overrides of every training stage, `targeted` the command line's arguments by stage name."""
    if not isinstance(stage, dict):
        raise ValueError(f"{where}: a stage is a mapping (config: ... or command: ...), got {stage!r}")
    env = {str(name): text(value, f"{key}.env") for name, value in (stage.get("env") or {}).items()}
    if "command" in stage:
        _check_keys(stage, COMMAND_KEYS, where)
        if "name" not in stage:
            raise ValueError(f"{where}: a command step needs a name (its done-marker is <marker_dir>/<name>.done.json)")
        name = str(stage["name"])
        args = [text(a, f"{key}.args") for a in stage.get("args") or []]
        return CommandStep(name, str(stage["command"]), (*args, *targeted.get(name, [])), env)
    _check_keys(stage, TRAINING_KEYS, where)
    if "config" not in stage:
        raise ValueError(f"{where} has no config (a training stage) or command (a command step)")
    name = str(stage.get("name", stage["config"]))
    overrides = [text(o, key, strict=False) for o in stage.get("overrides") or []]
    return TrainingStage(
        name, stage["config"], (*common, *overrides, *targeted.get(name, [])),
        bool(stage.get("load_from_previous", False)), env,
    )


def _check_stages(stages: list[Stage], targeted: dict[str, list[str]], where: str) -> None:
    names = [stage.name for stage in stages]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"{where}: stage name {repeated[0]!r} is used twice; give the stages distinct names")
    unknown = sorted(set(targeted) - set(names))
    if unknown:
        raise ValueError(f"{where}: no stage named {unknown[0]!r}; stages: {', '.join(names)}")
    training = [stage for stage in stages if isinstance(stage, TrainingStage)]
    if training and training[0].load_from_previous:
        raise ValueError(f"{where}: the first training stage has no previous stage to load from")


def _check_keys(mapping: dict, allowed: set[str], where: str) -> None:
    unknown = sorted(set(mapping) - allowed)
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]!r}; allowed: {', '.join(sorted(allowed))}")


def _variables(declared: Any, given: Mapping[str, str], where: str) -> dict[str, str]:
    """The file's `vars` updated by `given`; a given name the file does not declare is an error."""
    if not isinstance(declared, dict):
        raise ValueError(f"{where}: vars must be a mapping of names to values")
    unknown = sorted(set(given) - set(declared))
    if unknown:
        raise ValueError(f"{where}: unknown variable {unknown[0]!r}; the file's vars: {', '.join(declared) or 'none'}")
    return {str(name): str(value) for name, value in {**declared, **given}.items()}


def _substitute(text: str, variables: Mapping[str, str], where: str, strict: bool) -> str:
    """`${name}` -> its value; an unknown name raises when `strict`, else stays (a Hydra interpolation)."""

    def value(match: re.Match) -> str:
        if match[1] in variables:
            return variables[match[1]]
        if strict:
            raise ValueError(f"{where}: unknown variable ${{{match[1]}}}; vars: {', '.join(variables) or 'none'}")
        return match[0]

    return VARIABLE.sub(value, text)


def _split_extra(extra: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """Command-line arguments -> (overrides of every training stage, stage name -> its own arguments)."""
    common: list[str] = []
    targeted: dict[str, list[str]] = {}
    for argument in extra:
        match = STAGE_ARGUMENT.match(argument)
        if match and "=" not in match[1]:
            targeted.setdefault(match[1], []).append(match[2])
        else:
            common.append(argument)
    return common, targeted


def parse_variables(pairs: list[str] | None) -> dict[str, str]:
    """["out=/tmp/demo"] -> {"out": "/tmp/demo"} (the `--var` options)."""
    variables = {}
    for pair in pairs or []:
        name, separator, value = pair.partition("=")
        if not separator or not name:
            raise ValueError(f"--var expects NAME=VALUE, got {pair!r}")
        variables[name] = value
    return variables


# --------------------------------------------------------------------------------------------------------------
# Running it
# --------------------------------------------------------------------------------------------------------------


def compose_stage(config_dir: Path, stage: TrainingStage, extra: Sequence[str] = ()) -> DictConfig:
    """The stage's config, composed exactly as train.py will compose it (plus `extra` overrides)."""
    import micro_diffusion.training.config  # noqa: F401  (registers the config schema with Hydra)

    with initialize_config_dir(config_dir=str(config_dir), version_base=None):
        return compose(config_name=stage.config, overrides=[*stage.overrides, *extra])


def save_folder(config_dir: Path, stage: TrainingStage) -> Path:
    """The stage's resolved `trainer.save_folder`."""
    return Path(str(compose_stage(config_dir, stage).trainer.save_folder))


def launch_command(pipeline: Pipeline, stage: Stage, load_path: Path | None = None) -> list[str]:
    """The command line of a stage: `composer -n <nproc> train.py ...` with autoresume on and the checkpoint to
    start from, or `python -m micro_diffusion.cli <command> <args>`."""
    if isinstance(stage, CommandStep):
        return [sys.executable, "-m", "micro_diffusion.cli", stage.command, *stage.args]
    return [
        sys.executable, "-m", "composer.cli", "-n", str(pipeline.nproc), str(pipeline.train_script),
        "--config-path", str(pipeline.config_dir), "--config-name", stage.config, *stage.overrides,
        *_runner_overrides(load_path),
    ]


def _runner_overrides(load_path: Path | None) -> list[str]:
    """What the runner adds to a training stage's overrides: autoresume, and the checkpoint to start from."""
    return ["trainer.autoresume=true", *([f"trainer.load_path={load_path}"] if load_path is not None else [])]


def run_subprocess(command: list[str], env: Mapping[str, str]) -> subprocess.CompletedProcess:
    """The default launcher: `command` with the current environment updated by `env`. The child stops when this
    runner dies (a killed runner must not leave a stage training into the folder its rerun resumes)."""
    return subprocess.run(command, env={**os.environ, **env}, preexec_fn=stop_with_parent)


def run_pipeline(
    pipeline: Pipeline, launch: Callable[[list[str], Mapping[str, str]], Any] = run_subprocess
) -> list[Path]:
    """Run every stage not yet done, in order, each with `launch(command, env)` (which returns an object with a
    `returncode`); returns the training stages' save folders."""
    folders = {stage.name: save_folder(pipeline.config_dir, stage) for stage in pipeline.training_stages}
    previous: Path | None = None
    for index, stage in enumerate(pipeline.stages):
        label = f"stage {index + 1}/{len(pipeline.stages)} ({stage.name})"
        if isinstance(stage, CommandStep):
            marker = pipeline.marker_dir / f"{stage.name}.done.json"
            if not _done(label, marker):
                command = launch_command(pipeline, stage)
                arguments = command[3:]  # after `python -m micro_diffusion.cli`
                print(f"[pipeline] {label}: micro-diffusion {' '.join(arguments)}", flush=True)
                _launch(label, command, stage.env, launch, marker, {"command": stage.command})
        else:
            folder = folders[stage.name]
            if not _done(label, folder / DONE_MARKER):
                _run_training(pipeline, stage, label, folder, previous, launch)
            previous = folder
    return list(folders.values())


def _done(label: str, marker: Path) -> bool:
    if marker.exists():
        print(f"[pipeline] {label}: done already ({marker}), skipped", flush=True)
    return marker.exists()


def _run_training(
    pipeline: Pipeline, stage: TrainingStage, label: str, folder: Path, previous: Path | None, launch: Callable
) -> None:
    """Launch a training stage after writing the config it runs with into its save folder."""
    load_path = None
    if stage.load_from_previous:
        load_path = previous / FINAL_CHECKPOINT
        if not load_path.exists():
            raise FileNotFoundError(f"{label} loads {load_path}, which does not exist")
    resuming = (folder / FINAL_CHECKPOINT).exists()
    print(f"[pipeline] {label}: {'resuming' if resuming else 'starting'} in {folder}", flush=True)
    config = compose_stage(pipeline.config_dir, stage, _runner_overrides(load_path))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / STAGE_CONFIG).write_text(OmegaConf.to_yaml(config, resolve=True))
    record = {"config": stage.config, "overrides": list(stage.overrides), "load_path": str(load_path or "")}
    _launch(label, launch_command(pipeline, stage, load_path), stage.env, launch, folder / DONE_MARKER, record)


def _launch(
    label: str, command: list[str], env: Mapping[str, str], launch: Callable, marker: Path, record: dict
) -> None:
    """Run one stage; on success write its done-marker: `record`, the environment it got and how long it took."""
    started = time.time()
    result = launch(command, env)
    if result.returncode != 0:
        raise SystemExit(f"[pipeline] {label} failed (exit code {result.returncode}): {' '.join(command)}")
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({**record, "env": dict(env), "seconds": round(time.time() - started, 1)}, indent=2))
