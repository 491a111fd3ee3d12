"""The EDM2 U-Net trained through train.py: pixel space, configurations C/E/G, EDM2's training settings.

- Real Fashion-MNIST images go through `precompute --vae pixel` unchanged (pixel "latents" in [-1, 1]).
- `create_latent_diffusion(unet_preset=...)` builds each configuration, trains a step and generates with class
  labels and guidance; labels reach the U-Net one-hot, label dropout gives the null class; unconditional works.
- Forced weight normalisation rewrites the weights in training forwards only, never in evaluation or sampling
  (where the EMA callback swaps its averages in).
- configs/edm2_fashion_mnist.yaml holds EDM2's settings and `model.unet_config` selects the configuration.
- Slow: a tiny class-conditional U-Net trained in-process by train.py on real Fashion-MNIST samples better, by
  the offline Frechet distance, than its first checkpoint (numbers in its docstring).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file
from torch import nn

from micro_diffusion.data.convert import convert
from micro_diffusion.data.loader import StreamingLatentsDataset, make_streams
from micro_diffusion.data.precompute import precompute
from micro_diffusion.data.sources.fashion_mnist import FASHION_MNIST_DIR, iter_fashion_mnist, load_fashion_mnist
from micro_diffusion.eval.features import get_feature_extractor
from micro_diffusion.eval.frechet import compute_feature_statistics, frechet_distance
from micro_diffusion.models.edm2_unet import HeConv
from micro_diffusion.models.model import LatentDiffusion, UNetNetwork, create_latent_diffusion
from micro_diffusion.models.mp_layers import MPConv
from micro_diffusion.training.config import ConfigError, RunConfig, load_run_config
from micro_diffusion.training.optim import InverseSqrtScheduler

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import train  # noqa: E402  (the training script at the repository root)

CONFIG = "edm2_fashion_mnist"
TINY_UNET = dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8], channels_per_head=16,
                 dropout=0.0)


def tiny_model(config: str = "G", num_classes: int | None = 10, **overrides) -> LatentDiffusion:
    torch.manual_seed(0)
    arguments = dict(
        vae_name="pixel", text_encoder_name=None, num_classes=num_classes, latent_res=16, in_channels=3,
        dtype="float32", sigma_data=0.5, p_mean=-0.8, p_std=1.6, learned_loss_weighting=True,
        unet_preset="cifar-XXS", unet_config=config, unet_kwargs=TINY_UNET,
    )
    return create_latent_diffusion(**(arguments | overrides))


def pixel_batch(batch_size: int = 4) -> dict:
    generator = torch.Generator().manual_seed(1)
    return {
        "image_latents": torch.rand(batch_size, 3, 16, 16, generator=generator) * 2 - 1,
        "label": torch.arange(batch_size) % 10,
        "drop_caption_mask": torch.ones(batch_size),
    }


def compose_run(*overrides: str) -> RunConfig:
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base=None):
        return load_run_config(compose(config_name=CONFIG, overrides=list(overrides)))


def fashion_mnist_available() -> None:
    """The slow test and the pixel round trip need the real data: fail (never skip) when it is missing."""
    if not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.fail("Fashion-MNIST is missing: run `scripts/get_offline_data.sh fashion_mnist`")


# ----------------------------------------------------------------------------------------------------------------
# Pixel space
# ----------------------------------------------------------------------------------------------------------------


def test_pixel_autoencoder_round_trips_real_images_through_precompute(tmp_path, tiny_hf_clip_dir):
    """At the native 28 px, `precompute --vae pixel` stores the images themselves in [-1, 1] (grey repeated to
    RGB), and the model's pixel autoencoder decodes them back to the same 8-bit values."""
    fashion_mnist_available()
    convert(iter_fashion_mnist(split="test"), tmp_path / "mds", limit=8, progress=False)
    precompute(tmp_path / "mds", tmp_path / "pixels", resolutions=(28,), vae="pixel",
               text_encoder=tiny_hf_clip_dir.name, num_workers=0, progress=False)
    dataset = StreamingLatentsDataset(make_streams([str(tmp_path / "pixels")]), image_size=28, latent_channels=3,
                                      latent_downsample=1, caption_length=77, caption_channels=32, shuffle=False)
    latents = torch.stack([dataset[i]["image_latents"] for i in range(8)])
    images, labels = load_fashion_mnist(FASHION_MNIST_DIR, "test")
    expected = torch.from_numpy(images[:8].astype(np.float32))[:, None].expand(-1, 3, -1, -1)
    torch.testing.assert_close((latents + 1) * 127.5, expected, atol=0.07, rtol=0)  # float16 storage
    assert [dataset[i]["label"] for i in range(8)] == labels[:8].tolist()
    vae = tiny_model().vae
    assert (vae.latent_channels, vae.downsample_factor) == (3, 1)
    decoded = (vae.decode(latents) + 1) / 2  # what generate() returns
    torch.testing.assert_close((decoded * 255).round(), expected, atol=0, rtol=0)


# ----------------------------------------------------------------------------------------------------------------
# The U-Net in LatentDiffusion
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", ["C", "E", "G"])
def test_each_configuration_trains_a_step_and_generates_with_labels_and_guidance(config):
    model = tiny_model(config)
    assert isinstance(model.dit, UNetNetwork) and model.dit.unet.config == config
    assert model.label_embedder is None, "labels are embedded by the U-Net's own label layer"
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.9, 0.99))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    batch = pixel_batch()
    for _ in range(2):  # G's zero-initialised output gain passes gradients upstream from the second step on
        optimizer.zero_grad()
        loss = model.loss(model(batch), batch)
        loss.backward()
        optimizer.step()
        assert torch.isfinite(loss)
    unchanged = [name for name, p in model.named_parameters() if torch.equal(p, before[name])]
    assert unchanged == [], "every parameter, the loss weighting's and the label layer's included, trains"

    model.eval()
    images = model.generate(class_labels=[3, 7], seeds=[5, 5], guidance_scale=2.0, num_inference_steps=3)
    assert images.shape == (2, 3, 16, 16) and 0 <= images.min() and images.max() <= 1
    assert not torch.allclose(images[0], images[1]), "the class changes the sample"
    again = model.generate(class_labels=[3], seeds=[5], guidance_scale=2.0, num_inference_steps=3)
    torch.testing.assert_close(again[0], images[0], atol=1e-4, rtol=0)  # batch size only changes rounding


def test_labels_reach_the_unet_one_hot_and_dropped_labels_are_the_null_class():
    model = tiny_model()
    batch = pixel_batch() | {"drop_caption_mask": torch.tensor([1.0, 0.0, 1.0, 1.0])}
    condition = model.caption_latents(batch)
    expected = torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 3]), 10).float()
    expected[1] = 0
    torch.testing.assert_close(condition, expected[:, None, None, :])
    seen = []
    model.dit.unet.embedding.register_forward_hook(lambda module, inputs, output: seen.append(inputs[1]))
    model(batch)
    torch.testing.assert_close(seen[0], expected)
    with pytest.raises(ValueError, match=r"class labels must be in \[0, 10\)"):
        model.label_condition(torch.tensor([10]))


def test_unconditional_unet_trains_and_generates_from_seeds():
    model = tiny_model(num_classes=None)
    assert model.unconditional and model.dit.unet.label_dim == 0
    batch = pixel_batch()
    assert model.caption_latents(batch).shape == (4, 1, 1, 0)
    model.loss(model(batch), batch).backward()
    images = model.eval().generate(seeds=[0, 1], guidance_scale=1.0, num_inference_steps=2)
    assert images.shape == (2, 3, 16, 16)
    with pytest.raises(ValueError, match="unconditional model generates one image per seed"):
        model.generate(class_labels=[1], seeds=[0], guidance_scale=1.0)
    with pytest.raises(ValueError, match="guidance_scale=1.0"):
        model.generate(seeds=[0])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(dit_kwargs={"patch_size": 1}), "configure the MicroDiT, which unet_preset replaces"),
        (dict(train_mask_ratio=0.5), "configure the MicroDiT, which unet_preset replaces"),
        (dict(train_route_ratio=0.5), "configure the MicroDiT, which unet_preset replaces"),
        (dict(pos_interp_scale=2), r"^pos_interp_scale=2 configure the MicroDiT, which unet_preset replaces"),
        (dict(label_embedding_dim=64, use_caption_mask=True), "label_embedding_dim=64, use_caption_mask=True"),
        (dict(text_encoder_name="minilm", num_classes=None), "set text_encoder_name to None"),
        (dict(unet_kwargs={"img_resolution": 32}), r"\['img_resolution'\] are set by latent_res"),
        (dict(unet_preset=None), r"^unet_config='G', unet_kwargs=.* configure the EDM2 U-Net: set unet_preset too"),
        (dict(unet_config="F"), "config must be one of"),
        (dict(unet_preset="cifar-XXXL"), "unknown EDM2 U-Net preset"),
    ],
)
def test_settings_that_do_not_apply_to_the_unet_are_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_model(**overrides)


def test_forced_weight_normalisation_only_in_training_forwards():
    """MPConv renormalises its stored weights in a training forward only: evaluation (where the EMA callback swaps
    its averages in) and sampling leave them as they are."""
    model = tiny_model("G")
    layers = [m for m in model.modules() if isinstance(m, MPConv)]
    with torch.no_grad():
        for layer in layers:
            layer.weight.mul_(3.0)  # rows of RMS about 3, as an average of weights might hold
    stored = [layer.weight.detach().clone() for layer in layers]
    batch = pixel_batch()
    model.eval()
    model.eval_forward(batch)
    model.generate(class_labels=[1], seeds=[0], num_inference_steps=2)
    for layer, weight in zip(layers, stored):
        torch.testing.assert_close(layer.weight, weight, rtol=0, atol=0)
    model.train()
    model(batch)
    for layer in layers:
        row_rms = layer.weight.flatten(1).square().mean(dim=1).sqrt()
        torch.testing.assert_close(row_rms, torch.ones_like(row_rms), atol=1e-3, rtol=0)


# ----------------------------------------------------------------------------------------------------------------
# The config
# ----------------------------------------------------------------------------------------------------------------


def test_the_config_holds_edm2_training_settings():
    run = compose_run()
    assert run.model["unet_preset"] == "cifar-XXS" and run.model["unet_config"] == "G"
    assert (run.model["sigma_data"], run.model["p_mean"], run.model["p_std"]) == (0.5, -0.8, 1.6)
    assert run.model["learned_loss_weighting"] is True and run.model["vae_name"] == "pixel"
    assert (run.optimizer.betas, run.optimizer.weight_decay) == ([0.9, 0.99], 0.0)
    assert run.algorithms.gradient_clipping is None
    scheduler = train.scheduler_entry(run)
    assert scheduler[0] is InverseSqrtScheduler and all(time.endswith("sp") for time in scheduler[1].values())
    assert run.callbacks["power_ema"]["sigma_rels"] == [0.05, 0.10]
    for interval in (run.trainer.max_duration, run.trainer.eval_interval, run.trainer.save_interval):
        assert interval.endswith("sp"), "training time and intervals are counted in images"
    train.check_run(run)


@pytest.mark.parametrize(("config", "layer"), [("C", HeConv), ("E", MPConv), ("G", MPConv)])
def test_one_key_selects_the_configuration(config, layer):
    run = compose_run(f"model.unet_config={config}", "model.latent_res=16", "data.image_size=16",
                      "+model.unet_kwargs={model_channels: 16, channel_mult: [1, 2], channels_per_head: 16}")
    network = create_latent_diffusion(**run.model).dit.unet
    assert network.config == config and isinstance(network.input_conv, layer)
    assert any(isinstance(m, nn.GroupNorm) for m in network.modules()) == (config != "G")
    assert network.label_dim == 10 and network.img_channels == 3


@pytest.mark.parametrize(
    "key", ["+model.dit_arch=MicroDiT_XXS_2", "+model.train_mask_ratio=0.0", "+model.train_route_ratio=0.0"]
)
def test_microdit_keys_with_the_unet_are_errors(key):
    with pytest.raises(ConfigError, match=rf"model\.{key[7:].split('=')[0]}: configures the MicroDiT"):
        train.check_run(compose_run(key))


# ----------------------------------------------------------------------------------------------------------------
# Fashion-MNIST
# ----------------------------------------------------------------------------------------------------------------

BATCH, STEPS, CHECKPOINTS = 64, 400, 10
IMAGES = BATCH * STEPS  # 25,600 images: about 3 epochs of the 8,000 training images
NUM_SAMPLES, NUM_REFERENCE = 250, 500


def fashion_mnist_pixels(root: Path, resolution: int) -> Path:
    """Real Fashion-MNIST through convert and `precompute --vae pixel`: 8,000 training and 500 held-out test
    images at `resolution` px, in root/pixels/{train,test}."""
    for split, count in (("train", 8000), ("test", NUM_REFERENCE)):
        convert(iter_fashion_mnist(split=split), root / "mds" / split, limit=count, progress=False)
        precompute(root / "mds" / split, root / "pixels" / split, resolutions=(resolution,), vae="pixel",
                   text_encoder="minilm", num_workers=0, progress=False)
    return root / "pixels"


@pytest.mark.slow
@pytest.mark.timeout(1800)  # two launched trainings and sampling: past 900 s on a loaded 2-core machine
def test_tiny_unet_trained_on_fashion_mnist_samples_better_than_its_first_checkpoint(tmp_path):
    """train.py (in-process, one CPU thread) trains a tiny class-conditional U-Net in config G (16 channels, levels
    16, 8 and 4 px, 0.32M parameters) on 16-px Fashion-MNIST pixels with EDM2's settings for 25,600 images (400
    steps of 64), every time in images: LR reference 6,400 and warm-up 1,280 images, checkpoints and power-EMA
    snapshots every 2,560. Frechet distance (EfficientNet-Lite0 features) of 250 class-balanced samples (10 Heun
    steps, no guidance) to 500 held-out test images, measured: 300 at the first checkpoint (2,560 images), 185 at
    the last (similar runs: 294 -> 170 after 32,000 images; 268 -> 151 with 32 channels). About 4.5 minutes, 3
    of them training."""
    fashion_mnist_available()
    pixels = fashion_mnist_pixels(tmp_path, resolution=16)
    every = IMAGES // CHECKPOINTS
    run = compose_run(
        f"data.datadir={pixels}", "data.image_size=16", "model.latent_res=16", f"data.train_batch_size={BATCH}",
        "data.eval_streams=null", "data.eval_batch_size=null", "trainer.eval_interval=null", "data.num_workers=0",
        "data.prefetch_factor=null", "data.persistent_workers=false", "data.pin_memory=false", "model.dtype=float32",
        "trainer.device=cpu", "trainer.precision=fp32", "trainer.progress_bar=false", "callbacks.image_grid=null",
        "logger.tensorboard=null", f"trainer.save_folder={tmp_path}/run", "trainer.save_num_checkpoints_to_keep=-1",
        "+model.unet_kwargs={model_channels: 16, channel_mult: [1, 2, 2], num_blocks: 1, attn_resolutions: [8], "
        "channels_per_head: 16, dropout: 0.0}",
        "optimizer.lr=0.01", f"scheduler.t_ref={IMAGES // 4}sp", f"scheduler.t_warmup={IMAGES // 20}sp",
        f"trainer.max_duration={IMAGES}sp", f"trainer.save_interval={every}sp",
        f"callbacks.power_ema.snapshot_interval_images={every}",
    )
    trainer = train.train(run)
    assert int(trainer.state.timestamp.batch) == STEPS
    assert trainer.state.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.01 / math.sqrt(4), rel=0.01)
    steps_per_checkpoint = STEPS // CHECKPOINTS
    first = tmp_path / "run" / f"ep0-ba{steps_per_checkpoint}-rank0.pt"
    snapshots = sorted(path.name for path in (tmp_path / "run" / "phema").glob("*-0.100.safetensors"))
    assert snapshots == [f"phema-{every * k:012d}-0.100.safetensors" for k in range(1, CHECKPOINTS + 1)]
    load_file(tmp_path / "run" / "phema" / snapshots[-1])  # a network state dict, for post-hoc reconstruction

    extractor = get_feature_extractor("efficientnet-lite0")
    test_set = StreamingLatentsDataset(make_streams([str(pixels / "test")]), image_size=16, latent_channels=3,
                                       latent_downsample=1, caption_length=32, caption_channels=384, shuffle=False)
    real = torch.stack([test_set[i]["image_latents"] for i in range(NUM_REFERENCE)])
    reference = compute_feature_statistics((real + 1) / 2, extractor)
    model = trainer.state.model.eval()
    distances = {}
    for name, checkpoint in (("first", first), ("final", tmp_path / "run" / "latest-rank0.pt")):
        model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=False)["state"]["model"])
        images = model.generate(class_labels=[i % 10 for i in range(NUM_SAMPLES)], seed=0, guidance_scale=1.0,
                                num_inference_steps=10)
        distances[name] = frechet_distance(reference, compute_feature_statistics(images, extractor))
    assert distances["final"] < 0.75 * distances["first"], distances
