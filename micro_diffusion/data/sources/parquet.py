"""Reader for parquet files with image bytes and a caption column (e.g. the Hugging Face TextCaps export).

The image cell may be raw bytes or a Hugging Face `Image` struct `{"bytes": ..., "path": ...}`. A list-valued
caption cell (several reference captions) gives its first item. Needs `pyarrow`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from micro_diffusion.data.sources.base import Record, register_source
from micro_diffusion.data.sources.files import caption_text, expand_paths, label_value

_ROWS_PER_BATCH = 256


@register_source("parquet")
def iter_parquet(
    paths: str | Sequence[str],
    image_column: str = "image",
    caption_column: str = "caption",
    label_column: str | None = None,
    key_column: str | None = None,
    extra_columns: Sequence[str] = (),
) -> Iterator[Record]:
    """Yield one record per parquet row.

    Args:
        paths: file paths or glob patterns, read in sorted order.
        image_column: bytes, or a struct with a `bytes` field.
        caption_column, label_column: text (or list of texts) and optional integer label.
        key_column: optional unique id column; default key is `<file name>/<row index>`.
        extra_columns: columns copied into `Record.extra` (for `convert --max-extra` filters).
    """
    wanted = [image_column, caption_column, *filter(None, [label_column, key_column]), *extra_columns]
    for path in expand_paths(paths, "parquet"):
        for index, row in enumerate(iter_parquet_rows(path, columns=wanted)):
            where = f"{path} row {index}"
            yield Record(
                key=str(row[key_column]) if key_column else f"{path.name}/{index}",
                image=None,
                encoded=_image_bytes(row[image_column], where),
                caption=caption_text(row[caption_column]),
                label=label_value(row[label_column], where) if label_column else -1,
                extra={column: row[column] for column in extra_columns},
            )


def iter_parquet_rows(path: Path, columns: Sequence[str] | None = None) -> Iterator[dict[str, Any]]:
    """Rows of one parquet file as dicts, read batch by batch; a missing column raises naming the file."""
    pq = _import_pyarrow_parquet()
    table = pq.ParquetFile(path)
    if columns is not None:
        missing = sorted(set(columns) - set(table.schema_arrow.names))
        if missing:
            raise KeyError(f"{path}: missing column(s) {missing}; the file has {table.schema_arrow.names}")
        columns = list(dict.fromkeys(columns))
    for batch in table.iter_batches(batch_size=_ROWS_PER_BATCH, columns=columns):
        yield from batch.to_pylist()


def _image_bytes(cell: Any, where: str) -> bytes:
    """An image cell -> encoded bytes (b"" when empty, which the converter counts as a missing image)."""
    if isinstance(cell, dict):
        cell = cell.get("bytes")
    if cell is None:
        return b""
    if not isinstance(cell, bytes):
        raise TypeError(
            f"{where}: image cell must be bytes or a {{'bytes': ...}} struct, got {type(cell).__name__}"
        )
    return cell


def _import_pyarrow_parquet() -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError as error:
        raise ImportError("reading parquet needs pyarrow: pip install pyarrow") from error
    return pq
