"""`micro-diffusion generate`: sample a grid of images for prompts from DiT weights.

    micro-diffusion generate --weights dit.safetensors --dit-arch MicroDiT_XL_2 --latent-res 64 \\
        --pos-interp-scale 2.0 --vae <folder> --text-encoder <name> --prompt "a red circle" --out grid.png
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from torchvision.utils import save_image

from micro_diffusion.models.checkpoints import load_dit_weights
from micro_diffusion.models.model import DTYPES, SAMPLERS, LatentDiffusion, create_latent_diffusion


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Options that rebuild a LatentDiffusion around trained DiT weights (shared with `micro-diffusion eval`)."""
    parser.add_argument("--weights", required=True, help="DiT weights: .safetensors or a tensor-only .pt")
    parser.add_argument("--dit-arch", default="MicroDiT_XL_2")
    parser.add_argument("--latent-res", type=int, default=64)
    parser.add_argument("--in-channels", type=int, default=4)
    parser.add_argument("--pos-interp-scale", type=float, default=2.0)
    parser.add_argument("--vae", default="stabilityai/stable-diffusion-xl-base-1.0")
    parser.add_argument("--text-encoder", default="openclip:hf-hub:apple/DFN5B-CLIP-ViT-H-14-378")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def add_sampling_arguments(parser: argparse.ArgumentParser, seed: int = 2024) -> None:
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--sampler", choices=SAMPLERS, default="heun")
    parser.add_argument("--seed", type=int, default=seed, help="image i uses seed + i")


def build_model(args: argparse.Namespace) -> LatentDiffusion:
    """The LatentDiffusion described by `add_model_arguments` options, with its DiT weights, in eval mode."""
    model = create_latent_diffusion(
        vae_name=args.vae, text_encoder_name=args.text_encoder, dit_arch=args.dit_arch, latent_res=args.latent_res,
        in_channels=args.in_channels, pos_interp_scale=args.pos_interp_scale, dtype=args.dtype,
    )
    load_dit_weights(model.dit, args.weights)
    return model.to(args.device).eval()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="micro-diffusion generate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    add_sampling_arguments(parser)
    parser.add_argument("--prompt", action="append", required=True, help="repeat for several prompts")
    parser.add_argument("--images-per-prompt", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("outputs/generate/grid.png"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    model = build_model(args)
    prompts = [p for p in args.prompt for _ in range(args.images_per_prompt)]
    images = model.generate(prompt=prompts, guidance_scale=args.guidance, num_inference_steps=args.steps,
                            seed=args.seed, sampler=args.sampler, progress=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_image(images, args.out, nrow=max(1, int(math.sqrt(len(prompts)))))
    protocol = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    args.out.with_suffix(".json").write_text(json.dumps(protocol, indent=2))
    print(f"wrote {len(prompts)} images to {args.out} (settings in {args.out.with_suffix('.json')})")


if __name__ == "__main__":
    main()
