"""Power-function EMA: the update rule against brute-force averages, post-hoc reconstruction, the snapshot files,
the `posthoc-ema` command, the sigma_rel sweep and the Composer callback (snapshots and resume)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from composer import Trainer
from composer.models import ComposerModel
from safetensors import safe_open
from safetensors.torch import load_file
from scipy.integrate import trapezoid
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from micro_diffusion.cli.posthoc_ema import main
from micro_diffusion.diffusion.power_ema import (
    MAX_SIGMA_REL,
    PowerFunctionEMA,
    ema_beta,
    find_snapshots,
    gamma_to_sigma_rel,
    power_profile,
    profile_inner_products,
    reconstruct,
    save_reconstruction,
    save_snapshot,
    sigma_rel_to_gamma,
    solve_posthoc_weights,
    sweep,
)
from micro_diffusion.models.model import create_latent_diffusion
from micro_diffusion.models.sampling import load_weights
from micro_diffusion.training.power_ema_callback import PowerEMA


class ToyNet(nn.Module):
    """A small network with a buffer, standing in for the trained network."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(6, 5)
        self.register_buffer("scale", torch.tensor([2.0, 3.0]))

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x)


def flat(tensors: list[Tensor] | dict[str, Tensor]) -> Tensor:
    values = tensors.values() if isinstance(tensors, dict) else tensors
    return torch.cat([t.detach().double().flatten() for t in values])


def exact_weights(times: np.ndarray, gamma: float, at: float) -> np.ndarray:
    """The profile's mass over each step interval (t_{k-1}, t_k], for the steps up to time `at`."""
    upto = times[times <= at]
    previous = np.concatenate([[0.0], upto[:-1]])
    return (upto ** (gamma + 1) - previous ** (gamma + 1)) / at ** (gamma + 1)


class RandomWalkRun:
    """A toy 'training run': the network's weights take a random walk, with variable batch sizes.

    Keeps the weight history and the image count after every step, and snapshots of two power EMAs
    (sigma_rel 0.05 and 0.10) written every `every` steps into `folder`.
    """

    sigma_rels = (0.05, 0.10)

    def __init__(self, folder: Path | None = None, steps: int = 1200, every: int = 40) -> None:
        torch.manual_seed(0)
        self.network = ToyNet()
        self.ema = PowerFunctionEMA(self.network, self.sigma_rels)
        history, times, t = [], [], 0
        for step in range(1, steps + 1):
            with torch.no_grad():
                for param in self.network.parameters():
                    param.add_(torch.randn_like(param))
            t += 8 if step % 3 else 12
            self.ema.update(t)
            history.append(flat(list(self.network.parameters())))
            times.append(t)
            if folder is not None and step % every == 0:
                for index, sigma_rel in enumerate(self.sigma_rels):
                    state = self.ema.averaged_state_dict(index)
                    save_snapshot(folder, state, t, sigma_rel, self.ema.buffer_names())
        self.history = torch.stack(history)
        self.times = np.array(times, dtype=np.float64)

    def brute_force(self, sigma_rel: float, at: float) -> Tensor:
        weights = torch.from_numpy(exact_weights(self.times, sigma_rel_to_gamma(sigma_rel), at))
        return weights @ self.history[: len(weights)]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[RandomWalkRun, Path]:
    folder = tmp_path_factory.mktemp("phema")
    return RandomWalkRun(folder), folder


# --------------------------------------------------------------------------------------------------------------
# The math
# --------------------------------------------------------------------------------------------------------------


def test_sigma_rel_and_gamma_convert_both_ways() -> None:
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.01)
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.01)
    assert sigma_rel_to_gamma(MAX_SIGMA_REL) == pytest.approx(0.0, abs=1e-9)
    for sigma_rel in (0.01, 0.05, 0.13, 0.2, 0.28):
        assert gamma_to_sigma_rel(sigma_rel_to_gamma(sigma_rel)) == pytest.approx(sigma_rel, rel=1e-9)
    for bad in (0.0, -0.1, 0.3):
        with pytest.raises(ValueError, match="sigma_rel"):
            sigma_rel_to_gamma(bad)


def test_profile_is_normalised_and_has_the_requested_width() -> None:
    tau = np.linspace(0, 1000, 400_001)[1:]
    for sigma_rel in (0.05, 0.15):
        profile = power_profile(tau, 1000.0, sigma_rel_to_gamma(sigma_rel))
        mean = trapezoid(tau * profile, tau)
        std = math.sqrt(trapezoid((tau - mean) ** 2 * profile, tau))
        assert trapezoid(profile, tau) == pytest.approx(1.0, abs=1e-4)
        assert std / 1000 == pytest.approx(sigma_rel, rel=1e-3)
    assert power_profile(np.array([1001.0]), 1000.0, 3.0)[0] == 0.0


def test_profile_inner_products_match_numerical_integration() -> None:
    tau = np.linspace(0, 700, 700_001)[1:]
    numeric = trapezoid(power_profile(tau, 500.0, 6.9) * power_profile(tau, 700.0, 17.0), tau)
    assert profile_inner_products(500.0, 6.9, 700.0, 17.0) == pytest.approx(numeric, rel=1e-3)
    # long runs in images do not overflow
    assert np.isfinite(profile_inner_products(2e9, 17.0, 1.9e9, 17.0))


def test_first_update_starts_the_average_at_the_current_weights() -> None:
    assert ema_beta(64, 64, 6.94) == 0.0
    assert ema_beta(128, 64, 0.0) == pytest.approx(0.5)


def test_power_ema_equals_brute_force_average_of_the_weight_history() -> None:
    run = RandomWalkRun()
    t = run.times[-1]
    for index, sigma_rel in enumerate(run.sigma_rels):
        average = flat(run.ema.averages[index])
        brute = run.brute_force(sigma_rel, t)
        assert torch.allclose(average, brute, atol=1e-4)
        # the same, to first order, as weights proportional to t^gamma
        approximate = torch.from_numpy(run.times ** sigma_rel_to_gamma(sigma_rel))
        approximate = (approximate / approximate.sum()) @ run.history
        spread = (brute - run.history[-1]).norm()
        assert (average - approximate).norm() < 0.02 * spread


def test_averaged_state_dict_holds_averages_and_buffers() -> None:
    run = RandomWalkRun(steps=10)
    state = run.ema.averaged_state_dict(1)
    assert set(state) == {"linear.weight", "linear.bias", "scale"}
    assert torch.equal(state["scale"], run.network.scale)
    assert torch.allclose(flat([state["linear.weight"], state["linear.bias"]]), flat(run.ema.averages[1]))
    assert run.ema.buffer_names() == ["scale"]
    with pytest.raises(ValueError, match="time must increase"):
        run.ema.update(int(run.times[-1]))


def test_state_dict_round_trip_continues_identically() -> None:
    torch.manual_seed(0)
    network = nn.Linear(4, 3)
    ema = PowerFunctionEMA(network, (0.05, 0.2))
    for t in (10, 20, 30):
        with torch.no_grad():
            network.weight.add_(1.0)
        ema.update(t)
    restored = PowerFunctionEMA(network, (0.05, 0.2))
    restored.load_state_dict(ema.state_dict())
    for t in (40, 50):
        with torch.no_grad():
            network.weight.mul_(-1.5)
        ema.update(t)
        restored.update(t)
    assert restored.t_images == 50
    for mine, theirs in zip(ema.averages, restored.averages):
        assert all(torch.equal(a, b) for a, b in zip(mine, theirs))
    with pytest.raises(ValueError, match="sigma_rels"):
        PowerFunctionEMA(network, (0.05,)).load_state_dict(ema.state_dict())


# --------------------------------------------------------------------------------------------------------------
# Post-hoc reconstruction
# --------------------------------------------------------------------------------------------------------------


def test_solver_returns_a_tracked_profile_exactly() -> None:
    times = [100.0, 100.0, 200.0, 200.0, 300.0, 300.0]
    gammas = [sigma_rel_to_gamma(0.05), sigma_rel_to_gamma(0.10)] * 3
    solution = solve_posthoc_weights(times, gammas, 300.0, [0.10])
    assert np.allclose(solution.weights[:, 0], [0, 0, 0, 0, 0, 1], atol=1e-6)
    assert solution.fit_error[0] < 1e-6
    with pytest.raises(ValueError, match="target_time"):
        solve_posthoc_weights(times, gammas, 200.0, [0.10])


def test_reconstruction_of_a_tracked_sigma_rel_returns_that_ema(run: tuple[RandomWalkRun, Path]) -> None:
    toy, folder = run
    snapshots = find_snapshots(folder)
    assert len(snapshots) == 2 * 30
    (result,) = reconstruct(snapshots, [0.10])
    (tracked,) = [s for s in snapshots if s.t_images == toy.times[-1] and s.sigma_rel == pytest.approx(0.10)]
    for name, tensor in load_file(str(tracked.path)).items():
        assert torch.allclose(result.state_dict[name], tensor, atol=1e-4), name
    assert result.t_images == int(toy.times[-1])


@pytest.mark.parametrize("sigma_rel", [0.075, 0.15])
def test_reconstruction_of_other_sigma_rels_matches_brute_force(
    run: tuple[RandomWalkRun, Path], sigma_rel: float
) -> None:
    toy, folder = run
    snapshots = find_snapshots(folder)
    halfway = snapshots[len(snapshots) // 2].t_images
    for at in (halfway, None):
        (result,) = reconstruct(snapshots, [sigma_rel], at)
        brute = toy.brute_force(sigma_rel, result.t_images)
        between_tracked = (toy.brute_force(0.05, result.t_images) - toy.brute_force(0.10, result.t_images)).norm()
        reconstructed = flat([result.state_dict["linear.weight"], result.state_dict["linear.bias"]])
        assert (reconstructed - brute).norm() < 0.01 * between_tracked
        assert torch.equal(result.state_dict["scale"], toy.network.scale)


def test_posthoc_command_writes_loadable_weights(run: tuple[RandomWalkRun, Path], tmp_path: Path) -> None:
    _, folder = run
    snapshots = find_snapshots(folder)
    output = tmp_path / "ema.safetensors"
    main([str(folder), "--sigma-rel", "0.08", "--output", str(output), "--at-images", str(snapshots[10].t_images)])
    network = ToyNet()
    network.load_state_dict(load_file(str(output)))  # strict: exactly the network's keys
    with safe_open(str(output), framework="pt") as file:
        header = file.metadata()
    assert float(header["sigma_rel"]) == 0.08 and int(header["t_images"]) == snapshots[10].t_images

    main([str(folder), "--sigma-rel", "0.06,0.12", "--out-dir", str(tmp_path / "many"), "--dtype", "float16"])
    written = sorted((tmp_path / "many").glob("*.safetensors"))
    assert [path.name.split("-")[-1] for path in written] == ["0.060.safetensors", "0.120.safetensors"]
    assert load_file(str(written[0]))["linear.weight"].dtype == torch.float16

    with pytest.raises(SystemExit):
        main([str(folder), "--sigma-rel", "0.08", "--output", str(output), "--at-images", "123"])
    with pytest.raises(SystemExit):
        main([str(folder), "--sigma-rel", "0.5", "--output", str(output)])


def test_sweep_writes_table_and_plot(run: tuple[RandomWalkRun, Path], tmp_path: Path) -> None:
    toy, folder = run
    target = toy.brute_force(0.12, toy.times[-1])

    def distance_to_target(state: dict[str, Tensor]) -> float:
        return (flat([state["linear.weight"], state["linear.bias"]]) - target).norm().item()

    sigma_rels = [0.04, 0.08, 0.12, 0.16, 0.2]
    rows = sweep(folder, sigma_rels, distance_to_target, tmp_path, metric_name="distance", max_batch=2)
    assert [row["sigma_rel"] for row in rows] == sigma_rels
    table = json.loads((tmp_path / "posthoc_sweep.json").read_text())
    assert table["best"]["sigma_rel"] == 0.12
    assert (tmp_path / "posthoc_sweep.csv").read_text().splitlines()[0].endswith("distance")
    assert (tmp_path / "posthoc_sweep.png").read_bytes()[:4] == b"\x89PNG"


# --------------------------------------------------------------------------------------------------------------
# The Composer callback
# --------------------------------------------------------------------------------------------------------------


class ToyComposerModel(ComposerModel):
    """Regression with a ToyNet kept at `.dit`, where the callback looks for the trained network."""

    def __init__(self) -> None:
        super().__init__()
        self.dit = ToyNet()

    def forward(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        return self.dit(batch[0])

    def loss(self, outputs: Tensor, batch: tuple[Tensor, Tensor]) -> Tensor:
        return (outputs - batch[1]).square().mean()


def _train(folder: Path, max_duration: str, load_path: str | None = None, save: bool = False) -> PowerEMA:
    """Fit a toy ComposerModel (its network at `.dit`) with the PowerEMA callback; returns the callback."""

    torch.manual_seed(0)
    data = TensorDataset(torch.randn(64, 6), torch.randn(64, 5))
    model = ToyComposerModel()
    callback = PowerEMA(snapshot_interval_images=40, folder=str(folder / "{run_name}"), snapshot_dtype="float16")
    trainer = Trainer(
        model=model,
        train_dataloader=DataLoader(data, batch_size=8, shuffle=False),
        max_duration=max_duration,
        optimizers=torch.optim.SGD(model.parameters(), lr=0.1),
        callbacks=[callback],
        device="cpu",
        run_name="toy",
        save_folder=str(folder / "checkpoints") if save else None,
        save_interval="6ba",
        load_path=load_path,
        progress_bar=False,
        log_to_console=False,
        loggers=[],
    )
    trainer.fit()
    return callback


def test_callback_saves_snapshots_and_resumes_exactly(tmp_path: Path) -> None:
    straight = _train(tmp_path / "straight", "12ba", save=True)
    snapshots = find_snapshots(tmp_path / "straight" / "toy")
    # 8 images per batch, every 40 images: batches 5 and 10 (40, 80 images) and the end of the fit (96)
    assert sorted({s.t_images for s in snapshots}) == [40, 80, 96]
    assert sorted({round(s.sigma_rel, 6) for s in snapshots}) == [0.05, 0.1]
    first = load_file(str(snapshots[0].path))
    assert set(first) == {"linear.weight", "linear.bias", "scale"}
    assert first["linear.weight"].dtype == torch.float16 and first["scale"].dtype == torch.float32

    (reconstructed,) = reconstruct(snapshots, [0.10])  # the command reads the callback's files
    tracked = next(s for s in snapshots if s.t_images == 96 and s.sigma_rel == pytest.approx(0.10))
    for name, tensor in load_file(str(tracked.path)).items():
        assert torch.allclose(reconstructed.state_dict[name], tensor.float(), atol=1e-3), name

    checkpoint = tmp_path / "straight" / "checkpoints" / "ep0-ba6-rank0.pt"
    resumed = _train(tmp_path / "resumed", "12ba", load_path=str(checkpoint))
    assert resumed.ema.t_images == straight.ema.t_images == 96
    for mine, theirs in zip(straight.ema.averages, resumed.ema.averages):
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(mine, theirs))
    resumed_snapshots = find_snapshots(tmp_path / "resumed" / "toy")
    assert sorted({s.t_images for s in resumed_snapshots}) == [80, 96]  # 40 was saved before the checkpoint
    for snapshot in resumed_snapshots:
        original = tmp_path / "straight" / "toy" / snapshot.path.name
        assert all(
            torch.equal(a, b) for a, b in zip(load_file(str(original)).values(), load_file(str(snapshot.path)).values())
        )


def test_a_class_conditional_microdit_averages_its_label_embedding_too(tmp_path: Path) -> None:
    """Sampling a class-conditional MicroDiT needs its learned label embedding: the snapshots hold it beside the
    network ("dit.*", "label_embedder.weight"), and the post-hoc EMA loads into a fresh model through
    `models.sampling.load_weights`."""
    def build():
        return create_latent_diffusion(
            vae_name="identity", text_encoder_name=None, num_classes=3, label_embedding_dim=32,
            dit_arch="MicroDiT_XXS_2", latent_res=4, in_channels=3, dtype="float32",
        )

    torch.manual_seed(0)
    model = build()
    samples = [{"image_latents": torch.randn(3, 4, 4), "label": torch.tensor(i % 3)} for i in range(16)]
    Trainer(
        model=model, train_dataloader=DataLoader(samples, batch_size=4), max_duration="4ba", device="cpu",
        optimizers=torch.optim.Adam(model.parameters(), lr=1e-2), run_name="cls", progress_bar=False,
        log_to_console=False, loggers=[], callbacks=[PowerEMA(snapshot_interval_images=8, folder=str(tmp_path))],
    ).fit()
    snapshots = find_snapshots(tmp_path)
    keys = set(load_file(str(snapshots[0].path)))
    assert "label_embedder.weight" in keys and all(k.startswith("dit.") for k in keys - {"label_embedder.weight"})

    (reconstruction,) = reconstruct(snapshots, [0.10])
    weights = save_reconstruction(tmp_path / "ema.safetensors", reconstruction)
    fresh = build()
    load_weights(fresh, weights)
    torch.testing.assert_close(fresh.label_embedder.weight, reconstruction.state_dict["label_embedder.weight"])
    assert not torch.equal(fresh.label_embedder.weight, model.label_embedder.weight)  # an average, not the last
    assert fresh.generate(class_labels=[0, 2], seeds=[0, 1], num_inference_steps=2).shape == (2, 3, 4, 4)
