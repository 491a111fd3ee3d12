"""scripts/train_pipeline.py: stage order, checkpoint chaining, skipping finished stages, resuming interrupted ones.

The launcher is replaced by a fake that records each command and writes the checkpoint a real stage would leave;
tests/test_train_e2e.py runs a real pipeline.
"""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import train_pipeline  # noqa: E402


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
    """Records launch commands; a successful stage leaves `latest-rank0.pt` in its save folder."""

    def __init__(self, fail_config: str | None = None) -> None:
        self.commands: list[list[str]] = []
        self.fail_config = fail_config

    def __call__(self, command: list[str]) -> subprocess.CompletedProcess:
        self.commands.append(command)
        config = command[command.index("--config-name") + 1]
        if config == self.fail_config:
            return subprocess.CompletedProcess(command, 1)
        exp_name = {"tiny_res_16_pretrain": "tiny_mask_75_res_16_pretrain",
                    "tiny_res_16_finetune": "tiny_mask_0_res_16_finetune",
                    "tiny_res_32_pretrain": "tiny_mask_75_res_32_pretrain"}[config]
        folder = Path(next(a for a in command if a.startswith("trainer.save_folder=")).split("=", 1)[1])
        folder = Path(str(folder).replace("${exp_name}", exp_name))
        folder.mkdir(parents=True, exist_ok=True)
        (folder / train_pipeline.FINAL_CHECKPOINT).write_bytes(b"checkpoint")
        return subprocess.CompletedProcess(command, 0)

    def configs(self) -> list[str]:
        return [command[command.index("--config-name") + 1] for command in self.commands]


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
        train_pipeline.run_pipeline(pipeline, FakeLauncher(fail_config="tiny_res_16_finetune"))
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
    ],
)
def test_pipeline_files_are_validated(tmp_path, change, message):
    stages = change.pop("stages", None)
    with pytest.raises(ValueError, match=message):
        train_pipeline.load_pipeline(write_pipeline(tmp_path, tmp_path / "runs", stages, **change), [])


def test_nproc_from_the_command_line_wins(tmp_path):
    assert train_pipeline.load_pipeline(write_pipeline(tmp_path, tmp_path / "runs"), [], nproc=1).nproc == 1
