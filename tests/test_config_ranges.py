"""Values out of range fail when the config is read, naming the dotted key, before any model or data is built.

Batch sizes of 0 or -8, a mask ratio of 1.5, a negative learning rate or `save_interval=0ba` used to pass
validation and fail minutes later, inside torch or Composer, without the key (issue 18).
"""

import functools
import sys
from pathlib import Path
from typing import Annotated

import pytest
from hydra import compose, initialize_config_dir

from micro_diffusion.config_checks import NON_NEGATIVE, ConfigError, Range, check_arguments
from micro_diffusion.training import autoencoder_task, tasks
from micro_diffusion.training.config import load_run_config

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import train  # noqa: E402  (the training script at the repository root)

DIFFUSION = "tiny_res_16_pretrain"
AUTOENCODER = "autoencoder_shapes"


def read_then_build(config: str, *overrides: str) -> None:
    """What train.py does up to fit: read the config (`load_run_config`, `check_run`), then build the task."""
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base=None):
        cfg = compose(config_name=config, overrides=list(overrides))
    run = load_run_config(cfg)
    train.check_run(run)
    tasks.TASKS[run.task](run)


@pytest.fixture(autouse=True)
def nothing_is_built(monkeypatch: pytest.MonkeyPatch) -> None:
    """Building a model or reading data fails the test: range errors must come first."""

    def refused(builder):
        @functools.wraps(builder)  # the same signature: the config checks read it
        def build(*args, **kwargs):
            raise AssertionError("a model or dataset was built")

        return build

    for module, name in [(tasks, "create_latent_diffusion"), (tasks, "build_streaming_latents_dataloader"),
                         (autoencoder_task, "build_autoencoder"), (autoencoder_task, "load_source_images")]:
        monkeypatch.setattr(module, name, refused(getattr(module, name)))


@pytest.mark.parametrize(
    ("config", "overrides"),
    [(DIFFUSION, []), (AUTOENCODER, []),
     (DIFFUSION, ["+model.train_route_ratio=0.5", "+model.dit_kwargs={route_span: [1, 3]}"])],
)
def test_a_valid_config_reaches_the_build(config: str, overrides: list[str]) -> None:
    with pytest.raises(AssertionError, match="a model or dataset was built"):
        read_then_build(config, *overrides)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.train_batch_size=0", r"data\.train_batch_size: must be > 0, got 0"),
        ("data.train_batch_size=-8", r"data\.train_batch_size: must be > 0, got -8"),
        ("data.eval_batch_size=0", r"data\.eval_batch_size: must be > 0, got 0"),
        ("trainer.device_train_microbatch_size=0", r"trainer\.device_train_microbatch_size: must be > 0, got 0"),
        ("+data.num_workers=-1", r"data\.num_workers: must be >= 0, got -1"),
        ("data.image_size=0", r"data\.image_size: must be > 0, got 0"),
        ("model.train_mask_ratio=1.5", r"model\.train_mask_ratio: must be in \[0, 1\), got 1\.5"),
        ("model.train_mask_ratio=1.0", r"model\.train_mask_ratio: must be in \[0, 1\), got 1\.0"),
        ("+model.train_route_ratio=1.0", r"model\.train_route_ratio: must be in \[0, 1\), got 1\.0"),
        ("+model.train_route_ratio=-0.5", r"model\.train_route_ratio: must be in \[0, 1\), got -0\.5"),
        ("+model.train_route_ratio=0.5", r"model\.train_route_ratio: routes tokens around .*route_span"),
        ("+model.sigma_data=0", r"model\.sigma_data: must be > 0, got 0"),
        ("data.cap_drop_prob=1.5", r"data\.cap_drop_prob: must be in \[0, 1\], got 1\.5"),
        ("data.cap_drop_prob=-0.1", r"data\.cap_drop_prob: must be in \[0, 1\], got -0\.1"),
        ("optimizer.lr=-1e-4", r"optimizer\.lr: must be >= 0, got -0\.0001"),
        ("optimizer.weight_decay=-0.1", r"optimizer\.weight_decay: must be >= 0, got -0\.1"),
        ("optimizer.betas=[0.9,1.0]", r"optimizer\.betas\.1: must be in \[0, 1\), got 1\.0"),
        ("optimizer.eps=0", r"optimizer\.eps: must be > 0, got 0\.0"),
        ("algorithms.gradient_clipping.clipping_threshold=-1",
         r"algorithms\.gradient_clipping\.clipping_threshold: must be > 0, got -1\.0"),
        ("trainer.save_interval=0ba", r"trainer\.save_interval: must be a positive time, got '0ba'"),
        ("trainer.eval_interval=0ba", r"trainer\.eval_interval: must be a positive time, got '0ba'"),
        ("trainer.max_duration=0ep", r"trainer\.max_duration: must be a positive time, got '0ep'"),
        ("trainer.max_duration=10epochs", r"trainer\.max_duration: not a Composer time string .*got '10epochs'"),
        ("seed=-1", r"seed: must be in \[0, 4294967295\], got -1"),
    ],
)
def test_diffusion_ranges_fail_when_the_config_is_read(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        read_then_build(DIFFUSION, override)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.train_batch_size=0", r"data\.train_batch_size: must be > 0, got 0"),
        ("data.eval_batch_size=-8", r"data\.eval_batch_size: must be > 0, got -8"),
        ("data.num_eval_images=0", r"data\.num_eval_images: must be > 0, got 0"),
        ("data.num_workers=-1", r"data\.num_workers: must be >= 0, got -1"),
        ("model.grid_interval=0ba", r"model\.grid_interval: must be a positive time, got '0ba'"),
    ],
)
def test_autoencoder_ranges_fail_when_the_config_is_read(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        read_then_build(AUTOENCODER, override)


def test_every_value_out_of_range_is_named() -> None:
    with pytest.raises(ConfigError, match=r"optimizer\.lr: .*; optimizer\.eps: "):
        read_then_build(DIFFUSION, "optimizer.lr=-1", "optimizer.eps=-1")


def test_ranges_are_declared_in_annotations_of_any_checked_target() -> None:
    """`check_arguments` reads the constraints of a function's annotations (list values item by item)."""

    def target(count: Annotated[int, Range(low=1)] = 1, sizes: Annotated[list[int] | None, NON_NEGATIVE] = None):
        return count, sizes

    check_arguments(target, {"count": 3, "sizes": [0, 2]}, "section")
    with pytest.raises(ConfigError, match=r"section\.count: must be >= 1, got 0"):
        check_arguments(target, {"count": 0}, "section")
    with pytest.raises(ConfigError, match=r"section\.sizes\.1: must be >= 0, got -2"):
        check_arguments(target, {"sizes": [1, -2]}, "section")
