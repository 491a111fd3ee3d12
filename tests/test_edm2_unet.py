"""EDM2 U-Net: preset sizes, configurations C/E/G, conditioning, preconditioning and a short training run."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from micro_diffusion.diffusion.edm import edm_loss, precondition, sample_training_sigmas
from micro_diffusion.models.edm2_unet import EDM2Denoiser, EDM2UNet, create_edm2_unet
from micro_diffusion.models.mp_layers import MPConv

TINY = dict(
    img_resolution=16,
    img_channels=3,
    label_dim=10,
    model_channels=32,
    channel_mult=(1, 2),
    num_blocks=1,
    attn_resolutions=(8,),
    channels_per_head=32,
)


def tiny_unet(config: str, **overrides) -> EDM2UNet:
    torch.manual_seed(0)
    return EDM2UNet(**{**TINY, **overrides}, config=config)


def open_gains_(net: nn.Module) -> None:
    """Set G's zero-initialised learned gains to 1, so that every parameter influences the output."""
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, MPConv) and module.gain is not None:
                module.gain.fill_(1.0)


def parameter_count(preset: str, config: str) -> float:
    with torch.device("meta"):
        net = create_edm2_unet(preset, config=config)
    return sum(p.numel() for p in net.parameters()) / 1e6


@pytest.mark.parametrize(
    ("preset", "millions"),
    [
        ("img512-XS", 125),
        ("img512-S", 280),
        ("img512-M", 498),
        ("img512-L", 777),
        ("img512-XL", 1119),
        ("img512-XXL", 1523),
    ],
)
def test_config_g_presets_have_the_papers_parameter_counts(preset: str, millions: float) -> None:
    assert parameter_count(preset, "G") == pytest.approx(millions, rel=0.01)


@pytest.mark.parametrize(("preset", "config", "millions"), [("img512-S", "C", 277.8), ("img512-S", "E", 277.8)])
def test_ablation_configs_have_the_papers_parameter_counts(preset: str, config: str, millions: float) -> None:
    assert parameter_count(preset, config) == pytest.approx(millions, rel=0.01)


@pytest.mark.parametrize("config", ["C", "E"])
def test_cifar_preset_matches_the_reimplementation_size(config: str) -> None:
    assert parameter_count("cifar-XS", config) == pytest.approx(39.5, rel=0.01)


def test_configs_use_their_layers() -> None:
    kinds = {config: {type(m).__name__ for m in tiny_unet(config).modules()} for config in "CEG"}
    assert "MPConv" not in kinds["C"] and "HeConv" in kinds["C"] and "GroupNorm" in kinds["C"]
    assert "MPConv" in kinds["E"] and "HeConv" not in kinds["E"] and "GroupNorm" in kinds["E"]
    assert "MPConv" in kinds["G"] and "GroupNorm" not in kinds["G"]
    assert not any(getattr(m, "bias", None) is not None for config in "CEG" for m in tiny_unet(config).modules())


@pytest.mark.parametrize("config", ["C", "E", "G"])
def test_class_conditional_forward_backward(config: str) -> None:
    net = tiny_unet(config)
    open_gains_(net)
    x, noise_labels, labels = torch.randn(3, 3, 16, 16), torch.randn(3), torch.tensor([0, 4, 9])
    out = net(x, noise_labels, labels)
    assert out.shape == (3, 3, 16, 16) and out.dtype == torch.float32
    out.square().mean().backward()
    for name, param in net.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name

    net.eval()
    one_hot = torch.nn.functional.one_hot(labels, 10).float()
    assert torch.allclose(net(x, noise_labels, labels), net(x, noise_labels, one_hot))
    assert not torch.allclose(net(x, noise_labels, labels), net(x, noise_labels, labels.roll(1)), atol=1e-3)
    assert not torch.allclose(net(x, noise_labels, labels), net(x, noise_labels.flip(0), labels), atol=1e-3)


def test_labels_must_match_the_conditioning() -> None:
    conditional, unconditional = tiny_unet("G"), tiny_unet("G", label_dim=0)
    x, noise_labels = torch.randn(2, 3, 16, 16), torch.randn(2)
    assert unconditional(x, noise_labels).shape == (2, 3, 16, 16)
    with pytest.raises(ValueError, match="unconditional"):
        unconditional(x, noise_labels, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="class-conditional"):
        conditional(x, noise_labels)
    with pytest.raises(ValueError, match="one-hot"):
        conditional(x, noise_labels, torch.zeros(2, 7))


def test_config_g_starts_as_the_skip_connection_and_preserves_magnitudes() -> None:
    net = tiny_unet("G").eval()
    x, sigma, labels = torch.randn(4, 3, 16, 16), torch.tensor([0.1, 0.5, 2.0, 10.0]), torch.tensor([1, 2, 3, 4])
    denoised = EDM2Denoiser(net)(x, sigma, labels)
    c_skip = precondition(sigma, 0.5).c_skip
    assert torch.allclose(denoised, c_skip[:, None, None, None] * x)  # zero output gain: F = 0

    rms: dict[str, float] = {}

    def record(name: str) -> Callable[[nn.Module, tuple, torch.Tensor], None]:
        def hook(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
            rms[name] = output.square().mean().sqrt().item()

        return hook

    for prefix, blocks in (("enc", net.encoder), ("dec", net.decoder)):
        for name, block in blocks.items():
            block.register_forward_hook(record(f"{prefix}.{name}"))
    net(torch.randn(8, 3, 16, 16), torch.randn(8), torch.arange(8))
    assert len(rms) == len(net.encoder) + len(net.decoder)
    assert all(0.6 < value < 1.5 for value in rms.values()), rms


def test_dropout_only_while_training() -> None:
    net = tiny_unet("G", dropout=0.5)
    open_gains_(net)
    x, noise_labels, labels = torch.randn(2, 3, 16, 16), torch.randn(2), torch.tensor([3, 5])
    with torch.no_grad():
        assert not torch.equal(net(x, noise_labels, labels), net(x, noise_labels, labels))
        net.eval()
        assert torch.equal(net(x, noise_labels, labels), net(x, noise_labels, labels))


def test_presets_validate_their_arguments() -> None:
    with pytest.raises(ValueError, match="unknown EDM2 U-Net preset"):
        create_edm2_unet("img512-XXXL")
    with pytest.raises(ValueError, match="unknown preset fields"):
        create_edm2_unet("cifar-XS", num_channels=3)
    with pytest.raises(ValueError, match="config"):
        tiny_unet("F")
    net = create_edm2_unet("cifar-XXS", config="E", img_channels=1, label_dim=10, img_resolution=16)
    assert net(torch.randn(1, 1, 16, 16), torch.zeros(1), torch.tensor([7])).shape == (1, 1, 16, 16)


@pytest.mark.slow
@pytest.mark.parametrize(("config", "lr"), [("C", 2e-3), ("E", 1e-2), ("G", 1e-2)])
def test_tiny_network_learns_class_conditional_denoising(config: str, lr: float) -> None:
    net = tiny_unet(config)
    denoiser = EDM2Denoiser(net)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr, betas=(0.9, 0.99))
    generator = torch.Generator().manual_seed(0)
    clean = (0.5 * torch.randn(8, 3, 1, 1, generator=generator)).expand(8, 3, 16, 16)  # one colour per class
    labels = torch.arange(8)
    losses = []
    for _ in range(30):
        sigma = sample_training_sigmas(8, -0.4, 1.0, generator=generator)
        noisy = clean + sigma[:, None, None, None] * torch.randn(clean.shape, generator=generator)
        loss, _ = edm_loss(denoiser(noisy, sigma, labels), clean, sigma, 0.5)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) < 0.75 * sum(losses[:5])
