"""Magnitude-preserving MicroDiT (`mp=True`): the default network unchanged, MP layers and sums in the blocks,
forced weight normalisation with untouched EMA copies, exact FLOP counter, torch.compile."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from micro_diffusion.models.checkpoints import load_dit_state
from micro_diffusion.models.dit import DiT, create_dit
from micro_diffusion.models.layers import DiTBlock, ExpertChoiceMoE
from micro_diffusion.models.mp_layers import GELU_RMS, MPConv, mp_gelu, normalize_weights_

CAPTION_CHANNELS, CAPTION_LENGTH = 64, 8
# The learned linear layers inside the blocks, by the last part of their qualified names.
MP_LINEARS = {"qkv", "proj", "q_linear", "kv_linear", "w1", "w2", "w3"}


def tiny_dit(**kwargs) -> DiT:
    torch.manual_seed(0)
    return create_dit("MicroDiT_XXS_2", input_size=16, caption_channels=CAPTION_CHANNELS, **kwargs)


def randomize_zero_parameters(model: nn.Module) -> nn.Module:
    """Give zero-initialised parameters (adaLN, final layer) small random values so gradients reach every block."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().max() == 0:
                p.normal_(0, 0.02)
    return model


def inputs(batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, 4, 16, 16, generator=g),
        torch.randn(batch, generator=g),
        torch.randn(batch, 1, CAPTION_LENGTH, CAPTION_CHANNELS, generator=g),
    )


def mp_weights(model: nn.Module) -> list[tuple[str, torch.Tensor, tuple[int, ...]]]:
    """(name, stored weight, fan-in dims) of every MP weight: MPConv rows and the MP experts' axis 1."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, MPConv):
            found.append((f"{name}.weight", module.weight, tuple(range(1, module.weight.ndim))))
        elif isinstance(module, ExpertChoiceMoE) and module.mp:
            found += [(f"{name}.w1", module.w1, (1,)), (f"{name}.w2", module.w2, (1,))]
    return found


def fan_in_rms(weight: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    return weight.detach().square().mean(dim=dims).sqrt()


def all_unit_rms(model: nn.Module) -> bool:
    """Every stored MP weight has unit-RMS fan-in vectors (up to the normalisation's eps = 1e-4)."""
    return all(torch.allclose(fan_in_rms(w, dims), torch.ones(()), rtol=1e-3) for _, w, dims in mp_weights(model))


def test_default_network_is_unchanged_by_the_flag():
    default, explicit = tiny_dit(), tiny_dit(mp=False)
    assert not any(isinstance(m, MPConv) for m in explicit.modules())
    default_state, explicit_state = default.state_dict(), explicit.state_dict()
    assert list(explicit_state) == list(default_state)
    assert all(torch.equal(explicit_state[k], default_state[k]) for k in default_state)
    x, t, y = inputs()
    default.eval(), explicit.eval()
    with torch.no_grad():
        torch.testing.assert_close(explicit(x, t, y)["sample"], default(x, t, y)["sample"], rtol=0, atol=0)


def test_mp_and_standard_weights_refuse_to_load_into_each_other():
    mp, standard = tiny_dit(mp=True), tiny_dit()
    with pytest.raises(KeyError, match="missing.*magnitude_preserving"):
        load_dit_state(mp, standard.state_dict(), "standard weights")
    with pytest.raises(KeyError, match="unexpected.*magnitude_preserving"):
        load_dit_state(standard, mp.state_dict(), "MP weights")
    load_dit_state(tiny_dit(mp=True), mp.state_dict())


def test_mp_layers_are_exactly_the_block_linears_and_keep_the_key_layout():
    model = tiny_dit(mp=True)
    standard = tiny_dit()
    mp_shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert mp_shapes.pop("magnitude_preserving") == ()
    assert mp_shapes == {k: v.shape for k, v in standard.state_dict().items()}
    mp_names = {name for name, m in model.named_modules() if isinstance(m, MPConv)}
    linears = {name for name, m in standard.named_modules() if isinstance(m, nn.Linear)}
    block_linears = {name for name in linears if name.rsplit(".", 1)[-1] in MP_LINEARS}
    assert mp_names == block_linears
    assert all(name.startswith(("y_emb_preprocess.", "patch_mixer.", "blocks.")) for name in mp_names)
    # adaLN modulation, router, embedders and final layer stay standard linear layers
    standard_linears = {name for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert {"blocks.0.adaLN_modulation.1", "blocks.1.mlp.gate", "final_layer.linear", "t_embedder.mlp.0"} <= (
        standard_linears
    )
    moes = [m for m in model.modules() if isinstance(m, ExpertChoiceMoE)]
    assert moes and all(m.mp for m in moes)
    with pytest.raises(ValueError, match="use_bias=False"):
        DiT(input_size=8, dim=64, depth=2, head_dim=32, caption_channels=8, patch_mixer_dim=64, mp=True)


def test_mp_forward_backward_with_masking_and_moe():
    model = randomize_zero_parameters(tiny_dit(mp=True))
    x, t, y = inputs(batch=4)
    out = model(x, t, y, mask_ratio=0.5)
    assert out["sample"].shape == x.shape and out["mask"].sum(dim=1).tolist() == [32.0] * 4
    assert torch.isfinite(out["sample"]).all()
    out["sample"].square().mean().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or p.grad.abs().max() == 0]
    assert missing == []
    moe = next(m for m in model.blocks.modules() if isinstance(m, ExpertChoiceMoE))
    assert (moe.w1.grad.abs().sum(dim=(1, 2)) > 0).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(x, t, y, mask_ratio=0.5)["sample"]
    assert low.dtype == torch.bfloat16 and torch.isfinite(low.float()).all()


def test_mp_gelu_constant_is_the_rms_of_gelu_over_a_unit_normal():
    x = torch.linspace(-12, 12, 200_001, dtype=torch.float64)
    density = torch.exp(-x.square() / 2) / math.sqrt(2 * math.pi)
    second_moment = torch.trapezoid(torch.nn.functional.gelu(x).square() * density, x)
    assert GELU_RMS**2 == pytest.approx(second_moment.item(), rel=1e-8)
    assert mp_gelu(torch.randn(1_000_000)).square().mean().sqrt().item() == pytest.approx(1.0, abs=0.01)


@pytest.mark.parametrize("moe", [False, True])
def test_mp_block_keeps_unit_variance_at_init(moe):
    """Unit-variance tokens through one MP block at init (adaLN output zero, so no modulation).

    Every MP linear and the dense FFN map unit variance to unit variance (within 5 %). The block output stays
    within [0.55, 1.05]: the MP sums are exact, and what is lost is the softmax average of attention over
    independent random tokens (a worst case: real tokens are correlated) and, for MoE, the expert weighting.
    """
    torch.manual_seed(0)
    block = DiTBlock(128, 128, 32, 1.0, 4.0, 64, 1e-6, False, moe, 4, 2.0, 0.01, mp=True)
    block.init_weights()
    x, caption, c = torch.randn(4, 256, 128), torch.randn(4, 16, 128), torch.randn(4, 128)
    with torch.no_grad():
        normed = block.norm1(x)
        linears = [block.attn.qkv, block.cross_attn.q_linear, block.cross_attn.kv_linear]
        if not moe:
            linears += [block.mlp.w1, block.mlp.w2]
        for layer in linears:
            assert layer(normed).var().item() == pytest.approx(1.0, rel=0.05)
        if moe:
            w1, w2 = block.mlp.expert_weights()
            hidden = torch.einsum("td,edh->eth", normed[0], w1)
            assert hidden.var().item() == pytest.approx(1.0, rel=0.05)
            expert_out = torch.einsum("eth,ehd->etd", mp_gelu(hidden), w2)
            assert expert_out.square().mean().item() == pytest.approx(1.0, rel=0.05)
        else:
            assert block.mlp(normed).square().mean().item() == pytest.approx(1.0, rel=0.05)
        out = block(x, caption, c)
    assert 0.55 < out.var().item() < 1.05


def test_forced_weight_normalisation_while_training_and_ema_copies_untouched():
    model = randomize_zero_parameters(tiny_dit(mp=True))
    initial = {name: w.detach().clone() for name, w, _ in mp_weights(model)}
    ema = copy.deepcopy(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, t, y = inputs(batch=4)
    for _ in range(3):
        loss = (model(x, t, y, mask_ratio=0.5)["sample"] - x).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            for average, weight in zip(ema.parameters(), model.parameters()):
                average.lerp_(weight, 0.5)
    assert not all_unit_rms(model)  # the last step moved the rows off the sphere ...
    model(x, t, y, mask_ratio=0.5)
    assert all_unit_rms(model)  # ... and the next training forward pass put every one back
    assert all(not torch.allclose(w, initial[name]) for name, w, _ in mp_weights(model))
    optimizer.step()
    normalize_weights_(model)  # the explicit form covers the MoE experts too
    assert all_unit_rms(model)

    # An average of unit rows is shorter than unit: forward passes of the EMA copy must not renormalise it.
    assert not all_unit_rms(ema)
    stored = {name: w.detach().clone() for name, w, _ in mp_weights(ema)}
    ema.eval()(x, t, y)["sample"].sum().backward()  # eval mode, grad enabled
    with torch.no_grad():
        ema.train()(x, t, y, mask_ratio=0.5)  # training mode, no grad
    assert all(torch.equal(w, stored[name]) for name, w, _ in mp_weights(ema))


@pytest.mark.parametrize("mask_ratio", [0.0, 0.5])
def test_flop_counter_is_exact_for_mp(mask_ratio):
    model = tiny_dit(mp=True)
    x, t, y = inputs()
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x, t, y, mask_ratio=mask_ratio)
    assert model.forward_flops(mask_ratio, CAPTION_LENGTH) * x.shape[0] == counter.get_total_flops()
    assert model.forward_flops(mask_ratio, CAPTION_LENGTH) == tiny_dit().forward_flops(mask_ratio, CAPTION_LENGTH)


@pytest.mark.slow
def test_torch_compile_mp_forward_matches_eager():
    model = randomize_zero_parameters(tiny_dit(mp=True)).eval()
    compiled = torch.compile(model, fullgraph=True)
    x, t, y = inputs()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, t, y)["sample"], model(x, t, y)["sample"], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_compiled_training_forward_normalises_weights_in_place():
    """The in-place forced weight normalisation inside a compiled training graph (aot_eager: the traced
    forward and backward graphs without inductor's code generation, which takes minutes on a CPU)."""
    model = randomize_zero_parameters(tiny_dit(mp=True))
    with torch.no_grad():
        for _, weight, _ in mp_weights(model):
            weight.mul_(1.5)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x, t, y = inputs()
    out = compiled(x, t, y)["sample"]
    assert all_unit_rms(model)
    out.sum().backward()
    assert all(w.grad is not None for _, w, _ in mp_weights(model))
    with torch.no_grad():
        torch.testing.assert_close(out, model.eval()(x, t, y)["sample"], rtol=1e-4, atol=1e-5)
