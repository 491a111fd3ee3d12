"""The in-training sample-quality callback logs FD and the shapes score from a real Composer run."""

from __future__ import annotations

import pytest
import torch
from composer import Trainer
from composer.loggers import InMemoryLogger
from torch.utils.data import DataLoader

from micro_diffusion.encoders.text import load_text_encoder
from micro_diffusion.encoders.vae import load_vae
from micro_diffusion.models.dit import create_dit
from micro_diffusion.models.model import LatentDiffusion
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
