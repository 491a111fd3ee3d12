"""Checkpoints hold what training changes, not the frozen VAE and text encoder, and still load strictly.

- `LatentDiffusion.state_dict()` has no `vae.` or `text_encoder.` entries; a state dict without them loads with
  strict=True, and a missing network key is still an error.
- A state dict of an older version, which holds the encoders, loads too: their saved copies are ignored, with a
  note, and the encoders keep the weights they were built with.
- Composer's checkpoints (full state, weights-only start, resume) and torch's FSDP full state dict (the calls
  Composer makes under FSDP, on two CPU ranks) follow the same rule. (There torch fills any key a full state
  dict lacks with the model's own value, strict or not: its own behaviour, which the frozen encoders rely on.)
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest
import torch
from composer import Trainer
from composer.utils import get_free_tcp_port
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy
from torch.utils.data import DataLoader

from micro_diffusion.models.checkpoints import load_checkpoint
from micro_diffusion.models.model import FROZEN_ENCODERS, LatentDiffusion, create_latent_diffusion

LATENT_RES = 8


def text_model(vae_dir, text_encoder_name: str) -> LatentDiffusion:
    torch.manual_seed(0)
    return create_latent_diffusion(
        vae_name=str(vae_dir), text_encoder_name=text_encoder_name, dit_arch="MicroDiT_XXS_2", latent_res=LATENT_RES,
        in_channels=4, dtype="float32", learned_loss_weighting=True,
    )


def frozen_keys(keys) -> list[str]:
    return [key for key in keys if key.split(".", 1)[0] in FROZEN_ENCODERS]


def encoder_weights(model: LatentDiffusion) -> dict[str, torch.Tensor]:
    return {f"{name}.{key}": value.clone() for name in FROZEN_ENCODERS
            for key, value in getattr(model, name).state_dict().items()}


@pytest.fixture
def build(tiny_vae_dir, tiny_hf_clip_dir) -> Callable[[], LatentDiffusion]:
    return lambda: text_model(tiny_vae_dir, tiny_hf_clip_dir.name)


def test_state_dict_holds_the_trained_modules_only_and_loads_strictly(build):
    model = build()
    state = model.state_dict()
    assert frozen_keys(state) == [], "the frozen encoders are not saved"
    assert any(key.startswith("dit.") for key in state) and any(key.startswith("loss_weighting.") for key in state)
    assert sum(value.numel() for value in state.values()) < sum(p.numel() for p in model.parameters())

    fresh = build()
    with torch.no_grad():
        for param in model.dit.parameters():
            param.add_(1.0)
    assert fresh.load_state_dict(model.state_dict(), strict=True) == ([], [])
    for key, value in model.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[key], value, rtol=0, atol=0, msg=key)

    state = model.state_dict()
    del state["dit.x_embedder.proj.weight"]
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*dit\.x_embedder\.proj\.weight"):
        fresh.load_state_dict(state, strict=True)


def test_an_older_state_dict_with_the_encoders_loads_and_keeps_the_built_encoders(build, caplog):
    model = build()
    old_format = {**model.state_dict(), **{key: value + 1 for key, value in encoder_weights(model).items()}}
    fresh = build()
    built = encoder_weights(fresh)
    with caplog.at_level(logging.WARNING, logger="micro_diffusion.models.checkpoints"):
        fresh.load_state_dict(old_format, strict=True)
    assert "frozen 'vae'" in caplog.text and "frozen 'text_encoder'" in caplog.text
    for key, value in encoder_weights(fresh).items():
        torch.testing.assert_close(value, built[key], rtol=0, atol=0, msg=key)


def latent_batches(count: int) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    return [{"image_latents": torch.randn(4, LATENT_RES, LATENT_RES, generator=generator),
             "caption_latents": torch.randn(1, 77, 32, generator=generator)} for _ in range(count)]


def make_trainer(model: LatentDiffusion, save_folder, **kwargs) -> Trainer:
    return Trainer(
        model=model, train_dataloader=DataLoader(latent_batches(8), batch_size=4), max_duration="2ba",
        optimizers=torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3), device="cpu",
        save_folder=str(save_folder), save_interval="1ba", progress_bar=False, log_to_console=False, seed=0,
        run_name="frozen", **kwargs,
    )


def test_composer_checkpoints_omit_the_encoders_and_load_them_back(build, tmp_path):
    model = build()
    make_trainer(model, tmp_path / "run").fit()
    checkpoint = load_checkpoint(tmp_path / "run" / "latest-rank0.pt")
    assert frozen_keys(checkpoint["state"]["model"]) == []
    assert len(checkpoint["state"]["model"]) == len(model.state_dict())

    for options in (dict(load_weights_only=True, load_strict_model_weights=True), dict()):
        fresh = build()
        built = encoder_weights(fresh)
        make_trainer(fresh, tmp_path / f"load{len(options)}", load_path=str(tmp_path / "run" / "latest-rank0.pt"),
                     **options)
        for key, value in model.state_dict().items():
            torch.testing.assert_close(fresh.state_dict()[key], value, rtol=0, atol=0, msg=key)
        for key, value in encoder_weights(fresh).items():
            torch.testing.assert_close(value, built[key], rtol=0, atol=0, msg=key)


def _fsdp_worker(rank: int, port: int, vae_dir, text_encoder_name: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        models = []
        for seed in (0, 1):
            model = text_model(vae_dir, text_encoder_name)
            torch.manual_seed(seed)
            torch.nn.init.normal_(model.dit.x_embedder.proj.weight)
            # Composer's layout: FSDP around the trained children, the frozen encoders left as they are.
            for name in ("dit", "loss_weighting"):
                setattr(model, name, FullyShardedDataParallel(
                    getattr(model, name), sharding_strategy=ShardingStrategy.SHARD_GRAD_OP, use_orig_params=True,
                    device_id=torch.device("cpu"),
                ))
            models.append(model)
        # Composer's options with state_dict_type full, but cpu_offload (a GPU -> CPU copy) crashes on CPU tensors.
        options = StateDictOptions(full_state_dict=True)
        saved = get_model_state_dict(models[0], options=options)
        assert frozen_keys(saved) == [] and "dit.x_embedder.proj.weight" in saved
        # (set_model_state_dict adds the model's own entries for the keys it lacks to the dict it is given)
        set_model_state_dict(models[1], dict(saved), options=StateDictOptions(full_state_dict=True, strict=True))
        loaded = get_model_state_dict(models[1], options=options)
        for key, value in saved.items():
            torch.testing.assert_close(loaded[key], value, rtol=0, atol=0, msg=key)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_fsdp_full_state_dict_omits_the_encoders_and_loads_strictly(tiny_vae_dir, tiny_hf_clip_dir):
    torch.multiprocessing.spawn(
        _fsdp_worker, args=(get_free_tcp_port(), tiny_vae_dir, tiny_hf_clip_dir.name), nprocs=2
    )
