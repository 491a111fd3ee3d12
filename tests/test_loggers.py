"""Callbacks and loggers by name or by `_target_`, checked against their signatures; the trackers end to end.

The runs are train.py's own `train()` on a toy image classifier (the `diffusion` task is swapped for it): what is
under test is the path from a config entry to a tracker's files, which does not depend on the model.
"""

import inspect
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from composer.callbacks import ImageVisualizer, MemoryMonitor, SpeedMonitor
from composer.loggers import FileLogger, InMemoryLogger, TensorboardLogger
from composer.models import ComposerClassifier
from hydra import compose, initialize_config_dir
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from micro_diffusion.config_checks import ConfigError
from micro_diffusion.training.config import RunConfig, load_run_config
from micro_diffusion.training.loggers import ResumableFileLogger
from micro_diffusion.training.tasks import TaskComponents

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import train  # noqa: E402  (the training script at the repository root)


def toy_run(save_folder: Path, *overrides: str) -> RunConfig:
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base=None):
        cfg = compose(config_name="tiny_res_16_pretrain", overrides=[
            "exp_name=toy", f"trainer.save_folder={save_folder}", "trainer.eval_interval=null",
            "callbacks.image_grid=null", "callbacks.throughput=null", "logger.tensorboard=null", "logger.file=null",
            "trainer.progress_bar=false", "trainer.save_interval=2ba", "trainer.max_duration=4ba",
            "optimizer.moe_lr_scale=1.0", "data.train_batch_size=4", *overrides,
        ])
    return load_run_config(cfg)


def toy_task(run: RunConfig) -> TaskComponents:
    """A classifier of 8x8 RGB images (so that Composer's ImageVisualizer has images to log)."""
    torch.manual_seed(0)
    model = ComposerClassifier(nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2)), num_classes=2)
    data = DataLoader(TensorDataset(torch.rand(32, 3, 8, 8), torch.randint(0, 2, (32,))), batch_size=4)
    return TaskComponents(model, data, None)


@pytest.fixture(autouse=True)
def toy_diffusion_task(monkeypatch):
    monkeypatch.setitem(train.TASKS, "diffusion", toy_task)


def built(run: RunConfig) -> tuple[list, list]:
    """(callbacks, loggers) as build_trainer makes them."""
    train.check_run(run)
    callbacks = [train.call_with(target, args, path) for path, target, args in train.callback_entries(run)]
    loggers = [train.call_with(target, args, path)
               for path, target, args in train.configured_entries(run.logger, train.LOGGERS, "logger")]
    return callbacks, loggers


def test_any_composer_callback_by_name_and_any_class_by_target(tmp_path):
    callbacks, loggers = built(toy_run(
        tmp_path, "+callbacks.memory_monitor={}", "+callbacks.image_visualizer={interval:16sp}",
        "+callbacks.speed={_target_:composer.callbacks.SpeedMonitor,window_size:3,time_unit:minutes}",
        "+logger.memory={_target_:composer.loggers.InMemoryLogger}",
    ))
    by_type = {type(c): c for c in callbacks}
    assert MemoryMonitor in by_type and by_type[SpeedMonitor].divider == 60
    assert by_type[ImageVisualizer].interval.value == 4, "a Composer callback's '<n>sp' is converted too"
    assert [type(logger) for logger in loggers] == [InMemoryLogger]


@pytest.mark.parametrize(("override", "message"), [
    ("+callbacks.memory_monitor={interval:5}", r"callbacks\.memory_monitor\.interval: unknown key; MemoryMonitor"),
    ("+callbacks.x={_target_:composer.callbacks.SpeedMonitor,window:3}", r"callbacks\.x\.window: unknown key"),
    ("+callbacks.x={_target_:collections.OrderedDict}",
     r"callbacks\.x\._target_: collections\.OrderedDict is not a subclass of composer\.core\.callback\.Callback"),
    ("+callbacks.x={_target_:composer.loggers.InMemoryLogger}", None),
    ("+logger.x={_target_:composer.callbacks.SpeedMonitor}",
     r"logger\.x\._target_: composer\.callbacks\.SpeedMonitor is not a subclass of .*LoggerDestination"),
    ("+logger.x={_target_:no_such_package.Logger}", r"logger\.x\._target_: cannot import no_such_package\.Logger"),
    ("+logger.x={_target_:InMemoryLogger}", r"logger\.x\._target_: 'InMemoryLogger' is not a dotted path"),
    ("+logger.mlflow={experiment:e}", r"logger\.mlflow\.experiment: unknown key; MLFlowLogger takes"),
    ("+logger.weights_and_biases={}", r"logger\.weights_and_biases: unknown name .* choose one of .*wandb"),
    ("+callbacks.generate={prompts:[a],interval:2ba}",
     r"callbacks\.generate: Generate takes \*\*kwargs, so its configuration keys cannot be checked"),
])
def test_entries_are_checked_before_anything_is_built(tmp_path, override, message):
    run = toy_run(tmp_path, override)
    if message is None:  # a logger is a callback too
        train.check_run(run)
        return
    with pytest.raises(ConfigError, match=message):
        train.check_run(run)


def test_a_logger_whose_package_is_missing_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(train.LOGGERS.requires, "mlflow", ("no_such_module", "pip install no-such-module"))
    with pytest.raises(ConfigError, match=r"logger\.mlflow: MLFlowLogger needs the package 'no_such_module', not "
                                          r"installed: pip install no-such-module"):
        train.check_run(toy_run(tmp_path, "+logger.mlflow={}"))


def test_the_file_logger_keeps_the_history_of_a_resumed_run(tmp_path):
    """Killed after its checkpoint at batch 2 with batch 3 already logged: the rerun keeps batches 0-1, logs 2-5."""
    metrics = tmp_path / "run" / "metrics.txt"
    file_logger = [f"logger.file={{filename:{metrics},capture_stdout:false,capture_stderr:false}}",
                   "trainer.autoresume=true", "trainer.save_overwrite=false"]
    train.train(toy_run(tmp_path / "run", *file_logger, "trainer.max_duration=2ba"))
    with metrics.open("a") as log:  # what the killed attempt had logged past its checkpoint
        log.write("[metric][batch=2]: loss/train/total: 99.0 \n[metric][batch=3]: loss/train/total: 99.0 \n")
    before = logged_steps(metrics)
    train.train(toy_run(tmp_path / "run", *file_logger, "trainer.max_duration=6ba"))
    after = logged_steps(metrics)
    assert before[:2] == [0, 1] and after == [0, 1, 2, 3, 4, 5], after
    assert "99.0" not in metrics.read_text()

    train.train(toy_run(tmp_path / "run", *file_logger[:1], "trainer.autoresume=false",
                        "trainer.save_overwrite=true", "trainer.max_duration=1ba"))
    assert logged_steps(metrics) == [0], "a run that starts afresh starts a new file"


def test_a_file_shared_by_all_ranks_is_written_by_rank_0_alone(tmp_path, monkeypatch):
    """Two ranks rewriting one metrics file on resume raced; a per-rank filename is still written on every rank."""
    from micro_diffusion.training import loggers

    monkeypatch.setattr(loggers, "dist", SimpleNamespace(get_global_rank=lambda: 1))
    shared, per_rank = tmp_path / "metrics.txt", tmp_path / "metrics-rank{rank}.txt"
    for folder, filename in (("shared", shared), ("per_rank", per_rank)):
        train.train(toy_run(tmp_path / folder, f"logger.file={{filename:'{filename}',capture_stdout:false}}",
                            "trainer.max_duration=1ba"))
    assert not shared.exists()
    assert logged_steps(tmp_path / "metrics-rank0.txt") == [0], "the process (rank 0 in fact) wrote its own file"


@pytest.mark.parametrize("arguments", [{"init_kwargs": {"mode": "offline"}, "log_artifacts": True}, {}])
def test_wandb_finds_no_checkpoint_where_it_stores_none(tmp_path, monkeypatch, arguments):
    """Autoresume without a local checkpoint asks each logger for one: W&B answers "not found" (which Composer
    skips) without asking its server, offline or when it does not upload checkpoints."""
    pytest.importorskip("wandb")
    import wandb

    from micro_diffusion.training.loggers import WandBLogger

    monkeypatch.setattr(wandb, "Api", lambda *args, **kwargs: pytest.fail("asked the W&B server"))
    wandb_logger = WandBLogger(project="microdit", entity="team", **arguments)
    with pytest.raises(FileNotFoundError, match="does not store checkpoints"):
        wandb_logger.download_file("latest-rank0.pt", str(tmp_path / "latest-rank0.pt"))


def logged_steps(metrics: Path) -> list[int]:
    return [int(step) for step in re.findall(r"\[metric\]\[batch=(\d+)\]: loss/train/total:", metrics.read_text())]


def test_tensorboard_writes_event_files_that_tensorboard_reads(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log_dir = tmp_path / "tb"
    trainer = train.train(toy_run(tmp_path / "run", f"logger.tensorboard={{log_dir:{log_dir},flush_interval:1}}",
                                  "+callbacks.image_visualizer={interval:2ba}"))
    assert any(isinstance(d, TensorboardLogger) for d in trainer.logger.destinations)
    events = EventAccumulator(str(next(log_dir.rglob("events.out.tfevents.*")).parent), size_guidance={"images": 0})
    events.Reload()
    tags = events.Tags()
    losses = events.Scalars("loss/train/total")
    assert [event.step for event in losses] == [0, 1, 2, 3] and all(event.value > 0 for event in losses)
    images = [tag for tag in tags["images"] if tag.startswith("Images/Train")]
    assert images, tags
    assert events.Images(images[0])[0].encoded_image_string.startswith(b"\x89PNG")


def test_the_file_logger_takes_composer_file_logger_arguments_but_overwrite():
    ours = set(inspect.signature(ResumableFileLogger).parameters)
    assert ours == set(inspect.signature(FileLogger).parameters) - {"overwrite"}
