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

--weights: a network state dict (`save_dit_weights`, `micro-diffusion posthoc-ema`, the PowerEMA snapshots), a
LatentDiffusion state dict or a Composer checkpoint. A class-conditional MicroDiT also needs its learned label
embedding (`label_embedder.weight`, in a training checkpoint or an exported EMA); the EDM2 U-Net embeds labels
itself, so its network weights suffice.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torchvision.utils import save_image

from micro_diffusion.models.checkpoints import PREFIXES, load_dit_state, read_state_dict
from micro_diffusion.models.model import DTYPES, SAMPLERS, LatentDiffusion, create_latent_diffusion

# The model flags (by their `create_latent_diffusion` argument names) and their defaults: the released model.
RELEASED_MODEL: dict[str, Any] = {
    "dit_arch": "MicroDiT_XL_2",
    "latent_res": 64,
    "in_channels": 4,
    "pos_interp_scale": 2.0,
    "vae_name": "stabilityai/stable-diffusion-xl-base-1.0",
    "text_encoder_name": "openclip:hf-hub:apple/DFN5B-CLIP-ViT-H-14-378",
    "dtype": "bfloat16",
}
# What a model is conditioned on -> how it is named in messages.
CONDITIONINGS = {"text": "text-to-image", "class": "class-conditional", "unconditional": "unconditional"}
DEFAULT_GUIDANCE = 5.0
RESOLVED_CONFIG_COMMAND = "python train.py --config-path configs --config-name <name> --cfg job --resolve"
Condition = str | int | None  # a prompt, a class label, or None (unconditional model)


# --------------------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------------------


def add_model_arguments(parser: argparse.ArgumentParser, weights_required: bool = True) -> None:
    """Options that rebuild a LatentDiffusion around trained weights (shared with `micro-diffusion eval`)."""
    parser.add_argument("--weights", required=weights_required, type=Path,
                        help="network weights: .safetensors or a tensor-only .pt (see above)")
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
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def _default(name: str) -> str:
    return f"default: {RELEASED_MODEL[name]}"


def add_sampling_arguments(parser: argparse.ArgumentParser, seed: int = 2024) -> None:
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--guidance", type=float,
                        help=f"classifier-free guidance scale (default: {DEFAULT_GUIDANCE}; 1.0 when unconditional)")
    parser.add_argument("--sampler", choices=SAMPLERS, default="heun")
    parser.add_argument("--seed", type=int, default=seed, help="image i uses seed + i")


def resolve_model(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Fold the model flags and --model-config into `args.model` (every `create_latent_diffusion` argument), set
    `args.conditioning` (a key of CONDITIONINGS) and the guidance default; errors go through `parser.error`."""
    flags = {name: value for name in RELEASED_MODEL if (value := getattr(args, name)) is not None}
    for name in RELEASED_MODEL:
        delattr(args, name)
    try:
        chosen = RELEASED_MODEL if args.model_config is None else read_model_config(args.model_config)
    except (OSError, ValueError) as error:
        parser.error(f"--model-config {args.model_config}: {error}")
    defaults = {name: p.default for name, p in inspect.signature(create_latent_diffusion).parameters.items()}
    args.model = defaults | chosen | flags
    args.conditioning = model_conditioning(args.model)
    if args.guidance is None:
        args.guidance = 1.0 if args.conditioning == "unconditional" else DEFAULT_GUIDANCE
    elif args.conditioning == "unconditional" and args.guidance != 1.0:
        parser.error(f"an unconditional model has no guidance: --guidance must be 1.0, not {args.guidance}")


def read_model_config(path: Path) -> dict[str, Any]:
    """The `create_latent_diffusion` arguments in a YAML file (top level, or its `model:` section), checked:
    unknown keys, unresolved `${...}` interpolations and raw Hydra configs raise a ValueError naming the key."""
    from omegaconf import OmegaConf  # imported here (with the config helpers): only a model config needs them

    from micro_diffusion.training.config import check_arguments

    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    values = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    if not isinstance(values, dict):
        raise ValueError("must hold a mapping of create_latent_diffusion arguments (at top level or under model:)")
    if "defaults" in values:
        raise ValueError(
            "is a raw Hydra config (it has a defaults list): its model section lacks what the defaults add; "
            f"dump the composed, resolved config instead ({RESOLVED_CONFIG_COMMAND})"
        )
    if isinstance(values.get("model"), dict):
        values = values["model"]
    unresolved = next(_interpolations(values, "model"), None)
    if unresolved is not None:
        raise ValueError(
            f"{unresolved[0]} is an interpolation ({unresolved[1]!r}); the file must hold plain values: dump the "
            f"composed, resolved config ({RESOLVED_CONFIG_COMMAND})"
        )
    check_arguments(create_latent_diffusion, values, "model")
    return values


def _interpolations(value: Any, key: str) -> Iterator[tuple[str, str]]:
    """(dotted key, text) of the `${...}` strings in a nested mapping / list."""
    if isinstance(value, dict):
        for name, item in value.items():
            yield from _interpolations(item, f"{key}.{name}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _interpolations(item, f"{key}.{index}")
    elif isinstance(value, str) and "${" in value:
        yield key, value


def model_conditioning(model_arguments: dict[str, Any]) -> str:
    """What the model built from these `create_latent_diffusion` arguments samples from: "class" (num_classes
    set), "text" (a text encoder) or "unconditional" (neither: the EDM2 U-Net only)."""
    if model_arguments["num_classes"] is not None:
        return "class"
    return "text" if model_arguments["text_encoder_name"] is not None else "unconditional"


def build_model(args: argparse.Namespace) -> LatentDiffusion:
    """The LatentDiffusion of `args.model` (see `resolve_model`) with the weights of `args.weights`, in eval mode."""
    model = create_latent_diffusion(**args.model)
    load_weights(model, args.weights)
    return model.to(args.device).eval()


def load_weights(model: LatentDiffusion, path: Path) -> None:
    """Load the network's weights strictly, and a class-conditional MicroDiT's label embedding (num_classes, C)."""
    load_network_state(model, read_state_dict(path), str(path))


def load_network_state(model: LatentDiffusion, state: dict[str, Tensor], source: str) -> None:
    """`load_weights` for a state dict in memory (e.g. a post-hoc EMA reconstruction); `source` names it in errors."""
    load_dit_state(model.dit, state, source)
    if model.label_embedder is None:
        return
    names = [prefix.removesuffix("dit.") + "label_embedder.weight" for prefix in PREFIXES]
    found = [name for name in names if name in state]
    if not found:
        raise KeyError(
            f"{source} holds no label embedding ({' or '.join(names)}): a class-conditional MicroDiT needs it "
            "besides the network weights; pass a training checkpoint, an exported EMA or a post-hoc EMA"
        )
    model.label_embedder.load_state_dict({"weight": state[found[0]]})


# --------------------------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------------------------


def sample_images(model: LatentDiffusion, conditions: Sequence[Condition], seeds: Sequence[int], **sampling) -> Tensor:
    """Images (B, 3, H, W) in [0, 1]: image i from seeds[i] and conditions[i], a prompt (text-to-image model), a
    class label (class-conditional) or None (unconditional). `sampling`: the other `generate` arguments."""
    if model.unconditional:
        return model.generate(seeds=list(seeds), **sampling)
    keyword = "prompt" if model.num_classes is None else "class_labels"
    return model.generate(seeds=list(seeds), **{keyword: list(conditions)}, **sampling)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="micro-diffusion generate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    add_sampling_arguments(parser)
    conditions = parser.add_mutually_exclusive_group(required=True)
    conditions.add_argument("--prompt", action="append", help="text-to-image: repeat for several prompts")
    conditions.add_argument("--class-label", action="append", type=int,
                            help="class-conditional: repeat for several labels")
    conditions.add_argument("--num-images", type=int, help="unconditional: this many images")
    parser.add_argument("--images-per-prompt", type=int, default=1, help="images per --prompt / --class-label")
    parser.add_argument("--out", type=Path, default=Path("outputs/generate/grid.png"))
    args = parser.parse_args(argv)
    resolve_model(parser, args)
    given = next(flag for flag in ("prompt", "class_label", "num_images") if getattr(args, flag) is not None)
    expected = {"text": "prompt", "class": "class_label", "unconditional": "num_images"}[args.conditioning]
    if given != expected:
        parser.error(f"the model is {CONDITIONINGS[args.conditioning]}: it samples from "
                     f"--{expected.replace('_', '-')}, not --{given.replace('_', '-')}")
    if args.num_images is not None and (args.num_images < 1 or args.images_per_prompt != 1):
        parser.error("--num-images must be >= 1 and takes no --images-per-prompt")
    return args


def conditions_of(args: argparse.Namespace) -> list[Condition]:
    """One condition per image: each prompt / class label repeated --images-per-prompt times, or None each."""
    if args.num_images is not None:
        return [None] * args.num_images
    chosen = args.prompt if args.prompt is not None else args.class_label
    return [condition for condition in chosen for _ in range(args.images_per_prompt)]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    model = build_model(args)
    conditions = conditions_of(args)
    seeds = range(args.seed, args.seed + len(conditions))
    images = sample_images(model, conditions, seeds, guidance_scale=args.guidance, num_inference_steps=args.steps,
                           sampler=args.sampler, progress=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_image(images, args.out, nrow=max(1, int(math.sqrt(len(conditions)))))
    protocol = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    args.out.with_suffix(".json").write_text(json.dumps(protocol, indent=2))
    print(f"wrote {len(conditions)} images to {args.out} (settings in {args.out.with_suffix('.json')})")


if __name__ == "__main__":
    main()
