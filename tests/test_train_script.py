"""train.py itself: evaluation with and without compile, low-precision LayerNorm, checkpoint ignore keys."""

import sys
import warnings
from pathlib import Path

import pytest
import torch
from composer.models import ComposerClassifier
from composer.utils.checkpoint import glob_filter
from hydra import compose, initialize_config_dir
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from micro_diffusion.models.model import create_latent_diffusion
from micro_diffusion.training.config import ConfigError, RunConfig, load_run_config
from micro_diffusion.training.task_components import TaskComponents

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import train  # noqa: E402  (the training script at the repository root)


def compose_run(*overrides: str) -> RunConfig:
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base=None):
        return load_run_config(compose(config_name="tiny_res_16_pretrain", overrides=list(overrides)))


def toy_components(with_eval: bool) -> TaskComponents:
    torch.manual_seed(0)
    model = ComposerClassifier(nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2)), num_classes=2)
    data = DataLoader(TensorDataset(torch.randn(8, 4), torch.randint(0, 2, (8,))), batch_size=4)
    return TaskComponents(model, data, data if with_eval else None)


def test_compile_keeps_evaluation_on(tmp_path):
    """The original forced eval_interval to 0 whenever misc.compile was set; here both hold."""
    run = compose_run(
        "trainer.compile=true", f"trainer.save_folder={tmp_path}", "callbacks={}", "optimizer.moe_lr_scale=1.0"
    )
    trainer = train.build_trainer(run, toy_components(with_eval=True))
    assert hasattr(trainer.state.model.forward, "_torchdynamo_orig_callable"), "the training forward is compiled"
    assert [evaluator.label for evaluator in trainer.state.evaluators] == ["eval"]
    assert run.trainer.eval_interval == "50ba"
    trainer.close()


def test_compile_of_a_microdit_is_regional(tiny_hf_clip_dir, tmp_path):
    """trainer.compile with a MicroDiT compiles each block and the caption refiner, not the whole forward."""
    run = compose_run(
        "trainer.compile=true", f"trainer.save_folder={tmp_path}", "callbacks={}", "optimizer.moe_lr_scale=1.0",
        "trainer.eval_interval=null",
    )
    model = create_latent_diffusion(
        vae_name="identity", text_encoder_name=tiny_hf_clip_dir.name, dit_arch="MicroDiT_XXS_2", in_channels=3,
        latent_res=8, dtype="float32",
    )
    data = DataLoader(TensorDataset(torch.randn(8, 4)), batch_size=4)
    trainer = train.build_trainer(run, TaskComponents(model, data))
    dit = trainer.state.model.dit
    compiled = [m for m in dit.modules() if m._compiled_call_impl is not None]
    assert compiled == [dit.y_emb_preprocess, *dit.patch_mixer, *dit.blocks]
    assert not hasattr(trainer.state.model.forward, "_torchdynamo_orig_callable"), "not compiled as one graph"
    trainer.close()


def test_evaluation_interval_requires_evaluation_data_and_the_reverse(tmp_path):
    run = compose_run(f"trainer.save_folder={tmp_path}", "optimizer.moe_lr_scale=1.0")
    with pytest.raises(ConfigError, match=r"trainer\.eval_interval: set it when the task has evaluation data"):
        train.build_trainer(run, toy_components(with_eval=False))
    run = compose_run(f"trainer.save_folder={tmp_path}", "trainer.eval_interval=null")
    with pytest.raises(ConfigError, match=r"evaluation data: yes, eval_interval: None"):
        train.build_trainer(run, toy_components(with_eval=True))


def test_low_precision_layernorm_replaces_only_trainable_norms(tiny_hf_clip_dir):
    model = create_latent_diffusion(
        vae_name="identity", text_encoder_name=tiny_hf_clip_dir.name, dit_arch="MicroDiT_XXS_2", in_channels=3,
        latent_res=8, dtype="float32",
    )
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainable_before = {name for name, p in model.named_parameters() if p.requires_grad}
    dit_norms = sum(1 for m in model.dit.modules() if isinstance(m, nn.LayerNorm))
    replaced = train.apply_low_precision_layernorm(model)
    assert replaced == dit_norms > 0
    assert all(type(m).__name__ == "LPLayerNorm" for m in model.dit.modules() if isinstance(m, nn.LayerNorm))
    frozen_norms = [m for m in model.text_encoder.modules() if isinstance(m, nn.LayerNorm)]
    assert frozen_norms and all(type(m) is nn.LayerNorm for m in frozen_norms), "frozen encoders are left alone"
    assert {name for name, p in model.named_parameters() if p.requires_grad} == trainable_before
    for name, param in model.named_parameters():
        torch.testing.assert_close(param, before[name], rtol=0, atol=0)


def test_low_precision_layernorm_without_a_trainable_norm_is_an_error():
    with pytest.raises(ConfigError, match="no trainable LayerNorm"):
        train.apply_low_precision_layernorm(nn.Sequential(nn.Linear(2, 2)))


def test_an_ignore_key_that_matches_nothing_is_an_error():
    state_dict = {"state": {"schedulers": {"LambdaLR": {"base_lrs": [1.0]}}}}
    with warnings.catch_warnings():
        train.fail_on_unmatched_ignore_keys()
        glob_filter(["state/schedulers/*/base_lrs"])(state_dict)
        assert state_dict["state"]["schedulers"]["LambdaLR"] == {}
        with pytest.raises(UserWarning, match="No parts from loaded checkpoint"):
            glob_filter(["state/optimizers/AdamW/param_groups/lr"])(state_dict)


def test_callback_intervals_in_images_become_batches():
    """EDM2 counts training time in images: a callback's "<n>sp" is n / global batch optimizer steps."""
    run = compose_run("data.train_batch_size=8", "callbacks.image_grid.interval=64sp",
                      "+callbacks.ema={smoothing:0.9,ema_start:16sp}")
    entries = {path: arguments for path, _, arguments in train.callback_entries(run)}
    assert entries["callbacks.image_grid"]["interval"] == "8ba" and entries["callbacks.ema"]["ema_start"] == "2ba"
    assert train.images_to_batches("100ba", 8, "x") == "100ba" and train.images_to_batches(3, 8, "x") == 3
    with pytest.raises(ConfigError, match="callbacks.ema.ema_start.*whole number of batches of 8"):
        train.check_run(compose_run("data.train_batch_size=8", "+callbacks.ema={smoothing:0.9,ema_start:12sp}"))
    with pytest.raises(ConfigError, match="train_batch_size"):
        train.images_to_batches("64sp", None, "callbacks.image_grid.interval")
