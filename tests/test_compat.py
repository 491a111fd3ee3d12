"""The private third-party APIs of `micro_diffusion.compat` are still where the pinned versions had them.

Each test fails with a message naming what moved, so an upgrade of Composer, PyTorch or EfficientNet-Lite
points at the one function of compat.py to update.
"""

import inspect
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from micro_diffusion import compat


def test_trainer_keeps_the_checkpoint_rng_state_in_a_private_attribute():
    from composer import Trainer

    source = inspect.getsource(Trainer)
    assert "self._rng_state = checkpoint.load_checkpoint(" in source and "load_rng_state(self._rng_state)" in source, (
        f"composer {compat.COMPOSER_VERSION} loaded a resumed checkpoint's RNG state into Trainer._rng_state and "
        "applied it from there; the installed composer does not: exact resume (train.keep_rng_of_resume) needs "
        "compat.take_pending_rng_state updated"
    )


def test_take_pending_rng_state_hands_the_state_over_once():
    trainer = SimpleNamespace(_rng_state=[{"torch": torch.zeros(1)}])
    assert compat.take_pending_rng_state(trainer) is not None
    assert trainer._rng_state is None and compat.take_pending_rng_state(trainer) is None
    with pytest.raises(compat.CompatError, match=r"Trainer\._rng_state .* update micro_diffusion/compat\.py"):
        compat.take_pending_rng_state(SimpleNamespace())


def test_gpu_peak_flops_is_importable_and_answers_on_this_machine():
    state = SimpleNamespace(precision=SimpleNamespace(value="amp_bf16"))
    try:
        peak = compat.gpu_peak_flops(state)
    except compat.CompatError as error:
        pytest.fail(str(error))
    assert peak is None or peak >= 0


def test_low_precision_layernorm_is_a_layernorm():
    try:
        layer_class = compat.low_precision_layernorm_class()
    except compat.CompatError as error:
        pytest.fail(str(error))
    assert issubclass(layer_class, nn.LayerNorm), f"composer's LPLayerNorm is no longer an nn.LayerNorm: {layer_class}"
    layer = layer_class(8, 1e-6, True)
    assert layer(torch.randn(2, 8)).shape == (2, 8)


def test_torch_still_reports_amx_support():
    assert callable(getattr(torch.cpu, "_is_amx_tile_supported", None)), (
        f"torch {torch.__version__} has no torch.cpu._is_amx_tile_supported (torch {compat.TORCH_VERSION} had it): "
        "compat.cpu_has_amx now always answers False; find its replacement"
    )
    assert isinstance(compat.cpu_has_amx(), bool)


def test_efficientnet_lite0_loads_and_exposes_its_stages():
    network = compat.load_efficientnet_lite0()
    try:
        stem, blocks = compat.efficientnet_stages(network)
    except compat.CompatError as error:
        pytest.fail(str(error))
    with torch.no_grad():
        features = stem(torch.zeros(1, 3, 64, 64))
        assert features.shape == (1, 32, 32, 32), f"EfficientNet-Lite0's stem changed: {tuple(features.shape)}"
        for block in blocks[:11]:
            features = block(features)
        assert features.shape[1] == 112, f"EfficientNet-Lite0's block 10 changed: {tuple(features.shape)}"
        pooled = network.extract_features(torch.zeros(1, 3, 224, 224))
    assert pooled.shape == (1, 1280, 7, 7), f"EfficientNet.extract_features changed: {tuple(pooled.shape)}"


def test_efficientnet_stages_name_what_moved():
    with pytest.raises(compat.CompatError, match="efficientnet-lite-pytorch 0.1.0"):
        compat.efficientnet_stages(nn.Linear(2, 2))
