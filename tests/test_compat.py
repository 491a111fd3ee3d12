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


def test_file_logger_keeps_its_run_name_in_a_private_attribute(tmp_path):
    from composer.loggers import FileLogger

    file_logger = FileLogger(str(tmp_path / "{run_name}" / "metrics.txt"))
    compat.set_file_logger_run_name(file_logger, "stage-1")
    assert file_logger.filename == str(tmp_path / "stage-1" / "metrics.txt"), (
        f"composer {compat.COMPOSER_VERSION}'s FileLogger formatted its filename with _run_name; the installed "
        "composer does not: update compat.set_file_logger_run_name"
    )
    with pytest.raises(compat.CompatError, match=r"FileLogger\._run_name"):
        compat.set_file_logger_run_name(SimpleNamespace(), "stage-1")


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


class _Resumable(torch.utils.data.IterableDataset):
    """Samples 0..n-1 in order, resuming mid-epoch from its state dict like a Streaming dataset."""

    def __init__(self, count: int) -> None:
        self.count, self.start = count, 0

    def __iter__(self):
        start, self.start = self.start, 0
        return iter(torch.arange(start, self.count, dtype=torch.float32)[:, None])

    def state_dict(self, num_samples: int, from_beginning: bool) -> dict:
        return {"sample_in_epoch": num_samples}

    def load_state_dict(self, state: dict) -> None:
        self.start = state["sample_in_epoch"]


def _noise_recording_trainer(tmp_path, draws: list, max_duration: str, **kwargs):
    from composer import Trainer
    from composer.models import ComposerModel

    class NoiseModel(ComposerModel):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(1))

        def forward(self, batch):
            noise = torch.randn(1)  # the draw a diffusion loss makes: it must continue across a resume
            draws.append(float(noise))
            return (batch * self.weight + noise).sum()

        def loss(self, outputs, batch):
            return outputs

    model = NoiseModel()
    return Trainer(
        model=model, train_dataloader=torch.utils.data.DataLoader(_Resumable(8), batch_size=1),
        max_duration=max_duration, optimizers=torch.optim.SGD(model.parameters(), lr=0.1), device="cpu",
        save_folder=str(tmp_path), save_interval="2ba", run_name="rng", seed=7, progress_bar=False,
        log_to_console=False, **kwargs,
    )


def test_composer_resume_hands_over_the_rng_state_that_exact_resume_restores(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import train  # the training script: keep_rng_of_resume

    uninterrupted: list[float] = []
    _noise_recording_trainer(tmp_path / "full", uninterrupted, "4ba").fit()
    _noise_recording_trainer(tmp_path / "cut", [], "2ba").fit()
    resumed: list[float] = []
    trainer = _noise_recording_trainer(tmp_path / "resumed", resumed, "4ba",
                                       load_path=str(tmp_path / "cut" / "latest-rank0.pt"))
    pending = getattr(trainer, "_rng_state", "missing")
    assert isinstance(pending, list) and len(pending) == 1 and {"torch", "python", "numpy"} <= set(pending[0]), (
        f"composer {compat.COMPOSER_VERSION} kept a resumed checkpoint's per-rank RNG states (a list of dicts with "
        f"'torch', 'python' and 'numpy') in Trainer._rng_state until it applied them; the installed composer holds "
        f"{type(pending).__name__} there: update compat.take_pending_rng_state and train.keep_rng_of_resume"
    )
    train.keep_rng_of_resume(trainer)
    trainer.fit()
    assert resumed == uninterrupted[2:], (
        "restoring the checkpoint's RNG state at the first batch after a mid-epoch resume no longer reproduces the "
        f"uninterrupted run's noise ({resumed} vs {uninterrupted[2:]}): exact resume (train.keep_rng_of_resume) is "
        "broken for the installed composer"
    )
