"""Data jobs under faults: interrupted convert, undecodable captions, 16-bit PNGs, truncated shards.

Each test is a row of RELIABILITY.md: a bad input or a fault, and what the user sees.
"""

import io
import json
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from streaming import MDSWriter
from streaming.base.format import reader_from_json
from streaming.base.util import clean_stale_shared_memory

from micro_diffusion.data import schema
from micro_diffusion.data.convert import SKIP_CAPTION_NOT_UTF8, SUMMARY_FILE, convert
from micro_diffusion.data.images import to_rgb
from micro_diffusion.data.loader import StreamingLatentsDataset, make_streams
from micro_diffusion.data.precompute import CroppedImages, RawShards, precompute
from micro_diffusion.data.sources import Record
from micro_diffusion.data.sources.folder import iter_folder
from micro_diffusion.data.sources.tar import iter_tar


def png_bytes(seed: int, size=(24, 20)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def records(count: int) -> list[Record]:
    return [Record(f"k{i}", None, f"caption {i}", label=i, encoded=png_bytes(i)) for i in range(count)]


def read_rows(folder: Path) -> list[dict]:
    rows = []
    for shard in json.loads((folder / "index.json").read_text())["shards"]:
        reader = reader_from_json(str(folder), None, shard)
        rows += [reader.get_item(i) for i in range(reader.samples)]
    return rows


def interrupted(items: list[Record], after: int):
    """The records, then the interruption a user's Ctrl-C gives after `after` of them."""
    yield from items[:after]
    raise KeyboardInterrupt


def truncate(path: Path, keep: int = 100) -> None:
    path.write_bytes(path.read_bytes()[:keep])


# --- an interrupted convert ------------------------------------------------------------------------------


def test_an_interrupted_convert_is_refused_until_it_is_rerun(tmp_path):
    raw = tmp_path / "raw"
    with pytest.raises(KeyboardInterrupt):
        convert(interrupted(records(12), after=7), raw, size_limit=1 << 12, progress=False)
    assert (raw / "index.json").is_file()  # Streaming wrote the index of what it had: it looks complete
    with pytest.raises(RuntimeError, match=r"did not finish.*micro-diffusion convert.*--overwrite"):
        RawShards(raw)
    with pytest.raises(RuntimeError, match=r"did not finish.*--overwrite"):
        precompute(raw, tmp_path / "latents", resolutions=[8], progress=False, num_workers=0)
    with pytest.raises(FileExistsError, match="did not finish"):
        convert(records(12), raw, progress=False)

    summary = convert(records(12), raw, size_limit=1 << 12, overwrite=True, progress=False)
    assert summary.kept == 12
    assert [row[schema.RAW_KEY] for row in read_rows(raw)] == [f"k{i}" for i in range(12)]
    assert len(RawShards(raw)) == 12


# --- captions that are not UTF-8 -------------------------------------------------------------------------


def test_a_non_utf8_sidecar_caption_is_a_counted_skip_named_in_the_summary(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for name, caption in (("a", b"a red box"), ("b", b"caf\xe9 in latin-1"), ("c", b"a blue box")):
        (images / f"{name}.png").write_bytes(png_bytes(ord(name)))
        (images / f"{name}.txt").write_bytes(caption)
    summary = convert(iter_folder(images), tmp_path / "raw", progress=False)
    assert summary.kept == 2 and summary.skipped == {SKIP_CAPTION_NOT_UTF8: 1}
    assert f"({SKIP_CAPTION_NOT_UTF8}), e.g. b.png" in (tmp_path / "raw" / SUMMARY_FILE).read_text()
    assert [row[schema.RAW_CAPTION] for row in read_rows(tmp_path / "raw")] == ["a red box", "a blue box"]


def test_a_non_utf8_tar_caption_is_a_counted_skip_not_a_replaced_caption(tmp_path):
    shard = tmp_path / "shard.tar"
    with tarfile.open(shard, "w") as archive:
        for name, data in (("0.png", png_bytes(0)), ("0.txt", b"\xff\xfe broken"), ("1.png", png_bytes(1)),
                           ("1.txt", b"fine")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    summary = convert(iter_tar(shard), tmp_path / "raw", progress=False)
    assert summary.kept == 1 and summary.examples[SKIP_CAPTION_NOT_UTF8] == ["shard.tar/0"]


# --- truncated and damaged shards ------------------------------------------------------------------------


def test_a_truncated_raw_shard_is_named_with_the_command_that_remakes_it(tmp_path):
    raw = tmp_path / "raw"
    convert(records(12), raw, size_limit=1 << 12, progress=False)
    shards = sorted(raw.glob("shard.*.mds"))
    assert len(shards) >= 3
    truncate(shards[1])
    with pytest.raises(ValueError, match=rf"{shards[1].name} is 100 bytes.*index.json.*micro-diffusion convert"):
        precompute(raw, tmp_path / "latents", resolutions=[8], progress=False, num_workers=0)


def write_latent_stream(folder: Path, count: int) -> None:
    with MDSWriter(out=str(folder), columns=schema.latent_columns([16]), size_limit=1 << 12) as writer:
        for i in range(count):
            writer.write({
                schema.KEY: f"s{i}", schema.CAPTION: f"caption {i}", schema.LABEL: i,
                schema.CAPTION_LATENTS: schema.to_fp16_bytes(np.zeros((1, 5, 6))),
                schema.CAPTION_MASK: np.ones(5, np.uint8).tobytes(),
                schema.latents_column(16): schema.to_fp16_bytes(np.zeros((4, 2, 2))),
            })  # fmt: skip


def test_a_bad_shard_in_the_middle_of_a_latent_stream_fails_at_start_naming_it(tmp_path):
    clean_stale_shared_memory()
    stream = tmp_path / "latents"
    write_latent_stream(stream, 60)
    shards = sorted(stream.glob("shard.*.mds"))
    assert len(shards) >= 3
    truncate(shards[len(shards) // 2])
    with pytest.raises(ValueError, match=rf"{shards[len(shards) // 2].name} is 100 bytes"):
        StreamingLatentsDataset(
            make_streams([str(stream)]), image_size=16, caption_length=5, caption_channels=6, batch_size=4
        )
    clean_stale_shared_memory()


def test_a_truncated_precomputed_chunk_names_precompute_and_a_rerun_redoes_only_it(
    tmp_path, tiny_hf_clip_dir
):
    clean_stale_shared_memory()
    raw, latents = tmp_path / "raw", tmp_path / "latents"
    convert(records(10), raw, progress=False)
    options = dict(resolutions=[8], text_encoder=tiny_hf_clip_dir.name, chunk_size=4, num_workers=0, progress=False)
    precompute(raw, latents, **options)
    damaged = next((latents / "chunk_000001").glob("shard.*.mds"))
    truncate(damaged)
    with pytest.raises(ValueError, match=r"chunk_000001/shard.00000.mds is 100 bytes.*precompute"):
        StreamingLatentsDataset(make_streams([str(latents)]), image_size=8, latent_channels=3,
                                latent_downsample=1, caption_length=77, caption_channels=32, batch_size=2)
    assert precompute(raw, latents, **options) == 4
    dataset = StreamingLatentsDataset(make_streams([str(latents)]), image_size=8, latent_channels=3,
                                      latent_downsample=1, caption_length=77, caption_channels=32, batch_size=2)
    captions = sorted(dataset[i][schema.BATCH_CAPTION] for i in range(len(dataset)))
    assert captions == sorted(f"caption {i}" for i in range(10))
    clean_stale_shared_memory()


# --- 16-bit PNGs -----------------------------------------------------------------------------------------


def png_16bit(levels: np.ndarray) -> bytes:
    """A 16-bit PNG of `levels` (H, W) grey or (H, W, 3) RGB uint16, written by hand (Pillow writes only the
    grey kind)."""
    height, width = levels.shape[:2]
    colour_type = 2 if levels.ndim == 3 else 0
    rows = b"".join(b"\x00" + levels[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("channels", [1, 3], ids=["grey", "rgb"])
def test_16bit_pngs_keep_their_levels_through_convert_and_precompute(tmp_path, channels):
    grey = (np.arange(256).reshape(16, 16) * 257).astype(np.uint16)  # 8-bit level k as 16-bit: 257 k
    levels = grey if channels == 1 else np.stack([grey, grey // 2, 65535 - grey], axis=-1)
    record = Record("deep", None, "a 16-bit image", encoded=png_16bit(levels))
    convert([record], tmp_path / "raw", progress=False)
    image = to_rgb(Image.open(io.BytesIO(read_rows(tmp_path / "raw")[0][schema.RAW_IMAGE])))
    expected = np.round(levels / 257).astype(np.uint8)
    expected = np.repeat(expected[..., None], 3, axis=-1) if channels == 1 else expected
    assert np.abs(np.asarray(image).astype(int) - expected).max() <= 1
    dataset = CroppedImages(tmp_path / "raw", [16])
    pixels = (dataset[0]["images"][0].permute(1, 2, 0).numpy() + 1) * 127.5
    assert np.abs(pixels - expected).max() <= 1.5
