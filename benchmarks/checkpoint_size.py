"""Size of a training checkpoint with and without the frozen encoders: the demo's (measured) and MicroDiT_XL_2's.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python benchmarks/checkpoint_size.py

Demo: the demo's DiT (configs/base/demo.yaml: MicroDiT_XXS_2, 1x1 patches on 8x8x4 latents, MiniLM-16 captions)
with its real MiniLM weights and an untrained autoencoder of the demo preset (same size as the trained one). A
Composer-shaped checkpoint (model state dict, AdamW moments after one step) is written with torch.save and
measured; "before" adds the state dicts of the frozen encoders, which checkpoints held until they were left out.

XL: counted on the meta device, nothing allocated: MicroDiT_XL_2 at 512 px (64x64 latents, 1024-wide captions),
float32, with AdamW's two float32 moments and the EMA callback's float32 copy of the trainable parameters; the
SDXL VAE (diffusers AutoencoderKL, SDXL's config) and the DFN5B CLIP-ViT-H-14 text tower (width 1024, 24 layers,
77 positions, 49408 tokens; no projection) in bfloat16, the stage configs' model.dtype. Prints one JSON line.
"""

from __future__ import annotations

import io
import json

import torch
from diffusers import AutoencoderKL

from micro_diffusion.encoders.text import load_text_encoder
from micro_diffusion.encoders.vae import load_vae
from micro_diffusion.models.autoencoder import build_autoencoder
from micro_diffusion.models.dit import create_dit
from micro_diffusion.models.model import LatentDiffusion

GB = 1e9
SDXL_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
    block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
)
CLIP_H_TEXT = dict(width=1024, layers=24, context=77, vocab=49408, mlp_ratio=4)


def tensor_bytes(state: dict[str, torch.Tensor]) -> int:
    return sum(value.numel() * value.element_size() for value in state.values())


def demo_checkpoint(tmp_vae: str) -> dict[str, float]:
    dit = create_dit("MicroDiT_XXS_2", input_size=8, in_channels=4, caption_channels=384, patch_size=1)
    vae = load_vae(tmp_vae, dtype=torch.float32)
    model = LatentDiffusion(dit, vae, load_text_encoder("minilm-16", dtype=torch.float32), latent_res=8)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    for param in optimizer.param_groups[0]["params"]:
        param.grad = torch.zeros_like(param)
    optimizer.step()
    buffer = io.BytesIO()
    torch.save({"state": {"model": model.state_dict(), "optimizers": {"AdamW": optimizer.state_dict()}}}, buffer)
    frozen = tensor_bytes(model.vae.state_dict()) + tensor_bytes(model.text_encoder.state_dict())
    return {"demo_after_mb": buffer.tell() / 1e6, "demo_before_mb": (buffer.tell() + frozen) / 1e6,
            "demo_dit_params_m": sum(p.numel() for p in dit.parameters()) / 1e6, "demo_frozen_mb": frozen / 1e6}


def clip_h_text_params() -> int:
    width, hidden = CLIP_H_TEXT["width"], CLIP_H_TEXT["width"] * CLIP_H_TEXT["mlp_ratio"]
    block = 2 * 2 * width + 3 * width * width + 3 * width + width * width + width + width * hidden + hidden \
        + hidden * width + width  # two LayerNorms, attention in/out projections, MLP
    return CLIP_H_TEXT["vocab"] * width + CLIP_H_TEXT["context"] * width + CLIP_H_TEXT["layers"] * block + 2 * width


def xl_checkpoint() -> dict[str, float]:
    with torch.device("meta"):
        dit = create_dit("MicroDiT_XL_2", input_size=64, in_channels=4, caption_channels=1024, pos_interp_scale=2.0)
        vae = AutoencoderKL(**SDXL_VAE_CONFIG)
    trainable = sum(p.numel() for p in dit.parameters())
    dit_state = sum(v.numel() for v in dit.state_dict().values())
    after = 4 * dit_state + 2 * 4 * trainable + 4 * trainable  # weights, AdamW moments, EMA
    vae_params, text_params = sum(p.numel() for p in vae.parameters()), clip_h_text_params()
    frozen = 2 * (vae_params + text_params)
    return {"xl_dit_params_m": trainable / 1e6, "xl_dit_state_m": dit_state / 1e6,
            "sdxl_vae_params_m": vae_params / 1e6, "clip_h_text_params_m": text_params / 1e6,
            "xl_after_gb": after / GB, "xl_before_gb": (after + frozen) / GB, "xl_frozen_gb": frozen / GB}


def main() -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        build_autoencoder("tiny-32", latent_channels=4).save_pretrained(folder)
        results = demo_checkpoint(folder)
    results.update(xl_checkpoint())
    print(json.dumps({name: round(value, 2) for name, value in results.items()}))


if __name__ == "__main__":
    main()
