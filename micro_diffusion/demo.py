"""`make demo` / `micro-diffusion demo`: the main job on built-in data.

Until the training stack lands this runs the real network on a real (masked) training step: it builds a small
MicroDiT, runs forward + backward with 75% patch masking, and reports what went through the backbone, the
expert-choice routing, the loss and the gradient, and the analytic FLOPs, so a newcomer sees every moving part.
"""

from __future__ import annotations

import argparse
import time

import torch

from micro_diffusion.models.dit import create_dit
from micro_diffusion.models.layers import ExpertChoiceMoE


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="micro-diffusion demo", description=__doc__)
    parser.add_argument("--preset", default="MicroDiT_XS_2")
    parser.add_argument("--latent-res", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--mask-ratio", type=float, default=0.75)
    parser.add_argument("--caption-length", type=int, default=32)
    parser.add_argument("--caption-channels", type=int, default=384)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    model = create_dit(args.preset, input_size=args.latent_res, caption_channels=args.caption_channels)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"built {args.preset}: {n_params / 1e6:.2f}M parameters, {len(model.patch_mixer)} mixer blocks, "
          f"{len(model.blocks)} backbone blocks, {model.num_tokens} tokens per image")

    backbone_tokens: list[int] = []
    model.blocks[0].register_forward_hook(lambda _m, inputs, _o: backbone_tokens.append(inputs[0].shape[1]))
    latents = torch.randn(args.batch, model.in_channels, args.latent_res, args.latent_res)
    c_noise = torch.randn(args.batch) * 1.2 / 4
    captions = torch.randn(args.batch, 1, args.caption_length, args.caption_channels)

    start = time.perf_counter()
    out = model(latents, c_noise, captions, mask_ratio=args.mask_ratio)
    kept = 1 - out["mask"]
    loss = ((out["sample"] - latents).square().mean(1).unfold(1, 2, 2).unfold(2, 2, 2).mean((-1, -2))
            .flatten(1) * kept).sum() / kept.sum()
    loss.backward()
    seconds = time.perf_counter() - start

    grad_norm = torch.sqrt(sum(p.grad.square().sum() for p in model.parameters() if p.grad is not None))
    moe = next(m for m in model.modules() if isinstance(m, ExpertChoiceMoE))
    _, routed = moe.route(torch.randn(1, backbone_tokens[0], moe.w1.shape[1]))
    print(f"masked step: {backbone_tokens[0]} of {model.num_tokens} tokens per image went through the backbone "
          f"(mask ratio {args.mask_ratio}); each of {moe.num_experts} experts took {routed.shape[-1]} tokens")
    print(f"loss over kept patches {loss.item():.4f}, gradient norm {grad_norm.item():.4f}, "
          f"forward+backward {seconds:.2f} s for {args.batch} images")
    print(f"analytic training FLOPs per image: {model.training_flops(args.mask_ratio, args.caption_length) / 1e9:.2f} "
          f"GFLOP masked vs {model.training_flops(0.0, args.caption_length) / 1e9:.2f} GFLOP unmasked")


if __name__ == "__main__":
    main()
