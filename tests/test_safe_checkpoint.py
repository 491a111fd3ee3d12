"""Training never runs code from a checkpoint: every checkpoint train.py reads (trainer.load_path, with or without
load_weights_only, and the save folder's latest checkpoint under autoresume) goes through a weights-only load
with the project's allowlist, and a refused file is named in the error.

The runs are train.py's own `train()` on a toy model (the `diffusion` task is swapped for a two-layer classifier):
the loading path under test is Composer's, which does not depend on the model.
"""

import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from composer.models import ComposerClassifier
from hydra import compose, initialize_config_dir
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from micro_diffusion.models.checkpoints import load_checkpoint
from micro_diffusion.training import safe_checkpoint
from micro_diffusion.training.config import RunConfig, load_run_config
from micro_diffusion.training.tasks import TaskComponents

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import train  # noqa: E402  (the training script at the repository root)


class Payload:
    """Unpickling this object creates `marker` (what an attacker's checkpoint would do, less harmfully)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def toy_run(save_folder: Path, *overrides: str) -> RunConfig:
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base=None):
        cfg = compose(config_name="tiny_res_16_pretrain", overrides=[
            "exp_name=toy", f"trainer.save_folder={save_folder}", "trainer.eval_interval=null",
            "callbacks.image_grid=null", "callbacks.throughput=null", "logger.tensorboard=null",
            "trainer.progress_bar=false", "trainer.save_interval=1ba", "trainer.max_duration=2ba",
            "trainer.save_num_checkpoints_to_keep=-1", "optimizer.moe_lr_scale=1.0", *overrides,
        ])
    return load_run_config(cfg)


def toy_task(run: RunConfig) -> TaskComponents:
    torch.manual_seed(0)
    model = ComposerClassifier(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), num_classes=2)
    data = DataLoader(TensorDataset(torch.randn(32, 4), torch.randint(0, 2, (32,))), batch_size=4)
    return TaskComponents(model, data, None)


@pytest.fixture(autouse=True)
def toy_diffusion_task(monkeypatch):
    monkeypatch.setitem(train.TASKS, "diffusion", toy_task)


@pytest.fixture(scope="module")
def real_checkpoint(tmp_path_factory) -> Path:
    """A checkpoint written by a 2-batch run of train.py."""
    folder = tmp_path_factory.mktemp("genuine")
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(train.TASKS, "diffusion", toy_task)
        train.train(toy_run(folder))
    return folder / "ep0-ba2-rank0.pt"


def refusal(run: RunConfig) -> str:
    """The error of a run that must refuse its checkpoint, or what happened instead."""
    try:
        train.train(run)
    except safe_checkpoint.UnsafeCheckpointError as error:
        return str(error)
    return "the run finished"


def plant_payload(real_checkpoint: Path, evil: Path, marker: Path) -> Path:
    """A working checkpoint (the genuine one) that also carries a payload, as a real attack would."""
    checkpoint = load_checkpoint(real_checkpoint)
    checkpoint["state"]["metadata"]["note"] = Payload(marker)
    torch.save(checkpoint, evil)
    return evil


@pytest.mark.parametrize("weights_only", [False, True], ids=["full_state", "load_weights_only"])
def test_a_payload_given_as_load_path_never_runs(tmp_path, real_checkpoint, weights_only):
    marker = tmp_path / "pwned"
    evil = plant_payload(real_checkpoint, tmp_path / "evil.pt", marker)
    run = toy_run(tmp_path / "run", f"trainer.load_path={evil}", f"trainer.load_weights_only={weights_only}",
                  "trainer.max_duration=4ba")
    error = refusal(run)
    assert not marker.exists(), "the checkpoint's payload ran"
    assert str(evil) in error and "posix.system" in error, error


def test_a_payload_planted_as_the_latest_checkpoint_never_runs(tmp_path, real_checkpoint):
    marker = tmp_path / "pwned"
    save_folder = tmp_path / "run"
    save_folder.mkdir()
    latest = plant_payload(real_checkpoint, save_folder / "latest-rank0.pt", marker)
    error = refusal(toy_run(save_folder, "trainer.autoresume=true", "trainer.save_overwrite=false",
                            "trainer.max_duration=4ba"))
    assert not marker.exists(), "the checkpoint's payload ran"
    assert str(latest) in error and "posix.system" in error, error


def test_a_genuine_checkpoint_still_resumes(tmp_path, real_checkpoint):
    save_folder = tmp_path / "run"
    save_folder.mkdir()
    shutil.copy(real_checkpoint, save_folder / "latest-rank0.pt")
    trainer = train.train(toy_run(save_folder, "trainer.autoresume=true", "trainer.save_overwrite=false",
                                  "trainer.max_duration=4ba"))
    assert int(trainer.state.timestamp.batch) == 4
    assert sorted(p.name for p in save_folder.glob("ep0-ba*-rank0.pt")) == ["ep0-ba3-rank0.pt", "ep0-ba4-rank0.pt"]


def test_the_allowlist_covers_a_real_checkpoint_and_nothing_more(real_checkpoint):
    needed = set(torch.serialization.get_unsafe_globals_in_checkpoint(real_checkpoint))
    allowed = {f"{g.__module__}.{g.__qualname__}" for g in safe_checkpoint.checkpoint_globals()}
    assert needed <= allowed, f"a checkpoint of this project needs {sorted(needed - allowed)}"
    assert not any(name.startswith(("os.", "posix.", "builtins.", "subprocess.")) for name in allowed)


def test_composer_still_loads_checkpoints_where_the_safe_loader_is_installed():
    """Composer 0.32.1 reads every monolithic checkpoint in these functions; the safe loader replaces them."""
    for module_name, attribute in safe_checkpoint.PATCHED:
        module = sys.modules.get(module_name) or __import__(module_name, fromlist=[attribute])
        assert hasattr(module, attribute), (
            f"{module_name}.{attribute} is gone from the installed composer: training would read checkpoints "
            "without the weights-only load; update micro_diffusion/training/safe_checkpoint.py"
        )
    safe_checkpoint.install()
    for module_name, attribute in safe_checkpoint.PATCHED:
        assert getattr(sys.modules[module_name], attribute).__module__ == safe_checkpoint.__name__


def test_a_moved_composer_loader_stops_the_install_with_what_to_update(monkeypatch):
    import composer.checkpoint.load

    monkeypatch.delattr(composer.checkpoint.load, "_torch_load_with_validation")
    moved = r"composer\.checkpoint\.load\._torch_load_with_validation is not where composer 0\.32\.1 had it"
    with pytest.raises(RuntimeError, match=rf"{moved}.*update micro_diffusion/training/safe_checkpoint\.py"):
        safe_checkpoint.install()
