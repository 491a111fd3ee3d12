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
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from micro_diffusion.cli.generate import (
    add_model_arguments,
    add_sampling_arguments,
    check_image_seeds,
    resolve_model,
    settings_of,
)
from micro_diffusion.cli.options import parse_key_values
from micro_diffusion.cli.posthoc_ema import parse_sigma_rels
from micro_diffusion.data.sources.shapes import sample_prompts
from micro_diffusion.diffusion.power_ema import sweep
from micro_diffusion.distributed import Distributed, init_distributed
from micro_diffusion.eval.clip_score import load_clip_score
from micro_diffusion.eval.features import FeatureExtractor, get_feature_extractor
from micro_diffusion.eval.frechet import statistics_metrics
from micro_diffusion.eval.reference import FeatureReference, reference_statistics
from micro_diffusion.eval.report import EvalProtocol, metric_records, save_sample_grid, write_report
from micro_diffusion.eval.sample_folder import (
    SETTINGS_FILE,
    SampleSet,
    read_sample_folder,
    sample_batches,
    write_manifest,
)
from micro_diffusion.eval.shapes_score import summarise_shapes
from micro_diffusion.eval.streaming import ScoreTotals, StreamingScorer
from micro_diffusion.models.checkpoints import load_network_state
from micro_diffusion.models.model import LatentDiffusion, create_latent_diffusion
from micro_diffusion.models.sampling import CONDITIONINGS, Condition, build_model, sample_images

METRICS = ("fd", "kid", "pr", "shapes", "clip")
TEXT_METRICS = ("shapes", "clip")  # scores of images against their text prompts
FEATURE_SAMPLE_METRICS = ("kid", "pr")  # need the features themselves (a capped sample), not only their moments
MAX_STORED_FEATURES = 10_000
GRID_SIZE = 64


def load_prompts(spec: str, num_samples: int, seed: int) -> list[str]:
    """`shapes` -> grammar captions of the shapes source; otherwise a text file, one prompt per line, cycled."""
    if spec == "shapes":
        return sample_prompts(num_samples, seed=seed)
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
    parser.add_argument("--outdir", type=Path, help="also write each sample to DIR/<seed>.png with a manifest; "
                        "samples already there are read, not generated again (resume)")
    parser.add_argument("--images", type=Path, help="score the samples of a folder (see `generate --outdir`) "
                        "instead of generating: its manifest gives the prompts of the text metrics")
    args = parser.parse_args(argv)
    if sum(x is not None for x in (args.weights, args.posthoc_snapshots, args.images)) != 1:
        parser.error("give --weights (score one set of weights), --posthoc-snapshots (sweep EMA lengths) or "
                     "--images (score a folder of samples)")
    if (args.posthoc_snapshots is None) != (args.sigma_rels is None):
        parser.error("--posthoc-snapshots and --sigma-rels go together")
    if args.images is not None:
        resolve_folder(parser, args)
    else:
        resolve_model(parser, args)
        resolve_prompts(parser, args)
        check_image_seeds(parser, range(args.seed, args.seed + args.num_samples))
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
    if args.outdir is not None and args.images is not None:
        parser.error("--outdir writes generated samples; --images reads them: give one")
    return args


def resolve_folder(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--images: the folder's samples (`args.samples`), their conditioning, and the generation settings its
    `generate` wrote (None each when it was made elsewhere), for the report."""
    try:
        args.samples = read_sample_folder(args.images)
    except (OSError, ValueError, KeyError) as error:
        parser.error(f"--images {args.images}: {error}")
    first = args.samples.conditions[0]
    args.conditioning = "text" if isinstance(first, str) else "unconditional" if first is None else "class"
    args.prompts = "shapes" if args.metrics and "shapes" in args.metrics else None
    settings = args.images / SETTINGS_FILE
    known = json.loads(settings.read_text()) if settings.is_file() else {}
    for name in ("steps", "guidance", "sampler"):
        setattr(args, name, known.get(name))
    args.seed = args.samples.seeds[0]


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


def feature_reference(args: argparse.Namespace, resolution: int, extractor: FeatureExtractor) -> FeatureReference:
    """The cached statistics of --reference-source at the samples' resolution, by the samples' extractor (only
    the process that computes the metrics reads or computes them)."""
    options = parse_key_values(args.reference_option, "--reference-option")
    statistics, name = reference_statistics(
        args.reference_source, options, args.reference_count, resolution, extractor, args.cache_dir, args.batch_size
    )
    return FeatureReference(extractor, statistics, name)


def feature_metrics(args: argparse.Namespace, totals: ScoreTotals, reference: FeatureReference) -> dict[str, float]:
    """FD / KID / precision-recall of the samples' feature statistics against the reference."""
    stored = len(totals.features.stored_features)
    kid_size = min(1000, stored, len(reference.statistics.stored_features))
    metrics = statistics_metrics(
        totals.features, reference.statistics, kid_subsets=100 if "kid" in args.metrics else 0,
        kid_subset_size=kid_size, precision_recall_neighborhood=3 if "pr" in args.metrics else 0,
    )
    renamed = {"frechet_distance": f"fd_{reference.extractor.name}"}
    return {renamed.get(key, key): value for key, value in metrics.items()}


def make_scorer(args: argparse.Namespace, device: torch.device) -> StreamingScorer:
    """The metrics of --metrics, streaming: features only for KID / precision-recall are kept as a sample."""
    extractor = None
    if {"fd", "kid", "pr"} & set(args.metrics):
        extractor = get_feature_extractor(args.extractor, weights_path=args.extractor_weights, device=device)
    max_stored = MAX_STORED_FEATURES if set(FEATURE_SAMPLE_METRICS) & set(args.metrics) else 0
    clip = load_clip_score(args.clip_weights, args.clip_model, device=device) if "clip" in args.metrics else None
    return StreamingScorer(extractor, max_stored, shapes="shapes" in args.metrics, clip=clip)


def score_samples(
    args: argparse.Namespace, world: Distributed, samples: SampleSet, model: LatentDiffusion | None,
    scorer: StreamingScorer, folder: Path | None,
) -> tuple[ScoreTotals | None, Tensor]:
    """Score this process's slice of the samples (generated by `model`, or read from `folder`), batch by batch;
    returns the totals merged over all processes (None on ranks but 0) and a grid's worth of this rank's
    first samples."""
    def make(indices: list[int]) -> Tensor:
        return sample_images(model, [samples.conditions[i] for i in indices], [samples.seeds[i] for i in indices],
                             guidance_scale=args.guidance, num_inference_steps=args.steps, sampler=args.sampler)

    grid: list[Tensor] = []
    mine = world.shard(len(samples.seeds))
    batches = sample_batches(mine, args.batch_size, make if model is not None else None, folder, samples.files)
    for indices, images in tqdm(batches, total=-(-len(mine) // args.batch_size), desc=f"eval rank {world.rank}",
                                unit="batch", disable=world.rank != 0):
        scorer.update(indices, images, [samples.conditions[i] for i in indices])
        grid += list(images[:GRID_SIZE - len(grid)])
    gathered = world.gather(scorer.totals)
    if gathered is None:
        return None, torch.stack(grid)
    totals = gathered[0]
    for other in gathered[1:]:
        totals.merge(other)
    return totals, torch.stack(grid)


def metric_results(args: argparse.Namespace, totals: ScoreTotals, scorer: StreamingScorer, sampler: str) -> list:
    """Records of every metric of --metrics from the merged totals, each with its protocol."""
    if len(totals.image_sizes) != 1:
        raise ValueError(f"the samples differ in size ({sorted(totals.image_sizes)})")
    count = totals.features.count if totals.features is not None else totals.clip_count or totals.shapes["num_images"]
    records = []
    if totals.features is not None:
        reference = feature_reference(args, next(iter(totals.image_sizes)), scorer.extractor)
        protocol = EvalProtocol(args.extractor, count, reference.name, sampler, args.steps, args.guidance, args.seed)
        records += metric_records(feature_metrics(args, totals, reference), protocol)
    if totals.shapes is not None:
        score = summarise_shapes(totals.shapes)
        count = int(score.pop("num_images"))
        protocol = EvalProtocol("shapes-checker", count, "shapes grammar prompts", sampler, args.steps,
                                args.guidance, args.seed)
        records += metric_records({f"shapes/{k}": v for k, v in score.items()}, protocol)
    if scorer.clip is not None:
        protocol = EvalProtocol(scorer.clip.name, totals.clip_count, "the generation prompts", sampler,
                                args.steps, args.guidance, args.seed)
        records += metric_records({"clip_score": totals.clip_score}, protocol)
    return records


def posthoc_sweep(args: argparse.Namespace, samples: SampleSet, sampler: str) -> list[dict]:
    """FD of the post-hoc EMA of every --sigma-rels value, as metric records (the sweep's table and plot go to
    args.out), each streamed in one process."""
    world = Distributed(0, 1, torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu")))
    model = create_latent_diffusion(**args.model).to(world.device).eval()
    extractor = get_feature_extractor(args.extractor, weights_path=args.extractor_weights, device=world.device)
    metric = f"fd_{args.extractor}"
    references: list[FeatureReference] = []

    def score(state: dict[str, Tensor]) -> float:
        load_network_state(model, state, f"the post-hoc EMA from {args.posthoc_snapshots}")
        totals, _ = score_samples(args, world, samples, model, StreamingScorer(extractor), None)
        if not references:
            references.append(feature_reference(args, next(iter(totals.image_sizes)), extractor))
        return feature_metrics(args, totals, references[0])[metric]

    rows = sweep(args.posthoc_snapshots, args.sigma_rels, score, args.out, metric_name=metric)
    protocol = EvalProtocol(args.extractor, len(samples.seeds), references[0].name, sampler, args.steps,
                            args.guidance, args.seed)
    values = {f"{metric}@sigma_rel={row['sigma_rel']:.3f},images={row['t_images']}": row[metric] for row in rows}
    return metric_records(values, protocol)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    sampler = {"heun": "edm-heun", "euler": "euler-ode", None: "unknown"}[args.sampler]
    if args.images is not None:
        samples, conditioning = args.samples, f"{args.conditioning}, from {args.images / 'manifest.jsonl'}"
    else:
        conditions, conditioning = sample_conditions(args)
        samples = SampleSet.of(range(args.seed, args.seed + len(conditions)), conditions)
    if args.posthoc_snapshots is not None:
        records = [r | {"conditioning": conditioning} for r in posthoc_sweep(args, samples, sampler)]
        report = write_report(args.out / "report.json", records)
        print(json.dumps({r["metric"]: round(r["value"], 4) for r in report["results"]}, indent=2))
        print(f"report: {args.out / 'report.json'}; sweep: {args.out / 'posthoc_sweep.png'}")
        return
    world = init_distributed(args.device)
    model = None if args.weights is None else build_model(args.model, args.weights, world.device)
    if args.outdir is not None and world.rank == 0:
        write_manifest(args.outdir, samples)
        (args.outdir / SETTINGS_FILE).write_text(json.dumps(settings_of(args), indent=2))
    world.barrier()
    scorer = make_scorer(args, world.device)
    totals, grid = score_samples(args, world, samples, model, scorer, args.outdir or args.images)
    if totals is not None:
        grid_path = save_sample_grid(grid, args.out / "samples.png")
        records = [r | {"conditioning": conditioning} for r in metric_results(args, totals, scorer, sampler)]
        report = write_report(args.out / "report.json", records, sample_grid=grid_path)
        print(json.dumps({r["metric"]: round(r["value"], 4) for r in report["results"]}, indent=2))
        print(f"report: {args.out / 'report.json'}; samples: {grid_path} ({world.world_size} processes)")
    world.close()
