"""Training-step throughput of a MicroDiT: forward, backward and the fused AdamW step, with compile time per mask
ratio, images/s and MFU; run by benchmarks/gpu_throughput.sh for the code before and after a change.

The script measures whichever `micro_diffusion` is first on the path (the shell script points PYTHONPATH at a git
worktree of the earlier commit for the "before" rows), and compiles it the way that code's `trainer.compile`
does: region by region when it has `micro_diffusion.models.regional_compile`, else the whole network as one graph
(what Composer's `compile_config={}` did). So it only uses APIs the earlier code also has (`create_dit`,
`DiT.training_flops`, `training.optim.build_adamw`).

    python benchmarks/train_throughput.py --label after --mode bare --mask-ratios 0.0 0.75 --batch 256
    composer -n 1 benchmarks/train_throughput.py --label after --mode fsdp --mask-ratios 0.75   # Composer + FSDP
    python benchmarks/train_throughput.py --table results.jsonl            # one table from the JSON lines
    python benchmarks/train_throughput.py --cpu-tiny --label after --mode bare   # the same path on CPU, tiny

Modes: `eager` (no compile), `bare` (compiled step in this process), `fsdp` (Composer Trainer with the stage
configs' fsdp_config `{sharding_strategy: SHARD_GRAD_OP}` and compile on; without a GPU the Trainer runs
unsharded on the CPU, to check the path). Each configuration prints one JSON line:
compile_s = first step minus the median step (compilation and warm-up), ms_per_step (median), images_per_s,
mfu = `training_flops` x batch / step time / dense bf16 peak (Composer's table, or --peak-tflops), graphs (Dynamo's
unique graphs, a measure of how much regional compilation reused). A batch that runs out of memory is halved.
"""

from __future__ import annotations

import argparse
import json
import time
from types import SimpleNamespace

import torch
from torch._dynamo.utils import counters

from micro_diffusion.models.dit import create_dit
from micro_diffusion.training.optim import build_adamw

try:
    from micro_diffusion.models.regional_compile import compile_regions
except ImportError:  # the code before issue 17: trainer.compile compiled the whole model
    compile_regions = None

FSDP_CONFIG = {"sharding_strategy": "SHARD_GRAD_OP"}  # configs/base/microdit_xl2.yaml trainer.fsdp_config
TINY = dict(preset="MicroDiT_XXS_2", latent=8, caption_length=8, caption_channels=32, batch=4, steps=3)


def peak_flops(device: str, override_tflops: float | None) -> float | None:
    """Dense bf16 peak FLOP/s of the GPU (Composer's table), None on CPU or for an unknown GPU."""
    if override_tflops:
        return override_tflops * 1e12
    if device != "cuda":
        return None
    from composer.callbacks.speed_monitor import get_gpu_flops_available

    return get_gpu_flops_available(SimpleNamespace(precision=SimpleNamespace(value="amp_bf16"))) or None


def compile_kind() -> str:
    return "regional" if compile_regions is not None else "whole"


def compile_model(model: torch.nn.Module) -> torch.nn.Module:
    """The model as that code's `trainer.compile` runs it: regions compiled in place, or one compiled graph."""
    if compile_regions is not None:
        compile_regions(model)
        return model
    return torch.compile(model)


def step_loss(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, mask_ratio: float,
              device: str) -> torch.Tensor:
    with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=device == "cuda"):
        return model(x, t, y, mask_ratio=mask_ratio)["sample"].float().square().mean()


def synthetic_batch(model: torch.nn.Module, batch: int, latent: int, caption_length: int,
                    device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Latents (B, C, latent, latent), c_noise (B,), captions (B, 1, L, C_txt)."""
    return (torch.randn(batch, model.in_channels, latent, latent, device=device), torch.randn(batch, device=device),
            torch.randn(batch, 1, caption_length, model.caption_channels, device=device))


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_bare(model, step_model, optimizer, inputs, mask_ratio: float, steps: int, device: str) -> list[float]:
    """Seconds of each training step (forward, backward, optimizer step), the first one compiling."""
    seconds = []
    for _ in range(steps + 1):
        sync(device)
        start = time.perf_counter()
        step_loss(step_model, *inputs, mask_ratio, device).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        seconds.append(time.perf_counter() - start)
    return seconds


def time_composer(model, inputs, mask_ratio: float, steps: int, device: str, compiled: bool) -> list[float]:
    """Seconds of each batch of a Composer fit (FSDP on a GPU), from one batch end to the next."""
    from composer import Callback, Trainer
    from composer.models import ComposerModel

    class DiTStep(ComposerModel):
        def __init__(self) -> None:
            super().__init__()
            self.dit = model

        def forward(self, batch):
            return self.dit(*batch, mask_ratio=mask_ratio)["sample"].float().square().mean()

        def loss(self, outputs, batch):
            return outputs

    class BatchClock(Callback):
        def __init__(self) -> None:
            self.marks = []

        def before_train_batch(self, state, logger) -> None:
            if not self.marks:
                sync(device)
                self.marks.append(time.perf_counter())

        def batch_end(self, state, logger) -> None:
            sync(device)
            self.marks.append(time.perf_counter())

    for block in [*model.patch_mixer, *model.blocks]:
        block._fsdp_wrap = True  # training/tasks.py: each block is an FSDP unit
    composer_model = DiTStep()
    regional = compiled and compile_regions is not None and bool(compile_regions(composer_model))
    clock = BatchClock()
    gpu = device == "cuda"
    trainer = Trainer(
        model=composer_model, train_dataloader=[tuple(tensor.cpu() for tensor in inputs)] * (steps + 1),
        device_train_microbatch_size=len(inputs[0]),  # the list of batches has no batch_size for Composer to read
        max_duration=f"{steps + 1}ba", optimizers=build_adamw(composer_model, 1e-4, 0.0, (0.9, 0.999), 1e-8),
        device="gpu" if gpu else "cpu", precision="amp_bf16" if gpu else "fp32", callbacks=[clock],
        parallelism_config={"fsdp": dict(FSDP_CONFIG)} if gpu else None, progress_bar=False,
        compile_config={} if compiled and not regional else None,
    )
    trainer.fit()
    trainer.close()
    return [b - a for a, b in zip(clock.marks, clock.marks[1:])]


def measure(args: argparse.Namespace, mask_ratio: float, batch: int, device: str) -> dict:
    torch.manual_seed(0)
    torch._dynamo.reset()
    counters.clear()
    model = create_dit(args.preset, input_size=args.latent, caption_channels=args.caption_channels).to(device)
    inputs = synthetic_batch(model, batch, args.latent, args.caption_length, device)
    if args.mode == "fsdp":
        seconds = time_composer(model, inputs, mask_ratio, args.steps, device, compiled=True)
        kind = compile_kind()
    else:
        step_model = compile_model(model) if args.mode == "bare" else model
        optimizer = build_adamw(model, 1e-4, 0.0, (0.9, 0.999), 1e-8)
        seconds = time_bare(model, step_model, optimizer, inputs, mask_ratio, args.steps, device)
        kind = compile_kind() if args.mode == "bare" else "eager"
    step = sorted(seconds[1:])[len(seconds[1:]) // 2]
    flops = model.training_flops(mask_ratio, args.caption_length) * batch
    peak = peak_flops(device, args.peak_tflops)
    return {
        "label": args.label, "mode": args.mode, "compile": kind, "preset": args.preset, "mask_ratio": mask_ratio,
        "batch": batch, "compile_s": round(seconds[0] - step, 2), "ms_per_step": round(1e3 * step, 2),
        "images_per_s": round(batch / step, 1), "tflops": round(flops / step / 1e12, 4),
        "mfu": round(flops / step / peak, 3) if peak else None, "graphs": counters["stats"]["unique_graphs"],
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
    }


def run(args: argparse.Namespace) -> None:
    device = "cuda" if torch.cuda.is_available() and not args.cpu_tiny else "cpu"
    for mask_ratio in args.mask_ratios:
        batch = args.batch
        while True:
            try:
                print(json.dumps(measure(args, mask_ratio, batch, device)), flush=True)
                break
            except torch.OutOfMemoryError:
                if batch == 1:
                    raise
                batch //= 2
                torch.cuda.empty_cache()


def print_table(paths: list[str]) -> None:
    """One markdown table of every JSON line in `paths`, then after/before ratios of images/s and compile time."""
    rows = [json.loads(line) for path in paths for line in open(path) if line.startswith("{")]
    print("| code | mode | compile | mask | batch | compile s | ms/step | images/s | MFU | graphs |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['label']} | {r['mode']} | {r['compile']} | {r['mask_ratio']:.2f} | {r['batch']} | "
              f"{r['compile_s']:.1f} | {r['ms_per_step']:.1f} | {r['images_per_s']:.1f} | {r['mfu']} | {r['graphs']} |")
    key = {(r["label"], r["mode"], r["mask_ratio"]): r for r in rows}
    for (label, mode, ratio), after in key.items():
        before = key.get(("before", mode, ratio))
        if label == "after" and before:
            speed = after["images_per_s"] / before["images_per_s"]
            print(f"after/before {mode} mask {ratio:.2f}: images/s x{speed:.2f}, "
                  f"compile s x{after['compile_s'] / max(before['compile_s'], 1e-9):.2f}")
    for (label, mode, ratio), masked in key.items():
        unmasked = key.get((label, mode, 0.0))
        if ratio > 0 and unmasked:
            print(f"{label} {mode}: masked {ratio:.2f} / unmasked step time per image "
                  f"{(masked['ms_per_step'] / masked['batch']) / (unmasked['ms_per_step'] / unmasked['batch']):.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--label", default="after", help="'before' or 'after' (which code this is)")
    parser.add_argument("--mode", default="bare", choices=["eager", "bare", "fsdp"])
    parser.add_argument("--preset", default="MicroDiT_XL_2")
    parser.add_argument("--latent", type=int, default=32, help="latent side (32 = 256 px with an 8x VAE)")
    parser.add_argument("--caption-length", type=int, default=77)
    parser.add_argument("--caption-channels", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=256, help="per-GPU batch (the recipe's 2,048 over 8 GPUs)")
    parser.add_argument("--steps", type=int, default=8, help="timed steps after the compiling one")
    parser.add_argument("--mask-ratios", nargs="+", type=float, default=[0.0, 0.75])
    parser.add_argument("--peak-tflops", type=float, default=None, help="override the dense bf16 peak")
    parser.add_argument("--cpu-tiny", action="store_true",
                        help=f"on the CPU with a tiny preset ({TINY}), to check the script end to end")
    parser.add_argument("--table", nargs="+", help="print the table of these JSON-lines files and exit")
    args = parser.parse_args()
    if args.table:
        print_table(args.table)
        return
    if args.cpu_tiny:
        for name, value in TINY.items():
            setattr(args, name, value)
    run(args)


if __name__ == "__main__":
    main()
