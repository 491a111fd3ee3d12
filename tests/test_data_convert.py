"""convert: records -> raw MDS, with counted skips, resizing, parallel workers and the CLI."""

import io

import numpy as np
import pytest
from PIL import Image
from training_runs import read_mds

from micro_diffusion.cli.convert import main as convert_main
from micro_diffusion.data import convert as convert_module
from micro_diffusion.data import schema
from micro_diffusion.data.convert import RowRules, convert, prepare_row
from micro_diffusion.data.sources import Record


def image_bytes(size=(40, 30), colour=(200, 10, 10), fmt="PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format=fmt)
    return buffer.getvalue()


def mixed_records() -> list[Record]:
    pixels = np.random.default_rng(0).integers(0, 255, (12, 10), dtype=np.uint8)
    return [
        Record("ok-png", None, "a red box", label=1, encoded=image_bytes(), extra={"score": 0.1}),
        Record("ok-array", Image.fromarray(pixels), "noise", label=2),
        Record("corrupt", None, "broken file", encoded=image_bytes()[:40]),
        Record("not-an-image", None, "text file", encoded=b"hello"),
        Record("no-caption", None, "  ", encoded=image_bytes()),
        Record("missing", None, "gone", encoded=b""),
        Record("tiny", None, "too small", encoded=image_bytes(size=(4, 30))),
    ]


def test_convert_keeps_values_and_counts_every_skip(tmp_path):
    summary = convert(mixed_records(), tmp_path / "raw", RowRules(min_size=8), progress=False)
    rows = read_mds(tmp_path / "raw")
    assert [row[schema.RAW_KEY] for row in rows] == ["ok-png", "ok-array"]
    first, second = rows
    assert first[schema.RAW_IMAGE] == image_bytes()  # untouched file bytes are stored as they are
    assert (first[schema.RAW_CAPTION], first[schema.RAW_LABEL], first[schema.RAW_EXTRA]) == (
        "a red box",
        1,
        {"score": 0.1},
    )
    assert (first[schema.RAW_WIDTH], first[schema.RAW_HEIGHT]) == (40, 30)
    decoded = np.asarray(Image.open(io.BytesIO(second[schema.RAW_IMAGE])))
    np.testing.assert_array_equal(decoded, np.asarray(mixed_records()[1].image))  # arrays stored losslessly
    assert summary.kept == 2
    assert dict(summary.skipped) == {
        convert_module.SKIP_UNREADABLE_IMAGE: 2,
        convert_module.SKIP_NO_CAPTION: 1,
        convert_module.SKIP_MISSING_IMAGE: 1,
        convert_module.SKIP_TOO_SMALL: 1,
    }
    assert summary.examples[convert_module.SKIP_UNREADABLE_IMAGE] == ["corrupt", "not-an-image"]
    report = (tmp_path / "raw" / convert_module.SUMMARY_FILE).read_text()
    assert "kept 2" in report and "skipped 2 (unreadable image), e.g. corrupt, not-an-image" in report


def test_parallel_workers_write_the_same_shards_as_one_process(tmp_path):
    records = mixed_records() * 20
    serial = convert(records, tmp_path / "serial", RowRules(min_size=8), num_workers=0, progress=False)
    parallel = convert(records, tmp_path / "parallel", RowRules(min_size=8), num_workers=2, progress=False)
    assert read_mds(tmp_path / "serial") == read_mds(tmp_path / "parallel")
    assert serial.kept == parallel.kept == 40 and serial.skipped == parallel.skipped
    assert serial.total == len(records)


def test_max_size_downscales_the_shorter_side_and_reencodes():
    jpeg = Record("big", None, "big", encoded=image_bytes(size=(400, 200), fmt="JPEG"))
    row, reason = prepare_row(jpeg, RowRules(max_size=64))
    assert reason is None
    assert (row[schema.RAW_WIDTH], row[schema.RAW_HEIGHT]) == (128, 64)
    stored = Image.open(io.BytesIO(row[schema.RAW_IMAGE]))
    assert (stored.format, stored.size) == ("JPEG", (128, 64))
    row, _ = prepare_row(
        Record("small", None, "s", encoded=image_bytes(size=(50, 60))), RowRules(max_size=64)
    )
    assert row[schema.RAW_IMAGE] == image_bytes(size=(50, 60))


def test_extra_thresholds_and_empty_captions():
    record = Record("r", None, "", encoded=image_bytes(), extra={"image_nsfw": 0.5})
    assert prepare_row(record, RowRules()) == (None, convert_module.SKIP_NO_CAPTION)
    rules = RowRules(allow_empty_captions=True, max_extra={"image_nsfw": 0.2})
    assert prepare_row(record, rules) == (None, "image_nsfw above 0.2")
    with pytest.raises(KeyError, match="no extra field 'prompt_nsfw'"):
        prepare_row(record, RowRules(allow_empty_captions=True, max_extra={"prompt_nsfw": 0.2}))


def test_refuses_a_non_empty_output_unless_overwrite(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        convert(mixed_records(), tmp_path / "out", progress=False)
    convert(mixed_records()[:1], tmp_path / "out", overwrite=True, progress=False)
    assert [row[schema.RAW_KEY] for row in read_mds(tmp_path / "out")] == ["ok-png"]


def test_cli_with_yaml_config_and_source_options(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        (images / f"{i}.png").write_bytes(image_bytes(colour=(i, 0, 0)))
        (images / f"{i}.txt").write_text(f"caption {i}")
    config = tmp_path / "job.yaml"
    config.write_text(
        f"source: folder\nsource_options: {{root: {images}}}\nworkers: 0\nlimit: 2\nno_progress: true\n"
    )
    convert_main(["--config", str(config), "--output", str(tmp_path / "raw")])
    assert [row[schema.RAW_CAPTION] for row in read_mds(tmp_path / "raw")] == ["caption 0", "caption 1"]
    assert "convert: 2 records" in capsys.readouterr().out

    with pytest.raises(
        SystemExit, match="bad --source-option for folder: missing a required argument: 'root'"
    ):
        convert_main(
            ["--source", "folder", "--source-option", "rooot=x", "--output", str(tmp_path / "x")]
        )

    config.write_text("source: folder\nmin_sise: 3\n")
    with pytest.raises(SystemExit):
        convert_main(["--config", str(config), "--output", str(tmp_path / "other")])
    assert "unknown option(s) ['min_sise']" in capsys.readouterr().err
