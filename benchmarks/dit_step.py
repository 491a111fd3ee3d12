"""Forward+backward time per image of small MicroDiT presets: masked vs unmasked, MoE vs dense FFN.

Prints one JSON line per configuration, then one summary line with the ratios we track (measured in the same
run, so they compare like with like on whatever machine runs it):

    python benchmarks/dit_step.py [--presets MicroDiT_XXS_2 MicroDiT_XS_2] [--batch 16] [--latent 32]
    python benchmarks/dit_step.py --presets MicroDiT_XL_2 --ffn moe --batch 64 --caption-length 77 \
        --caption-channels 1024 --compile --peak-tflops 989     # GPU: bf16 autocast, MFU against that peak

MFU = analytic training FLOPs per step (`DiT.training_flops`, exact for the matmuls and attention) / step time /
peak. The step is forward + backward; the optimiser step is left out (it is O(parameters), not O(tokens)).
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from micro_diffusion.models.dit import create_dit


def time_train_step(model: torch.nn.Module, batch: int, latent: int, caption_length: int, mask_ratio: float,
                    repeats: int, device: str) -> float:
    """Median seconds of one forward+backward pass over a batch."""
    x = torch.randn(batch, model.in_channels, latent, latent, device=device)
    t = torch.randn(batch, device=device)
    y = torch.randn(batch, 1, caption_length, model.caption_channels, device=device)
    times = []
    for step in range(repeats + 2):
        start = time.perf_counter()
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = model(x, t, y, mask_ratio=mask_ratio)["sample"].float().square().mean()
        loss.backward()
        if device == "cuda":
            torch.cuda.synchronize()
        if step >= 2:  # the first two steps warm up allocators and kernels
            times.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["MicroDiT_XXS_2", "MicroDiT_XS_2"])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--latent", type=int, default=32, help="latent side (32 = 256 px with an 8x VAE)")
    parser.add_argument("--caption-length", type=int, default=32)
    parser.add_argument("--caption-channels", type=int, default=384)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--ffn", nargs="+", default=["moe", "dense"], choices=["moe", "dense"])
    parser.add_argument("--mask-ratios", nargs="+", type=float, default=[0.0, 0.75])
    parser.add_argument("--compile", action="store_true", help="torch.compile the model first")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's dense bf16 peak, to report MFU (H100 SXM: 989)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="CPU intra-op threads (1 avoids OpenMP spinning on a loaded machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    seconds: dict[tuple[str, str, float], float] = {}
    for preset in args.presets:
        for ffn in args.ffn:
            torch.manual_seed(0)
            # experts_every_n larger than any depth places no MoE block: the same network with dense FFNs.
            extra = {} if ffn == "moe" else {"experts_every_n": 10**6}
            model = create_dit(preset, input_size=args.latent, caption_channels=args.caption_channels, **extra)
            model.to(args.device)
            step_model = torch.compile(model) if args.compile else model
            for mask_ratio in args.mask_ratios:
                sec = time_train_step(step_model, args.batch, args.latent, args.caption_length, mask_ratio,
                                      args.repeats, args.device)
                seconds[(preset, ffn, mask_ratio)] = sec
                flops = model.training_flops(mask_ratio, args.caption_length)
                print(json.dumps({
                    "preset": preset, "ffn": ffn, "mask_ratio": mask_ratio, "batch": args.batch,
                    "latent": args.latent, "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
                    "train_gflop_per_image": round(flops / 1e9, 3),
                    "ms_per_image": round(1e3 * sec / args.batch, 3),
                    "achieved_gflops": round(flops * args.batch / sec / 1e9, 2),
                    "device": args.device, "threads": torch.get_num_threads(), "compile": args.compile,
                    **({"mfu": round(flops * args.batch / sec / (args.peak_tflops * 1e12), 3)}
                       if args.peak_tflops else {}),
                }))
    summary = {
        f"{preset}_masked_over_unmasked_time_{ffn}": round(
            seconds[(preset, ffn, 0.75)] / seconds[(preset, ffn, 0.0)], 3)
        for preset in args.presets for ffn in args.ffn if {0.0, 0.75} <= set(args.mask_ratios)
    }
    summary["machine"] = platform.processor() or platform.machine()
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
