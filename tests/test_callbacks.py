"""Training callbacks under a real Composer Trainer on CPU: EMA, image grid, NaN guard, throughput and MFU."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from composer import Callback, Trainer
from composer.core import State, Timestamp
from composer.loggers import InMemoryLogger, Logger, LoggerDestination
from composer.utils import get_free_tcp_port
from PIL import Image
from safetensors.torch import load_file
from torch import Tensor, nn
from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from torchvision.utils import make_grid

from micro_diffusion.models.checkpoints import (
    EMA_CALLBACK,
    export_ema_weights,
    load_dit_weights,
    read_trained_weights,
)
from micro_diffusion.models.dit import num_kept_tokens
from micro_diffusion.models.model import LatentDiffusion, create_latent_diffusion
from micro_diffusion.training.callbacks import EMA, ImageGridLogger, NaNGuard, ThroughputMonitor

LATENT_RES = 8  # identity "VAE": latents are 3 x 8 x 8 images, 16 tokens of 2 x 2 patches
NUM_CLASSES = 4
BATCH_SIZE = 4


def class_model(mask_ratio: float = 0.5) -> LatentDiffusion:
    torch.manual_seed(0)
    return create_latent_diffusion(
        vae_name="identity", text_encoder_name=None, num_classes=NUM_CLASSES, label_embedding_dim=32,
        dit_arch="MicroDiT_XXS_2", latent_res=LATENT_RES, in_channels=3, dtype="float32", train_mask_ratio=mask_ratio,
    )


def class_samples(count: int = 8 * BATCH_SIZE) -> list[dict[str, Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [
        {
            "image_latents": torch.randn(3, LATENT_RES, LATENT_RES, generator=generator),
            "label": torch.randint(0, NUM_CLASSES, (), generator=generator),
        }
        for _ in range(count)
    ]


def make_trainer(
    model: LatentDiffusion, callbacks: list[Callback], max_duration: str, samples: list[dict] | None = None, **kwargs
) -> Trainer:
    return Trainer(
        model=model,
        train_dataloader=DataLoader(samples or class_samples(), batch_size=BATCH_SIZE),
        max_duration=max_duration,
        optimizers=torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2),
        device="cpu",
        callbacks=callbacks,
        progress_bar=False,
        log_to_console=False,
        seed=0,
        **kwargs,
    )


def trainable(model: nn.Module) -> dict[str, Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def assert_weights_equal(actual: dict[str, Tensor], expected: dict[str, Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=1e-6, msg=name)


# ----------------------------------------------------------------------------------------------------------------
# EMA
# ----------------------------------------------------------------------------------------------------------------


class SetWeightsToBatch(Callback):
    """After each step, sets every trainable parameter to the batch number: the averaged weights are then known."""

    def batch_end(self, state: State, logger: Logger) -> None:
        with torch.no_grad():
            for param in state.model.parameters():
                if param.requires_grad:
                    param.fill_(float(state.timestamp.batch))


@pytest.mark.parametrize(
    "ema_start, update_interval, closed_form",
    [
        # updates after batches 1..6, starting from the initial weights w0
        (0, 1, lambda w0, s: s**6 * w0 + (1 - s) * sum(s ** (6 - i) * i for i in range(1, 7))),
        # restarts from the weights of batch 2 (= 2), then updates after batches 4 and 6
        ("2ba", "2ba", lambda w0, s: torch.full_like(w0, s**2 * 2 + (1 - s) * (s * 4 + 6))),
    ],
)
def test_ema_after_k_updates_equals_the_closed_form(ema_start, update_interval, closed_form):
    model = class_model()
    initial = trainable(model)
    ema = EMA(smoothing=0.8, ema_start=ema_start, update_interval=update_interval)
    make_trainer(model, [SetWeightsToBatch(), ema], max_duration="6ba").fit()
    assert_weights_equal(ema.weights, {name: closed_form(w0, 0.8) for name, w0 in initial.items()})
    assert any(name.startswith("label_embedder.") for name in ema.weights)  # every trained module is averaged
    assert not any(name.startswith("vae.") for name in ema.weights)


def test_ema_arguments_give_clear_errors():
    assert EMA(half_life="4ba", update_interval=2).smoothing == pytest.approx(0.5**0.5)
    with pytest.raises(ValueError, match="exactly one of smoothing and half_life"):
        EMA()
    with pytest.raises(ValueError, match="exactly one of smoothing and half_life"):
        EMA(smoothing=0.9, half_life="10ba")
    with pytest.raises(ValueError, match="multiple of update_interval"):
        EMA(smoothing=0.9, ema_start="25ba", update_interval="10ba")
    with pytest.raises(ValueError, match="number of batches"):
        EMA(smoothing=0.9, ema_start="1ep")
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        EMA(smoothing=1.0)


class WeightSnapshots(Callback):
    """Copies of the model's trained weights at the points where training and evaluation read them."""

    def __init__(self, ema: EMA) -> None:
        self.ema = ema
        self.raw_after_step: dict[int, dict[str, Tensor]] = {}
        self.ema_after_step: dict[int, dict[str, Tensor]] = {}
        self.in_eval: dict[int, dict[str, Tensor]] = {}
        self.at_next_step: dict[int, dict[str, Tensor]] = {}

    def batch_end(self, state: State, logger: Logger) -> None:
        self.raw_after_step[int(state.timestamp.batch)] = trainable(state.model)
        self.ema_after_step[int(state.timestamp.batch)] = {k: v.clone() for k, v in self.ema.weights.items()}

    def eval_batch_start(self, state: State, logger: Logger) -> None:
        self.in_eval[int(state.timestamp.batch)] = trainable(state.model)

    def batch_start(self, state: State, logger: Logger) -> None:
        self.at_next_step[int(state.timestamp.batch)] = trainable(state.model)


def test_evaluation_uses_the_ema_weights_and_training_continues_from_the_raw_ones():
    model = class_model()
    ema = EMA(smoothing=0.9)
    snapshots = WeightSnapshots(ema)
    logger = InMemoryLogger()
    eval_samples = class_samples(BATCH_SIZE)
    trainer = make_trainer(
        model, [ema, snapshots], max_duration="3ba", loggers=[logger],
        eval_dataloader=DataLoader(eval_samples, batch_size=BATCH_SIZE), eval_interval="1ba",
    )
    trainer.fit()
    for batch in (1, 2, 3):
        assert_weights_equal(snapshots.in_eval[batch], snapshots.ema_after_step[batch])
        assert not torch.equal(snapshots.in_eval[batch]["dit.final_layer.linear.weight"],
                               snapshots.raw_after_step[batch]["dit.final_layer.linear.weight"])
    for batch in (1, 2):
        assert_weights_equal(snapshots.at_next_step[batch], snapshots.raw_after_step[batch])
    assert_weights_equal(trainable(model), snapshots.raw_after_step[3])

    # The logged validation loss is the EMA model's.
    eval_batch = next(iter(DataLoader(eval_samples, batch_size=BATCH_SIZE)))
    model.eval()
    with ema.applied(trainer.state):
        ema_loss = model.validation_loss(eval_batch).item()
    raw_loss = model.validation_loss(eval_batch).item()
    logged = logger.most_recent_values["metrics/eval/ValidationLoss"].item()
    assert logged == pytest.approx(ema_loss, rel=1e-5) and logged != pytest.approx(raw_loss, rel=1e-5)


def test_ema_survives_checkpoint_and_resume_and_exports(tmp_path):
    uninterrupted = EMA(smoothing=0.8)
    make_trainer(class_model(), [uninterrupted], max_duration="4ba").fit()

    first_half = EMA(smoothing=0.8)
    make_trainer(class_model(), [first_half], max_duration="2ba", save_folder=str(tmp_path), save_interval="2ba").fit()
    checkpoint = tmp_path / "latest-rank0.pt"
    resumed = EMA(smoothing=0.8)
    trainer = make_trainer(class_model(), [resumed], max_duration="4ba", load_path=str(checkpoint))
    assert_weights_equal(resumed.weights, first_half.weights)
    trainer.fit()
    assert_weights_equal(resumed.weights, uninterrupted.weights)

    exported = export_ema_weights(checkpoint, tmp_path / "ema.safetensors")
    fresh = class_model()
    load_dit_weights(fresh.dit, exported)
    assert_weights_equal({f"dit.{k}": v for k, v in trainable(fresh.dit).items()},
                         {k: v for k, v in first_half.weights.items() if k.startswith("dit.")})
    label_embedding = load_file(exported)["label_embedder.weight"]
    torch.testing.assert_close(label_embedding, first_half.weights["label_embedder.weight"])


def test_a_checkpoint_saved_before_the_ema_started_offers_its_raw_weights(tmp_path):
    assert EMA.__qualname__ == EMA_CALLBACK  # Composer keys a callback's checkpoint state by its class name
    make_trainer(class_model(), [EMA(smoothing=0.8, ema_start="4ba")], max_duration="2ba", save_folder=str(tmp_path),
                 save_interval="2ba").fit()
    checkpoint = tmp_path / "latest-rank0.pt"
    with pytest.raises(KeyError, match=r"saved at batch 2, before its EMA started \(batch 4\)"):
        export_ema_weights(checkpoint, tmp_path / "ema.safetensors")
    weights = read_trained_weights(checkpoint)
    assert weights.kind == "raw" and "before its EMA started" in weights.description
    assert "dit.final_layer.linear.weight" in weights.state


def test_export_and_restore_give_clear_errors(tmp_path):
    torch.save({"state": {"model": {}, "callbacks": {}}}, tmp_path / "no_ema.pt")
    with pytest.raises(KeyError, match="holds no EMA weights"):
        export_ema_weights(tmp_path / "no_ema.pt", tmp_path / "out.safetensors")
    ema = EMA(smoothing=0.9)
    ema.load_state_dict({"weights": {"dit.not_a_parameter": torch.zeros(1)}})
    with pytest.raises(ValueError, match=r"do not match the model's trainable parameters.*unexpected \['dit.not_a"):
        make_trainer(class_model(), [ema], max_duration="1ba").fit()


def plain_trainable(model: nn.Module) -> dict[str, Tensor]:
    """`trainable` without FSDP's name segment."""
    return {name.replace("_fsdp_wrapped_module.", ""): value for name, value in trainable(model).items()}


def _check_ema_on_two_ranks(wrapper: str) -> None:
    """EMA of a model laid out as Composer wraps it: FSDP around its trained children, or DDP around it."""
    torch.manual_seed(0)
    model = nn.Module()
    model.dit = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 5))
    model.label_embedder = nn.Embedding(3, 5)
    model.vae = nn.Linear(2, 2).requires_grad_(False)
    initial = trainable(model)
    if wrapper == "fsdp":
        for name in ("dit", "label_embedder"):  # SHARD_GRAD_OP: every rank holds a part of each tensor
            module = FullyShardedDataParallel(
                getattr(model, name), sharding_strategy=ShardingStrategy.SHARD_GRAD_OP, use_orig_params=True,
                device_id=torch.device("cpu"),
            )
            setattr(model, name, module)
        assert any(p.numel() == 0 for p in model.parameters())  # really sharded
    state = SimpleNamespace(model=model if wrapper == "fsdp" else DistributedDataParallel(model))
    state.timestamp = Timestamp()
    ema = EMA(smoothing=0.5)
    ema.fit_start(state, None)
    for step in (1, 2, 3):
        with FullyShardedDataParallel.summon_full_params(model, writeback=True), torch.no_grad():
            for param in model.parameters():
                if param.requires_grad:
                    param.fill_(step)
        state.timestamp = Timestamp(batch=step)
        ema.batch_end(state, None)
    expected = {name: 0.125 * w0 + 0.5 * (0.25 * 1 + 0.5 * 2 + 3) for name, w0 in initial.items()}
    assert_weights_equal(ema.weights, expected)  # plain names, full tensors, on every rank

    ema.eval_start(state, None)
    with FullyShardedDataParallel.summon_full_params(model, writeback=False):
        assert_weights_equal(plain_trainable(model), expected)  # every rank's shard holds its part of the average
    ema.eval_end(state, None)
    with FullyShardedDataParallel.summon_full_params(model, writeback=False):
        assert_weights_equal(plain_trainable(model), {name: torch.full_like(w, 3.0) for name, w in initial.items()})


def _two_rank_worker(rank: int, port: int) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        _check_ema_on_two_ranks("fsdp")
        _check_ema_on_two_ranks("ddp")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_ema_under_fsdp_and_ddp_on_two_ranks():
    # Composer's FSDP needs CUDA; torch's FSDP runs on CPU with gloo, with the layout Composer gives the model.
    torch.multiprocessing.spawn(_two_rank_worker, args=(get_free_tcp_port(),), nprocs=2)


# ----------------------------------------------------------------------------------------------------------------
# Image grid
# ----------------------------------------------------------------------------------------------------------------


class RecordImages(LoggerDestination):
    def __init__(self) -> None:
        self.logged: list[tuple[str, int, Tensor]] = []

    def log_images(self, images, name="Images", channels_last=False, step=None, masks=None, mask_class_labels=None,
                   use_table=True) -> None:
        self.logged.append((name, step, images))


def test_image_grid_is_saved_and_logged_with_the_ema_weights(tmp_path):
    model = class_model()
    ema = EMA(smoothing=0.9)
    labels = [0, 1, 2, 3, 0, 1]
    grid_logger = ImageGridLogger(
        class_labels=labels, interval="2ba", seed=5, num_inference_steps=2, guidance_scale=2.0, num_columns=3,
        save_folder=str(tmp_path / "{run_name}"),
    )
    recorder = RecordImages()
    trainer = make_trainer(model, [grid_logger, ema], max_duration="3ba", loggers=[recorder], run_name="grid-run")
    trainer.fit()

    # Every second batch and at the end of training; 6 images of 8 x 8 in 3 columns, 2-pixel padding.
    files = sorted(path.name for path in (tmp_path / "grid-run").iterdir())
    assert files == ["grid_ba00000002.png", "grid_ba00000003.png"]
    with Image.open(tmp_path / "grid-run" / files[-1]) as png:
        assert png.size == (3 * (LATENT_RES + 2) + 2, 2 * (LATENT_RES + 2) + 2)
    assert [(name, step) for name, step, _ in recorder.logged] == [("image_grid", 2), ("image_grid", 3)]

    final_grid = recorder.logged[-1][2]
    model.eval()
    sample = dict(class_labels=labels, seeds=[5, 6, 7, 8, 9, 10], num_inference_steps=2, guidance_scale=2.0)
    with ema.applied(trainer.state):
        with_ema = make_grid(model.generate(**sample), nrow=3)
    raw = make_grid(model.generate(**sample), nrow=3)
    torch.testing.assert_close(final_grid, with_ema)
    assert not torch.allclose(final_grid, raw)


def test_image_grid_for_a_text_model_with_prompts(tmp_path, tiny_hf_clip_dir):
    torch.manual_seed(0)
    model = create_latent_diffusion(
        vae_name="identity", text_encoder_name=tiny_hf_clip_dir.name, dit_arch="MicroDiT_XXS_2",
        latent_res=LATENT_RES, in_channels=3, dtype="float32",
    )
    samples = [{"image_latents": torch.randn(3, LATENT_RES, LATENT_RES), "caption_latents": torch.randn(1, 77, 32)}
               for _ in range(BATCH_SIZE)]
    grid_logger = ImageGridLogger(prompts=["a red circle", "two blue squares"], interval="1ba", num_inference_steps=2,
                                  save_folder=str(tmp_path))
    make_trainer(model, [grid_logger], max_duration="1ba", samples=samples).fit()
    with Image.open(tmp_path / "grid_ba00000001.png") as png:
        assert png.size == (2 * (LATENT_RES + 2) + 2, LATENT_RES + 2 + 2)  # two prompts: one row of two


def test_image_grid_arguments_give_clear_errors():
    with pytest.raises(ValueError, match="exactly one of prompts"):
        ImageGridLogger()
    with pytest.raises(ValueError, match="exactly one of prompts"):
        ImageGridLogger(prompts=["a"], class_labels=[0])
    with pytest.raises(ValueError, match="at least one"):
        ImageGridLogger(prompts=[])


# ----------------------------------------------------------------------------------------------------------------
# NaN guard
# ----------------------------------------------------------------------------------------------------------------


def test_nan_guard_stops_before_the_step_and_names_the_batch():
    samples = class_samples()
    samples[2 * BATCH_SIZE]["image_latents"][0, 0, 0] = float("nan")  # first sample of batch 2 (0-based)
    model = class_model()
    with pytest.raises(RuntimeError, match=r"non-finite training loss at batch 2 \(epoch 0, rank 0\): loss=nan"):
        make_trainer(model, [NaNGuard()], max_duration="4ba", samples=samples).fit()
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the NaN never reached the weights


def test_nan_guard_names_every_loss_term():
    guard = NaNGuard()
    state = SimpleNamespace(loss={"diffusion": torch.tensor(float("nan")), "weighting": torch.tensor(0.5)},
                            timestamp=Timestamp(epoch=1, batch=7))
    with pytest.raises(RuntimeError, match=r"at batch 7 \(epoch 1, rank 0\): diffusion=nan, weighting=0.5"):
        guard.after_loss(state, None)
    state.loss = (torch.tensor(1.0), torch.tensor([1.0, float("inf"), float("-inf")]))
    with pytest.raises(RuntimeError, match=r"loss\[0\]=1, loss\[1\]=2 of 3 values not finite"):
        guard.after_loss(state, None)
    state.loss = {"diffusion": torch.tensor(0.3)}
    guard.after_loss(state, None)  # finite: training goes on


# ----------------------------------------------------------------------------------------------------------------
# Throughput and MFU
# ----------------------------------------------------------------------------------------------------------------


class RecordProgress(Callback):
    """Composer's training wall-clock time and image count after every batch."""

    def __init__(self) -> None:
        self.after_batch: dict[int, tuple[float, int]] = {}

    def batch_end(self, state: State, logger: Logger) -> None:
        progress = (state.timestamp.total_wct.total_seconds(), int(state.timestamp.sample))
        self.after_batch[int(state.timestamp.batch)] = progress


def test_throughput_and_mfu_follow_the_formula(tiny_hf_clip_dir):
    torch.manual_seed(0)
    model = create_latent_diffusion(
        vae_name="identity", text_encoder_name=tiny_hf_clip_dir.name, load_text_encoder_weights=False,
        dit_arch="MicroDiT_XXS_2", latent_res=LATENT_RES, in_channels=3, dtype="float32", train_mask_ratio=0.5,
    )
    caption_length = 5
    samples = [{"image_latents": torch.randn(3, LATENT_RES, LATENT_RES),
                "caption_latents": torch.randn(1, caption_length, 32)} for _ in range(6 * BATCH_SIZE)]
    progress = RecordProgress()
    logger = InMemoryLogger()
    monitor = ThroughputMonitor(window_size=2, log_interval=2, peak_flops_per_device=1e12)
    make_trainer(model, [progress, monitor], max_duration="6ba", samples=samples, loggers=[logger]).fit()

    logged = {key: [(int(timestamp.batch), value) for timestamp, value in logger.data[key]]
              for key in logger.data if key.startswith("throughput/")}
    assert [batch for batch, _ in logged["throughput/images_per_sec"]] == [4, 6]  # every 2 batches, window filled
    flops_per_image = model.dit.training_flops(0.5, caption_length)
    tokens_per_image = num_kept_tokens(LATENT_RES**2 // 4, 0.5)
    assert tokens_per_image == 8
    for index, batch in enumerate((4, 6)):
        (start_seconds, start_images), (end_seconds, end_images) = (progress.after_batch[b] for b in (batch - 2, batch))
        images_per_sec = (end_images - start_images) / (end_seconds - start_seconds)
        expected = {
            "throughput/images_per_sec": images_per_sec,
            "throughput/device/images_per_sec": images_per_sec,  # world size 1
            "throughput/tokens_per_sec": images_per_sec * tokens_per_image,
            "throughput/device/tokens_per_sec": images_per_sec * tokens_per_image,
            "throughput/flops_per_sec": images_per_sec * flops_per_image,
            "throughput/device/flops_per_sec": images_per_sec * flops_per_image,
            "throughput/device/mfu": images_per_sec * flops_per_image / 1e12,
        }
        assert logged.keys() == expected.keys()
        for key, value in expected.items():
            assert logged[key][index] == (batch, pytest.approx(value, rel=1e-9)), key


def test_mfu_is_omitted_without_a_known_peak_and_class_labels_count_one_token():
    model = class_model(mask_ratio=0.0)
    logger = InMemoryLogger()
    make_trainer(model, [ThroughputMonitor(window_size=1, log_interval=1)], max_duration="2ba", loggers=[logger]).fit()
    values = logger.most_recent_values
    assert "throughput/device/mfu" not in values  # CPU: no peak in Composer's table
    assert values["throughput/flops_per_sec"] == pytest.approx(
        values["throughput/images_per_sec"] * model.dit.training_flops(0.0, 1), rel=1e-9
    )
    assert values["throughput/tokens_per_sec"] == pytest.approx(values["throughput/images_per_sec"] * 16, rel=1e-9)


def test_throughput_of_a_network_without_a_flop_counter_is_images_per_second():
    """The EDM2 U-Net has no analytic FLOP counter: the monitor logs images/s only."""
    torch.manual_seed(0)
    model = create_latent_diffusion(
        vae_name="identity", text_encoder_name=None, num_classes=NUM_CLASSES, latent_res=LATENT_RES, in_channels=3,
        dtype="float32", unet_preset="cifar-XXS",
        unet_kwargs={"model_channels": 16, "num_blocks": 1, "channel_mult": [1], "attn_resolutions": [],
                     "channels_per_head": 16},
    )
    logger = InMemoryLogger()
    make_trainer(model, [ThroughputMonitor(window_size=1, log_interval=1)], max_duration="2ba", loggers=[logger]).fit()
    logged = {key for key in logger.data if key.startswith("throughput/")}
    assert logged == {"throughput/images_per_sec", "throughput/device/images_per_sec"}
    assert logger.most_recent_values["throughput/images_per_sec"] > 0


def test_throughput_arguments_give_clear_errors():
    with pytest.raises(ValueError, match="window_size and log_interval"):
        ThroughputMonitor(window_size=0)
    with pytest.raises(ValueError, match="peak_flops_per_device"):
        ThroughputMonitor(peak_flops_per_device=0)
