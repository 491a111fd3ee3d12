"""How the shapes score holds up on ground-truth renders degraded like generated samples: blurred (soft edges)
and noisy. Prints one JSON line.

For each prompt set (resolution, groups per prompt) and each degradation, the score of the ground-truth renders
(a perfect scorer gives 1.0 everywhere) and, per shape, the share of ground-truth objects found with the right
colour and shape (the detection whose centre is nearest, within half the object's size), plus the share of all
detections called a circle (a third is right: the source draws each shape equally often).

Degradations, on images in [0, 1] before scoring: `box3` (3x3 box filter), `gauss1.0` / `gauss1.3` (Gaussian blur
of that standard deviation in pixels) and `clean`, each alone and with `+noise8` (Gaussian noise of standard
deviation 8 on 0-255 levels, then clipped). Borders are extended (nearest pixel).

    python benchmarks/shapes_score_robustness.py [--num-images 500] [--seed 7]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import torch
from scipy import ndimage

from micro_diffusion.data.sources.shapes import SHAPES, ShapesSpec, iter_shapes
from micro_diffusion.eval.shapes_score import detect_objects, judge, shapes_score

BLURS = {"clean": None, "box3": ("box", 3), "gauss1.0": ("gauss", 1.0), "gauss1.3": ("gauss", 1.3)}
NOISE_LEVEL = 8 / 255
# (name, resolution, max_groups): the demo's 32 px single-group prompts, the full grammar at 32 and 64 px.
PROMPT_SETS = (("32px-1group", 32, 1), ("32px-2groups", 32, 2), ("64px-2groups", 64, 2))


def degrade(images: np.ndarray, blur: tuple[str, float] | None, noise: float, seed: int) -> np.ndarray:
    """(B, H, W, 3) floats in [0, 1] -> the same blurred over H and W, plus Gaussian noise, clipped."""
    if blur is not None:
        kind, size = blur
        if kind == "box":
            images = ndimage.uniform_filter(images, size=(1, int(size), int(size), 1), mode="nearest")
        else:
            images = ndimage.gaussian_filter(images, sigma=(0, size, size, 0), mode="nearest")
    if noise:
        images = images + noise * np.random.default_rng(seed).standard_normal(images.shape, dtype=np.float32)
    return np.clip(images, 0.0, 1.0)


def object_recall(found: list, truth: list[dict]) -> dict[str, tuple[int, int]]:
    """Per shape: (ground-truth objects whose nearest detection, within half their size, has their colour
    and shape, ground-truth objects)."""
    tally = {shape: [0, 0] for shape in SHAPES}
    for obj in truth:
        tally[obj["shape"]][1] += 1
        if not found:
            continue
        nearest = min(found, key=lambda f: np.hypot(*np.subtract(f.centre, obj["centre"])))
        close = np.hypot(*np.subtract(nearest.centre, obj["centre"])) < obj["size"] / 2
        tally[obj["shape"]][0] += int(close and (nearest.colour, nearest.shape) == (obj["colour"], obj["shape"]))
    return {shape: (right, total) for shape, (right, total) in tally.items()}


def measure(images: np.ndarray, records: list) -> dict[str, float]:
    """Score and per-shape figures of (B, H, W, 3) images against the records they were rendered from."""
    tensor = torch.from_numpy(images).permute(0, 3, 1, 2)
    captions = [record.caption for record in records]
    score = shapes_score(tensor, captions)
    found = detect_objects(tensor)
    result = {key: round(score[key], 4) for key in ("all", "colour", "shape", "count", "position") if key in score}
    totals = {shape: [0, 0] for shape in SHAPES}
    for objects, record in zip(found, records):
        for shape, (right, total) in object_recall(objects, record.extra["objects"]).items():
            totals[shape][0] += right
            totals[shape][1] += total
    for shape, (right, total) in totals.items():
        result[f"object/{shape}"] = round(right / max(total, 1), 4)
    # All-correct of single-object prompts, per shape (the hardest case for small blurred triangles).
    for shape in SHAPES:
        hits = [
            judge(objects, ShapesSpec.from_dict(record.extra["spec"]))["all"]
            for objects, record in zip(found, records)
            if len(record.extra["objects"]) == 1 and record.extra["objects"][0]["shape"] == shape
        ]
        if hits:
            result[f"single/{shape}"] = round(float(np.mean(hits)), 4)
    detections = [obj.shape for objects in found for obj in objects]
    result["called_circle"] = round(detections.count("circle") / max(len(detections), 1), 4)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-images", type=int, default=500)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    start = time.perf_counter()
    results: dict[str, dict] = {}
    for name, resolution, max_groups in PROMPT_SETS:
        records = list(iter_shapes(args.num_images, resolution=resolution, seed=args.seed, max_groups=max_groups))
        clean = np.stack([np.asarray(record.image, dtype=np.float32) / 255 for record in records])
        for blur_name, blur in BLURS.items():
            for noise in (0.0, NOISE_LEVEL):
                condition = blur_name + ("+noise8" if noise else "")
                results[f"{name}/{condition}"] = measure(degrade(clean, blur, noise, args.seed), records)
    print(json.dumps({
        "benchmark": "shapes_score_robustness",
        "num_images": args.num_images,
        "seed": args.seed,
        "results": results,
        "seconds": round(time.perf_counter() - start, 1),
        "machine": platform.processor() or platform.machine(),
    }))


if __name__ == "__main__":
    main()
