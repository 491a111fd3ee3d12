"""The ceiling an autoencoder sets for the demo: the demo's three prompt sets rendered as ground truth, encoded
(posterior mean), decoded and scored by the shapes checker, per set and criterion.

No DiT can score above its autoencoder's round trip of the truth, so this is how an autoencoder is judged before
any MicroDiT run (the demo's report writes the same figures as `shapes/<set>/through_autoencoder/*`).

    python benchmarks/autoencoder_ceiling.py outputs/demo/autoencoder_run/autoencoder [more folders ...] \
        --holdout-pairs "blue triangle,orange circle,magenta square" --holdout-captions 0.15
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from micro_diffusion.data.sources.shapes import PROMPT_SETS, Holdout, prompt_set, render_prompts
from micro_diffusion.encoders.vae import load_vae
from micro_diffusion.eval.shapes_score import shapes_score

CRITERIA = ("all", "object", "colour", "shape", "count", "binding", "position")


@torch.no_grad()
def ceiling(folder: Path, prompts: list[str], resolution: int, seed: int, batch_size: int = 100) -> dict[str, float]:
    """Shapes scores of `prompts`' ground-truth renders after a round trip through the autoencoder at `folder`."""
    vae = load_vae(str(folder))
    truth = torch.from_numpy(render_prompts(prompts, resolution, seed)).permute(0, 3, 1, 2).float() / 127.5 - 1
    decoded = torch.cat([vae.decode(vae.encode(batch, sample=False)) for batch in truth.split(batch_size)])
    return shapes_score(((decoded.float() + 1) / 2).clamp(0, 1), prompts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("autoencoders", type=Path, nargs="+", help="autoencoder folders (diffusers format)")
    parser.add_argument("--holdout-pairs", default="", help="the demo's held-out colour-shape pairs")
    parser.add_argument("--holdout-captions", type=float, default=0.0, help="the demo's held-out caption share")
    parser.add_argument("--num-prompts", type=int, default=200, help="prompts per set (the demo's report: 200)")
    parser.add_argument("--seed", type=int, default=1000, help="prompt and layout seed (the demo's report: 1000)")
    parser.add_argument("--resolution", type=int, default=32)
    args = parser.parse_args()

    holdout = Holdout.from_options(args.holdout_pairs, args.holdout_captions)
    sets = {name: prompt_set(name, args.num_prompts, args.seed, holdout) for name in PROMPT_SETS}
    print(f"ground truth through each autoencoder: shapes score, {args.num_prompts} prompts per set, seed "
          f"{args.seed}, {args.resolution} px, posterior mean")
    print("| autoencoder | set | " + " | ".join(CRITERIA) + " |")
    print("|---|---|" + "---|" * len(CRITERIA))
    for folder in args.autoencoders:
        for name, prompts in sets.items():
            score = ceiling(folder, prompts, args.resolution, args.seed)
            values = " | ".join(f"{score[key]:.3f}" if key in score else "" for key in CRITERIA)
            print(f"| {folder} | {name} | {values} |", flush=True)


if __name__ == "__main__":
    main()
