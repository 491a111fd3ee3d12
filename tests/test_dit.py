"""MicroDiT network: checkpoint compatibility, masking, expert-choice routing, guidance path, FLOP counter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from micro_diffusion.models.dit import (
    DIT_PRESETS,
    DiT,
    MicroDiT_Tiny_2,
    MicroDiT_XL_2,
    MicroDiT_XXS_2,
    create_dit,
    random_token_mask,
)
from micro_diffusion.models.layers import ExpertChoiceMoE, sincos_2d, tokens_per_expert

REFERENCE = Path(__file__).resolve().parent / "data"  # key/shape lists of the released checkpoints
CAPTION_CHANNELS, CAPTION_LENGTH = 64, 8


def tiny_dit(**kwargs) -> DiT:
    torch.manual_seed(0)
    return MicroDiT_XXS_2(input_size=16, caption_channels=CAPTION_CHANNELS, **kwargs)


def randomize(model: torch.nn.Module) -> torch.nn.Module:
    """Give zero-initialised (adaLN-Zero) parameters random values so every path carries signal."""
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().max() == 0:
                p.normal_(0, 0.02)
    return model


def inputs(batch: int = 2, size: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, size, size, generator=g)
    t = torch.randn(batch, generator=g)
    y = torch.randn(batch, 1, CAPTION_LENGTH, CAPTION_CHANNELS, generator=g)
    return x, t, y


@pytest.mark.parametrize(
    ("factory", "name", "millions"), [(MicroDiT_XL_2, "xl2", 1165.4), (MicroDiT_Tiny_2, "tiny2", 200.7)]
)
def test_state_dict_matches_released_checkpoints(factory, name, millions):
    reference = REFERENCE / f"official_keys_{name}.json"
    expected = [(key, tuple(shape)) for key, shape, _ in json.loads(reference.read_text())["state_dict"]]
    with torch.device("meta"):
        model = factory()
    actual = [(key, tuple(value.shape)) for key, value in model.state_dict().items()]
    assert sorted(actual) == sorted(expected)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    assert params == pytest.approx(millions, rel=1e-3)


def test_checkpoint_round_trip_strict():
    model = randomize(tiny_dit())
    clone = tiny_dit()
    clone.load_state_dict(model.state_dict(), strict=True)
    x, t, y = inputs()
    model.eval(), clone.eval()
    torch.testing.assert_close(model(x, t, y)["sample"], clone(x, t, y)["sample"])


@pytest.mark.parametrize("name", sorted(DIT_PRESETS))
def test_every_preset_output_shape(name):
    device = "meta" if name in ("MicroDiT_XL_2", "MicroDiT_Tiny_2") else "cpu"
    with torch.device(device):
        model = create_dit(name, input_size=16, caption_channels=CAPTION_CHANNELS)
        x = torch.randn(2, 4, 16, 16)
        out = model(x, torch.randn(2), torch.randn(2, 1, CAPTION_LENGTH, CAPTION_CHANNELS), mask_ratio=0.5)
    assert out["sample"].shape == (2, 4, 16, 16)
    assert out["mask"].shape == (2, 64)


def test_mask_ratio_zero_runs_full_path_and_075_keeps_a_quarter():
    model = tiny_dit()
    seen: list[int] = []
    model.blocks[0].register_forward_hook(lambda _m, args, _o: seen.append(args[0].shape[1]))
    x, t, y = inputs()
    assert model(x, t, y, mask_ratio=0.0)["mask"] is None
    out = model(x, t, y, mask_ratio=0.75)
    assert seen == [64, 16]
    assert out["mask"].sum(dim=1).tolist() == [48.0, 48.0]


def test_masked_positions_output_the_zero_mask_token():
    model = randomize(tiny_dit())
    x, t, y = inputs()
    out = model(x, t, y, mask_ratio=0.75)
    patches = out["sample"].unfold(2, 2, 2).unfold(3, 2, 2)  # (N, C, 8, 8, 2, 2)
    per_token = patches.permute(0, 2, 3, 1, 4, 5).reshape(2, 64, -1)
    dropped = out["mask"].bool()
    assert per_token[dropped].abs().max() == 0
    assert per_token[~dropped].abs().min(dim=-1).values.gt(0).all()


def test_masks_differ_across_samples_and_reproduce_under_a_seed():
    first = random_token_mask(4, 64, 0.75, torch.device("cpu"), torch.Generator().manual_seed(1))
    again = random_token_mask(4, 64, 0.75, torch.device("cpu"), torch.Generator().manual_seed(1))
    other = random_token_mask(4, 64, 0.75, torch.device("cpu"), torch.Generator().manual_seed(2))
    assert torch.equal(first.mask, again.mask)
    assert not torch.equal(first.mask, other.mask)
    assert len({tuple(row.tolist()) for row in first.mask}) == 4
    # The inverse permutation really inverts: kept ids are exactly the zeros of the mask.
    kept = torch.zeros(4, 64).scatter(1, first.keep_indices, 1.0)
    assert torch.equal(kept, 1 - first.mask)

    model = tiny_dit()
    x, t, y = inputs()
    torch.manual_seed(3)
    mask_a = model(x, t, y, mask_ratio=0.75)["mask"]
    torch.manual_seed(3)
    mask_b = model(x, t, y, mask_ratio=0.75)["mask"]
    assert torch.equal(mask_a, mask_b)


def reference_expert_choice(moe: ExpertChoiceMoE, x: torch.Tensor) -> torch.Tensor:
    """Loop-based expert choice, written for clarity only, to check the vectorised dispatch against."""
    n, t, _ = x.shape
    k = tokens_per_expert(t, moe.num_experts, moe.capacity)
    probs = moe.gate(x).softmax(-1)
    out = torch.zeros_like(x)
    for i in range(n):
        for e in range(moe.num_experts):
            weight, idx = probs[i, :, e].topk(k)
            h = torch.nn.functional.gelu(x[i, idx] @ moe.w1[e]) @ moe.w2[e]
            out[i, idx] += weight[:, None] * h
    return out


def test_expert_choice_routing_capacity_weights_and_values():
    torch.manual_seed(0)
    moe = ExpertChoiceMoE(dim=32, hidden_dim=64, num_experts=4, capacity=2.0)
    moe.init_weights(0.02)
    x = torch.randn(3, 24, 32)
    weights, indices = moe.route(x)
    k = int(2.0 * 24 / 4)
    assert indices.shape == (3, 4, k)
    # Each expert takes exactly k distinct tokens of each sample.
    assert all(len(set(row.tolist())) == k for row in indices.reshape(-1, k))
    # Routing weights are the softmax over experts of the chosen tokens (probabilities sum to 1 per token).
    probs = moe.gate(x).softmax(-1)
    torch.testing.assert_close(probs.sum(-1), torch.ones(3, 24))
    torch.testing.assert_close(weights, probs.transpose(1, 2).gather(2, indices))
    torch.testing.assert_close(moe(x), reference_expert_choice(moe, x), rtol=1e-5, atol=1e-6)
    # Masking shrinks the token count and with it the capacity.
    assert moe.route(x[:, :8])[1].shape[-1] == int(2.0 * 8 / 4)


def test_gradients_reach_every_parameter_and_expert():
    model = randomize(tiny_dit())
    x, t, y = inputs(batch=4)
    model(x, t, y, mask_ratio=0.5)["sample"].square().mean().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or p.grad.abs().max() == 0]
    assert missing == []
    moe = next(m for m in model.modules() if isinstance(m, ExpertChoiceMoE))
    per_expert = moe.w1.grad.abs().sum(dim=(1, 2))
    assert (per_expert > 0).all()


def test_eval_mode_is_deterministic_and_guidance_forward_matches_manual_combination():
    model = randomize(tiny_dit()).eval()
    x, t, y = inputs()
    with torch.no_grad():
        a = model(x, t, y)["sample"]
        b = model(x, t, y)["sample"]
        guided = model(x, t, y, cfg=3.0)["sample"]
        uncond = model(x, t, torch.zeros_like(y))["sample"]
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(guided, uncond + 3.0 * (a - uncond), rtol=1e-4, atol=1e-5)


def test_broadcast_noise_level_and_three_dim_captions():
    model = randomize(tiny_dit()).eval()
    x, _, y = inputs()
    with torch.no_grad():
        scalar = model(x, torch.tensor([0.3]), y)["sample"]
        full = model(x, torch.full((2,), 0.3), y.squeeze(1))["sample"]
    torch.testing.assert_close(scalar, full)
    with pytest.raises(ValueError, match="caption embedding"):
        model(x, torch.zeros(2), torch.randn(2, 1, 8, 3))


def test_network_without_patch_mixer_works():
    model = randomize(tiny_dit(use_patch_mixer=False))
    assert len(model.patch_mixer) == 0
    x, t, y = inputs()
    out = model(x, t, y, mask_ratio=0.75)
    assert out["sample"].shape == x.shape
    out["sample"].sum().backward()


def test_position_interpolation_aligns_grids():
    base = sincos_2d(16, 16, 64, pos_interp_scale=1.0).view(16, 16, 64)
    interpolated = sincos_2d(32, 32, 64, pos_interp_scale=2.0).view(32, 32, 64)
    torch.testing.assert_close(interpolated[::2, ::2], base)


def test_bf16_autocast_forward_on_cpu():
    model = randomize(tiny_dit())
    x, t, y = inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, y, mask_ratio=0.75)["sample"]
    assert out.dtype == torch.bfloat16
    assert torch.isfinite(out.float()).all()


@pytest.mark.parametrize("mask_ratio", [0.0, 0.75])
def test_flop_counter_matches_torch_flop_counter(mask_ratio):
    model = tiny_dit()
    x, t, y = inputs()
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x, t, y, mask_ratio=mask_ratio)
    measured_per_image = counter.get_total_flops() / x.shape[0]
    assert model.forward_flops(mask_ratio, CAPTION_LENGTH) == pytest.approx(measured_per_image, rel=0.05)


def test_masking_cuts_backbone_flops():
    with torch.device("meta"):
        model = MicroDiT_XL_2()
    unmasked, masked = model.forward_flops(0.0), model.forward_flops(0.75)
    assert masked < 0.45 * unmasked
    assert model.training_flops(0.75) == 3 * masked


@pytest.mark.slow
def test_torch_compile_tiny_preset():
    model = randomize(tiny_dit()).eval()
    compiled = torch.compile(model)
    x, t, y = inputs()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, t, y)["sample"], model(x, t, y)["sample"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "call",
    [
        lambda model, x, t, y: model(x, t, y, mask_ratoi=0.75),
        lambda model, x, t, y: model(x, t, y, cfg=2.0, mask_ratoi=0.75),
        lambda model, x, t, y: model.forward_without_cfg(x, t, y, mask_ratoi=0.75),
        lambda model, x, t, y: model.forward_with_cfg(x, t, y, 2.0, mask_ratoi=0.75),
    ],
    ids=["forward", "forward-cfg", "forward_without_cfg", "forward_with_cfg"],
)
def test_unknown_forward_arguments_raise(call):
    """A misspelled mask_ratio must not silently train unmasked."""
    model = tiny_dit()
    with pytest.raises(TypeError, match="mask_ratoi"):
        call(model, *inputs())


def test_unknown_preset_arguments_raise():
    with pytest.raises(TypeError, match="pos_interp_scael"):
        create_dit("MicroDiT_XXS_2", pos_interp_scael=2.0)


def test_released_call_signature_is_kept():
    model = randomize(tiny_dit()).eval()
    x, t, y = inputs()
    with torch.no_grad():
        keyword = model(x, t, y, cfg=2.0, mask_ratio=0.0)["sample"]
        positional = model.forward_with_cfg(x, t, y, 2.0, 0.0)["sample"]
    torch.testing.assert_close(keyword, positional, rtol=0, atol=0)


def padded_caption(y: torch.Tensor, num_real: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """y (N, 1, L, C) with tokens num_real.. replaced by random padding, and the (N, L) mask of the real ones."""
    padding = torch.randn(y[:, :, num_real:].shape, generator=torch.Generator().manual_seed(seed))
    mask = torch.zeros(y.shape[0], y.shape[2], dtype=torch.bool)
    mask[:, :num_real] = True
    return torch.cat([y[:, :, :num_real], padding], dim=2), mask


def test_caption_mask_makes_padded_tokens_irrelevant():
    model = randomize(tiny_dit()).eval()
    x, t, y = inputs()
    first, mask = padded_caption(y, 3, seed=1)
    second, _ = padded_caption(y, 3, seed=2)
    with torch.no_grad():
        masked = [model(x, t, caption, caption_mask=mask)["sample"] for caption in (first, second)]
        guided = [model(x, t, caption, cfg=3.0, caption_mask=mask)["sample"] for caption in (first, second)]
        unmasked = [model(x, t, caption)["sample"] for caption in (first, second)]
        short = model(x, t, y[:, :, :3])["sample"]  # the real tokens alone, no padding at all
    torch.testing.assert_close(masked[0], masked[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(guided[0], guided[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(masked[0], short, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(unmasked[0], unmasked[1], atol=1e-4)  # without the mask, padding counts


def test_an_all_true_caption_mask_is_the_unmasked_network():
    model = randomize(tiny_dit()).eval()
    x, t, y = inputs()
    with torch.no_grad():
        plain = model(x, t, y)["sample"]
        masked = model(x, t, y, caption_mask=torch.ones(y.shape[0], y.shape[2], dtype=torch.bool))["sample"]
    torch.testing.assert_close(plain, masked, rtol=1e-5, atol=1e-6)


def test_bad_caption_masks_are_rejected():
    model = tiny_dit()
    x, t, y = inputs()
    with pytest.raises(ValueError, match="caption_mask must be"):
        model(x, t, y, caption_mask=torch.ones(y.shape[0], y.shape[2]))
    with pytest.raises(ValueError, match="without any real token"):
        model(x, t, y, caption_mask=torch.zeros(y.shape[0], y.shape[2], dtype=torch.bool))
