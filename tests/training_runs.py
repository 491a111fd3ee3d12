"""Helpers of the tests that launch real training runs (`composer -n N train.py`): latent shards, commands,
checkpoints, MDS rows. Imported by the tests that train or read shards."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from streaming import MDSWriter
from streaming.base.format import reader_from_json

from micro_diffusion.data import schema

REPO = Path(__file__).resolve().parents[1]


def read_mds(folder: Path) -> list[dict]:
    """Every row of an MDS folder, in shard order."""
    index = json.loads((folder / "index.json").read_text())
    rows = []
    for shard in index["shards"]:
        reader = reader_from_json(str(folder), None, shard)
        rows += [reader.get_item(i) for i in range(reader.samples)]
    return rows


def write_latent_shards(
    folder: Path, count: int, seed: int, caption_shape: tuple[int, int], image_sizes: tuple[int, ...] = (16, 32),
    channels: int = 3, downsample: int = 1,
) -> None:
    """Latent shards a tiny model learns quickly: at each image size a (channels, size / downsample, ...) "latent"
    with one bright channel per class (0, 1 or 2), the smaller sizes averaged down from the largest, and
    constant caption states (1, *caption_shape) of value label / 3. The defaults are pixel-space latents at 16 and
    32 px (the identity autoencoder)."""
    rng = np.random.default_rng(seed)
    side = max(image_sizes) // downsample
    with MDSWriter(out=str(folder), columns=schema.latent_columns(list(image_sizes)), size_limit=1 << 22) as writer:
        for index in range(count):
            label = int(rng.integers(0, 3))
            latent = 0.1 * rng.standard_normal((channels, side, side))
            latent[label % channels] += 0.8
            record = {
                schema.KEY: f"sample{index}",
                schema.CAPTION: f"class {label}",
                schema.LABEL: label,
                schema.CAPTION_LATENTS: schema.to_fp16_bytes(np.full((1, *caption_shape), label / 3)),
                schema.CAPTION_MASK: np.ones(caption_shape[0], np.uint8).tobytes(),
            }
            for size in image_sizes:
                small, factor = size // downsample, side * downsample // size
                pooled = latent.reshape(channels, small, factor, small, factor).mean((2, 4))
                record[schema.latents_column(size)] = schema.to_fp16_bytes(pooled)
            writer.write(record)


def subprocess_env() -> dict[str, str]:
    """The environment of a launched run: offline, one intra-op thread per process."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def composer_command(nproc: int, config: str, overrides: list[str], launcher: tuple[str, ...] = ()) -> list[str]:
    """`composer -n nproc [launcher options] train.py --config-name config overrides`."""
    return [
        sys.executable, "-m", "composer.cli", "-n", str(nproc), *launcher, str(REPO / "train.py"),
        "--config-path", str(REPO / "configs"), "--config-name", config, *overrides,
    ]


def run_command(command: list[str], cwd: Path, timeout: float = 900) -> str:
    """Run `command` to the end; its stdout, or an assertion error with the end of its output. It runs in a session
    of its own, ended whole (launcher, workers, their dataloader workers) if the test stops first."""
    with subprocess.Popen(command, cwd=cwd, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, start_new_session=True) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except BaseException:
            os.killpg(process.pid, signal.SIGKILL)
            raise
    assert process.returncode == 0, f"{' '.join(command)} failed:\n{stdout[-4000:]}\n{stderr[-8000:]}"
    return stdout


def load_state(checkpoint: Path) -> dict:
    """The `state` of a Composer checkpoint."""
    return torch.load(checkpoint, map_location="cpu", weights_only=False)["state"]


def trained_batches(state: dict) -> int:
    """The batch counter of a checkpoint's state."""
    return int(state["timestamp"]["Timestamp"]["batch"])
