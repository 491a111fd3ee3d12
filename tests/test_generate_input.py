"""Generate questions its input (issue 18): an empty or over-long prompt is reported, a seed torch cannot take is
named, and a missing weights file fails before the model (its autoencoder and text encoder) is built."""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from micro_diffusion.cli import evaluate, generate
from micro_diffusion.diffusion.samplers import check_seeds, noise_from_seeds
from micro_diffusion.encoders.text import load_text_encoder, prompt_warnings
from micro_diffusion.models import sampling
from micro_diffusion.models.model import LatentDiffusion, create_latent_diffusion

LONG_PROMPT = "a " * 2800  # 2,800 one-token words


@pytest.fixture(scope="module")
def model(tiny_vae_dir, tiny_hf_clip_dir) -> LatentDiffusion:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return create_latent_diffusion(
            vae_name=str(tiny_vae_dir), text_encoder_name=tiny_hf_clip_dir.name, dit_arch="MicroDiT_XXS_2",
            latent_res=8, in_channels=4, dtype="float32",
        ).eval()


@pytest.mark.parametrize("fixture", ["tiny_openclip_checkpoint", "tiny_hf_clip_dir", "tiny_t5_dir"])
def test_every_text_encoder_reports_empty_and_cut_prompts(fixture: str, request: pytest.FixtureRequest) -> None:
    tiny = request.getfixturevalue(fixture)
    encoder = load_text_encoder(tiny.name)
    messages = prompt_warnings(encoder, ["a red circle", " ", LONG_PROMPT])
    assert len(messages) == 2
    assert messages[0].startswith("prompt 1 is empty")
    assert f"cut to the text encoder's {tiny.max_length} tokens" in messages[1] and "prompt 2" in messages[1]
    assert prompt_warnings(encoder, ["a red circle"]) == []


def test_generate_warns_of_an_empty_prompt_and_of_the_tokens_it_drops(model: LatentDiffusion) -> None:
    with pytest.warns(UserWarning) as caught:
        model.generate(prompt=["", LONG_PROMPT], seed=0, num_inference_steps=1)
    messages = [str(warning.message) for warning in caught]
    assert any(message.startswith("prompt 0 is empty") for message in messages), messages
    # CLIP: start token + 2,800 words + end token, cut to 77 -> 2,725 dropped.
    assert any("prompt 1 (2800 words) is 2802 tokens long: cut to the text encoder's 77 tokens, the last 2725 "
               "dropped" in message for message in messages), messages
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.generate(prompt="a red circle", seed=0, num_inference_steps=1)


@pytest.mark.parametrize("seed", [2**64, -1])
def test_a_seed_torch_cannot_take_is_named(model: LatentDiffusion, seed: int) -> None:
    with pytest.raises(ValueError, match=rf"seed {seed} is out of range: seeds are integers in \[0, 2\*\*64\)"):
        model.generate(prompt="a red circle", seed=seed, num_inference_steps=1)
    with pytest.raises(ValueError, match=rf"seed {seed} is out of range"):
        noise_from_seeds([0, seed], (2,))


def test_the_last_image_of_a_batch_needs_a_valid_seed_too() -> None:
    check_seeds(range(2**64 - 2, 2**64))
    with pytest.raises(ValueError, match=rf"seed {2**64} is out of range"):
        check_seeds(range(2**64 - 2, 2**64 + 1))
    with pytest.raises(TypeError, match=r"seed 1\.5 is not an integer"):
        check_seeds([1.5])


@pytest.fixture
def model_config(tmp_path: Path) -> Path:
    """An unconditional pixel-space U-Net described by a model config: nothing to load until it is built."""
    arguments = {"vae_name": "identity", "text_encoder_name": None, "num_classes": None, "latent_res": 8,
                 "in_channels": 3, "dtype": "float32", "unet_preset": "cifar-XXS"}
    path = tmp_path / "model.yaml"
    path.write_text(yaml.safe_dump(arguments))
    return path


@pytest.fixture
def nothing_is_built(monkeypatch: pytest.MonkeyPatch) -> None:
    @functools.wraps(create_latent_diffusion)  # the same signature: the model config is checked against it
    def build(**arguments):
        raise AssertionError("the model was built")

    monkeypatch.setattr(sampling, "create_latent_diffusion", build)


@pytest.mark.usefixtures("nothing_is_built")
def test_a_missing_weights_file_fails_before_the_model_is_built(model_config: Path, tmp_path: Path) -> None:
    missing = tmp_path / "missing.pt"
    with pytest.raises(FileNotFoundError, match=rf"weights file {missing} does not exist"):
        generate.main(["--weights", str(missing), "--model-config", str(model_config), "--num-images", "1",
                       "--out", str(tmp_path / "grid.png")])
    with pytest.raises(FileNotFoundError, match=rf"weights file {missing} does not exist"):
        evaluate.main(["--weights", str(missing), "--model-config", str(model_config), "--num-samples", "2",
                       "--reference-source", "shapes", "--out", str(tmp_path / "eval")])


@pytest.mark.usefixtures("nothing_is_built")
def test_the_commands_refuse_a_bad_seed_before_the_model_is_built(
    model_config: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    weights = tmp_path / "weights.safetensors"
    weights.touch()
    with pytest.raises(SystemExit):
        generate.main(["--weights", str(weights), "--model-config", str(model_config), "--num-images", "2",
                       "--seed", str(2**64 - 1), "--out", str(tmp_path / "grid.png")])
    assert f"seed {2**64} is out of range: seeds are integers in [0, 2**64)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate.main(["--weights", str(weights), "--model-config", str(model_config), "--num-samples", "2",
                       "--seed", "-3", "--reference-source", "shapes", "--out", str(tmp_path / "eval")])
    assert "seed -3 is out of range" in capsys.readouterr().err
