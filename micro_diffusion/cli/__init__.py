"""The `micro-diffusion` command: one sub-command per job, each in its own module of this package.

Every sub-command module exposes `main(argv: list[str] | None) -> None` with its own argparse parser, so
`micro-diffusion <command> --help` documents the options where they are defined. The modules hold argparse and
printing only; what they run lives in the library below (data/, models/, diffusion/, eval/). They are imported
lazily: `micro-diffusion convert` does not pay for importing Composer. `python -m micro_diffusion.cli <command>`
is the same command (it is what `composer -n 8 -m micro_diffusion.cli precompute ...` launches).
"""

from __future__ import annotations

import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "convert": ("micro_diffusion.cli.convert", "source -> raw MDS shards"),
    "precompute": ("micro_diffusion.cli.precompute", "raw MDS -> latent MDS (VAE + text encoder)"),
    "latent-stats": ("micro_diffusion.cli.latent_stats", "per-channel latent statistics of a trained autoencoder"),
    "generate": ("micro_diffusion.cli.generate", "sample images from a checkpoint"),
    "eval": ("micro_diffusion.cli.evaluate", "generate samples and compute metrics into a JSON report"),
    "export": ("micro_diffusion.cli.export", "trained weights -> a model folder that generate and diffusers load"),
    "posthoc-ema": ("micro_diffusion.cli.posthoc_ema", "reconstruct an EMA of any length from power-EMA snapshots"),
    "demo": ("micro_diffusion.cli.demo", "the end-to-end demo on built-in data"),
}


def _usage() -> str:
    lines = ["usage: micro-diffusion <command> [options]", "", "commands:"]
    lines += [f"  {name:<12} {help_text}" for name, (_, help_text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Run the sub-command named by argv[0] (default: sys.argv[1:]) with the rest of the arguments."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        raise SystemExit(f"micro-diffusion: unknown command {command!r}\n\n{_usage()}")
    module = importlib.import_module(COMMANDS[command][0])
    module.main(rest)
