"""The pipeline runner (micro_diffusion/pipeline.py, scripts/train_pipeline.py): stage order, checkpoint chaining,
command steps, variables, skipping finished stages, resuming interrupted ones.

The launcher is replaced by a fake that records each command and writes the checkpoint a real stage would leave;
tests/test_train_e2e.py runs a real pipeline, tests/test_demo.py the demo's.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from micro_diffusion import pipeline as train_pipeline

REPO = Path(__file__).resolve().parents[1]


def write_pipeline(folder: Path, runs: Path, stages: list[dict] | None = None, **extra) -> Path:
    spec = {
        "config_dir": str(REPO / "configs"),
        "nproc": 2,
        "overrides": [f"trainer.save_folder={runs}/${{exp_name}}"],
        "stages": stages or [
            {"config": "tiny_res_16_pretrain"},
            {"config": "tiny_res_16_finetune", "load_from_previous": True},
            {"config": "tiny_res_32_pretrain", "load_from_previous": True, "overrides": ["data.cap_drop_prob=0.2"]},
        ],
        **extra,
    }
    path = folder / "pipeline.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


class FakeLauncher:
    """Records launch commands and environments; a successful training stage leaves `latest-rank0.pt` in its save
    folder."""

    def __init__(self, fail: str | None = None) -> None:
        self.commands: list[list[str]] = []
        self.envs: list[dict] = []
        self.fail = fail

    def __call__(self, command: list[str], env: dict) -> subprocess.CompletedProcess:
        self.commands.append(command)
        self.envs.append(dict(env))
        name = stage_of(command)
        if name == self.fail:
            return subprocess.CompletedProcess(command, 1)
        if "--config-name" in command:
            exp_name = {"tiny_res_16_pretrain": "tiny_mask_75_res_16_pretrain",
                        "tiny_res_16_finetune": "tiny_mask_0_res_16_finetune",
                        "tiny_res_32_pretrain": "tiny_mask_75_res_32_pretrain"}[name]
            folder = Path(next(a for a in command if a.startswith("trainer.save_folder=")).split("=", 1)[1])
            folder = Path(str(folder).replace("${exp_name}", exp_name))
            folder.mkdir(parents=True, exist_ok=True)
            (folder / train_pipeline.FINAL_CHECKPOINT).write_bytes(b"checkpoint")
        return subprocess.CompletedProcess(command, 0)

    def configs(self) -> list[str]:
        return [stage_of(command) for command in self.commands]


def stage_of(command: list[str]) -> str:
    """The config of a training launch, or the subcommand of a command step."""
    if "--config-name" in command:
        return command[command.index("--config-name") + 1]
    return command[3]


def test_stages_run_in_order_each_loading_the_previous_final_checkpoint(tmp_path):
    runs, launcher = tmp_path / "runs", FakeLauncher()
    pipeline = train_pipeline.load_pipeline(write_pipeline(tmp_path, runs), ["seed=3"])
    folders = train_pipeline.run_pipeline(pipeline, launcher)
    assert folders == [runs / "tiny_mask_75_res_16_pretrain", runs / "tiny_mask_0_res_16_finetune",
                       runs / "tiny_mask_75_res_32_pretrain"]
    assert launcher.configs() == ["tiny_res_16_pretrain", "tiny_res_16_finetune", "tiny_res_32_pretrain"]
    first, second, third = launcher.commands
    assert first[:6] == [sys.executable, "-m", "composer.cli", "-n", "2", str(REPO / "train.py")]
    assert not any(a.startswith("trainer.load_path=") for a in first)
    assert f"trainer.load_path={folders[0] / 'latest-rank0.pt'}" in second
    assert f"trainer.load_path={folders[1] / 'latest-rank0.pt'}" in third
    for command in launcher.commands:
        assert "trainer.autoresume=true" in command and "seed=3" in command
    assert third.index("seed=3") < third.index("data.cap_drop_prob=0.2"), "stage overrides come last"
    assert all((folder / train_pipeline.DONE_MARKER).exists() for folder in folders)


def test_finished_stages_are_skipped_and_an_interrupted_one_resumes(tmp_path, capsys):
    launcher = FakeLauncher()
    pipeline = train_pipeline.load_pipeline(write_pipeline(tmp_path, tmp_path / "runs"), [])
    folders = train_pipeline.run_pipeline(pipeline, launcher)
    launcher.commands.clear()
    (folders[2] / train_pipeline.DONE_MARKER).unlink()  # stage 3 was killed after a checkpoint
    capsys.readouterr()
    train_pipeline.run_pipeline(pipeline, launcher)
    output = capsys.readouterr().out
    assert launcher.configs() == ["tiny_res_32_pretrain"]
    assert output.count("skipped") == 2 and "stage 3/3 (tiny_res_32_pretrain): resuming" in output
    launcher.commands.clear()
    train_pipeline.run_pipeline(pipeline, launcher)
    assert launcher.commands == []


def test_a_failed_stage_stops_the_pipeline_without_a_marker(tmp_path):
    pipeline = train_pipeline.load_pipeline(write_pipeline(tmp_path, tmp_path / "runs"), [])
    with pytest.raises(SystemExit, match=r"stage 2/3 \(tiny_res_16_finetune\) failed \(exit code 1\)"):
        train_pipeline.run_pipeline(pipeline, FakeLauncher(fail="tiny_res_16_finetune"))
    assert not (tmp_path / "runs" / "tiny_mask_0_res_16_finetune" / train_pipeline.DONE_MARKER).exists()


def test_a_missing_previous_checkpoint_is_an_error(tmp_path):
    runs, launcher = tmp_path / "runs", FakeLauncher()
    pipeline = train_pipeline.load_pipeline(write_pipeline(tmp_path, runs), [])
    (runs / "tiny_mask_75_res_16_pretrain").mkdir(parents=True)
    (runs / "tiny_mask_75_res_16_pretrain" / train_pipeline.DONE_MARKER).write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"stage 2/3 .* loads .*tiny_mask_75_res_16_pretrain/latest-rank0\.pt"):
        train_pipeline.run_pipeline(pipeline, launcher)
    assert launcher.commands == []


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"resume": True}, r"unknown key 'resume'"),
        ({"stages": [{"config": "tiny_res_16_pretrain", "load_from": "x"}]}, r"stages\[0\]: unknown key 'load_from'"),
        ({"stages": [{"config": "tiny_res_16_finetune", "load_from_previous": True}]}, r"no previous stage"),
        ({"stages": [{"overrides": []}]}, r"stages\[0\] has no config"),
        ({"stages": [{"name": "x", "command": "convert", "overrides": []}]}, r"stages\[0\]: unknown key 'overrides'"),
        ({"stages": [{"command": "convert"}]}, r"stages\[0\]: a command step needs a name"),
        ({"stages": [{"name": "x", "command": "convert"}]}, r"command steps need marker_dir"),
        ({"marker_dir": "m", "stages": [{"name": "x", "command": "convert", "args": ["${out}"]}]},
         r"stages\[0\]\.args: unknown variable \$\{out\}"),
        ({"stages": [{"config": "tiny_res_16_pretrain"}, {"config": "tiny_res_16_pretrain"}]},
         r"stage name 'tiny_res_16_pretrain' is used twice"),
    ],
)
def test_pipeline_files_are_validated(tmp_path, change, message):
    stages = change.pop("stages", None)
    with pytest.raises(ValueError, match=message):
        train_pipeline.load_pipeline(write_pipeline(tmp_path, tmp_path / "runs", stages, **change), [])


def test_nproc_from_the_command_line_wins(tmp_path):
    assert train_pipeline.load_pipeline(write_pipeline(tmp_path, tmp_path / "runs"), [], nproc=1).nproc == 1


def test_command_steps_variables_and_stage_arguments(tmp_path):
    """Commands run between training stages with the file's variables (one moved from the command line), a
    `NAME:ARGUMENT` reaches only its stage, the stage's composed config is written beside its checkpoints, and
    every step is skipped on a rerun."""
    moved = tmp_path / "moved"
    stages = [
        {"name": "data", "command": "convert", "args": ["--output", "${out}/raw"]},
        {"config": "tiny_res_16_pretrain", "overrides": ["trainer.save_folder=${out}/runs/${exp_name}"],
         "env": {"OMP_NUM_THREADS": "1"}},
        {"name": "report", "command": "demo", "args": ["report", "--out", "${out}"]},
    ]
    path = write_pipeline(tmp_path, tmp_path / "unused", stages, vars={"out": str(tmp_path / "default")},
                          marker_dir="${out}/done")
    pipeline = train_pipeline.load_pipeline(
        path, ["seed=3", "tiny_res_16_pretrain:seed=4", "data:--limit=5"], variables={"out": str(moved)}
    )
    launcher = FakeLauncher()
    folders = train_pipeline.run_pipeline(pipeline, launcher)

    assert launcher.configs() == ["convert", "tiny_res_16_pretrain", "demo"]
    convert, training, report = launcher.commands
    assert convert == [sys.executable, "-m", "micro_diffusion.cli", "convert", "--output", f"{moved}/raw", "--limit=5"]
    assert report[3:] == ["demo", "report", "--out", str(moved)]
    assert training.index("seed=3") < training.index("seed=4") and "data:--limit=5" not in training
    assert f"trainer.save_folder={moved}/runs/${{exp_name}}" in training
    assert launcher.envs == [{}, {"OMP_NUM_THREADS": "1"}, {}]
    assert folders == [moved / "runs" / "tiny_mask_75_res_16_pretrain"]
    config = yaml.safe_load((folders[0] / train_pipeline.STAGE_CONFIG).read_text())
    assert config["seed"] == 4 and config["trainer"]["save_folder"] == str(folders[0])  # composed and resolved
    assert config["trainer"]["autoresume"] is True
    marker = json.loads((moved / "done" / "data.done.json").read_text())
    assert marker["command"] == "convert" and (moved / "done" / "report.done.json").exists()

    launcher.commands.clear()
    train_pipeline.run_pipeline(pipeline, launcher)
    assert launcher.commands == []


def test_a_failed_command_stops_the_pipeline_and_runs_again_next_time(tmp_path):
    stages = [{"name": "data", "command": "convert"}, {"config": "tiny_res_16_pretrain"}]
    path = write_pipeline(tmp_path, tmp_path / "runs", stages, marker_dir=str(tmp_path / "markers"))
    pipeline = train_pipeline.load_pipeline(path, [])
    with pytest.raises(SystemExit, match=r"stage 1/2 \(data\) failed \(exit code 1\)"):
        train_pipeline.run_pipeline(pipeline, FakeLauncher(fail="convert"))
    launcher = FakeLauncher()
    train_pipeline.run_pipeline(pipeline, launcher)
    assert launcher.configs() == ["convert", "tiny_res_16_pretrain"]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"variables": {"outt": "x"}}, r"unknown variable 'outt'; the file's vars: out"),
        ({"extra": ["tiny_res_16_pretrian:seed=1"]}, r"no stage named 'tiny_res_16_pretrian'"),
    ],
)
def test_command_line_names_are_checked(tmp_path, arguments, message):
    path = write_pipeline(tmp_path, tmp_path / "runs", vars={"out": "o"})
    with pytest.raises(ValueError, match=message):
        train_pipeline.load_pipeline(path, **arguments)


def test_the_script_is_a_thin_entry_point(tmp_path):
    """scripts/train_pipeline.py reports a bad pipeline file as a usage error, before anything runs."""
    path = write_pipeline(tmp_path, tmp_path / "runs", resume=True)
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "train_pipeline.py"), str(path)],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "unknown key 'resume'" in result.stderr
