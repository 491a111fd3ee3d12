"""Config validation: every key set must do something; bad keys fail with their dotted path before any build."""

import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from micro_diffusion.config_checks import ConfigError, check_arguments
from micro_diffusion.training.config import RunConfig, load_run_config
from micro_diffusion.training.tasks import diffusion_spec

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import train  # noqa: E402  (the training script at the repository root)

BASE = "tiny_res_16_pretrain"


def compose_run(*overrides: str, config: str = BASE) -> RunConfig:
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base=None):
        return load_run_config(compose(config_name=config, overrides=list(overrides)))


def checked(*overrides: str) -> RunConfig:
    run = compose_run(*overrides)
    train.check_run(run)
    return run


def test_the_base_config_is_valid():
    run = checked()
    assert run.trainer.eval_interval == "50ba" and run.optimizer.moe_lr_scale == 0.5


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("+trainer.max_epochs=3", r"trainer\.max_epochs: Key 'max_epochs' not in 'TrainerConfig'"),
        ("+optimizer.momentum=0.9", r"optimizer\.momentum: Key 'momentum' not in 'OptimizerConfig'"),
        ("+algorithms.ema=true", r"algorithms\.ema: Key 'ema' not in 'AlgorithmsConfig'"),
        ("+extra=1", r"extra: Key 'extra' not in 'RunConfig'"),
        ("exp_name=???", r"exp_name: Missing mandatory value"),
    ],
)
def test_schema_rejects_unknown_mistyped_and_missing_keys(override, message):
    with pytest.raises(ConfigError, match=message):
        compose_run(override)


def test_schema_rejects_mistyped_values():
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base=None):
        cfg = OmegaConf.to_container(compose(config_name=BASE))
    cfg["optimizer"]["lr"] = "fast"
    with pytest.raises(ConfigError, match=r"optimizer\.lr: Value 'fast' of type 'str' could not be converted"):
        load_run_config(cfg)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("+model.mask_ratio=0.5", r"model\.mask_ratio: unknown key; create_latent_diffusion takes"),
        ("+data.shuffle=false", r"data\.shuffle: Key 'shuffle' not in 'LatentDataConfig'"),
        ("+data.streaming.cache_limt=1gb", r"data\.streaming\.cache_limt: unknown key"),
        ("+data.streaming.shuffle_seed=3", r"data\.streaming\.shuffle_seed: set by the training script"),
        ("+data.caption_shape=[32,384]", r"data\.caption_shape: comes from model\.text_encoder_name"),
        ("+data.prefetch_factor=2", r"data\.prefetch_factor and data\.persistent_workers need data\.num_workers"),
        ("data.eval_streams=null", r"data\.eval_streams and data\.eval_batch_size: set both"),
        ("+data.pin_memory=true", r"data\.pin_memory needs trainer\.device gpu, not cpu"),
        ("data.image_size=24", r"data\.image_size 24 is not a multiple of model\.latent_res 16"),
        ("+callbacks.image_grid.prompt=[x]", r"callbacks\.image_grid\.prompt: unknown key; ImageGridLogger takes"),
        ("+callbacks.nan_guard.verbose=true", r"callbacks\.nan_guard\.verbose: unknown key; NaNGuard takes nothing"),
        ("+callbacks.speed_monitr={}", r"callbacks\.speed_monitr: unknown name 'speed_monitr'; choose one of"),
        ("+logger.tensorboard.flush=5", r"logger\.tensorboard\.flush: unknown key"),
        ("+scheduler.alpha=0.5", r"scheduler\.alpha: unknown key; CosineAnnealingWithWarmupScheduler takes"),
        ("scheduler.name=constant", r"scheduler\.alpha_f: unknown key; ConstantScheduler takes"),
        ("scheduler.name=step", r"scheduler\.name: unknown name 'step'"),
        ("task=segmentation", r"task: unknown name 'segmentation'; choose one of autoencoder, diffusion"),
    ],
)
def test_task_callback_logger_and_scheduler_keys_are_checked_before_building(override, message):
    with pytest.raises(ConfigError, match=message):
        checked(override)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["+trainer.load_ignore_keys=[state/model/x]"], r"trainer\.load_ignore_keys is set but trainer\.load_path"),
        (["trainer.load_weights_only=true"], r"trainer\.load_weights_only is set but trainer\.load_path is not"),
        (["trainer.load_path=x.pt", "trainer.load_strict_model_weights=false"],
         r"a full-state load is never strict in Composer"),
        (["algorithms.low_precision_layernorm=true"], r"low_precision_layernorm needs trainer\.precision amp_bf16"),
        (["trainer.fsdp_config={sharding_strategy:SHARD_GRAD_OP}"], r"trainer\.fsdp_config needs trainer\.device gpu"),
        (["trainer.device=gpu", "trainer.fsdp_config={sharding_stratgy:SHARD_GRAD_OP}"],
         r"trainer\.fsdp_config\.sharding_stratgy: not a Composer FSDP option"),
        (["trainer.fsdp_config=SHARD_GRAD_OP"], r"trainer\.fsdp_config: a mapping of Composer FSDP options or null"),
        (["trainer.device=gpu", "trainer.fsdp_config={sharding_strategy:SHARD_GRAD_OP}",
          "+callbacks.power_ema={snapshot_interval_images:64}"], r"callbacks\.power_ema does not run under FSDP"),
    ],
)
def test_keys_that_would_have_no_effect_are_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        compose_run(*overrides)


def test_the_dotted_path_of_a_missing_required_argument_is_named():
    with pytest.raises(ConfigError, match=r"scheduler\.t_warmup: required by ConstantWithWarmupScheduler"):
        checked("scheduler.name=constant_with_warmup", "~scheduler.t_warmup", "~scheduler.alpha_f")


def test_shard_format_follows_the_model():
    spec = diffusion_spec(compose_run())
    assert spec.shard_format == dict(latent_channels=3, latent_downsample=1, caption_length=32, caption_channels=384)
    label_model = compose_run(
        "model.text_encoder_name=null", "+model.num_classes=10", "+data.caption_shape=[32,384]", "data.image_size=64"
    )
    assert diffusion_spec(label_model).shard_format["latent_downsample"] == 4
    with pytest.raises(ConfigError, match=r"data\.caption_shape: \[length, channels\]"):
        diffusion_spec(compose_run("model.text_encoder_name=null", "+model.num_classes=10"))


def test_checks_accept_every_argument_a_target_takes():
    def target(a, b=1, *, c=2):
        return a, b, c

    check_arguments(target, {"a": 0, "c": 3}, "section")
    with pytest.raises(ConfigError, match=r"section\.a: required by"):
        check_arguments(target, {"b": 0}, "section")
    with pytest.raises(ConfigError, match=r"section: .* takes \*\*kwargs"):
        check_arguments(lambda **kwargs: None, {"a": 0}, "section")


def test_every_trainer_option_reaches_composer_trainer_by_name():
    """A new Trainer option is one TrainerConfig field: each field is a Trainer argument of the same name, or is
    converted (TRAINER_CONVERSIONS) to Trainer arguments."""
    import inspect
    from dataclasses import fields

    from composer import Trainer

    from micro_diffusion.training.config import TRAINER_CONVERSIONS, TrainerConfig

    parameters = set(inspect.signature(Trainer.__init__).parameters)
    for option in fields(TrainerConfig):
        produced = TRAINER_CONVERSIONS[option.name](None) if option.name in TRAINER_CONVERSIONS else {option.name: 0}
        assert set(produced) <= parameters, f"trainer.{option.name} -> {sorted(produced)}: not Trainer arguments"


def test_trainer_arguments_convert_and_skip_evaluation_without_data():
    from micro_diffusion.training.config import EVALUATION_OPTIONS, TrainerConfig, trainer_arguments

    settings = TrainerConfig(max_duration="10ba", save_folder="out", compile=True, fsdp_config={"a": 1},
                             eval_interval="5ba")
    arguments = trainer_arguments(settings, has_eval=True)
    assert arguments["compile_config"] == {} and arguments["parallelism_config"] == {"fsdp": {"a": 1}}
    assert arguments["log_to_console"] is False and arguments["console_log_interval"] == "1ba"
    assert arguments["eval_interval"] == "5ba" and arguments["max_duration"] == "10ba"
    assert not set(EVALUATION_OPTIONS) & set(trainer_arguments(settings, has_eval=False))
    assert "compile" not in arguments and "fsdp_config" not in arguments
