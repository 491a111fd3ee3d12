"""LatentDiffusion: training forward, masked loss, deterministic validation, overfitting, generate()."""

from __future__ import annotations

import pytest
import torch

from micro_diffusion.diffusion.edm import EDMConfig
from micro_diffusion.encoders.vae import load_vae
from micro_diffusion.models.dit import create_dit
from micro_diffusion.models.model import (
    DIT_ARGUMENTS,
    MODEL_DESCRIPTION,
    UNET_ARGUMENTS,
    LatentDiffusion,
    create_latent_diffusion,
    default_arguments,
    released_model_arguments,
)

LATENT_RES = 8  # the tiny VAE downsamples by 4: 32-px images


@pytest.fixture(scope="module")
def model(tiny_vae_dir, tiny_hf_clip_dir) -> LatentDiffusion:
    torch.manual_seed(0)
    return create_latent_diffusion(
        vae_name=str(tiny_vae_dir), text_encoder_name=tiny_hf_clip_dir.name, dit_arch="MicroDiT_XXS_2",
        latent_res=LATENT_RES, in_channels=4, dtype="float32", train_mask_ratio=0.5,
    )


def latent_batch(model: LatentDiffusion, batch: int = 4, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "image_latents": torch.randn(batch, 4, LATENT_RES, LATENT_RES, generator=g).half(),
        "caption_latents": torch.randn(batch, 1, 77, model.dit.caption_channels, generator=g).half(),
        "drop_caption_mask": torch.ones(batch),
    }


def test_builds_from_local_models_with_widths_from_the_encoders(model):
    assert model.dit.caption_channels == model.text_encoder.width == 32
    assert model.dit.input_size == LATENT_RES
    assert not any(p.requires_grad for p in model.vae.parameters())
    assert not any(p.requires_grad for p in model.text_encoder.parameters())


def test_training_forward_masks_and_eval_does_not(model):
    batch = latent_batch(model)
    seen: list[int] = []
    handle = model.dit.blocks[0].register_forward_hook(lambda _m, a, _o: seen.append(a[0].shape[1]))
    try:
        model.train()
        loss = model.loss(model(batch), batch)
        model.eval()
        model.validation_loss(batch)
    finally:
        handle.remove()
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert seen[0] == 8  # 16 tokens, half dropped in training
    assert all(n == 16 for n in seen[1:])  # no masking in evaluation


def test_dropped_captions_use_the_null_embedding(model):
    batch = latent_batch(model)
    batch["drop_caption_mask"] = torch.tensor([1.0, 0.0, 1.0, 0.0])
    caption = model.caption_latents(batch)
    assert caption[1].abs().max() == 0 and caption[3].abs().max() == 0
    assert caption[0].abs().max() > 0


def test_validation_loss_is_deterministic(model):
    batch = latent_batch(model)
    model.eval()
    assert model.validation_loss(batch).item() == model.validation_loss(batch).item()


def test_missing_precomputed_latents_give_a_clear_error(model):
    with pytest.raises(KeyError, match="image_latents"):
        model({"caption_latents": torch.zeros(1, 1, 77, 32)})


def test_trains_from_raw_images_and_captions(tiny_vae_dir, tiny_hf_clip_dir):
    model = create_latent_diffusion(
        vae_name=str(tiny_vae_dir), text_encoder_name=tiny_hf_clip_dir.name, dit_arch="MicroDiT_XXS_2",
        latent_res=LATENT_RES, dtype="float32", precomputed_latents=False,
    )
    batch = {"image": torch.rand(2, 3, 32, 32) * 2 - 1, "captions": ["a red circle", "two blue squares"]}
    loss = model.loss(model(batch), batch)
    loss.backward()
    assert torch.isfinite(loss)
    assert model.dit.x_embedder.proj.weight.grad is not None


@pytest.mark.slow
def test_tiny_model_overfits_a_fixed_batch():
    """16 fixed latents with their own captions: the deterministic validation loss falls by more than half."""
    torch.manual_seed(0)
    dit = create_dit("MicroDiT_XXS_2", input_size=8, in_channels=3, caption_channels=32)
    model = LatentDiffusion(dit, load_vae("identity"), None, latent_res=8)
    g = torch.Generator().manual_seed(1)
    batch = {"image_latents": 0.9 * torch.randn(16, 3, 8, 8, generator=g),
             "caption_latents": torch.randn(16, 1, 8, 32, generator=g)}
    model.eval()
    before = model.validation_loss(batch).item()
    optimizer = torch.optim.AdamW(model.dit.parameters(), lr=2e-3)
    model.train()
    for _ in range(250):
        optimizer.zero_grad(set_to_none=True)
        model.loss(model(batch), batch).backward()
        optimizer.step()
    model.eval()
    after = model.validation_loss(batch).item()
    assert after < 0.5 * before, (before, after)


@pytest.mark.parametrize("guidance_scale", [1.0, 4.0])
def test_generate_end_to_end_offline(model, guidance_scale):
    model.eval()
    images = model.generate(prompt=["a red circle", "a blue square"], num_inference_steps=3,
                            guidance_scale=guidance_scale, seed=0)
    assert images.shape == (2, 3, 32, 32) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1
    latents = model.generate(prompt="a red circle", num_inference_steps=3, seed=0, return_only_latents=True)
    assert latents.shape == (1, 4, LATENT_RES, LATENT_RES)


def test_an_image_depends_only_on_its_seed(model):
    model.eval()
    alone = model.generate(prompt=["a red circle"], num_inference_steps=3, seeds=[7], return_only_latents=True)
    batched = model.generate(prompt=["a green star", "a red circle"], num_inference_steps=3, seeds=[3, 7],
                             return_only_latents=True)
    torch.testing.assert_close(batched[1:], alone, rtol=1e-4, atol=1e-4)
    euler = model.generate(prompt=["a red circle"], num_inference_steps=3, seeds=[7], sampler="euler",
                           return_only_latents=True)
    assert not torch.allclose(euler, alone)


def test_generate_accepts_token_ids(model):
    tokens = model.text_encoder.tokenize(["a red circle"])
    from_ids = model.generate(tokenized_prompts=tokens.input_ids, attention_mask=tokens.attention_mask,
                              num_inference_steps=2, seed=1, return_only_latents=True)
    from_text = model.generate(prompt=["a red circle"], num_inference_steps=2, seed=1, return_only_latents=True)
    torch.testing.assert_close(from_ids, from_text)


def test_bad_prompts_get_clear_errors(model):
    with pytest.raises(ValueError, match="empty"):
        model.generate(prompt=[])
    with pytest.raises(TypeError, match="list of strings"):
        model.generate(prompt=[1, 2])
    with pytest.raises(ValueError, match="needs `prompt`"):
        model.generate()
    with pytest.raises(ValueError, match="sampler"):
        model.generate(prompt="x", sampler="ddim")
    long_prompt = " ".join(["circle"] * 500)  # truncated to the encoder's 77 tokens, as documented, with a warning
    with pytest.warns(UserWarning, match=r"is 502 tokens long: cut to the text encoder's 77 tokens"):
        assert model.generate(prompt=long_prompt, num_inference_steps=1, seed=0).shape == (1, 3, 32, 32)


def test_class_conditional_model_embeds_labels_and_drops_them_to_null(tiny_vae_dir):
    model = create_latent_diffusion(
        vae_name=str(tiny_vae_dir), text_encoder_name=None, num_classes=10, label_embedding_dim=32,
        dit_arch="MicroDiT_XXS_2", latent_res=LATENT_RES, dtype="float32",
    )
    batch = {"image_latents": torch.randn(3, 4, LATENT_RES, LATENT_RES), "label": torch.tensor([0, 3, 9]),
             "drop_caption_mask": torch.tensor([1.0, 0.0, 1.0])}
    caption = model.caption_latents(batch)
    assert caption.shape == (3, 1, 1, 32)
    assert caption[1].abs().max() == 0 and caption[0].abs().max() > 0
    with torch.no_grad():  # leave adaLN-Zero's zero init so that gradients reach the condition path
        for p in model.dit.parameters():
            if p.abs().max() == 0:
                p.normal_(0, 0.02)
    model.loss(model(batch), batch).backward()
    assert model.label_embedder.weight.grad[3].abs().max() == 0  # dropped label gets no gradient
    assert model.label_embedder.weight.grad[9].abs().max() > 0
    images = model.generate(class_labels=[1, 2], num_inference_steps=2, guidance_scale=2.0, seed=0)
    assert images.shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match="class labels"):
        model.generate(class_labels=[10])
    with pytest.raises(ValueError, match="exactly one"):
        create_latent_diffusion(vae_name=str(tiny_vae_dir), text_encoder_name=None, dit_arch="MicroDiT_XXS_2")


def test_mismatched_components_are_rejected(model):
    with pytest.raises(ValueError, match="channels"):
        LatentDiffusion(model.dit.__class__(in_channels=3, dim=64, depth=1, head_dim=32, patch_mixer_dim=64,
                                            caption_channels=32), model.vae, model.text_encoder)


@pytest.fixture(scope="module")
def masked_model(tiny_vae_dir, tiny_hf_clip_dir) -> LatentDiffusion:
    torch.manual_seed(0)
    model = create_latent_diffusion(
        vae_name=str(tiny_vae_dir), text_encoder_name=tiny_hf_clip_dir.name, dit_arch="MicroDiT_XXS_2",
        latent_res=LATENT_RES, in_channels=4, dtype="float32", use_caption_mask=True,
    )
    with torch.no_grad():  # leave adaLN-Zero's zero init so that the caption reaches the output
        for p in model.dit.parameters():
            if p.abs().max() == 0:
                p.normal_(0, 0.02)
    return model.eval()


def test_caption_mask_option_ignores_padded_caption_tokens(masked_model):
    batch = latent_batch(masked_model)
    real = 5
    mask = torch.zeros(4, 77, dtype=torch.bool)
    mask[:, :real] = True
    other_padding = dict(batch, caption_latents=torch.cat(
        [batch["caption_latents"][:, :, :real], torch.randn_like(batch["caption_latents"][:, :, real:])], dim=2))
    losses = [masked_model.validation_loss(dict(b, caption_mask=mask)).item() for b in (batch, other_padding)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    plain = LatentDiffusion(masked_model.dit, masked_model.vae, masked_model.text_encoder, latent_res=LATENT_RES)
    assert plain.validation_loss(batch).item() != pytest.approx(plain.validation_loss(other_padding).item())
    with pytest.raises(KeyError, match="caption_mask"):
        masked_model.validation_loss(batch)


def test_caption_mask_option_generates_with_the_encoders_mask(masked_model):
    tokens = masked_model.text_encoder.tokenize(["a red circle"])
    assert not tokens.attention_mask.bool().all()  # the prompt is padded
    from_text = masked_model.generate(prompt=["a red circle"], num_inference_steps=2, guidance_scale=3.0, seed=1,
                                      return_only_latents=True)
    from_ids = masked_model.generate(tokenized_prompts=tokens.input_ids, attention_mask=tokens.attention_mask,
                                     num_inference_steps=2, guidance_scale=3.0, seed=1, return_only_latents=True)
    torch.testing.assert_close(from_ids, from_text)
    ignoring_padding = masked_model.generate(
        tokenized_prompts=tokens.input_ids, attention_mask=torch.ones_like(tokens.attention_mask),
        num_inference_steps=2, guidance_scale=3.0, seed=1, return_only_latents=True)
    assert not torch.allclose(ignoring_padding, from_text)


def test_caption_mask_option_needs_a_text_to_image_microdit(tiny_vae_dir):
    with pytest.raises(ValueError, match="use_caption_mask .* text-to-image MicroDiT"):
        create_latent_diffusion(vae_name=str(tiny_vae_dir), text_encoder_name=None, num_classes=10,
                                label_embedding_dim=32, dit_arch="MicroDiT_XXS_2", latent_res=LATENT_RES,
                                dtype="float32", use_caption_mask=True)


def test_edm_defaults_have_one_home():
    """create_latent_diffusion's EDM defaults are EDMConfig's, and the released model is its defaults at 512 px."""
    defaults = default_arguments()
    edm = EDMConfig()
    assert (defaults["sigma_data"], defaults["p_mean"], defaults["p_std"]) == (edm.sigma_data, edm.p_mean, edm.p_std)
    released = released_model_arguments()
    assert released == {name: defaults[name] for name in MODEL_DESCRIPTION} | {"latent_res": 64,
                                                                                "pos_interp_scale": 2.0}
    assert set(DIT_ARGUMENTS + UNET_ARGUMENTS) <= set(defaults)
