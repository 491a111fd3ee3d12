"""Trained models that leave the project: the released layout through `model.load_state_dict`, `micro-diffusion
export` model folders (EMA, raw, post-hoc EMA), loading them with one argument, and the diffusers pipeline."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torch.utils.data import DataLoader

from micro_diffusion.cli.export import main as export_main
from micro_diffusion.cli.generate import main as generate_main
from micro_diffusion.diffusion.power_ema import save_snapshot
from micro_diffusion.encoders.vae import load_vae, save_latent_stats
from micro_diffusion.models.checkpoints import MODEL_FOLDER_CONFIG, load_network_state, read_model_folder
from micro_diffusion.models.dit import create_dit
from micro_diffusion.models.model import LatentDiffusion, create_latent_diffusion

PROMPTS = ["a red car", "a blue dog"]
SAMPLING = {"num_inference_steps": 2, "guidance_scale": 2.0}


def network_only_model() -> LatentDiffusion:
    """A LatentDiffusion around a tiny text-conditioned MicroDiT, built without encoders to load."""
    dit = create_dit("MicroDiT_XXS_2", input_size=8, in_channels=3, caption_channels=32)
    return LatentDiffusion(dit, load_vae("identity"), None, latent_res=8)


def test_model_load_state_dict_takes_the_released_layout_and_its_own_strictly(tmp_path: Path) -> None:
    torch.manual_seed(1)
    released = network_only_model().dit.state_dict()
    assert "pos_embed" in released and not any(key.startswith("dit.") for key in released)
    torch.save(released, tmp_path / "released.pt")

    model = network_only_model()
    model.load_state_dict(torch.load(tmp_path / "released.pt"))  # the original README's line
    for key, value in released.items():
        torch.testing.assert_close(model.dit.state_dict()[key], value)
    own = network_only_model()
    own.load_state_dict(model.state_dict())
    torch.testing.assert_close(own.dit.final_layer.linear.weight, released["final_layer.linear.weight"])
    model.dit.load_state_dict(released)

    with pytest.raises(RuntimeError, match=r'Unexpected key\(s\).*"dit.not_a_weight"'):
        model.load_state_dict(released | {"not_a_weight": torch.zeros(1)})
    with pytest.raises(RuntimeError, match=r'Missing key\(s\).*"dit.final_layer.linear.weight"'):
        model.load_state_dict({k: v for k, v in released.items() if k != "final_layer.linear.weight"})


class TrainedRun(NamedTuple):
    checkpoint: Path
    model_config: Path
    arguments: dict
    ema: dict[str, torch.Tensor]
    raw: dict[str, torch.Tensor]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_vae_dir, tiny_hf_clip_dir) -> TrainedRun:
    """Two steps of a tiny text-to-image MicroDiT on the tiny VAE's 4 x 8 x 8 latents, with the EMA callback."""
    from composer import Trainer

    from micro_diffusion.training.callbacks import EMA

    folder = tmp_path_factory.mktemp("trained_run")
    arguments = {"vae_name": str(tiny_vae_dir), "text_encoder_name": tiny_hf_clip_dir.name,
                 "dit_arch": "MicroDiT_XXS_2", "latent_res": 8, "in_channels": 4, "pos_interp_scale": 1.0,
                 "dtype": "float32"}
    model_config = folder / "run.yaml"
    model_config.write_text(yaml.safe_dump({"model": arguments, "trainer": {"max_duration": "2ba"}}))
    torch.manual_seed(0)
    model = create_latent_diffusion(**arguments, load_text_encoder_weights=False)
    data = [{"image_latents": torch.randn(4, 8, 8), "caption_latents": torch.randn(1, 77, 32)} for _ in range(4)]
    ema = EMA(smoothing=0.5)
    Trainer(model=model, train_dataloader=DataLoader(data, batch_size=2), max_duration="2ba",
            optimizers=torch.optim.AdamW(model.dit.parameters(), lr=1e-2), callbacks=[ema],
            save_folder=str(folder), save_interval="2ba", device="cpu", progress_bar=False).fit()
    raw = {f"dit.{k}": v.clone() for k, v in model.dit.state_dict().items()}
    return TrainedRun(folder / "latest-rank0.pt", model_config, arguments, dict(ema.weights), raw)


def images_of(model: LatentDiffusion, seed: int = 7) -> torch.Tensor:
    return model.generate(prompt=PROMPTS, seed=seed, **SAMPLING)


def test_export_writes_the_ema_and_loads_with_one_argument(trained_run: TrainedRun, tmp_path: Path, caplog) -> None:
    out = tmp_path / "exported"
    export_main([str(trained_run.checkpoint), str(out), "--model-config", str(trained_run.model_config)])
    description = json.loads((out / MODEL_FOLDER_CONFIG).read_text())
    assert description["weights"] == {"kind": "ema", "source": str(trained_run.checkpoint)}
    assert description["arguments"]["vae_name"] == trained_run.arguments["vae_name"]
    assert description["arguments"]["text_encoder_name"] == trained_run.arguments["text_encoder_name"]
    assert description["latent_statistics"] == {"scale": [0.5], "shift": [0.25]}  # the tiny VAE's config

    model = LatentDiffusion.from_pretrained(out)
    assert not model.training and model.text_encoder is not None
    for name, value in trained_run.ema.items():
        torch.testing.assert_close(model.state_dict()[name], value)

    # generate samples the same model from the folder alone, and from the checkpoint (its EMA), saying so.
    caplog.set_level(logging.INFO)
    generate_main(["--weights", str(out), "--prompt", PROMPTS[0], "--steps", "2", "--out", str(tmp_path / "a.png")])
    assert "EMA weights of the model folder" in caplog.text
    generate_main(["--weights", str(trained_run.checkpoint), "--model-config", str(trained_run.model_config),
                   "--prompt", PROMPTS[0], "--steps", "2", "--out", str(tmp_path / "b.png")])
    assert f"the EMA weights of the checkpoint {trained_run.checkpoint}" in caplog.text
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a.png")), np.asarray(Image.open(tmp_path / "b.png")))


def test_export_raw_weights_and_refuse_a_vae_with_other_statistics(trained_run: TrainedRun, tmp_path: Path,
                                                                    tiny_vae_dir: Path) -> None:
    out = tmp_path / "raw"
    export_main([str(trained_run.checkpoint), str(out), "--model-config", str(trained_run.model_config), "--raw"])
    exported = read_model_folder(out)
    assert exported.weights["kind"] == "raw"
    for name, value in trained_run.raw.items():
        torch.testing.assert_close(exported.state[name.removeprefix("dit.")], value)

    other_vae = tmp_path / "vae_with_stats"
    shutil.copytree(tiny_vae_dir, other_vae)
    save_latent_stats(other_vae, [0.0] * 4, [2.0] * 4)
    with pytest.raises(ValueError, match="was trained on latents normalised with"):
        LatentDiffusion.from_pretrained(out, vae_name=str(other_vae))


def test_export_a_posthoc_ema_from_snapshots(trained_run: TrainedRun, tmp_path: Path) -> None:
    network = {k.removeprefix("dit."): v for k, v in trained_run.raw.items()}
    buffers = [name for name in network if name == "pos_embed"]
    for t_images in (100, 200):
        save_snapshot(tmp_path / "phema", network, t_images, 0.1, buffers)
    out = tmp_path / "posthoc"
    export_main([str(tmp_path / "phema"), str(out), "--model-config", str(trained_run.model_config),
                 "--posthoc-sigma-rel", "0.1"])
    weights = read_model_folder(out).weights
    assert weights["kind"] == "posthoc" and weights["t_images"] == 200 and weights["sigma_rel"] == pytest.approx(0.1)


def test_export_without_an_ema_says_so(trained_run: TrainedRun, tmp_path: Path) -> None:
    raw_only = tmp_path / "raw_only.pt"
    checkpoint = torch.load(trained_run.checkpoint, weights_only=False)
    del checkpoint["state"]["callbacks"]["EMA"]
    torch.save(checkpoint, raw_only)
    with pytest.raises(SystemExit, match="holds no EMA weights.*--raw"):
        export_main([str(raw_only), str(tmp_path / "out"), "--model-config", str(trained_run.model_config)])


def test_diffusers_pipeline_matches_generate_and_round_trips(trained_run: TrainedRun, tmp_path: Path) -> None:
    from micro_diffusion.models.diffusers_pipeline import MicroDiTPipeline

    out = tmp_path / "exported"
    export_main([str(trained_run.checkpoint), str(out), "--model-config", str(trained_run.model_config)])
    pipe = MicroDiTPipeline.from_pretrained(out)
    result = pipe(PROMPTS, generator=torch.Generator().manual_seed(7), **SAMPLING)
    expected = (images_of(LatentDiffusion.from_pretrained(out)) * 255).round().byte().permute(0, 2, 3, 1).numpy()
    assert [image.size for image in result.images] == [(32, 32)] * 2
    assert np.array_equal(np.stack([np.asarray(image) for image in result.images]), expected)
    per_image = pipe(PROMPTS, generator=[torch.Generator().manual_seed(7), torch.Generator().manual_seed(8)],
                     output_type="pt", **SAMPLING).images
    torch.testing.assert_close(per_image, images_of(pipe.model))

    pipe.save_pretrained(tmp_path / "saved")
    again = MicroDiTPipeline.from_pretrained(tmp_path / "saved")
    assert again.weights == pipe.weights and again.arguments == pipe.arguments
    torch.testing.assert_close(again(PROMPTS, generator=torch.Generator().manual_seed(7), output_type="pt",
                                     **SAMPLING).images, per_image)
    fresh = create_latent_diffusion(**trained_run.arguments)
    load_network_state(fresh, read_model_folder(tmp_path / "saved").state)
    torch.testing.assert_close(fresh.dit.final_layer.linear.weight, pipe.model.dit.final_layer.linear.weight)
