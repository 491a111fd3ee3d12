"""Training data: latent MDS shards -> batches, several streams mixed by proportion, resumable.

`StreamingLatentsDataset` reads the latents of one image size, the caption latents, mask and text of every
sample written by `precompute`. Streams are Streaming `Stream`s (local folders or remote URLs with a local
cache), each with an optional `proportion`, `repeat` or `choose`; without them every sample is seen once per
epoch. The first sample of each stream is checked against the expected columns, shapes and dtypes, so a shard
made for another resolution or encoder fails at start with an error naming the stream and column; every shard of
a local stream is checked against its index's size, so a truncated one fails at start, named.

`build_streaming_latents_dataloader` wraps it in Streaming's `StreamingDataLoader`, whose `state_dict` the
Composer trainer checkpoints, so a resumed run continues with the next unseen sample.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from streaming import Stream, StreamingDataLoader, StreamingDataset

from micro_diffusion.data import schema
from micro_diffusion.data.shards import check_shard_files, read_index

StreamSpec = str | Mapping[str, Any]


class StreamingLatentsDataset(StreamingDataset):
    """Streaming dataset of precomputed latents for one image size.

    Each sample is a dict:
        image_latents: (C, h, w) float32, h = w = image_size / latent_downsample, from `latents_<image_size>`.
        caption_latents: (1, L, C_text) float32 (the original MicroDiT's shape).
        caption_mask: (L,) bool, True on real tokens (all True for shards written without a mask).
        drop_caption_mask: () float32, 0.0 with probability `cap_drop_prob` (guidance dropout) else 1.0;
            drawn from (shuffle_seed, epoch, sample index), so a resumed run drops the same captions.
        caption: str.
        label: int (-1 for shards without labels).

    Args:
        streams: the Streaming streams to mix.
        image_size: pixel resolution whose latents to read (a `latents_<image_size>` column must exist).
        latent_channels, latent_downsample: the autoencoder's C and f (4 and 8 for SDXL-VAE; 3 and 1 for
            pixel space).
        caption_length, caption_channels: L and C_text of the text encoder (77 and 1024 for DFN5B-CLIP-H).
        cap_drop_prob: probability of dropping the caption for classifier-free guidance.
        **streaming_kwargs: for `StreamingDataset` (shuffle, shuffle_seed, batch_size, cache_limit, ...).
    """

    def __init__(
        self,
        streams: Sequence[Stream],
        image_size: int,
        latent_channels: int = 4,
        latent_downsample: int = 8,
        caption_length: int = 77,
        caption_channels: int = 1024,
        cap_drop_prob: float = 0.0,
        **streaming_kwargs: Any,
    ) -> None:
        if image_size % latent_downsample:
            raise ValueError(
                f"image_size {image_size} is not divisible by latent_downsample {latent_downsample}"
            )
        if not 0.0 <= cap_drop_prob <= 1.0:
            raise ValueError(f"cap_drop_prob must be in [0, 1], got {cap_drop_prob}")
        for stream in streams:
            _check_local_shards(stream)
        super().__init__(streams=streams, **streaming_kwargs)
        latent_size = image_size // latent_downsample
        self.latents_column = schema.latents_column(image_size)
        self.latent_shape = (latent_channels, latent_size, latent_size)
        self.caption_shape = (1, caption_length, caption_channels)
        self.cap_drop_prob = cap_drop_prob
        for stream_id, stream in enumerate(streams):
            if self.samples_per_stream[stream_id] > 0:
                first = super().get_item(int(self.sample_offset_per_stream[stream_id]))
                self._check_sample(first, _stream_name(stream))

    def _check_sample(self, sample: Mapping[str, Any], stream: str) -> None:
        """Raise a ValueError naming the stream, column, expected and found value on the first mismatch."""
        expected_bytes = {
            self.latents_column: (self.latent_shape, 2),
            schema.CAPTION_LATENTS: (self.caption_shape, 2),
            schema.CAPTION_MASK: ((self.caption_shape[1],), 1),
        }
        for column, (shape, itemsize) in expected_bytes.items():
            if column not in sample:
                if column == schema.CAPTION_MASK:
                    continue
                raise ValueError(
                    f"stream {stream}: missing column {column!r} (expected {_describe(shape, itemsize)}); "
                    f"found columns {sorted(sample)}"
                )
            value = sample[column]
            size = int(np.prod(shape)) * itemsize
            if not isinstance(value, bytes) or len(value) != size:
                found = f"{len(value)} bytes" if isinstance(value, bytes) else type(value).__name__
                expected = _describe(shape, itemsize)
                raise ValueError(f"stream {stream}: column {column!r}: expected {expected}, found {found}")
        if not isinstance(sample.get(schema.CAPTION), str):
            found = type(sample[schema.CAPTION]).__name__ if schema.CAPTION in sample else "no such column"
            raise ValueError(f"stream {stream}: column {schema.CAPTION!r}: expected str, found {found}")
        if schema.LABEL in sample and not isinstance(sample[schema.LABEL], int | np.integer):
            found = type(sample[schema.LABEL]).__name__
            raise ValueError(f"stream {stream}: column {schema.LABEL!r}: expected int, found {found}")

    def get_item(self, sample_id: int, retry: int = 7) -> dict[str, Any]:
        """The training sample with global index `sample_id` (see the class docstring)."""
        sample = super().get_item(sample_id, retry)
        length = self.caption_shape[1]
        mask = sample.get(schema.CAPTION_MASK)
        caption_mask = np.frombuffer(mask, np.uint8).astype(bool) if mask else np.ones(length, dtype=bool)
        latents = schema.from_fp16_bytes(sample[self.latents_column], self.latent_shape, self.latents_column)
        captions = schema.from_fp16_bytes(
            sample[schema.CAPTION_LATENTS], self.caption_shape, schema.CAPTION_LATENTS
        )
        epoch = max(self.next_epoch - 1, 0)
        drop = np.random.default_rng([self.shuffle_seed, epoch, sample_id]).random() < self.cap_drop_prob
        return {
            schema.BATCH_IMAGE_LATENTS: torch.from_numpy(latents.astype(np.float32)),
            schema.BATCH_CAPTION_LATENTS: torch.from_numpy(captions.astype(np.float32)),
            schema.BATCH_CAPTION_MASK: torch.from_numpy(caption_mask),
            schema.BATCH_DROP_CAPTION: torch.tensor(0.0 if drop else 1.0),
            schema.BATCH_CAPTION: sample[schema.CAPTION],
            schema.BATCH_LABEL: int(sample.get(schema.LABEL, -1)),
        }


def _describe(shape: tuple[int, ...], itemsize: int) -> str:
    dtype = "float16" if itemsize == 2 else "uint8"
    return f"{dtype} bytes of shape {shape} ({int(np.prod(shape)) * itemsize} bytes)"


def _check_local_shards(stream: Stream) -> None:
    """Check each shard's size against the index of a stream read from local disk only (a remote stream's
    cache fills as it trains, and Streaming checks what it downloads)."""
    if stream.remote not in (None, stream.local):
        return
    folder = Path(stream.local) / stream.split
    remake = (
        f"rerun the `micro-diffusion precompute` that wrote {folder} with the same arguments (it redoes only the "
        "chunks whose shards are damaged), or remake the stream's shards"
    )
    check_shard_files(folder, read_index(folder, remake), remake)


def _stream_name(stream: Stream) -> str:
    return stream.remote or stream.local


def make_streams(specs: Sequence[StreamSpec]) -> list[Stream]:
    """Streams from local paths, or from mappings of `Stream` arguments (local, remote, proportion, ...)."""
    if not specs:
        raise ValueError("no data streams given")
    streams = []
    for spec in specs:
        arguments = {"local": spec} if isinstance(spec, str | os.PathLike) else dict(spec)
        if "local" in arguments:
            arguments["local"] = str(arguments["local"])
        streams.append(Stream(**arguments))
    return streams


def build_streaming_latents_dataloader(
    streams: Sequence[StreamSpec],
    batch_size: int,
    image_size: int,
    cap_drop_prob: float = 0.0,
    shuffle: bool = True,
    drop_last: bool = True,
    num_workers: int = 2,
    prefetch_factor: int | None = 2,
    persistent_workers: bool = True,
    pin_memory: bool = True,
    **dataset_kwargs: Any,
) -> StreamingDataLoader:
    """The training (or evaluation) dataloader over `streams`, with a checkpointable `state_dict`.

    Args:
        streams: local folders, or mappings of `Stream` arguments (e.g. {"remote": "s3://...", "local":
            "/tmp/cache", "proportion": 0.3}).
        batch_size: global batch size, divided by the number of processes (`WORLD_SIZE`).
        image_size, cap_drop_prob, **dataset_kwargs: see `StreamingLatentsDataset` (latent_channels,
            latent_downsample, caption_length, caption_channels, shuffle_seed, cache_limit, ...).
        shuffle, drop_last: True for training; False (and cap_drop_prob 0) for evaluation.
        num_workers, prefetch_factor, persistent_workers, pin_memory: PyTorch DataLoader options (the
            original: 2 workers, 2 batches each in advance, persistent, pinned).
    """
    world_size = _world_size()
    if batch_size % world_size:
        raise ValueError(f"global batch_size {batch_size} is not divisible by the {world_size} processes")
    per_device = batch_size // world_size
    dataset = StreamingLatentsDataset(
        make_streams(streams),
        image_size=image_size,
        cap_drop_prob=cap_drop_prob,
        shuffle=shuffle,
        batch_size=per_device,
        **dataset_kwargs,
    )
    return StreamingDataLoader(
        dataset,
        batch_size=per_device,
        drop_last=drop_last,
        num_workers=num_workers,
        prefetch_factor=prefetch_factor if num_workers > 0 else None,
        persistent_workers=persistent_workers and num_workers > 0,
        pin_memory=pin_memory and torch.cuda.is_available(),
    )


def _world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))
