"""`micro-diffusion convert`: a source's records -> raw MDS shards (image bytes, caption, label, size).

Each record is checked and prepared in a worker process: decoded (unreadable -> counted skip), filtered by
caption, `extra` thresholds and minimum shorter side, downscaled so the shorter side is at most `max_size`
(bicubic, antialiased), and stored as its original file bytes when untouched, else re-encoded (JPEG q95 for
JPEG sources, PNG otherwise). Rows are written in source order. The run ends with a summary of records kept
and skipped by reason (also written to `<output>/convert_summary.txt`).

    micro-diffusion convert --source emoji --output datadir/emoji/mds
    micro-diffusion convert --source tar --source-option paths='cc12m/*.tar' \
        --output datadir/cc12m/mds --min-size 256 --max-size 512
    micro-diffusion convert --config configs/data/diffusiondb.yaml
"""

from __future__ import annotations

import io
import itertools
import multiprocessing
import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image
from streaming import MDSWriter
from tqdm import tqdm

from micro_diffusion.data import schema, shards
from micro_diffusion.data.sources import Record

SKIP_MISSING_IMAGE = "missing image"
SKIP_UNREADABLE_IMAGE = "unreadable image"
SKIP_TOO_LARGE = "image over Pillow's decompression-bomb limit"
SKIP_TOO_SMALL = "shorter side below min_size"
SKIP_NO_CAPTION = "missing caption"
SKIP_CAPTION_NOT_UTF8 = "caption not valid UTF-8"
SUMMARY_FILE = "convert_summary.txt"
_RECORDS_PER_TASK = 32
_EXAMPLES_PER_REASON = 5
_KEPT_FORMATS = ("JPEG", "PNG", "WEBP")
_PNG_MODES = ("1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA")


@dataclass(frozen=True)
class RowRules:
    """What `prepare_row` keeps and how it stores it.

    Attributes:
        min_size: skip images whose shorter side is below this (pixels; 0 keeps all).
        max_size: downscale images whose shorter side is above this so it equals it (None: never).
        allow_empty_captions: keep records whose caption is empty (label-only data).
        max_extra: skip records whose `extra[name]` is above the threshold (e.g. {"image_nsfw": 0.2}).
    """

    min_size: int = 0
    max_size: int | None = None
    allow_empty_captions: bool = False
    max_extra: Mapping[str, float] = field(default_factory=dict)


@dataclass
class ConvertSummary:
    """Records kept and skipped (by reason, with the first few keys of each) and the wall time."""

    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    seconds: float = 0.0

    def count(self, key: str, skip_reason: str | None) -> None:
        if skip_reason is None:
            self.kept += 1
            return
        self.skipped[skip_reason] += 1
        keys = self.examples.setdefault(skip_reason, [])
        if len(keys) < _EXAMPLES_PER_REASON:
            keys.append(key)

    @property
    def total(self) -> int:
        return self.kept + sum(self.skipped.values())

    def report(self) -> str:
        rate = self.total / self.seconds if self.seconds > 0 else float("nan")
        lines = [
            f"convert: {self.total} records in {self.seconds:.1f} s ({rate:.1f} images/s): kept {self.kept}"
        ]
        for reason, number in self.skipped.most_common():
            lines.append(f"  skipped {number} ({reason}), e.g. {', '.join(self.examples[reason])}")
        if not self.skipped:
            lines.append("  skipped 0")
        return "\n".join(lines)


def prepare_row(record: Record, rules: RowRules) -> tuple[dict[str, Any] | None, str | None]:
    """Check one record and build its raw MDS row; returns (row, None) or (None, skip reason)."""
    if isinstance(record.caption, bytes):
        return None, SKIP_CAPTION_NOT_UTF8
    caption = record.caption.strip()
    if not caption and not rules.allow_empty_captions:
        return None, SKIP_NO_CAPTION
    for name, limit in rules.max_extra.items():
        if name not in record.extra:
            raise KeyError(f"record {record.key!r} has no extra field {name!r} to filter on (max_extra)")
        value = record.extra[name]
        if value is not None and float(value) > limit:
            return None, f"{name} above {limit}"
    if record.image is None and not record.encoded:
        return None, SKIP_MISSING_IMAGE
    try:
        image, resized = _load_image(record, rules)
    except Image.DecompressionBombError:
        return None, SKIP_TOO_LARGE
    except Exception:  # Pillow signals corrupt data with OSError, SyntaxError, ValueError, EOFError, ...
        return None, SKIP_UNREADABLE_IMAGE
    if image is None:
        return None, SKIP_TOO_SMALL
    if not resized and record.encoded and image.format in _KEPT_FORMATS:
        data = record.encoded
    else:
        data = _encode(image, jpeg=image.format == "JPEG")
    width, height = image.size
    return {
        schema.RAW_KEY: record.key,
        schema.RAW_IMAGE: data,
        schema.RAW_CAPTION: caption,
        schema.RAW_LABEL: int(record.label),
        schema.RAW_WIDTH: width,
        schema.RAW_HEIGHT: height,
        schema.RAW_EXTRA: record.extra,
    }, None


def _load_image(record: Record, rules: RowRules) -> tuple[Image.Image | None, bool]:
    """Decode the record's image -> (image, resized), or (None, False) when it is below `min_size`.

    A JPEG that will be downscaled anyway is decoded at a reduced scale (`draft`), which is much faster.
    """
    image = record.open_image()
    width, height = image.size
    if min(width, height) < rules.min_size:
        return None, False
    needs_resize = rules.max_size is not None and min(width, height) > rules.max_size
    if needs_resize and image.format == "JPEG":
        scale = rules.max_size / min(width, height)
        image.draft(image.mode, (int(width * scale + 1), int(height * scale + 1)))
    image.load()
    if not needs_resize:
        return image, False
    scale = rules.max_size / min(image.size)
    target = (
        max(rules.max_size, round(image.width * scale)),
        max(rules.max_size, round(image.height * scale)),
    )
    resized = image.resize(target, Image.Resampling.BICUBIC)
    resized.format = image.format
    return resized, True


def _encode(image: Image.Image, jpeg: bool) -> bytes:
    """JPEG (quality 95) when asked and the mode allows, else PNG (other modes, e.g. CMYK, become RGB)."""
    buffer = io.BytesIO()
    if jpeg and image.mode in ("RGB", "L", "CMYK"):
        image.save(buffer, format="JPEG", quality=95)
        return buffer.getvalue()
    if image.mode not in _PNG_MODES:
        image = image.convert("RGBA" if "A" in image.mode else "RGB")
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _prepare_rows(
    records: list[Record], rules: RowRules
) -> list[tuple[str, dict[str, Any] | None, str | None]]:
    return [(record.key, *prepare_row(record, rules)) for record in records]


def _prepared(
    records: Iterable[Record], rules: RowRules, num_workers: int
) -> Iterator[tuple[str, dict[str, Any] | None, str | None]]:
    """(key, row, skip reason) in source order, computed by `num_workers` processes (0: in this process).

    At most 2 * num_workers tasks are in flight, so a large source is never read ahead into memory.
    """
    if num_workers == 0:
        for record in records:
            yield (record.key, *prepare_row(record, rules))
        return
    iterator = iter(records)
    # "spawn", not "fork": forking a process whose torch/OpenMP threads hold locks can deadlock a worker, and a
    # Pool with a dead worker waits forever (seen in CI once earlier tests had used torch).
    with multiprocessing.get_context("spawn").Pool(num_workers) as pool:
        pending: deque = deque()
        while True:
            batch = list(itertools.islice(iterator, _RECORDS_PER_TASK))
            if batch:
                pending.append(pool.apply_async(_prepare_rows, (batch, rules)))
            if pending and (not batch or len(pending) >= 2 * num_workers):
                yield from pending.popleft().get()
            if not batch and not pending:
                return


def convert(
    records: Iterable[Record],
    output: str | Path,
    rules: RowRules | None = None,
    num_workers: int = 0,
    size_limit: int | str = "256mb",
    overwrite: bool = False,
    limit: int | None = None,
    progress: bool = True,
) -> ConvertSummary:
    """Write `records` (at most `limit`) as raw MDS shards into `output`; returns the summary (also printed).

    `rules` defaults to `RowRules()` (keep every readable image with a caption, unchanged). Raises
    FileExistsError when `output` is not empty, unless `overwrite`. Completion is recorded last
    (`shards.COMPLETE_FILE`): the readers of raw folders refuse one whose convert was interrupted.
    """
    rules = rules or RowRules()
    output = Path(output).expanduser()
    if output.exists() and not output.is_dir():
        raise NotADirectoryError(f"output {output} exists and is not a folder")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        unfinished = (output / shards.INDEX_FILE).is_file() and not (output / shards.COMPLETE_FILE).is_file()
        why = "holds a convert that did not finish" if unfinished else "is not empty"
        raise FileExistsError(f"output folder {output} {why}; choose another or pass --overwrite")
    (output / shards.COMPLETE_FILE).unlink(missing_ok=True)
    if limit is not None:
        records = itertools.islice(records, limit)
    summary = ConvertSummary()
    start = time.perf_counter()
    bar = tqdm(total=limit, unit="img", desc="convert", disable=not progress, dynamic_ncols=True)
    rows = _prepared(records, rules, num_workers)  # started before the writer's threads exist (fork)
    with MDSWriter(
        out=str(output), columns=schema.RAW_COLUMNS, size_limit=size_limit, exist_ok=overwrite
    ) as writer:
        for key, row, reason in rows:
            if row is not None:
                writer.write(row)
            summary.count(key, reason)
            bar.update(1)
            if bar.n % 256 == 0:
                bar.set_postfix(kept=summary.kept, skipped=bar.n - summary.kept, refresh=False)
    bar.close()
    summary.seconds = time.perf_counter() - start
    (output / SUMMARY_FILE).write_text(summary.report() + "\n", encoding="utf-8")
    shards.mark_complete(output, summary.kept)
    print(summary.report())
    return summary
