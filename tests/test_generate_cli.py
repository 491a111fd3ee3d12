"""`generate` and `eval` on class-conditional and unconditional models described by --model-config.

- A tiny class-conditional EDM2 U-Net in pixel space: weights written by `micro-diffusion posthoc-ema` from its
  snapshots load as they are; `generate --class-label` and `eval --prompts classes` sample exactly what
  LatentDiffusion.generate does (sample i: class i mod num_classes, seed seed + i) and FD is reported with its
  protocol.
- An unconditional U-Net samples from --num-images seeds with guidance 1.
- The model config: top level or under `model:` of a composed training config; the flags given override it;
  unknown keys, interpolations, raw Hydra configs and conditions that do not fit the model are clear errors.
- A class-conditional MicroDiT loads its learned label embedding with its network weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file
from torchvision.utils import save_image

from micro_diffusion.cli import evaluate
from micro_diffusion.cli.evaluate import main as eval_main
from micro_diffusion.cli.evaluate import parse_args as eval_args
from micro_diffusion.cli.generate import main as generate_main
from micro_diffusion.cli.generate import parse_args as generate_args
from micro_diffusion.cli.posthoc_ema import main as posthoc_main
from micro_diffusion.diffusion.power_ema import save_snapshot
from micro_diffusion.eval.features import get_feature_extractor
from micro_diffusion.eval.report import save_sample_grid
from micro_diffusion.models.checkpoints import save_dit_weights
from micro_diffusion.models.model import LatentDiffusion, create_latent_diffusion
from micro_diffusion.models.sampling import load_weights

REPO = Path(__file__).resolve().parents[1]
TINY_UNET: dict[str, Any] = {
    "vae_name": "identity",
    "text_encoder_name": None,
    "num_classes": 10,
    "latent_res": 8,
    "in_channels": 3,
    "dtype": "float32",
    "sigma_data": 0.5,
    "unet_preset": "cifar-XXS",
    "unet_config": "G",
    "unet_kwargs": {"model_channels": 16, "num_blocks": 1, "channel_mult": [1, 2], "attn_resolutions": [],
                    "channels_per_head": 16, "dropout": 0.0},
}


class TinyRun(NamedTuple):
    """A trained-looking model, the YAML file describing it and its weights file."""

    model: LatentDiffusion
    config: Path
    weights: Path


def tiny_unet(**overrides) -> LatentDiffusion:
    """The TINY_UNET model with perturbed weights (G's zero output gain would make every sample alike)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = create_latent_diffusion(**(TINY_UNET | overrides))
        with torch.no_grad():
            for parameter in model.dit.parameters():
                parameter.add_(torch.randn_like(parameter) * 0.2)
    return model.eval()


def write_yaml(path: Path, values: Any) -> Path:
    path.write_text(yaml.safe_dump(values))
    return path


def png_pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=np.int16)


@pytest.fixture(scope="module")
def class_run(tmp_path_factory: pytest.TempPathFactory) -> TinyRun:
    """The class-conditional U-Net; its config under `model:` of a run config (whose other sections, even with
    interpolations, are ignored); its weights reconstructed by `posthoc-ema` from PowerEMA-style snapshots."""
    folder = tmp_path_factory.mktemp("class_unet")
    model = tiny_unet()
    state = model.dit.state_dict()
    buffers = [name for name, _ in model.dit.named_buffers()]
    for t_images in (1000, 2000):
        for sigma_rel in (0.05, 0.10):
            save_snapshot(folder / "phema", state, t_images, sigma_rel, buffers)
    weights = folder / "ema.safetensors"
    posthoc_main([str(folder / "phema"), "--sigma-rel", "0.10", "--output", str(weights)])
    run_config = {"exp_name": "tiny", "model": TINY_UNET, "callbacks": {"image_grid": {"seed": "${seed}"}}}
    return TinyRun(model, write_yaml(folder / "run.yaml", run_config), weights)


@pytest.fixture(scope="module")
def unconditional_run(tmp_path_factory: pytest.TempPathFactory) -> TinyRun:
    """The unconditional U-Net; its config at top level; its weights saved by save_dit_weights."""
    folder = tmp_path_factory.mktemp("unconditional_unet")
    model = tiny_unet(num_classes=None)
    weights = save_dit_weights(model.dit, folder / "unet.safetensors")
    return TinyRun(model, write_yaml(folder / "model.yaml", TINY_UNET | {"num_classes": None}), weights)


# --------------------------------------------------------------------------------------------------------------
# generate
# --------------------------------------------------------------------------------------------------------------


def test_generate_class_labels_from_posthoc_ema_weights(class_run: TinyRun, tmp_path: Path) -> None:
    out = tmp_path / "grid.png"
    generate_main(["--weights", str(class_run.weights), "--model-config", str(class_run.config),
                   "--class-label", "3", "--class-label", "7", "--steps", "2", "--guidance", "2", "--seed", "5",
                   "--out", str(out)])
    expected = class_run.model.generate(class_labels=[3, 7], seeds=[5, 6], guidance_scale=2.0, num_inference_steps=2)
    save_image(expected, tmp_path / "expected.png", nrow=1)
    pixels = png_pixels(out)
    assert pixels.shape == (2 * 8 + 3 * 2, 8 + 2 * 2, 3)  # one column of two 8 px images, 2 px padding
    assert np.abs(pixels - png_pixels(tmp_path / "expected.png")).max() <= 1  # post-hoc EMA = the weights
    assert not torch.allclose(expected[0], expected[1]), "the class label changes the sample"
    settings = json.loads(out.with_suffix(".json").read_text())
    assert settings["model"]["unet_preset"] == "cifar-XXS" and settings["model"]["num_classes"] == 10
    assert settings["conditioning"] == "class" and settings["class_label"] == [3, 7]


def test_generate_unconditional_images_from_seeds(unconditional_run: TinyRun, tmp_path: Path) -> None:
    out = tmp_path / "grid.png"
    generate_main(["--weights", str(unconditional_run.weights), "--model-config", str(unconditional_run.config),
                   "--num-images", "3", "--steps", "2", "--seed", "10", "--out", str(out)])
    expected = unconditional_run.model.generate(seeds=[10, 11, 12], guidance_scale=1.0, num_inference_steps=2)
    save_image(expected, tmp_path / "expected.png", nrow=1)
    assert np.array_equal(png_pixels(out), png_pixels(tmp_path / "expected.png"))
    assert json.loads(out.with_suffix(".json").read_text())["guidance"] == 1.0  # the unconditional default


def test_flags_given_override_the_model_config(class_run: TinyRun) -> None:
    args = generate_args(["--weights", "w.safetensors", "--model-config", str(class_run.config),
                          "--latent-res", "16", "--class-label", "1"])
    assert args.model["latent_res"] == 16 and args.model["unet_preset"] == "cifar-XXS"
    assert args.model["p_mean"] == -0.6, "keys the file leaves out take create_latent_diffusion's defaults"
    assert args.guidance == 5.0
    released = generate_args(["--weights", "w.safetensors", "--prompt", "a cat", "--latent-res", "32"]).model
    assert released["latent_res"] == 32 and released["pos_interp_scale"] == 2.0, "else the released model's"
    assert released["dit_arch"] == "MicroDiT_XL_2" and released["num_classes"] is None


@pytest.mark.parametrize("config_name", ["edm2_fashion_mnist", "minildm_fashion_mnist"])
def test_a_composed_resolved_training_config_describes_its_model(config_name: str, tmp_path: Path) -> None:
    """What `train.py --cfg job --resolve` prints (composed, resolved) is a valid --model-config."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    import micro_diffusion.training.config  # noqa: F401  (registers the run schema the configs start from)

    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base=None):
        config = compose(config_name=config_name)
    OmegaConf.resolve(config)
    path = tmp_path / "run.yaml"
    path.write_text(OmegaConf.to_yaml(config))
    args = generate_args(["--weights", "w.safetensors", "--model-config", str(path), "--class-label", "1"])
    section = OmegaConf.to_container(config.model)
    assert {key: args.model[key] for key in section} == section
    assert args.conditioning == "class"


# --------------------------------------------------------------------------------------------------------------
# eval
# --------------------------------------------------------------------------------------------------------------


def test_eval_cycles_class_labels_and_reports_fd_with_its_protocol(class_run: TinyRun, tmp_path: Path) -> None:
    reference = tmp_path / "reference"
    reference.mkdir()
    generator = np.random.default_rng(0)
    for index in range(10):
        pixels = generator.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(reference / f"{index:02d}.png")
    out = tmp_path / "eval"
    eval_main(["--weights", str(class_run.weights), "--model-config", str(class_run.config),
               "--prompts", "classes", "--metrics", "fd", "--num-samples", "10", "--batch-size", "4",
               "--steps", "2", "--reference-source", "folder", "--reference-option", f"root={reference}",
               "--reference-count", "10", "--cache-dir", str(tmp_path / "cache"), "--out", str(out)])
    report = json.loads((out / "report.json").read_text())
    (record,) = report["results"]
    assert record["metric"] == "fd_efficientnet-lite0" and record["value"] > 0
    assert record["num_samples"] == 10 and record["guidance"] == 5.0 and record["seed"] == 0
    assert "10 images, 8px" in record["reference_set"]
    assert record["conditioning"] == "class labels: sample i gets i mod 10"
    expected = class_run.model.generate(class_labels=list(range(10)), seeds=list(range(10)), num_inference_steps=2)
    save_sample_grid(expected, tmp_path / "expected.png")
    assert np.abs(png_pixels(out / report["sample_grid"]) - png_pixels(tmp_path / "expected.png")).max() <= 1


def test_eval_sweeps_posthoc_ema_lengths_by_fd(class_run: TinyRun, tmp_path: Path, monkeypatch) -> None:
    """`eval --posthoc-snapshots`: one FD record per sigma_rel under one protocol, and the sweep's table and plot;
    the feature extractor is built once for the whole sweep."""
    extractors = []

    def counted_extractor(*args, **kwargs):
        extractors.append(get_feature_extractor(*args, **kwargs))
        return extractors[-1]

    monkeypatch.setattr(evaluate, "get_feature_extractor", counted_extractor)
    reference = tmp_path / "reference"
    reference.mkdir()
    generator = np.random.default_rng(1)
    for index in range(10):
        Image.fromarray(generator.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)).save(reference / f"{index}.png")
    out = tmp_path / "sweep"
    eval_main(["--posthoc-snapshots", str(class_run.config.parent / "phema"), "--sigma-rels", "0.05,0.1",
               "--model-config", str(class_run.config), "--metrics", "fd", "--num-samples", "10", "--batch-size", "10",
               "--steps", "2", "--reference-source", "folder", "--reference-option", f"root={reference}",
               "--reference-count", "10", "--cache-dir", str(tmp_path / "cache"), "--out", str(out)])
    report = json.loads((out / "report.json").read_text())
    metrics = [record["metric"] for record in report["results"]]
    assert metrics == [f"fd_efficientnet-lite0@sigma_rel={s},images=2000" for s in ("0.050", "0.100")]
    assert all(r["value"] > 0 and r["num_samples"] == 10 and r["conditioning"].startswith("class labels")
               for r in report["results"])
    table = json.loads((out / "posthoc_sweep.json").read_text())
    assert [row["fd_efficientnet-lite0"] for row in table["rows"]] == [r["value"] for r in report["results"]]
    assert (out / "posthoc_sweep.png").stat().st_size > 0 and (out / "posthoc_sweep.csv").exists()
    assert len(extractors) == 1
    with pytest.raises(SystemExit):
        eval_main(["--weights", str(class_run.weights), "--posthoc-snapshots", str(out), "--sigma-rels", "0.1",
                   "--model-config", str(class_run.config)])


def test_eval_defaults_fit_the_model(class_run: TinyRun, unconditional_run: TinyRun) -> None:
    common = ["--weights", "w.safetensors", "--reference-source", "folder"]
    classes = eval_args([*common, "--model-config", str(class_run.config)])
    assert classes.prompts == "classes" and classes.metrics == ["fd", "kid"]
    unconditional = eval_args([*common, "--model-config", str(unconditional_run.config)])
    assert unconditional.prompts is None and unconditional.guidance == 1.0
    text = eval_args(common)
    assert text.prompts == "shapes" and text.metrics == ["fd", "kid", "shapes"]


# --------------------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------------------


def bad_config(tmp_path: Path, name: str) -> Path:
    """Model configs that must be refused."""
    contents = {
        "unknown": {"model": TINY_UNET | {"unet_presets": "cifar-XS"}},
        "interpolation": TINY_UNET | {"latent_res": "${data.image_size}"},
        "raw": {"defaults": ["base/edm2", "_self_"], "model": TINY_UNET},
        "list": [TINY_UNET],
    }[name]
    return write_yaml(tmp_path / f"{name}.yaml", contents)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("unknown", "model.unet_presets: unknown key; create_latent_diffusion takes"),
        ("interpolation", "model.latent_res is an interpolation ('${data.image_size}')"),
        ("raw", "raw Hydra config"),
        ("list", "must hold a mapping"),
    ],
)
def test_bad_model_configs_name_the_problem(config: str, message: str, tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit):
        generate_args(["--weights", "w.safetensors", "--model-config", str(bad_config(tmp_path, config)),
                       "--class-label", "1"])
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("run", "arguments", "message"),
    [
        ("class", ["--prompt", "a cat"], "the model is class-conditional: it samples from --class-label, not --prompt"),
        ("unconditional", ["--class-label", "1"], "the model is unconditional: it samples from --num-images"),
        ("unconditional", ["--num-images", "2", "--guidance", "2"], "--guidance must be 1.0"),
        ("released", ["--class-label", "1"], "the model is text-to-image: it samples from --prompt, not --class-label"),
        ("released", ["--prompt", "a", "--class-label", "1"], "not allowed with argument"),
    ],
)
def test_generate_refuses_conditions_that_do_not_fit_the_model(
    run: str, arguments: list[str], message: str, class_run: TinyRun, unconditional_run: TinyRun, capsys
) -> None:
    config = {"class": ["--model-config", str(class_run.config)],
              "unconditional": ["--model-config", str(unconditional_run.config)], "released": []}[run]
    with pytest.raises(SystemExit):
        generate_args(["--weights", "w.safetensors", *config, *arguments])
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("run", "arguments", "message"),
    [
        ("class", ["--metrics", "fd", "clip"], "against their text prompts, and the model is class-conditional"),
        ("class", ["--prompts", "shapes"], "a class-conditional model takes --prompts classes, not shapes"),
        ("unconditional", ["--prompts", "classes"], "an unconditional model samples from seeds alone"),
        ("released", ["--prompts", "classes"], "--prompts classes needs a class-conditional model"),
    ],
)
def test_eval_refuses_prompts_and_metrics_that_do_not_fit_the_model(
    run: str, arguments: list[str], message: str, class_run: TinyRun, unconditional_run: TinyRun, capsys
) -> None:
    config = {"class": ["--model-config", str(class_run.config)],
              "unconditional": ["--model-config", str(unconditional_run.config)], "released": []}[run]
    with pytest.raises(SystemExit):
        eval_args(["--weights", "w.safetensors", "--reference-source", "folder", *config, *arguments])
    assert message in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------------------
# A class-conditional MicroDiT
# --------------------------------------------------------------------------------------------------------------


def test_a_class_conditional_microdit_loads_its_label_embedding(tmp_path: Path) -> None:
    def build(seed: int) -> LatentDiffusion:
        torch.manual_seed(seed)
        return create_latent_diffusion(vae_name="identity", text_encoder_name=None, num_classes=4,
                                       label_embedding_dim=32, dit_arch="MicroDiT_XXS_2", latent_res=8,
                                       in_channels=3, dit_kwargs={"patch_size": 1}, dtype="float32")

    trained, fresh = build(0), build(1)
    state = {f"dit.{key}": value for key, value in trained.dit.state_dict().items()}
    path = tmp_path / "model.safetensors"  # a LatentDiffusion state dict: network and label embedding
    save_file(state | {"label_embedder.weight": trained.label_embedder.weight.detach()}, str(path))
    load_weights(fresh, path)
    torch.testing.assert_close(fresh.label_embedder.weight, trained.label_embedder.weight)
    torch.testing.assert_close(fresh.dit.final_layer.linear.weight, trained.dit.final_layer.linear.weight)
    with pytest.raises(KeyError, match="holds no label embedding"):
        load_weights(fresh, save_dit_weights(trained.dit, tmp_path / "network.safetensors"))
