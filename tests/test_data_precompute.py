"""precompute: raw MDS -> latent MDS (identity VAE, tiny HF CLIP), round trip to the loader, resume, ranks."""

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from streaming import MDSWriter
from streaming.base.util import clean_stale_shared_memory
from training_runs import read_mds

from micro_diffusion.data import precompute as precompute_module
from micro_diffusion.data import schema
from micro_diffusion.data.convert import convert
from micro_diffusion.data.images import crop_transform, to_rgb
from micro_diffusion.data.loader import StreamingLatentsDataset, make_streams
from micro_diffusion.data.precompute import CaptionCache, precompute
from micro_diffusion.data.sources import Record
from micro_diffusion.encoders.text import load_text_encoder

NUM_SAMPLES = 10
RESOLUTIONS = [8, 16]


def source_images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    sizes = [(20, 16), (16, 30), (24, 24), (17, 19), (40, 18)]
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes * 2]
    images[3] = Image.fromarray(rng.integers(0, 256, (19, 17, 4), dtype=np.uint8), mode="RGBA")
    return images


@pytest.fixture(scope="module")
def raw_folder(tmp_path_factory) -> Path:
    records = [
        Record(f"k{i}", image, f"a photo of thing {i}", label=i % 3)
        for i, image in enumerate(source_images())
    ]
    folder = tmp_path_factory.mktemp("raw") / "mds"
    convert(records, folder, progress=False)
    return folder


def run(raw_folder: Path, output: Path, text_encoder: str, **options) -> int:
    defaults = dict(resolutions=RESOLUTIONS, vae="identity", batch_size=3, chunk_size=4, num_workers=0)
    return precompute(raw_folder, output, text_encoder=text_encoder, progress=False, **(defaults | options))


def test_round_trip_source_raw_latents_loader(raw_folder, tmp_path, tiny_hf_clip_dir):
    run(raw_folder, tmp_path / "latents", tiny_hf_clip_dir.name)
    rows = read_mds(tmp_path / "latents")
    assert [row[schema.KEY] for row in rows] == [f"k{i}" for i in range(NUM_SAMPLES)]

    encoder = load_text_encoder(tiny_hf_clip_dir.name)
    captions = [f"a photo of thing {i}" for i in range(NUM_SAMPLES)]
    states, mask = encoder(captions)
    images = source_images()
    for i, row in enumerate(rows):
        assert (row[schema.CAPTION], row[schema.LABEL]) == (captions[i], i % 3)
        for resolution in RESOLUTIONS:
            expected = crop_transform(resolution)(to_rgb(images[i])).numpy()
            stored = schema.from_fp16_bytes(row[schema.latents_column(resolution)], expected.shape, "latents")
            np.testing.assert_allclose(stored, expected, atol=1e-3)
        stored_states = schema.from_fp16_bytes(row[schema.CAPTION_LATENTS], (1, 77, 32), "caption_latents")
        np.testing.assert_allclose(stored_states[0], states[i].numpy(), atol=2e-2, rtol=1e-2)
        assert np.frombuffer(row[schema.CAPTION_MASK], np.uint8).tolist() == mask[i].tolist()

    clean_stale_shared_memory()
    dataset = StreamingLatentsDataset(
        make_streams([str(tmp_path / "latents")]), 16, latent_channels=3, latent_downsample=1,
        caption_length=77, caption_channels=32,
    )  # fmt: skip
    sample = dataset[4]
    assert sample["image_latents"].dtype == torch.float32 and sample["image_latents"].shape == (3, 16, 16)
    expected = crop_transform(16)(to_rgb(images[4]))
    torch.testing.assert_close(sample["image_latents"], expected, atol=1e-3, rtol=0)
    assert sample["caption_latents"].shape == (1, 77, 32) and sample["caption"] == captions[4]
    assert sample["caption_mask"].tolist() == mask[4].bool().tolist()
    clean_stale_shared_memory()


def test_transparent_pixels_become_white_and_crops_are_centred():
    transparent = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    assert to_rgb(transparent).getpixel((0, 0)) == (255, 255, 255)
    stripes = Image.new("RGB", (24, 8), (0, 0, 0))
    stripes.paste((255, 255, 255), (8, 0, 16, 8))  # the middle third is white
    crop = crop_transform(8)(stripes)
    assert crop.shape == (3, 8, 8) and crop.min() == 1.0


def test_moments_store_mean_and_std(raw_folder, tmp_path, tiny_hf_clip_dir):
    run(raw_folder, tmp_path / "latents", tiny_hf_clip_dir.name, moments=True, resolutions=[8])
    row = read_mds(tmp_path / "latents")[0]
    std = schema.from_fp16_bytes(row[schema.latents_std_column(8)], (3, 8, 8), "std")
    mean = schema.from_fp16_bytes(row[schema.latents_column(8)], (3, 8, 8), "mean")
    assert np.all(std == 0)  # pixel space is deterministic
    np.testing.assert_allclose(mean, crop_transform(8)(to_rgb(source_images()[0])).numpy(), atol=1e-3)


def test_crash_midway_then_rerun_is_complete_without_duplicates(
    raw_folder, tmp_path, tiny_hf_clip_dir, monkeypatch
):
    clean = tmp_path / "clean"
    run(raw_folder, clean, tiny_hf_clip_dir.name)

    encode_batch, calls = precompute_module._encode_batch, []

    def crashing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # in the middle of the second chunk (3 samples per batch, 4 per chunk)
            raise RuntimeError("simulated crash")
        return encode_batch(*args, **kwargs)

    monkeypatch.setattr(precompute_module, "_encode_batch", crashing)
    crashed = tmp_path / "crashed"
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(raw_folder, crashed, tiny_hf_clip_dir.name)
    assert (crashed / "chunk_000000" / "index.json").is_file()
    assert (crashed / "chunk_000001.partial").is_dir() and not (crashed / "index.json").exists()
    monkeypatch.setattr(precompute_module, "_encode_batch", encode_batch)

    assert run(raw_folder, crashed, tiny_hf_clip_dir.name) == NUM_SAMPLES - 4  # chunk 0 is reused
    assert not list(crashed.glob("*.partial"))
    assert read_mds(crashed) == read_mds(clean)  # same keys, same order, same bytes


def test_max_chunks_stops_early_and_a_rerun_finishes(raw_folder, tmp_path, tiny_hf_clip_dir, capsys):
    output = tmp_path / "latents"
    assert run(raw_folder, output, tiny_hf_clip_dir.name, max_chunks=1) == 4
    assert not (output / "index.json").exists()
    assert "2 chunk(s) remain" in capsys.readouterr().out
    assert run(raw_folder, output, tiny_hf_clip_dir.name) == NUM_SAMPLES - 4
    assert [row[schema.KEY] for row in read_mds(output)] == [f"k{i}" for i in range(NUM_SAMPLES)]
    with pytest.raises(ValueError, match="other settings \\(resolutions differ"):
        run(raw_folder, output, tiny_hf_clip_dir.name, resolutions=[8])


def test_raw_shards_with_a_wrong_column_are_rejected(tmp_path):
    with MDSWriter(out=str(tmp_path / "raw"), columns={"jpg": "bytes", "caption": "str"}) as writer:
        writer.write({"jpg": b"x", "caption": "c"})
    with pytest.raises(ValueError, match=r"shard.00000.mds lacks column\(s\) \['image'\]"):
        precompute_module.RawShards(tmp_path / "raw")
    with pytest.raises(FileNotFoundError, match="is .* a raw MDS folder"):
        precompute_module.RawShards(tmp_path)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_two_processes_cover_every_sample_once(raw_folder, tmp_path, tiny_hf_clip_dir):
    output = tmp_path / "latents"
    command = [
        sys.executable, "-m", "composer.cli.launcher", "-n", "2", "--master_port", str(free_port()),
        "--stdout", str(tmp_path / "rank{rank}.out"), "--stderr", str(tmp_path / "rank{rank}.err"),
        "-m", "micro_diffusion.cli", "precompute", "--input", str(raw_folder), "--output", str(output),
        "--resolutions", "8", "--vae", "identity", "--text-encoder", tiny_hf_clip_dir.name,
        "--chunk-size", "2", "--batch-size", "2", "--workers", "0", "--no-progress",
    ]  # fmt: skip
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    logs = "".join(path.read_text() for path in tmp_path.glob("rank*.*"))
    assert result.returncode == 0, result.stdout + result.stderr + logs
    chunk_owners = {path.name for path in output.glob("chunk_*")}
    assert chunk_owners == {f"chunk_{k:06d}" for k in range(5)}
    keys = [row[schema.KEY] for row in read_mds(output)]
    assert keys == [f"k{i}" for i in range(NUM_SAMPLES)]  # every sample exactly once, in order
    assert "precompute: encoded 10 samples" in result.stdout + logs
    shutil.rmtree(output)


def test_caption_cache_encodes_each_distinct_caption_once_and_evicts():
    calls: list[list[str]] = []

    def encoder(captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(list(captions))
        states = torch.stack([torch.full((2, 3), float(len(c))) for c in captions])
        return states, torch.ones(len(captions), 2, dtype=torch.long)

    cache = CaptionCache(encoder, max_entries=2)
    states, mask = cache(["a", "bb", "a"])
    assert calls == [["a", "bb"]]
    assert states.dtype == np.float16 and states.shape == (3, 2, 3) and mask.shape == (3, 2)
    assert states[0, 0, 0] == 1 and states[1, 0, 0] == 2 and states[2, 0, 0] == 1
    cache(["bb", "a"])
    assert len(calls) == 1  # both cached
    cache(["ccc"])  # evicts the least recently used ("bb")
    cache(["a"])
    assert len(calls) == 2
    cache(["bb"])
    assert calls[-1] == ["bb"]
