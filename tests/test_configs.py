"""Every config composes and passes validation; the four MicroDiT stages hold the original recipe's values."""

import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from micro_diffusion.models.model import MODEL_DESCRIPTION, default_arguments, released_model_arguments
from micro_diffusion.pipeline import load_pipeline, save_folder
from micro_diffusion.training.config import ConfigError, RunConfig, load_run_config, validate_section

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "configs"
sys.path.insert(0, str(REPO))
import train  # noqa: E402  (the training script at the repository root)

CONFIGS = sorted(path.stem for path in CONFIG_DIR.glob("*.yaml"))


def compose_run(config: str, overrides: list[str] = ()) -> RunConfig:
    """The validated run of a config. What a config leaves to the command line gets a placeholder path, as a
    user's command would give it: values marked `???`, and the checkpoint of a stage that continues another
    (a config that says how to load but not what)."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        cfg = compose(config_name=config, overrides=list(overrides))
    for key in OmegaConf.missing_keys(cfg):
        OmegaConf.update(cfg, key, "/placeholder/path")
    loads = cfg.trainer.load_ignore_keys is not None or cfg.trainer.load_weights_only
    if loads and cfg.trainer.load_path is None:
        cfg.trainer.load_path = "/placeholder/latest-rank0.pt"
    return load_run_config(cfg)


def validate_everything(run: RunConfig) -> None:
    """All the validation that needs no data or weights: train.py's, plus the autoencoder task's sections."""
    train.check_run(run)
    if run.task == "autoencoder":
        from micro_diffusion.training.autoencoder_task import AutoencoderDataSection, AutoencoderModelSection

        validate_section(AutoencoderModelSection, run.model, "model")
        validate_section(AutoencoderDataSection, run.data, "data")


def test_the_config_folder_has_the_expected_configs():
    expected = {"res_256_pretrain", "res_256_finetune", "res_512_pretrain", "res_512_finetune",
                "tiny_res_16_pretrain", "tiny_res_16_finetune", "tiny_res_32_pretrain", "tiny_res_32_finetune",
                "minildm_fashion_mnist", "minildm_cifar10", "autoencoder_cifar10"}
    assert expected <= set(CONFIGS)


@pytest.mark.parametrize("config", CONFIGS)
def test_config_composes_and_every_key_is_consumed(config):
    validate_everything(compose_run(config))


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("section", ["trainer", "optimizer", "model", "data"])
def test_an_unknown_key_is_an_error(config, section):
    with pytest.raises(ConfigError, match=rf"{section}\.not_a_key"):
        validate_everything(compose_run(config, [f"+{section}.not_a_key=1"]))


# ----------------------------------------------------------------------------------------------------------------
# The original recipe (SonyResearch/micro_diffusion configs/res_*.yaml and README commands)
# ----------------------------------------------------------------------------------------------------------------

README_COMMANDS = {  # the overrides of the original README's four commands, verbatim
    "res_256_pretrain": ["exp_name=MicroDiTXL_mask_75_res_256_pretrain", "model.train_mask_ratio=0.75"],
    "res_256_finetune": ["exp_name=MicroDiTXL_mask_0_res_256_finetune", "model.train_mask_ratio=0.0",
                         "trainer.load_path=./trained_models/MicroDiTXL_mask_75_res_256_pretrain/latest-rank0.pt"],
    "res_512_pretrain": ["exp_name=MicroDiTXL_mask_75_res_512_pretrain", "model.train_mask_ratio=0.75",
                         "trainer.load_path=./trained_models/MicroDiTXL_mask_0_res_256_finetune/latest-rank0.pt"],
    "res_512_finetune": ["exp_name=MicroDiTXL_mask_0_res_512_finetune", "model.train_mask_ratio=0.0",
                         "trainer.load_path=./trained_models/MicroDiTXL_mask_75_res_512_pretrain/latest-rank0.pt"],
}
COMMON = {
    "seed": 18,
    "model.vae_name": "stabilityai/stable-diffusion-xl-base-1.0",
    "model.text_encoder_name": "openclip:hf-hub:apple/DFN5B-CLIP-ViT-H-14-378",
    "model.dit_arch": "MicroDiT_XL_2",
    "model.precomputed_latents": True,
    "model.in_channels": 4,
    "model.dtype": "bfloat16",
    "data.train_batch_size": 2048,
    "data.eval_batch_size": 1024,
    "data.cap_drop_prob": 0.1,
    "data.eval_streams": ["coco2014/mds_latents_sdxl1_dfnclipH14"],
    "data.num_workers": 2,
    "data.prefetch_factor": 2,
    "data.persistent_workers": True,
    "data.pin_memory": True,
    "optimizer.weight_decay": 0.1,
    "optimizer.eps": 1e-8,
    "optimizer.betas": [0.9, 0.999],
    "optimizer.moe_lr_scale": 0.5,  # intended by the original (half the LR), never applied there
    "algorithms.low_precision_layernorm": True,
    "algorithms.gradient_clipping.clipping_type": "norm",
    "trainer.device": "gpu",
    "trainer.precision": "amp_bf16",
    "trainer.fsdp_config": {"sharding_strategy": "SHARD_GRAD_OP"},
    "trainer.compile": True,
    "trainer.save_num_checkpoints_to_keep": 1,
    "trainer.save_overwrite": False,  # the original: true, and no autoresume; a rerun here resumes
    "trainer.autoresume": True,
    "callbacks.image_grid.guidance_scale": 5.0,
    "callbacks.image_grid.num_inference_steps": 30,
    "callbacks.image_grid.seed": 18,
    "callbacks.throughput.window_size": 3,
}
STREAMS_256 = ["sa1b/mds_latents_sdxl1_dfnclipH14", "cc12m/mds_latents_sdxl1_dfnclipH14",
               "textcaps/mds_latents_sdxl1_dfnclipH14", "jdb/mds_latents_sdxl1_dfnclipH14/train",
               "diffdb/mds_latents_sdxl1_dfnclipH14"]
STREAMS_512 = ["sa1b/mds_latents_sdxl1_dfnclipH14", "cc12m/mds_minres512_latents_sdxl1_dfnclipH14",
               "textcaps/mds_latents_sdxl1_dfnclipH14", "jdb/mds_latents_sdxl1_dfnclipH14/train"]
LR_IGNORE_KEYS = ["state/schedulers/LambdaLR/base_lrs", "state/schedulers/LambdaLR/_last_lr"]
COLUMNS = ("model.latent_res", "data.image_size", "model.pos_interp_scale", "model.train_mask_ratio",
           "model.p_mean", "model.p_std", "optimizer.lr", "scheduler",
           "algorithms.gradient_clipping.clipping_threshold", "trainer.max_duration",
           "trainer.device_train_microbatch_size", "trainer.eval_interval", "trainer.save_interval", "callbacks.ema",
           "trainer.load_weights_only", "trainer.load_strict_model_weights", "trainer.load_ignore_keys",
           "data.train_streams")
STAGES = {
    "res_256_pretrain": (32, 256, 1.0, 0.75, -0.6, 1.2, 2.4e-4,
                         {"name": "cosine_with_warmup", "t_warmup": "2500ba", "alpha_f": 0.33}, 0.25,
                         "250000ba", 256, "2500ba", "2500ba", None, False, True, None, STREAMS_256),
    "res_256_finetune": (32, 256, 1.0, 0.0, -0.6, 1.2, 8e-5, {"name": "constant"}, 0.25,
                         "280000ba", 64, "2500ba", "2500ba", None, False, True, LR_IGNORE_KEYS, STREAMS_256),
    "res_512_pretrain": (64, 512, 2.0, 0.75, 0.0, 0.6, 8e-5, {"name": "constant_with_warmup", "t_warmup": "500ba"},
                         0.5, "50000ba", 32, "2500ba", "2500ba",
                         {"smoothing": 0.99975, "ema_start": "25000ba", "update_interval": "1ba"},
                         True, False, ["state/model/dit.pos_embed"], STREAMS_512),
    "res_512_finetune": (64, 512, 2.0, 0.0, 0.0, 0.6, 8e-5, {"name": "constant"}, 0.5,
                         "55000ba", 16, "500ba", "500ba",
                         {"smoothing": 0.9975, "ema_start": "1000ba", "update_interval": "1ba"},
                         False, True, LR_IGNORE_KEYS, STREAMS_512),
}


def value_at(run: RunConfig, dotted: str):
    value = run
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else getattr(value, part)
    return value


@pytest.mark.parametrize("stage", list(STAGES))
def test_stage_configs_hold_the_original_recipe(stage):
    run = compose_run(stage, README_COMMANDS[stage])
    expected = {**COMMON, **dict(zip(COLUMNS, STAGES[stage]))}
    actual = {key: value_at(run, key) for key in expected}
    assert actual == expected
    assert run.exp_name == README_COMMANDS[stage][0].split("=")[1]
    assert run.trainer.save_folder == f"./trained_models/{run.exp_name}"
    assert len(run.callbacks["image_grid"]["prompts"]) == 16


def test_readme_checkpoint_chain():
    """Each stage's README command loads the final checkpoint the previous stage writes."""
    stages = list(STAGES)
    for previous, stage in zip(stages, stages[1:]):
        run = compose_run(stage, README_COMMANDS[stage])
        assert run.trainer.load_path == f"{compose_run(previous).trainer.save_folder}/latest-rank0.pt"


@pytest.mark.parametrize("pipeline", sorted((REPO / "yamls").glob("*.yaml")), ids=lambda path: path.stem)
def test_pipelines_name_valid_stage_configs(pipeline):
    loaded = load_pipeline(pipeline, [])
    stages = loaded.training_stages
    assert loaded.config_dir == CONFIG_DIR and len(stages) >= 2
    assert not stages[0].load_from_previous and stages[-1].load_from_previous, "the last stage continues another"
    folders = {save_folder(loaded.config_dir, stage) for stage in stages}
    assert len(folders) == len(stages), "every stage saves into its own folder"
    for stage in stages:
        overrides = [*stage.overrides, *(["trainer.load_path=x.pt"] if stage.load_from_previous else [])]
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
            train.check_run(load_run_config(compose(config_name=stage.config, overrides=overrides)))


def _yaml_leaves(node, prefix: str = ""):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _yaml_leaves(value, f"{prefix}{key}.")
    else:
        yield prefix[:-1], node


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.rglob("*.yaml")), ids=lambda p: str(p.relative_to(CONFIG_DIR)))
def test_a_required_marker_is_not_swallowed_by_a_schema_default(path):
    """Configs start from the schema, and OmegaConf keeps an existing value when `???` is merged onto it: a `???`
    on a key the schema gives a default would silently take that default instead of being required."""
    for key, value in _yaml_leaves(yaml.safe_load(path.read_text()) or {}):
        node = OmegaConf.structured(RunConfig)
        *parents, leaf = key.split(".")
        for part in parents:  # down the schema, as far as it defines the path
            node = node[part] if part in node and not OmegaConf.is_missing(node, part) else None
            if not isinstance(node, DictConfig):
                break
        if value == "???" and isinstance(node, DictConfig) and leaf in node and not OmegaConf.is_missing(node, leaf):
            pytest.fail(f"{path.name}: {key}: ??? is replaced by the schema default {node[leaf]!r}")


def model_section(config: str) -> dict:
    """The config's model section completed with create_latent_diffusion's defaults (what the model is built from)."""
    return default_arguments() | compose_run(config).model


@pytest.mark.parametrize("config", ["res_512_pretrain", "res_512_finetune"])
def test_the_512_px_stages_build_the_released_model(config):
    released = released_model_arguments()
    assert {name: model_section(config)[name] for name in released} == released


@pytest.mark.parametrize("config", ["res_256_pretrain", "res_256_finetune"])
def test_the_256_px_stages_build_create_latent_diffusions_default_model(config):
    """The original's defaults describe the 256-px stages: network, encoders and EDM noise (EDMConfig's)."""
    defaults = default_arguments()
    names = (*MODEL_DESCRIPTION, "sigma_data", "p_mean", "p_std")
    assert {name: model_section(config)[name] for name in names} == {name: defaults[name] for name in names}


@pytest.mark.parametrize(("tiny", "real"), [("tiny_res_16_pretrain", "res_256_pretrain"),
                                            ("tiny_res_32_pretrain", "res_512_pretrain")])
def test_the_tiny_stages_rehearse_the_real_stages_noise_and_positions(tiny, real):
    names = ("sigma_data", "p_mean", "p_std", "pos_interp_scale", "train_mask_ratio")
    assert {n: model_section(tiny)[n] for n in names} == {n: model_section(real)[n] for n in names}
