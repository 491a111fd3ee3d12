"""Safe weight loading (released layout, prefixed, Composer-nested, resolution change) and the generate CLI."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from micro_diffusion.cli.generate import main as generate_main
from micro_diffusion.models.checkpoints import load_dit_weights, save_dit_weights
from micro_diffusion.models.dit import create_dit


def tiny(input_size: int = 8, pos_interp_scale: float = 1.0):
    return create_dit("MicroDiT_XXS_2", input_size=input_size, caption_channels=32, pos_interp_scale=pos_interp_scale)


def test_safetensors_round_trip(tmp_path):
    source, target = tiny(), tiny()
    with torch.no_grad():
        source.final_layer.linear.weight.normal_()
    load_dit_weights(target, save_dit_weights(source, tmp_path / "dit.safetensors"))
    torch.testing.assert_close(target.final_layer.linear.weight, source.final_layer.linear.weight)


@pytest.mark.parametrize("layout", ["plain", "prefixed", "composer"])
def test_torch_files_in_every_layout_load_with_weights_only(tmp_path, layout):
    source, target = tiny(), tiny()
    with torch.no_grad():
        source.final_layer.linear.bias.fill_(0.5)
    state = source.state_dict()
    if layout == "prefixed":
        state = {f"dit.{k}": v for k, v in state.items()}
    elif layout == "composer":
        state = {"state": {"model": {f"model.dit.{k}": v for k, v in state.items()}}}
    torch.save(state, tmp_path / "weights.pt")
    load_dit_weights(target, tmp_path / "weights.pt")
    assert torch.all(target.final_layer.linear.bias == 0.5)


def test_pickled_objects_are_refused(tmp_path):
    torch.save({"weights": torch.zeros(1), "callback": Image.new("RGB", (1, 1))}, tmp_path / "unsafe.pt")
    with pytest.raises(ValueError, match="weights_only"):
        load_dit_weights(tiny(), tmp_path / "unsafe.pt")


def test_mismatched_keys_name_themselves(tmp_path):
    state = {f"bogus.{k}": v for k, v in tiny().state_dict().items()}
    torch.save(state, tmp_path / "other.pt")
    with pytest.raises(KeyError, match="missing"):
        load_dit_weights(tiny(), tmp_path / "other.pt")


def test_resolution_change_keeps_the_new_position_table(tmp_path):
    path = save_dit_weights(tiny(input_size=8), tmp_path / "low.safetensors")
    high = tiny(input_size=16, pos_interp_scale=2.0)
    table = high.pos_embed.clone()
    with pytest.raises(RuntimeError, match="pos_embed"):
        load_dit_weights(high, path)
    load_dit_weights(high, path, ignore_pos_embed=True)
    torch.testing.assert_close(high.pos_embed, table)


def test_generate_cli_writes_a_grid_offline(tmp_path, tiny_vae_dir, tiny_hf_clip_dir):
    weights = save_dit_weights(tiny(), tmp_path / "dit.safetensors")
    out = tmp_path / "grid.png"
    generate_main([
        "--weights", str(weights), "--dit-arch", "MicroDiT_XXS_2", "--latent-res", "8", "--pos-interp-scale", "1",
        "--vae", str(tiny_vae_dir), "--text-encoder", tiny_hf_clip_dir.name, "--prompt", "a red circle",
        "--prompt", "a blue square", "--images-per-prompt", "2", "--steps", "2", "--dtype", "float32",
        "--out", str(out),
    ])
    assert Image.open(out).size == (2 * 32 + 3 * 2, 2 * 32 + 3 * 2)  # 2 x 2 grid of 32 px with 2 px padding
    assert json.loads(out.with_suffix(".json").read_text())["guidance"] == 5.0


def test_composer_checkpoint_loads_safely(tmp_path):
    """A real Composer checkpoint (timestamps, RNG states inside) loads with weights_only=True."""
    from composer import Trainer
    from torch.utils.data import DataLoader

    from micro_diffusion.encoders.vae import load_vae
    from micro_diffusion.models.model import LatentDiffusion

    dit = create_dit("MicroDiT_XXS_2", input_size=8, in_channels=3, caption_channels=32)
    model = LatentDiffusion(dit, load_vae("identity"), None, latent_res=8)
    data = [{"image_latents": torch.randn(3, 8, 8), "caption_latents": torch.randn(1, 4, 32)} for _ in range(4)]
    Trainer(model=model, train_dataloader=DataLoader(data, batch_size=4), max_duration="1ba",
            optimizers=torch.optim.AdamW(model.dit.parameters()), save_folder=str(tmp_path), save_interval="1ba",
            device="cpu", progress_bar=False).fit()
    fresh = create_dit("MicroDiT_XXS_2", input_size=8, in_channels=3, caption_channels=32)
    load_dit_weights(fresh, tmp_path / "latest-rank0.pt")
    torch.testing.assert_close(fresh.final_layer.linear.weight, model.dit.final_layer.linear.weight)
