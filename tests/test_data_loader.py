"""Training loader: per-sample format, stream validation, mixing by proportion, deterministic resume."""

from collections import Counter

import numpy as np
import pytest
import torch
from streaming import MDSWriter
from streaming.base.util import clean_stale_shared_memory

from micro_diffusion.data import schema
from micro_diffusion.data.loader import (
    StreamingLatentsDataset,
    build_streaming_latents_dataloader,
    make_streams,
)

FORMAT = {"latent_channels": 4, "latent_downsample": 8, "caption_length": 5, "caption_channels": 6}
LATENT_SHAPE, CAPTION_SHAPE = (4, 2, 2), (1, 5, 6)


@pytest.fixture(autouse=True)
def _fresh_shared_memory():
    clean_stale_shared_memory()
    yield
    clean_stale_shared_memory()


def latent_row(index: int, label: int, with_mask: bool = True) -> dict:
    """A latent MDS row whose values encode `index`, so every tensor can be checked."""
    row = {
        schema.KEY: f"s{index}",
        schema.CAPTION: f"caption {index}",
        schema.LABEL: label,
        schema.CAPTION_LATENTS: schema.to_fp16_bytes(np.full(CAPTION_SHAPE, index / 8)),
        schema.latents_column(16): schema.to_fp16_bytes(np.full(LATENT_SHAPE, -index / 4)),
    }
    if with_mask:
        row[schema.CAPTION_MASK] = np.array([1, 1, 1, 0, 0], np.uint8).tobytes()
    return row


def write_stream(folder, count: int, label: int, with_mask: bool = True, columns: dict | None = None) -> str:
    rows = [latent_row(i, label, with_mask) for i in range(count)]
    spec = columns or {name: schema.latent_columns([16])[name] for name in rows[0]}
    with MDSWriter(out=str(folder), columns=spec, size_limit=1 << 12) as writer:
        for row in rows:
            writer.write(row)
    return str(folder)


def test_sample_format_and_values(tmp_path):
    dataset = StreamingLatentsDataset(make_streams([write_stream(tmp_path / "a", 4, label=3)]), 16, **FORMAT)
    sample = dataset[2]
    assert sample["image_latents"].dtype == torch.float32 and sample["image_latents"].shape == LATENT_SHAPE
    assert torch.all(sample["image_latents"] == -0.5)
    assert sample["caption_latents"].shape == CAPTION_SHAPE and torch.all(sample["caption_latents"] == 0.25)
    assert sample["caption_mask"].tolist() == [True, True, True, False, False]
    assert sample["drop_caption_mask"].item() == 1.0
    assert (sample["caption"], sample["label"]) == ("caption 2", 3)


def test_shards_without_mask_get_an_all_true_mask(tmp_path):
    dataset = StreamingLatentsDataset(
        make_streams([write_stream(tmp_path / "a", 2, 0, with_mask=False)]), 16, **FORMAT
    )
    assert dataset[0]["caption_mask"].all()


def test_validation_names_the_stream_column_and_shapes(tmp_path):
    good = write_stream(tmp_path / "good", 2, 0)
    with pytest.raises(ValueError, match=r"stream .*good: missing column 'latents_32'") as error:
        StreamingLatentsDataset(make_streams([good]), 32, **FORMAT)
    assert "found columns" in str(error.value)
    wrong = dict(FORMAT, caption_channels=8)
    message = (
        r"column 'caption_latents': expected float16 bytes of shape \(1, 5, 8\) \(80 bytes\), found 60 bytes"
    )
    with pytest.raises(ValueError, match=message):
        StreamingLatentsDataset(make_streams([good]), 16, **wrong)
    clean_stale_shared_memory()
    no_caption = {name: kind for name, kind in schema.latent_columns([16]).items() if name != schema.CAPTION}
    bad = tmp_path / "bad"
    with MDSWriter(out=str(bad), columns=no_caption) as writer:
        writer.write({k: v for k, v in latent_row(0, 0).items() if k != schema.CAPTION})
    with pytest.raises(
        ValueError, match=r"stream .*bad: column 'caption': expected str, found no such column"
    ):
        StreamingLatentsDataset(make_streams([good, str(bad)]), 16, **FORMAT)


def test_caption_dropout_rate_and_determinism(tmp_path):
    dataset = StreamingLatentsDataset(
        make_streams([write_stream(tmp_path / "a", 400, 0)]), 16, cap_drop_prob=0.25, **FORMAT
    )
    drops = [dataset[i]["drop_caption_mask"].item() for i in range(400)]
    assert set(drops) == {0.0, 1.0} and 0.18 < drops.count(0.0) / 400 < 0.32
    assert drops == [dataset[i]["drop_caption_mask"].item() for i in range(400)]


def test_streams_mix_by_proportion(tmp_path):
    streams = [
        {"local": write_stream(tmp_path / "a", 100, label=0), "proportion": 0.8},
        {"local": write_stream(tmp_path / "b", 100, label=1), "proportion": 0.2},
    ]
    loader = build_streaming_latents_dataloader(
        streams, batch_size=10, image_size=16, num_workers=0, epoch_size=200, shuffle_seed=3, **FORMAT
    )
    labels = Counter(label for batch in loader for label in batch["label"].tolist())
    assert sum(labels.values()) == 200
    assert abs(labels[0] / 200 - 0.8) <= 0.05  # Streaming mixes to the proportion up to rounding


def test_loader_resumes_where_the_checkpoint_left_it(tmp_path):
    local = write_stream(tmp_path / "a", 60, label=0)
    options = dict(batch_size=6, image_size=16, num_workers=0, shuffle_seed=7, **FORMAT)

    full = build_streaming_latents_dataloader([local], **options)
    order = [caption for batch in full for caption in batch["caption"]]
    del full
    clean_stale_shared_memory()

    first = build_streaming_latents_dataloader([local], **options)
    iterator = iter(first)
    seen = [caption for _ in range(4) for caption in next(iterator)["caption"]]
    state = first.state_dict()
    del iterator, first
    clean_stale_shared_memory()

    resumed = build_streaming_latents_dataloader([local], **options)
    resumed.load_state_dict(state)
    rest = [caption for batch in resumed for caption in batch["caption"]]
    assert state["sample_in_epoch"] == 24
    assert seen + rest == order and len(set(order)) == 60


def test_batch_size_must_split_over_processes(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ValueError, match="batch_size 6 is not divisible by the 4 processes"):
        build_streaming_latents_dataloader([str(tmp_path)], batch_size=6, image_size=16)
