"""`micro-diffusion generate`: sample a grid of images from trained network weights.

A text-to-image MicroDiT samples from prompts, a class-conditional model (MicroDiT or EDM2 U-Net) from class
labels, an unconditional one from seeds alone; give exactly the one that matches the model:

    micro-diffusion generate --weights dit.safetensors --dit-arch MicroDiT_XL_2 --latent-res 64 \\
        --pos-interp-scale 2.0 --vae <folder> --text-encoder <name> --prompt "a red circle" --out grid.png
    micro-diffusion generate --weights ema-000006400000-0.100.safetensors --model-config edm2_run.yaml \\
        --class-label 3 --class-label 7 --images-per-prompt 4 --guidance 2 --out grid.png
    micro-diffusion generate --weights uncond.safetensors --model-config model.yaml --num-images 16

Image i uses seed `--seed` + i. `--guidance` defaults to 5.0, and to 1.0 (the only value it may take) for an
unconditional model.

The model. Without --model-config, the model flags describe a text-to-image MicroDiT and default to the released
model (MicroDiT_XL_2 on 64x64x4 SDXL latents, pos_interp_scale 2, DFN5B CLIP). `--model-config FILE` is a YAML
file of `create_latent_diffusion` arguments, at top level or under `model:` (other top-level sections, as in a
whole training config, are ignored); the arguments it leaves out take `create_latent_diffusion`'s own defaults,
as in training, and the model flags given on the command line override it. Its values must be plain: the
`${...}` interpolations of a raw training config are not resolved (nor its Hydra defaults list applied), so dump
the composed, resolved config:

    python train.py --config-path configs --config-name edm2_fashion_mnist --cfg job --resolve > edm2_run.yaml

--weights: a model folder written by `micro-diffusion export` (it describes its model: no --model-config; model
flags override it, e.g. --vae for a local copy of its VAE), a network state dict (`save_dit_weights`,
`micro-diffusion posthoc-ema`, the PowerEMA snapshots), a LatentDiffusion state dict or a Composer checkpoint, of
which the EMA weights are used when it holds them (else its raw weights, saying why). The command says which
weights it samples with. A class-conditional MicroDiT also needs its learned label embedding
(`label_embedder.weight`, in a training checkpoint or an exported EMA); the EDM2 U-Net embeds labels itself, so
its network weights suffice.

    micro-diffusion generate --weights exported/ --prompt "a watercolor fox" --images-per-prompt 4
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections.abc import Iterable
from pathlib import Path

import torch.distributed as dist
from torch import Tensor
from torchvision.utils import save_image
from tqdm.auto import tqdm

from micro_diffusion.diffusion.samplers import check_seeds
from micro_diffusion.distributed import Distributed, init_distributed
from micro_diffusion.dtypes import DTYPES
from micro_diffusion.eval.sample_folder import (
    MANIFEST,
    SETTINGS_FILE,
    SampleSet,
    parse_seeds,
    sample_batches,
    write_manifest,
)
from micro_diffusion.models.checkpoints import is_model_folder
from micro_diffusion.models.model import SAMPLERS, LatentDiffusion
from micro_diffusion.models.sampling import (
    CONDITIONINGS,
    RELEASED_MODEL,
    Condition,
    build_model,
    model_arguments,
    model_conditioning,
    sample_images,
)

DEFAULT_GUIDANCE = 5.0


def add_model_arguments(parser: argparse.ArgumentParser, weights_required: bool = True) -> None:
    """Options that rebuild a LatentDiffusion around trained weights (shared with `micro-diffusion eval`)."""
    parser.add_argument("--weights", required=weights_required, type=Path,
                        help="network weights: .safetensors, a tensor-only .pt, a Composer checkpoint (its EMA when "
                        "it holds one) or a model folder of `micro-diffusion export` (see above)")
    add_model_flags(parser)
    parser.add_argument("--device", help="default: cuda:LOCAL_RANK when CUDA is available, else cpu")


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    """--model-config and the model flags, which `resolve_model_arguments` folds into `args.model`."""
    parser.add_argument("--model-config", type=Path,
                        help="YAML file of create_latent_diffusion arguments (top level or under model:)")
    group = parser.add_argument_group(
        "model flags", "those given override --model-config; without it, they default to the released model"
    )
    group.add_argument("--dit-arch", help=_default("dit_arch"))
    group.add_argument("--latent-res", type=int, help=_default("latent_res"))
    group.add_argument("--in-channels", type=int, help=_default("in_channels"))
    group.add_argument("--pos-interp-scale", type=float, help=_default("pos_interp_scale"))
    group.add_argument("--vae", dest="vae_name", help=_default("vae_name"))
    group.add_argument("--text-encoder", dest="text_encoder_name", help=_default("text_encoder_name"))
    group.add_argument("--dtype", choices=sorted(DTYPES), help=_default("dtype"))


def _default(name: str) -> str:
    return f"default: {RELEASED_MODEL[name]}"


def add_sampling_arguments(parser: argparse.ArgumentParser, seed: int = 2024) -> None:
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--guidance", type=float,
                        help=f"classifier-free guidance scale (default: {DEFAULT_GUIDANCE}; 1.0 when unconditional)")
    parser.add_argument("--sampler", choices=SAMPLERS, default="heun")
    parser.add_argument("--seed", type=int, default=seed, help="image i uses seed + i")


def check_image_seeds(parser: argparse.ArgumentParser, seeds: Iterable[int]) -> None:
    """The images' seeds checked (`check_seeds`) as a usage error, so a bad one fails before the model loads."""
    try:
        check_seeds(seeds)
    except (TypeError, ValueError) as error:
        parser.error(str(error))


def resolve_model_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Fold the model flags and --model-config (or the arguments of the model folder --weights names) into
    `args.model`, every `create_latent_diffusion` argument; errors go through `parser.error`."""
    flags = {name: value for name in RELEASED_MODEL if (value := getattr(args, name)) is not None}
    for name in RELEASED_MODEL:
        delattr(args, name)
    described_by, option = args.model_config, "--model-config"
    weights = getattr(args, "weights", None)
    if weights is not None and is_model_folder(weights):
        if args.model_config is not None:
            parser.error(f"--weights {weights} is a model folder, which describes its model: give no --model-config")
        described_by, option = weights, "--weights"
    try:
        args.model = model_arguments(described_by, flags)
    except (OSError, ValueError) as error:
        parser.error(f"{option} {described_by}: {error}")


def resolve_model(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """`resolve_model_arguments`, then set `args.conditioning` (a key of CONDITIONINGS) and the guidance default;
    errors go through `parser.error`."""
    resolve_model_arguments(parser, args)
    args.conditioning = model_conditioning(args.model)
    if args.guidance is None:
        args.guidance = 1.0 if args.conditioning == "unconditional" else DEFAULT_GUIDANCE
    elif args.conditioning == "unconditional" and args.guidance != 1.0:
        parser.error(f"an unconditional model has no guidance: --guidance must be 1.0, not {args.guidance}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="micro-diffusion generate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    add_sampling_arguments(parser)
    conditions = parser.add_mutually_exclusive_group()
    conditions.add_argument("--prompt", action="append", help="text-to-image: repeat for several prompts")
    conditions.add_argument("--class-label", action="append", type=int,
                            help="class-conditional: repeat for several labels")
    conditions.add_argument("--num-images", type=int, help="unconditional: this many images")
    parser.add_argument("--images-per-prompt", type=int, default=1, help="images per --prompt / --class-label")
    parser.add_argument("--out", type=Path, default=Path("outputs/generate/grid.png"))
    parser.add_argument("--outdir", type=Path, help="one PNG per sample, DIR/<seed>.png, and DIR/manifest.jsonl; "
                        "files already there are kept (a killed run resumes); each launcher process makes its slice")
    parser.add_argument("--seeds", type=parse_seeds, help="with --outdir: e.g. 0-49999 or 1,5,10-12; the "
                        "prompts / class labels are cycled over them (default: --seed + i, one per condition)")
    parser.add_argument("--batch-size", type=int, default=32, help="with --outdir: images per batch")
    args = parser.parse_args(argv)
    resolve_model(parser, args)
    if args.seeds is not None and args.outdir is None:
        parser.error("--seeds names the files of --outdir: give --outdir too")
    given = next((flag for flag in ("prompt", "class_label", "num_images") if getattr(args, flag) is not None), None)
    expected = {"text": "prompt", "class": "class_label", "unconditional": "num_images"}[args.conditioning]
    if given is None and not (expected == "num_images" and args.seeds is not None):
        parser.error(f"the model is {CONDITIONINGS[args.conditioning]}: give --{expected.replace('_', '-')}")
    if given is not None and given != expected:
        parser.error(f"the model is {CONDITIONINGS[args.conditioning]}: it samples from "
                     f"--{expected.replace('_', '-')}, not --{given.replace('_', '-')}")
    if args.num_images is not None and (args.num_images < 1 or args.images_per_prompt != 1):
        parser.error("--num-images must be >= 1 and takes no --images-per-prompt")
    check_image_seeds(parser, args.seeds or range(args.seed, args.seed + len(conditions_of(args))))
    return args


def conditions_of(args: argparse.Namespace) -> list[Condition]:
    """One condition per image: each prompt / class label repeated --images-per-prompt times, or None each."""
    if args.num_images is not None or (args.prompt is None and args.class_label is None):
        return [None] * (args.num_images or 1)
    chosen = args.prompt if args.prompt is not None else args.class_label
    return [condition for condition in chosen for _ in range(args.images_per_prompt)]


def settings_of(args: argparse.Namespace) -> dict:
    """The command's settings as JSON-ready values (paths as strings), to store beside its images."""
    return json.loads(json.dumps(vars(args), default=str))


def write_sample_folder(args: argparse.Namespace, model: LatentDiffusion, world: Distributed) -> None:
    """--outdir: this process's slice of the samples, one PNG each, skipping those already written."""
    conditions = conditions_of(args)
    seeds = args.seeds or range(args.seed, args.seed + len(conditions))
    samples = SampleSet.of(seeds, [conditions[i % len(conditions)] for i in range(len(seeds))])
    if world.rank == 0:
        write_manifest(args.outdir, samples)
        (args.outdir / SETTINGS_FILE).write_text(json.dumps(settings_of(args), indent=2))
    world.barrier()
    mine = world.shard(len(seeds))
    todo = [i for i in mine if not (args.outdir / samples.files[i]).is_file()]

    def make(indices: list[int]) -> Tensor:
        return sample_images(model, [samples.conditions[i] for i in indices], [samples.seeds[i] for i in indices],
                             guidance_scale=args.guidance, num_inference_steps=args.steps, sampler=args.sampler)

    for _ in tqdm(sample_batches(todo, args.batch_size, make, args.outdir, samples.files), unit="batch",
                  total=-(-len(todo) // args.batch_size), desc=f"generate rank {world.rank}", disable=world.rank != 0):
        pass
    done = world.reduce(len(todo), dist.ReduceOp.SUM)
    if world.rank == 0:
        print(f"wrote {int(done)} images to {args.outdir} ({len(seeds) - int(done)} were there already; "
              f"{world.world_size} processes; prompts in {args.outdir / MANIFEST})")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    world = init_distributed(args.device)
    model = build_model(args.model, args.weights, world.device)
    if args.outdir is not None:
        write_sample_folder(args, model, world)
        world.close()
        return
    conditions = conditions_of(args)
    seeds = range(args.seed, args.seed + len(conditions))
    images = sample_images(model, conditions, seeds, guidance_scale=args.guidance, num_inference_steps=args.steps,
                           sampler=args.sampler, progress=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_image(images, args.out, nrow=max(1, int(math.sqrt(len(conditions)))))
    args.out.with_suffix(".json").write_text(json.dumps(settings_of(args), indent=2))
    print(f"wrote {len(conditions)} images to {args.out} (settings in {args.out.with_suffix('.json')})")
    world.close()
