"""Magnitude-preserving layers: unit variance in -> unit variance out, forced weight normalisation, EMA copies."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from micro_diffusion.models.mp_layers import (
    MPConv,
    MPFourier,
    clip_activations,
    cosine_attention,
    mp_cat,
    mp_silu,
    mp_sum,
    normalize,
    normalize_weights_,
    pixel_norm,
)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def row_norms(weight: torch.Tensor) -> torch.Tensor:
    return weight.flatten(1).norm(dim=1)


def effective_weight(layer: MPConv) -> torch.Tensor:
    """The weight the forward pass applies: a linear layer's output on the identity matrix, transposed."""
    fan_in = layer.weight[0].numel()
    with torch.no_grad():
        linear = MPConv(fan_in, layer.out_channels, ()).eval()
        linear.weight.copy_(layer.weight.flatten(1))
        return linear(torch.eye(fan_in)).T


def test_normalize_gives_unit_rms_rows_and_pixels() -> None:
    weight = 5 * torch.randn(16, 8, 3, 3)
    assert torch.allclose(normalize(weight).flatten(1).square().mean(dim=1), torch.ones(16), atol=1e-3)
    x = 3 * torch.randn(2, 32, 5, 5) + 1
    assert torch.allclose(pixel_norm(x).square().mean(dim=1), torch.ones(2, 5, 5), atol=1e-3)


@pytest.mark.parametrize("kernel", [(), (1, 1), (3, 3)])
def test_mp_conv_preserves_unit_variance(kernel: tuple[int, ...]) -> None:
    layer = MPConv(96, 64, kernel).eval()
    layer.weight.data.mul_(7)  # the stored scale of the weight does not matter
    if kernel:
        x = torch.randn(8, 96, 24, 24)
        y = layer(x)[:, :, 1:-1, 1:-1]  # zero padding lowers the variance on the border
    else:
        x = torch.randn(8192, 96)
        y = layer(x)
    assert y.shape[-3 if kernel else -1] == 64
    assert y.var().item() == pytest.approx(1.0, rel=0.05)
    assert torch.allclose(row_norms(effective_weight(layer)), torch.ones(64), atol=1e-4)


def test_fixed_function_layers_preserve_unit_variance() -> None:
    a, b = torch.randn(2, 64, 64, 64)
    assert mp_silu(a).square().mean().sqrt().item() == pytest.approx(1.0, rel=0.01)
    assert mp_sum(a, b, t=0.3).var().item() == pytest.approx(1.0, rel=0.01)
    embedding = MPFourier(256)(torch.randn(4096))
    assert embedding.shape == (4096, 256)
    assert embedding.square().mean().sqrt().item() == pytest.approx(1.0, rel=0.02)


def test_mp_cat_has_unit_rms_and_balances_energy_independently_of_channels() -> None:
    a, b = torch.randn(512, 24), torch.randn(512, 104)
    joined = mp_cat(a, b, dim=1, t=0.3)
    assert joined.shape == (512, 128)
    assert joined.square().mean().sqrt().item() == pytest.approx(1.0, rel=0.02)
    energy_a, energy_b = joined[:, :24].square().sum(), joined[:, 24:].square().sum()
    assert (energy_b / energy_a).item() == pytest.approx(0.3**2 / 0.7**2, rel=0.05)


def test_forced_weight_normalisation_keeps_rows_at_unit_norm_through_training() -> None:
    layer = MPConv(32, 16, (3, 3))
    optimizer = torch.optim.Adam(layer.parameters(), lr=0.1)

    def stored_rows_have_unit_rms() -> bool:  # norm sqrt(fan_in), up to the norm's eps = 1e-4
        return torch.allclose(row_norms(layer.weight), torch.full((16,), math.sqrt(32 * 9)), rtol=1e-3)

    for _ in range(10):
        loss = (layer(torch.randn(4, 32, 8, 8)) - 1).square().mean()
        optimizer.zero_grad()
        loss.backward()
        # in-graph normalisation makes the gradient orthogonal to each (normalised) row
        cosines = torch.nn.functional.cosine_similarity(layer.weight.grad.flatten(1), layer.weight.flatten(1))
        assert cosines.abs().max() < 1e-4
        optimizer.step()
        assert not stored_rows_have_unit_rms()  # the step moved the rows off the sphere ...
        layer(torch.randn(1, 32, 8, 8))
        assert stored_rows_have_unit_rms()  # ... and the next training forward pass put them back
        assert torch.allclose(row_norms(effective_weight(layer)), torch.ones(16), atol=1e-4)
    optimizer.step()
    normalize_weights_(torch.nn.Sequential(layer))
    assert stored_rows_have_unit_rms()


def test_ema_and_evaluation_copies_are_never_renormalised() -> None:
    layer = MPConv(8, 4, ())
    layer.weight.data.mul_(3)  # off the unit-RMS sphere
    x = torch.randn(5, 8)
    reference = layer.eval()(x)

    ema = copy.deepcopy(layer).train().requires_grad_(False)  # how an EMA copy is kept
    evaluated = copy.deepcopy(layer).eval()
    no_grad = copy.deepcopy(layer).train()
    before = layer.weight.detach().clone()
    ema(x)
    evaluated(x).sum().backward()
    with torch.no_grad():
        no_grad(x)
    for copy_ in (ema, evaluated, no_grad):
        assert torch.equal(copy_.weight.detach(), before)
        # the function does not depend on the stored scale (up to the norm's eps = 1e-4)
        assert torch.allclose(copy_(x), reference, rtol=1e-3, atol=1e-4)

    layer.train()(x)
    assert not torch.equal(layer.weight.detach(), before)
    assert torch.allclose(layer.eval()(x), reference, rtol=1e-3, atol=1e-4)


def test_learned_gain_starts_at_zero_and_learns() -> None:
    layer = MPConv(8, 4, (3, 3), learned_gain=True)
    y = layer(torch.randn(2, 8, 6, 6))
    assert torch.count_nonzero(y) == 0
    y.sum().backward()
    assert layer.gain.grad is not None and layer.gain.grad.abs() > 0


def test_cosine_attention_matches_explicit_softmax_and_ignores_vector_scale() -> None:
    heads, d = 2, 16
    qkv = torch.randn(3, 3 * heads * d, 4, 5)
    y = cosine_attention(qkv, heads)
    assert y.shape == (3, heads * d, 4, 5)

    q, k, v = (normalize(t, dim=2) for t in qkv.reshape(3, 3, heads, d, 20).unbind(1))  # (N, heads, d, HW)
    logits = torch.einsum("nhcq,nhck->nhqk", q, k) / math.sqrt(d)
    assert logits.abs().max() <= math.sqrt(d) + 1e-4  # bounded cosine logits
    expected = torch.einsum("nhqk,nhck->nhcq", logits.softmax(dim=3), v).reshape(3, heads * d, 4, 5)
    assert torch.allclose(y, expected, atol=1e-5)

    per_pixel_scale = torch.rand(3, 1, 4, 5) * 10 + 1
    assert torch.allclose(cosine_attention(qkv * per_pixel_scale, heads), y, atol=1e-3)  # eps = 1e-4 in the norm


def test_clip_activations() -> None:
    x = torch.tensor([-1000.0, -3.0, 0.0, 255.0, 300.0])
    assert torch.equal(clip_activations(x), torch.tensor([-256.0, -3.0, 0.0, 255.0, 256.0]))


def test_mp_sum_keeps_the_main_path_dtype_under_autocast():
    """A float32 main path meets a bf16 branch under autocast (config G on GPU); lerp alone rejects that."""
    main, branch = torch.randn(4, 8), torch.randn(4, 8)
    mixed = mp_sum(main, branch.bfloat16(), t=0.3)
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, mp_sum(main, branch.bfloat16().float(), t=0.3))
