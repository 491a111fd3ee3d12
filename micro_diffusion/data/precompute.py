"""`micro-diffusion precompute`: raw MDS -> latent MDS, one pass of the VAE and the text encoder.

Every image is converted to RGB (transparent pixels composited onto white), then for each resolution resized
so its shorter side equals the resolution (bicubic, antialiased) and centre-cropped, mapped to [-1, 1] and
encoded: a posterior sample (as the original) or, with `--moments`, the posterior mean and std (EDM2 style).
Captions are encoded to (L, C) token states. Columns written: see `schema.latent_columns`.

Distributed and resumable: the input is cut into fixed-size chunks of consecutive samples; chunk k goes to
process k % world_size and is written to `<output>/chunk_<k>.partial/`, renamed to `<output>/chunk_<k>/` once
its index.json is complete. A rerun (with any number of processes) skips complete chunks and redoes the
others, so no sample is lost or duplicated. When every chunk is complete, rank 0 merges the chunk indexes into
`<output>/index.json`. Launch with one process per GPU:

    composer -n 8 -m micro_diffusion.cli precompute --input datadir/cc12m/mds \\
        --output datadir/cc12m/latents --vae stabilityai/stable-diffusion-xl-base-1.0 \\
        --text-encoder openclip:hf-hub:apple/DFN5B-CLIP-ViT-H-14-378
    micro-diffusion precompute --input datadir/emoji/mds --output datadir/emoji/latents \\
        --resolutions 32 64 --vae identity --text-encoder minilm
"""

from __future__ import annotations

import bisect
import io
import json
import os
import shutil
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml
from PIL import Image
from streaming import MDSWriter
from streaming.base.format import reader_from_json
from streaming.base.util import merge_index
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from micro_diffusion.data import schema
from micro_diffusion.data.images import crop_transform, to_rgb
from micro_diffusion.data.shards import check_complete, check_shard_files
from micro_diffusion.distributed import Distributed, init_distributed
from micro_diffusion.dtypes import torch_dtype
from micro_diffusion.encoders.text import TextEncoder, load_text_encoder
from micro_diffusion.encoders.vae import ImageAutoencoder, load_vae

SETTINGS_FILE = "precompute_settings.yaml"
INDEX_FILE = "index.json"


@dataclass(frozen=True)
class PrecomputeSettings:
    """Everything that decides the content of the output; a rerun must use the same values."""

    input: str
    num_samples: int
    resolutions: tuple[int, ...]
    vae: str
    text_encoder: str
    moments: bool
    chunk_size: int
    seed: int
    dtype: str


class RawShards:
    """Random access to the samples of a local raw MDS folder (its index.json and uncompressed shards).

    `shards[i]` is the decoded row dict of global sample i (columns of `schema.RAW_COLUMNS`). Opening checks the
    columns, that the convert which wrote the folder finished, and every shard's size against the index.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder).expanduser()
        index_path = self.folder / INDEX_FILE
        if not index_path.is_file():
            raise FileNotFoundError(
                f"{index_path} not found: is {self.folder} a raw MDS folder from `convert`?"
            )
        shards = json.loads(index_path.read_text())["shards"]
        self.readers = [reader_from_json(str(self.folder), None, shard) for shard in shards]
        for shard, reader in zip(shards, self.readers):
            reader.validate(allow_unsafe_types=False)
            missing = {schema.RAW_IMAGE, schema.RAW_CAPTION} - set(reader.column_names)
            if missing:
                name = shard["raw_data"]["basename"]
                raise ValueError(
                    f"{self.folder}: shard {name} lacks column(s) {sorted(missing)}; "
                    f"it has {reader.column_names}"
                )
            if not (self.folder / shard["raw_data"]["basename"]).is_file():
                raise FileNotFoundError(
                    f"{self.folder}: shard {shard['raw_data']['basename']} is missing (or only compressed; "
                    "precompute reads uncompressed shards as `convert` writes them)"
                )
        remake = f"rerun the `micro-diffusion convert` that wrote it with --output {self.folder} --overwrite"
        check_complete(self.folder, shards, remake)
        check_shard_files(self.folder, shards, remake)
        self.offsets = np.cumsum([0] + [reader.samples for reader in self.readers]).tolist()

    def __len__(self) -> int:
        return self.offsets[-1]

    def __getitem__(self, index: int) -> dict[str, Any]:
        shard = bisect.bisect_right(self.offsets, index) - 1
        return self.readers[shard].get_item(index - self.offsets[shard])


class CroppedImages(Dataset):
    """Raw samples -> {"index", "key", "caption", "label", "images": [(3, r, r) in [-1, 1] per resolution r]}.

    The dataset of the precompute DataLoader, so decoding and cropping run in its worker processes.
    """

    def __init__(self, folder: str | Path, resolutions: Sequence[int]) -> None:
        self.folder = folder
        self.transforms = [crop_transform(resolution) for resolution in resolutions]
        self._shards: RawShards | None = None  # opened lazily in each DataLoader worker

    def __getitem__(self, index: int) -> dict[str, Any]:
        if self._shards is None:
            self._shards = RawShards(self.folder)
        row = self._shards[index]
        key = row.get(schema.RAW_KEY, str(index))
        try:
            image = to_rgb(Image.open(io.BytesIO(row[schema.RAW_IMAGE])))
        except Exception as error:  # Pillow signals corrupt data with several exception types
            raise ValueError(
                f"{self.folder}: sample {index} ({key!r}) has an unreadable image: {error}"
            ) from error
        return {
            "index": index,
            "key": key,
            "caption": row[schema.RAW_CAPTION],
            "label": int(row.get(schema.RAW_LABEL, -1)),
            "images": [transform(image) for transform in self.transforms],
        }

    def __len__(self) -> int:
        if self._shards is None:
            self._shards = RawShards(self.folder)
        return len(self._shards)


def chunk_folder(output: Path, chunk: int, partial: bool = False) -> Path:
    return output / f"chunk_{chunk:06d}{'.partial' if partial else ''}"


def chunk_is_complete(folder: Path, expected: int) -> bool:
    """True when `folder/index.json` parses, counts exactly `expected` samples and its shards are whole."""
    try:
        shards = json.loads((folder / INDEX_FILE).read_text())["shards"]
        check_shard_files(folder, shards, "")
    except (OSError, ValueError, KeyError):
        return False
    return sum(shard["samples"] for shard in shards) == expected


def chunk_ranges(num_samples: int, chunk_size: int) -> list[range]:
    """Consecutive ranges of `chunk_size` indices covering [0, num_samples); the last may be shorter."""
    return [range(start, min(start + chunk_size, num_samples)) for start in range(0, num_samples, chunk_size)]


def _check_settings(output: Path, settings: PrecomputeSettings) -> None:
    """Write the settings file, or check that an earlier run into `output` used the same settings."""
    path = output / SETTINGS_FILE
    current = asdict(settings) | {"resolutions": list(settings.resolutions)}
    if path.is_file():
        previous = yaml.safe_load(path.read_text())
        if previous != current:
            changed = sorted(k for k in current if previous.get(k) != current[k])
            raise ValueError(
                f"{output} was written with other settings ({', '.join(changed)} differ: {path}); "
                "use a new output folder, or pass --overwrite to start again"
            )
        return
    output.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(current, sort_keys=False))


class CaptionCache:
    """Encodes captions through the text encoder, remembering the last `max_entries` distinct ones.

    Class-like and procedural captions repeat a lot (Fashion-MNIST has 10, the demo's shapes prompts a few
    dozen); encoding each distinct caption once makes the text encoder's cost vanish there, and costs nothing
    when captions are unique. Entries are kept in float16, the dtype they are stored in anyway.
    """

    def __init__(self, text_encoder: TextEncoder, max_entries: int = 4096) -> None:
        self.text_encoder = text_encoder
        self.max_entries = max_entries
        self.entries: OrderedDict[str, tuple[np.ndarray, np.ndarray]] = OrderedDict()

    def __call__(self, captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """captions (B strings) -> states (B, L, C) float16, mask (B, L) uint8."""
        missing = [c for c in dict.fromkeys(captions) if c not in self.entries]
        if missing:
            states, mask = self.text_encoder(missing)
            states = states.float().cpu().numpy().astype(schema.LATENT_DTYPE)
            mask = mask.cpu().numpy().astype(np.uint8)
            for i, caption in enumerate(missing):
                self.entries[caption] = (states[i], mask[i])
        for caption in captions:
            self.entries.move_to_end(caption)
        picked = [self.entries[c] for c in captions]
        while len(self.entries) > self.max_entries:
            self.entries.popitem(last=False)
        return np.stack([p[0] for p in picked]), np.stack([p[1] for p in picked])


def _encode_batch(
    batch: dict[str, Any],
    vae: ImageAutoencoder,
    captions: CaptionCache,
    settings: PrecomputeSettings,
    generator: torch.Generator,
) -> Iterator[dict[str, Any]]:
    """One collated batch -> latent MDS rows (fp16 bytes)."""
    states, mask = captions(list(batch["caption"]))
    latents: dict[str, np.ndarray] = {}
    for resolution, images in zip(settings.resolutions, batch["images"]):
        if settings.moments:
            mean, std = vae.encode_moments(images)
            latents[schema.latents_column(resolution)] = mean.float().cpu().numpy()
            latents[schema.latents_std_column(resolution)] = std.float().cpu().numpy()
        else:
            sample = vae.encode(images, sample=True, generator=generator)
            latents[schema.latents_column(resolution)] = sample.float().cpu().numpy()
    for i, key in enumerate(batch["key"]):
        row = {
            schema.KEY: key,
            schema.CAPTION: batch["caption"][i],
            schema.LABEL: int(batch["label"][i]),
            schema.CAPTION_LATENTS: schema.to_fp16_bytes(states[i][None]),
            schema.CAPTION_MASK: mask[i].tobytes(),
        }
        row.update({column: schema.to_fp16_bytes(values[i]) for column, values in latents.items()})
        yield row


def precompute(
    input_dir: str | Path,
    output_dir: str | Path,
    resolutions: Sequence[int] = (256, 512),
    vae: str = "identity",
    text_encoder: str = "minilm",
    moments: bool = False,
    batch_size: int = 32,
    chunk_size: int = 4096,
    seed: int = 2024,
    dtype: str = "float32",
    device: str | None = None,
    num_workers: int = 2,
    max_chunks: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> int:
    """Encode the raw MDS folder `input_dir` into the latent MDS folder `output_dir` (module docstring).

    Runs as one process of a distributed job when RANK / WORLD_SIZE are set. `max_chunks` bounds the chunks
    this process encodes in this run (the rest is left for a rerun). Returns the number of samples encoded by
    this process in this run.
    """
    input_dir, output = Path(input_dir).expanduser().resolve(), Path(output_dir).expanduser()
    torch_dtype(dtype)  # an unknown name fails here, before any work
    if not resolutions or min(resolutions) <= 0:
        raise ValueError(f"resolutions must be positive, got {list(resolutions)}")
    world = init_distributed(device)
    raw = RawShards(input_dir)
    if len(raw) == 0:
        raise ValueError(f"{input_dir} holds no samples")
    settings = PrecomputeSettings(
        str(input_dir), len(raw), tuple(resolutions), vae, text_encoder, moments, chunk_size, seed, dtype
    )
    if world.rank == 0:
        if overwrite and output.exists():
            shutil.rmtree(output)
        _check_settings(output, settings)
    world.barrier()

    chunks = chunk_ranges(len(raw), chunk_size)
    mine = world.shard(len(chunks))
    todo = [k for k in mine if not chunk_is_complete(chunk_folder(output, k), len(chunks[k]))]
    todo = todo[:max_chunks] if max_chunks is not None else todo
    start = time.perf_counter()
    encoded = _encode_chunks(raw, output, chunks, todo, settings, world, batch_size, num_workers, progress)
    seconds = time.perf_counter() - start

    world.barrier()
    total_encoded = world.reduce(encoded, dist.ReduceOp.SUM)
    slowest = world.reduce(seconds, dist.ReduceOp.MAX)
    if world.rank == 0:
        _finish(output, chunks, total_encoded, slowest, world.world_size)
    world.close()
    return encoded


def _encode_chunks(
    raw: RawShards,
    output: Path,
    chunks: list[range],
    todo: list[int],
    settings: PrecomputeSettings,
    world: Distributed,
    batch_size: int,
    num_workers: int,
    progress: bool,
) -> int:
    """Encode and write the chunks `todo`, each atomically (partial folder renamed when complete)."""
    if not todo:
        return 0
    dtype = torch_dtype(settings.dtype)
    vae = load_vae(settings.vae, dtype=dtype, device=world.device)
    captions = CaptionCache(load_text_encoder(settings.text_encoder, dtype=dtype, device=world.device))
    plan = [
        (k, list(chunks[k][i : i + batch_size])) for k in todo for i in range(0, len(chunks[k]), batch_size)
    ]
    loader = DataLoader(
        CroppedImages(raw.folder, settings.resolutions),
        batch_sampler=[indices for _, indices in plan],
        num_workers=num_workers,
    )
    columns = schema.latent_columns(list(settings.resolutions), with_std=settings.moments)
    bar = tqdm(
        total=sum(len(chunks[k]) for k in todo), unit="img", desc=f"precompute rank {world.rank}",
        disable=not progress or world.rank != 0, dynamic_ncols=True,
    )  # fmt: skip
    writer, current, written, encoded = None, None, 0, 0
    for (chunk, _), batch in zip(plan, loader):
        if chunk != current:
            current, written = chunk, 0
            partial = chunk_folder(output, chunk, partial=True)
            shutil.rmtree(partial, ignore_errors=True)
            shutil.rmtree(chunk_folder(output, chunk), ignore_errors=True)  # an incomplete earlier attempt
            writer = MDSWriter(out=str(partial), columns=columns, size_limit="256mb")
            generator = torch.Generator(world.device).manual_seed(settings.seed + chunk)
        for row in _encode_batch(batch, vae, captions, settings, generator):
            writer.write(row)
        written += len(batch["key"])
        encoded += len(batch["key"])
        bar.update(len(batch["key"]))
        if written == len(chunks[chunk]):
            writer.finish()
            os.replace(partial, chunk_folder(output, chunk))
    bar.close()
    return encoded


def _finish(output: Path, chunks: list[range], encoded: float, seconds: float, world_size: int) -> None:
    """Merge the chunk indexes into output/index.json when all chunks are complete; print the throughput."""
    done = [k for k, chunk in enumerate(chunks) if chunk_is_complete(chunk_folder(output, k), len(chunk))]
    rate = encoded / seconds if seconds > 0 else float("nan")
    print(
        f"precompute: encoded {int(encoded)} samples in {seconds:.1f} s ({rate:.1f} images/s over "
        f"{world_size} process(es)); {len(done)}/{len(chunks)} chunks complete in {output}"
    )
    if len(done) < len(chunks):
        print(f"precompute: {len(chunks) - len(done)} chunk(s) remain; rerun the same command to finish")
        return
    (output / INDEX_FILE).unlink(missing_ok=True)  # from an earlier run, before a damaged chunk was redone
    merge_index([str(chunk_folder(output, k) / INDEX_FILE) for k in done], str(output))
