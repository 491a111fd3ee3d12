"""The in-training sample-quality callback logs FD and the shapes score from a real Composer run."""

from __future__ import annotations

import os

import pytest
import torch
from composer import Trainer
from composer.loggers import InMemoryLogger
from composer.utils import get_free_tcp_port
from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy
from torch.utils.data import DataLoader

from micro_diffusion.encoders.text import load_text_encoder
from micro_diffusion.encoders.vae import load_vae
from micro_diffusion.models.dit import create_dit
from micro_diffusion.models.model import LatentDiffusion, create_latent_diffusion
from micro_diffusion.models.sampling import generate_samples
from micro_diffusion.training import sample_quality
from micro_diffusion.training.callbacks import EMA
from micro_diffusion.training.sample_quality import SampleQuality


def latent_samples(count: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [{"image_latents": torch.rand(3, 32, 32, generator=g) * 2 - 1,
             "caption_latents": torch.randn(1, 77, 32, generator=g)} for _ in range(count)]


@pytest.mark.slow
def test_logs_frechet_distance_and_shapes_score_at_eval(tmp_path, tiny_hf_clip_dir):
    torch.manual_seed(0)
    dit = create_dit("MicroDiT_XXS_2", input_size=32, in_channels=3, caption_channels=32)
    model = LatentDiffusion(dit, load_vae("identity"), load_text_encoder(tiny_hf_clip_dir.name), latent_res=32)
    quality = SampleQuality(
        num_samples=6, batch_size=3, steps=2, guidance=2.0, reference_source="shapes",
        reference_options={"num_samples": 12, "resolution": 32}, reference_count=12, cache_dir=str(tmp_path),
    )
    memory = InMemoryLogger()
    trainer = Trainer(
        model=model, train_dataloader=DataLoader(latent_samples(8), batch_size=4),
        eval_dataloader=DataLoader(latent_samples(4), batch_size=4), max_duration="2ba", eval_interval="2ba",
        optimizers=torch.optim.AdamW(model.dit.parameters(), lr=1e-4), callbacks=[quality], loggers=[memory],
        device="cpu", progress_bar=False,
    )
    trainer.fit()
    logged = memory.data
    assert "quality/fd_efficientnet-lite0" in logged and "quality/shapes_all" in logged
    fd = logged["quality/fd_efficientnet-lite0"][-1][1]
    assert fd > 0  # untrained samples are far from rendered shapes
    assert 0.0 <= logged["quality/shapes_all"][-1][1] <= 1.0


def test_rejects_bad_prompts():
    with pytest.raises(ValueError, match="prompts"):
        SampleQuality(prompts="a cat")
    assert SampleQuality(prompts=["a", "b"], num_samples=5).prompts == ["a", "b", "a", "b", "a"]


def class_batches(count: int) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    return [{"image_latents": torch.randn(3, 8, 8, generator=generator), "label": torch.tensor(index % 4)}
            for index in range(count)]


@pytest.mark.parametrize("ema_first", [True, False])
def test_scores_the_ema_weights_whatever_the_order_of_the_callbacks(monkeypatch, ema_first):
    scored = []

    def record_weights(model, conditions, seed, batch_size, **sampling):
        scored.append({name: param.detach().clone() for name, param in model.dit.named_parameters()})
        return torch.rand(len(conditions), 3, 8, 8)

    monkeypatch.setattr(sample_quality, "generate_samples", record_weights)
    torch.manual_seed(0)
    model = create_latent_diffusion(vae_name="identity", text_encoder_name=None, num_classes=4, label_embedding_dim=32,
                                    dit_arch="MicroDiT_XXS_2", latent_res=8, in_channels=3, dtype="float32")
    ema, quality = EMA(smoothing=0.5), SampleQuality(prompts=["a", "b"], num_samples=2)
    Trainer(
        model=model, train_dataloader=DataLoader(class_batches(8), batch_size=4),
        eval_dataloader=DataLoader(class_batches(4), batch_size=4), max_duration="2ba", eval_interval="2ba",
        optimizers=torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2), device="cpu",
        callbacks=[ema, quality] if ema_first else [quality, ema], progress_bar=False, log_to_console=False,
    ).fit()
    assert len(scored) == 1
    raw = {name: param.detach() for name, param in model.dit.named_parameters()}
    assert any(not torch.equal(weight, raw[name]) for name, weight in scored[0].items()), "the raw weights were scored"
    for name, weight in scored[0].items():
        torch.testing.assert_close(weight, ema.weights[f"dit.{name}"], rtol=0, atol=0, msg=name)


def _two_rank_worker(rank: int, port: int) -> None:
    torch.set_num_threads(1)
    # Composer reads these; an earlier in-process test of the suite may have left WORLD_SIZE=1 behind.
    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2", NODE_RANK="0")
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        model = create_latent_diffusion(vae_name="identity", text_encoder_name=None, num_classes=4,
                                        label_embedding_dim=32, dit_arch="MicroDiT_XXS_2", latent_res=8,
                                        in_channels=3, dtype="float32")
        quality = SampleQuality(prompts=["a"], num_samples=5, batch_size=2, steps=2, guidance=2.0)
        quality.prompts = [0, 1, 2, 3, 1]  # class labels: the conditions of a class-conditional model
        expected = generate_samples(model, quality.prompts, quality.seed, 5, **quality.sampling)
        for name in ("dit", "label_embedder"):  # Composer's layout: FSDP around the trained children
            setattr(model, name, FullyShardedDataParallel(
                getattr(model, name), sharding_strategy=ShardingStrategy.SHARD_GRAD_OP, use_orig_params=True,
                device_id=torch.device("cpu"),
            ))
        images = quality._generate_on_every_rank(model)  # rank 0 samples 0-2, rank 1 samples 3-4 (and a pad)
        assert images.shape == expected.shape
        torch.testing.assert_close(images, (expected * 255).round() / 255, rtol=0, atol=1e-5)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_every_rank_generates_a_slice_under_fsdp_and_all_samples_are_gathered():
    torch.multiprocessing.spawn(_two_rank_worker, args=(get_free_tcp_port(),), nprocs=2)
