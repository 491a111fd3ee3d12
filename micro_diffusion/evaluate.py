"""`micro-diffusion eval`: generate N samples from trained weights and score them, with the protocol in the report.

    micro-diffusion eval --weights dit.safetensors --dit-arch MicroDiT_XS_2 --latent-res 8 --vae <ae folder> \\
        --text-encoder minilm --prompts shapes --num-samples 500 --metrics fd kid shapes \\
        --reference-source shapes --reference-option resolution=32 --reference-option num_samples=5000 \\
        --steps 30 --guidance 3 --out outputs/eval
    micro-diffusion eval --weights ema-000006400000-0.100.safetensors --model-config edm2_run.yaml \\
        --prompts classes --num-samples 10000 --metrics fd kid pr --guidance 2 \\
        --reference-source fashion_mnist --reference-option split=test --reference-count 10000
    micro-diffusion eval --posthoc-snapshots runs/edm2/phema --sigma-rels 0.02,0.05,0.1,0.15,0.2 \\
        --model-config edm2_run.yaml --metrics fd ...       # post-hoc EMA sweep: FD of each reconstructed EMA

The model is described as for `micro-diffusion generate` (model flags and/or --model-config; see its --help).
Sample i uses seed `--seed` + i and, by the model's conditioning:
- text-to-image: a prompt from the shapes grammar (`--prompts shapes`, the default, scored by the shapes checker)
  or from a text file with one prompt per line (cycled to N);
- class-conditional: class label i mod num_classes (`--prompts classes`, the default);
- unconditional: nothing (no --prompts).
Frechet distance, KID and precision/recall compare the samples with a reference set read through any registered
source; its feature statistics are cached per (dataset, resolution, extractor). The shapes and CLIP scores need
text prompts. The report (JSON) states extractor, N, reference set, sampler, steps, guidance, seed and what the
samples were conditioned on next to every number, and a grid of the first samples is saved beside it.

Post-hoc EMA sweep (`--posthoc-snapshots` instead of `--weights`): the power-function EMA of every sigma_rel of
`--sigma-rels` is reconstructed from the PowerEMA snapshots (at the latest snapshot) and scored by FD under the
same protocol; the report has one record per sigma_rel, and posthoc_sweep.{json,csv,png} hold the table and plot.
"""

from __future__ import annotations

import argparse
import itertools
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from micro_diffusion.data.cli_options import parse_key_values
from micro_diffusion.data.precompute import crop_transform, to_rgb
from micro_diffusion.data.sources.base import get_source
from micro_diffusion.data.sources.shapes import sample_specs
from micro_diffusion.eval.clip_score import clip_score, load_clip_score
from micro_diffusion.eval.features import FeatureExtractor, get_feature_extractor
from micro_diffusion.eval.frechet import (
    FeatureStatistics,
    compute_image_metrics,
    load_or_compute_reference_statistics,
)
from micro_diffusion.eval.report import EvalProtocol, metric_records, save_sample_grid, write_report
from micro_diffusion.eval.shapes_score import shapes_score
from micro_diffusion.generate import (
    CONDITIONINGS,
    Condition,
    add_model_arguments,
    add_sampling_arguments,
    build_model,
    load_network_state,
    resolve_model,
    sample_images,
)
from micro_diffusion.models.model import LatentDiffusion, create_latent_diffusion
from micro_diffusion.posthoc_ema import parse_sigma_rels, sweep

METRICS = ("fd", "kid", "pr", "shapes", "clip")
TEXT_METRICS = ("shapes", "clip")  # scores of images against their text prompts


def load_prompts(spec: str, num_samples: int, seed: int) -> list[str]:
    """`shapes` -> grammar captions of the shapes source; otherwise a text file, one prompt per line, cycled."""
    if spec == "shapes":
        return [s.caption() for s in sample_specs(num_samples, seed=seed)]
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"--prompts must be 'shapes' or a text file of prompts; {path} does not exist")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{path} holds no prompts")
    return list(itertools.islice(itertools.cycle(lines), num_samples))


def sample_conditions(args: argparse.Namespace) -> tuple[list[Condition], str]:
    """One condition per sample (see `resolve_prompts`) and how they were chosen, for the report."""
    if args.conditioning == "unconditional":
        return [None] * args.num_samples, "unconditional"
    if args.conditioning == "class":
        num_classes = args.model["num_classes"]
        return [i % num_classes for i in range(args.num_samples)], f"class labels: sample i gets i mod {num_classes}"
    prompts = load_prompts(args.prompts, args.num_samples, args.seed)
    source = "the shapes grammar" if args.prompts == "shapes" else f"{args.prompts}, cycled"
    return prompts, f"prompts from {source}"


def generate_samples(
    model: LatentDiffusion, conditions: list[Condition], seed: int, batch_size: int, **sampling
) -> Tensor:
    """Images (N, 3, H, W) in [0, 1] on the CPU, N = len(conditions): sample i uses seed + i and conditions[i]
    (a prompt, a class label or None, as the model takes; see `generate.sample_images`) whatever the batch size."""
    batches = []
    for start in tqdm(range(0, len(conditions), batch_size), desc="generating", unit="batch"):
        chunk = conditions[start:start + batch_size]
        seeds = range(seed + start, seed + start + len(chunk))
        batches.append(sample_images(model, chunk, seeds, **sampling).cpu())
    return torch.cat(batches)


def reference_images(
    source: str, options: dict, count: int, resolution: int, batch_size: int
) -> Callable[[], Iterator[Tensor]]:
    """A callable yielding batches (B, 3, r, r) in [0, 1] of the first `count` records of a source."""
    transform = crop_transform(resolution)

    def batches() -> Iterator[Tensor]:
        records = itertools.islice(get_source(source)(**options), count)
        while chunk := list(itertools.islice(records, batch_size)):
            yield torch.stack([(transform(to_rgb(r.open_image())) + 1) / 2 for r in chunk])

    return batches


def reference_statistics(
    source: str, options: dict, count: int, resolution: int, extractor: FeatureExtractor, cache_dir: Path,
    batch_size: int = 32,
) -> tuple[FeatureStatistics, str]:
    """Cached feature statistics of the first `count` images of a source, and a name stating that set."""
    name = source + "".join(f"-{k}={v}" for k, v in sorted(options.items()))
    stats = load_or_compute_reference_statistics(
        cache_dir, f"{name}-n{count}", resolution, extractor,
        reference_images(source, options, count, resolution, batch_size),
    )
    return stats, f"{name} ({stats.count} images, {resolution}px)"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="micro-diffusion eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser, weights_required=False)
    add_sampling_arguments(parser, seed=0)
    parser.add_argument("--posthoc-snapshots", type=Path,
                        help="PowerEMA snapshot folder: sweep --sigma-rels instead of scoring --weights")
    parser.add_argument("--sigma-rels", type=parse_sigma_rels, help="EMA lengths of the sweep, e.g. 0.05,0.1")
    parser.add_argument("--prompts", help="text-to-image: 'shapes' (default) or a text file of prompts; "
                        "class-conditional: 'classes' (default); unconditional: none")
    parser.add_argument("--num-samples", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--metrics", nargs="+", choices=METRICS,
                        help="default: fd kid, and shapes with --prompts shapes")
    parser.add_argument("--extractor", default="efficientnet-lite0")
    parser.add_argument("--extractor-weights", help="weights file of the extractor (Inception, DINOv2, CLIP)")
    parser.add_argument("--clip-weights", help="OpenCLIP folder or checkpoint for the CLIP score "
                        "(default: $MICRO_DIFFUSION_CLIP_WEIGHTS)")
    parser.add_argument("--clip-model", help="OpenCLIP architecture name when --clip-weights is a bare file")
    parser.add_argument("--reference-source", help="registered source of the reference images, e.g. shapes")
    parser.add_argument("--reference-option", action="append", help="KEY=VALUE for the reference source")
    parser.add_argument("--reference-count", type=int, default=5000)
    parser.add_argument("--cache-dir", type=Path, default=Path("outputs/eval_cache"))
    parser.add_argument("--out", type=Path, default=Path("outputs/eval"))
    args = parser.parse_args(argv)
    if (args.weights is None) == (args.posthoc_snapshots is None):
        parser.error("give --weights (score one set of weights) or --posthoc-snapshots (sweep EMA lengths)")
    if (args.posthoc_snapshots is None) != (args.sigma_rels is None):
        parser.error("--posthoc-snapshots and --sigma-rels go together")
    resolve_model(parser, args)
    resolve_prompts(parser, args)
    if args.metrics is None:
        args.metrics = ["fd", "kid", "shapes"] if args.prompts == "shapes" else ["fd", "kid"]
    if {"fd", "kid", "pr"} & set(args.metrics) and not args.reference_source:
        parser.error("fd, kid and pr need --reference-source")
    text_metrics = [name for name in TEXT_METRICS if name in args.metrics]
    if text_metrics and args.conditioning != "text":
        parser.error(f"{' and '.join(text_metrics)} score images against their text prompts, and the model is "
                     f"{CONDITIONINGS[args.conditioning]} (use fd, kid or pr)")
    if "shapes" in args.metrics and args.prompts != "shapes":
        parser.error("the shapes metric needs --prompts shapes")
    if args.posthoc_snapshots is not None and args.metrics != ["fd"]:
        parser.error("the post-hoc EMA sweep scores FD: give --metrics fd")
    return args


def resolve_prompts(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Default --prompts by the model's conditioning (shapes, classes or none) and check that it fits the model."""
    if args.conditioning == "unconditional":
        if args.prompts is not None:
            parser.error(f"an unconditional model samples from seeds alone: drop --prompts {args.prompts}")
    elif args.conditioning == "class":
        args.prompts = args.prompts or "classes"
        if args.prompts != "classes":
            parser.error(f"a class-conditional model takes --prompts classes, not {args.prompts}")
    else:
        args.prompts = args.prompts or "shapes"
        if args.prompts == "classes":
            parser.error("--prompts classes needs a class-conditional model (num_classes in --model-config)")


@dataclass
class FeatureReference:
    """A feature extractor and the reference statistics FD / KID / precision-recall compare samples against."""

    extractor: FeatureExtractor
    statistics: FeatureStatistics
    name: str


def feature_reference(args: argparse.Namespace, resolution: int) -> FeatureReference:
    """The --extractor and the cached statistics of --reference-source at the samples' resolution."""
    extractor = get_feature_extractor(args.extractor, weights_path=args.extractor_weights, device=args.device)
    options = parse_key_values(args.reference_option, "--reference-option")
    statistics, name = reference_statistics(
        args.reference_source, options, args.reference_count, resolution, extractor, args.cache_dir, args.batch_size
    )
    return FeatureReference(extractor, statistics, name)


def feature_metrics(args: argparse.Namespace, images: Tensor, reference: FeatureReference) -> dict[str, float]:
    """FD / KID / precision-recall of images (N, 3, H, W) in [0, 1] against the reference."""
    kid_size = min(1000, len(images), len(reference.statistics.stored_features))
    metrics = compute_image_metrics(
        images, reference.statistics, reference.extractor, kid_subsets=100 if "kid" in args.metrics else 0,
        kid_subset_size=kid_size, precision_recall_neighborhood=3 if "pr" in args.metrics else 0,
    )
    renamed = {"frechet_distance": f"fd_{reference.extractor.name}"}
    return {renamed.get(key, key): value for key, value in metrics.items()}


def posthoc_sweep(args: argparse.Namespace, conditions: list[Condition], sampler: str) -> list[dict]:
    """FD of the post-hoc EMA of every --sigma-rels value, as metric records (the sweep's table and plot go to
    args.out). The extractor and reference statistics are loaded once, at the first sweep point."""
    model = create_latent_diffusion(**args.model).to(args.device).eval()
    metric = f"fd_{args.extractor}"
    references: list[FeatureReference] = []

    def score(state: dict[str, Tensor]) -> float:
        load_network_state(model, state, f"the post-hoc EMA from {args.posthoc_snapshots}")
        images = generate_samples(model, conditions, args.seed, args.batch_size, guidance_scale=args.guidance,
                                  num_inference_steps=args.steps, sampler=args.sampler)
        if not references:
            references.append(feature_reference(args, images.shape[-1]))
        return feature_metrics(args, images, references[0])[metric]

    rows = sweep(args.posthoc_snapshots, args.sigma_rels, score, args.out, metric_name=metric)
    protocol = EvalProtocol(args.extractor, len(conditions), references[0].name, sampler, args.steps, args.guidance,
                            args.seed)
    values = {f"{metric}@sigma_rel={row['sigma_rel']:.3f},images={row['t_images']}": row[metric] for row in rows}
    return metric_records(values, protocol)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    conditions, conditioning = sample_conditions(args)
    sampler = {"heun": "edm-heun", "euler": "euler-ode"}[args.sampler]
    if args.posthoc_snapshots is not None:
        records = [r | {"conditioning": conditioning} for r in posthoc_sweep(args, conditions, sampler)]
        report = write_report(args.out / "report.json", records)
        print(json.dumps({r["metric"]: round(r["value"], 4) for r in report["results"]}, indent=2))
        print(f"report: {args.out / 'report.json'}; sweep: {args.out / 'posthoc_sweep.png'}")
        return
    model = build_model(args)
    images = generate_samples(model, conditions, args.seed, args.batch_size, guidance_scale=args.guidance,
                              num_inference_steps=args.steps, sampler=args.sampler)
    args.out.mkdir(parents=True, exist_ok=True)
    grid = save_sample_grid(images[:64], args.out / "samples.png")
    records = []
    if {"fd", "kid", "pr"} & set(args.metrics):
        reference = feature_reference(args, images.shape[-1])
        protocol = EvalProtocol(args.extractor, len(images), reference.name, sampler, args.steps, args.guidance,
                                args.seed)
        records += metric_records(feature_metrics(args, images, reference), protocol)
    if "shapes" in args.metrics:
        score = shapes_score(images, conditions)
        count = int(score.pop("num_images"))
        protocol = EvalProtocol("shapes-checker", count, "shapes grammar prompts", sampler, args.steps,
                                args.guidance, args.seed)
        records += metric_records({f"shapes/{k}": v for k, v in score.items()}, protocol)
    if "clip" in args.metrics:
        scorer = load_clip_score(args.clip_weights, args.clip_model, device=args.device)
        pairs = ((images[i:i + args.batch_size], conditions[i:i + args.batch_size])
                 for i in range(0, len(images), args.batch_size))
        protocol = EvalProtocol(scorer.name, len(images), "the generation prompts", sampler,
                                args.steps, args.guidance, args.seed)
        records += metric_records({"clip_score": clip_score(pairs, scorer)}, protocol)
    records = [record | {"conditioning": conditioning} for record in records]
    report = write_report(args.out / "report.json", records, sample_grid=grid)
    print(json.dumps({r["metric"]: round(r["value"], 4) for r in report["results"]}, indent=2))
    print(f"report: {args.out / 'report.json'}; samples: {grid}")


if __name__ == "__main__":
    main()
