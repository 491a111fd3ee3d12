"""A set of samples on disk: one PNG per sample, named by its seed, and a manifest of what each was conditioned on.

    DIR/manifest.jsonl   one JSON object per sample, in sample order:
                         {"file": "000042.png", "seed": 42, "prompt": "two red circles"}
                         ("class_label": 3 for a class-conditional model; neither key for an unconditional one)
    DIR/000042.png ...   the 8-bit RGB sample of seed 42 (EDM2's and the FID tools' one-file-per-seed convention)
    DIR/generation.json  the model, weights and sampling settings, when the project made the samples

`micro-diffusion generate --outdir` and `eval --outdir` write such a folder, each process of a launcher its own
slice of the samples; a file that exists is not made again, so a killed run resumes. `eval --images DIR` scores a
folder: with its manifest, text metrics (CLIP score, shapes) pair each image with its prompt; without one, every
PNG of the folder is a sample (feature metrics only), so samples of other models are scored under one protocol.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

MANIFEST = "manifest.jsonl"
SETTINGS_FILE = "generation.json"  # how the samples were made (model, weights, sampler, steps, guidance), if known
Condition = str | int | None  # a prompt, a class label, or nothing (unconditional)
_SEED_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


def parse_seeds(text: str) -> list[int]:
    """"0-49999" or "1,5,10-12" -> the seeds, in order (ranges inclusive, as in EDM2's generate.py)."""
    seeds = []
    for part in text.split(","):
        match = _SEED_RANGE.match(part.strip())
        if match is None:
            raise ValueError(f"seeds must look like 0-49999 or 1,5,10-12; got {text!r}")
        first, last = int(match[1]), int(match[2] or match[1])
        if last < first:
            raise ValueError(f"seed range {part!r} runs backwards")
        seeds += range(first, last + 1)
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds {text!r} repeat a seed: each seed names one file")
    return seeds


def sample_file(seed: int) -> str:
    """The file name of the sample of `seed`: 000042.png."""
    return f"{seed:06d}.png"


@dataclass(frozen=True)
class SampleSet:
    """The samples of a run, in order: sample i has seed seeds[i] and condition conditions[i], in file files[i]."""

    seeds: list[int]
    conditions: list[Condition]
    files: list[str]

    @classmethod
    def of(cls, seeds: Sequence[int], conditions: Sequence[Condition]) -> SampleSet:
        if len(seeds) != len(conditions):
            raise ValueError(f"{len(seeds)} seeds but {len(conditions)} conditions")
        return cls(list(seeds), list(conditions), [sample_file(seed) for seed in seeds])

    def manifest_lines(self) -> list[str]:
        lines = []
        for seed, condition, file in zip(self.seeds, self.conditions, self.files):
            record: dict = {"file": file, "seed": seed}
            if isinstance(condition, str):
                record["prompt"] = condition
            elif condition is not None:
                record["class_label"] = int(condition)
            lines.append(json.dumps(record, ensure_ascii=False))
        return lines


def write_manifest(folder: Path, samples: SampleSet) -> None:
    """Write DIR/manifest.jsonl (atomically), or check that the one there lists the same samples (a resumed run
    must not mix samples of other seeds or prompts into the folder)."""
    path = Path(folder) / MANIFEST
    text = "\n".join(samples.manifest_lines()) + "\n"
    if path.is_file():
        if path.read_text(encoding="utf-8") != text:
            raise ValueError(
                f"{path} lists other samples (seeds or prompts) than this run: use another folder, or delete it"
            )
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)


def read_sample_folder(folder: Path) -> SampleSet:
    """The samples of a folder: those its manifest lists, or, without a manifest, every PNG in name order (seed i
    for the i-th, conditions None)."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        files = sorted(p.name for p in folder.glob("*.png"))
        if not files:
            raise FileNotFoundError(f"{folder} holds no {MANIFEST} and no PNG files")
        return SampleSet(list(range(len(files))), [None] * len(files), files)
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    missing = [r["file"] for r in records if not (folder / r["file"]).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} samples of {path} are missing, e.g. {missing[:3]}")
    conditions = [r.get("prompt", r.get("class_label")) for r in records]
    return SampleSet([r["seed"] for r in records], conditions, [r["file"] for r in records])


def save_images(folder: Path, files: Sequence[str], images: Tensor) -> None:
    """Write images (B, 3, H, W) in [0, 1] as 8-bit PNGs under the given names (each atomically)."""
    pixels = (images.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
    for file, array in zip(files, pixels.numpy()):
        path = Path(folder) / file
        partial = path.with_name(path.name + ".partial")
        Image.fromarray(array).save(partial, format="PNG")
        os.replace(partial, path)


def load_images(paths: Sequence[Path]) -> Tensor:
    """Read image files (all the same size) as (B, 3, H, W) float32 in [0, 1]."""
    arrays = [np.asarray(Image.open(path).convert("RGB")) for path in paths]
    sizes = {array.shape for array in arrays}
    if len(sizes) > 1:
        raise ValueError(f"samples differ in size ({sorted(sizes)}): resize them to one size first")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255


def sample_batches(
    indices: Sequence[int],
    batch_size: int,
    make: Callable[[list[int]], Tensor] | None,
    folder: Path | None = None,
    files: Sequence[str] = (),
) -> Iterator[tuple[list[int], Tensor]]:
    """Batches (sample indices, images (B, 3, H, W) in [0, 1]) of the samples `indices`, `batch_size` at a time.

    A sample whose file `folder / files[i]` exists is read from it; the others are made by `make(indices)` (None:
    all must exist) and, with a folder, written to it. Only one batch of images is in memory at a time.
    """
    for start in range(0, len(indices), batch_size):
        chunk = list(indices[start:start + batch_size])
        on_disk = [i for i in chunk if folder is not None and (folder / files[i]).is_file()]
        to_make = [i for i in chunk if i not in on_disk]
        images = {}
        if on_disk:
            images.update(zip(on_disk, load_images([folder / files[i] for i in on_disk])))
        if to_make:
            if make is None:
                raise FileNotFoundError(f"{folder} lacks the samples {[files[i] for i in to_make[:3]]} ...")
            made = make(to_make).cpu()
            if folder is not None:
                save_images(folder, [files[i] for i in to_make], made)
                made = (made.clamp(0, 1) * 255).round() / 255  # 8-bit levels, as a resumed run reads it
            images.update(zip(to_make, made))
        yield chunk, torch.stack([images[i] for i in chunk])
