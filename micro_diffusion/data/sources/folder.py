"""Reader for an image folder with captions: sidecar `.txt` files or a manifest (.jsonl/.csv/.parquet/COCO).

Sidecar layout (no manifest): every image file under `root` (recursively, sorted), its caption in the file of
the same name with the extension `.txt` (missing sidecar -> caption ""), optionally the label from the first
sub-folder (ImageFolder style):

    root/cat/0001.jpg   root/cat/0001.txt   root/dog/0002.png ...

Manifest layout: one row per image with the image path relative to `root` and the caption (column names are
options, so the same reader covers JourneyDB's jsonl, DiffusionDB's metadata parquet, img2dataset folders and
COCO's `captions_*.json`). Images are read as bytes and decoded later by the converter, so an unreadable file
is counted there; a missing file is passed on with empty bytes and counted as "missing image".
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from micro_diffusion.data.sources.base import Record, register_source
from micro_diffusion.data.sources.files import caption_text, label_value, safe_join
from micro_diffusion.data.sources.parquet import iter_parquet_rows

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@register_source("folder")
def iter_folder(
    root: str | Path,
    manifest: str | Path | None = None,
    image_column: str = "image",
    caption_column: str = "caption",
    label_column: str | None = None,
    extra_columns: tuple[str, ...] | list[str] = (),
    labels_from_subfolders: bool = False,
) -> Iterator[Record]:
    """Yield the images under `root` with their captions (and labels).

    Args:
        root: image folder; manifest paths are relative to it and may not leave it.
        manifest: a .jsonl / .csv / .parquet table or a COCO captions .json; None = sidecar .txt files.
        image_column, caption_column, label_column: manifest columns (a list of captions gives its first).
        extra_columns: manifest columns copied into `Record.extra` (e.g. DiffusionDB's `image_nsfw`, which
            `convert --max-extra image_nsfw=0.2` then filters with a counted skip).
        labels_from_subfolders: sidecar layout only: label = index of the first sub-folder in sorted order.
    """
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    if manifest is None:
        yield from _iter_sidecar(root, labels_from_subfolders)
        return
    if labels_from_subfolders:
        raise ValueError(
            "labels_from_subfolders applies to the sidecar layout; use label_column with a manifest"
        )
    manifest_path = Path(manifest).expanduser()
    for line, row in enumerate(read_manifest(manifest_path), start=1):
        where = f"{manifest_path} row {line}"
        relative = row.get(image_column)
        if not relative:
            raise ValueError(f"{where}: no image path in column {image_column!r} (columns: {sorted(row)})")
        path = safe_join(root, str(relative))
        yield Record(
            key=str(path.relative_to(root)),
            image=None,
            encoded=path.read_bytes() if path.is_file() else b"",
            caption=caption_text(row.get(caption_column)),
            label=label_value(row.get(label_column), where) if label_column else -1,
            extra={column: row.get(column) for column in extra_columns},
        )


def _iter_sidecar(root: Path, labels_from_subfolders: bool) -> Iterator[Record]:
    images = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    class_names = sorted({p.relative_to(root).parts[0] for p in images if len(p.relative_to(root).parts) > 1})
    for path in images:
        relative = path.relative_to(root)
        label = -1
        if labels_from_subfolders:
            if len(relative.parts) < 2:
                raise ValueError(
                    f"{path}: labels_from_subfolders needs every image inside a class sub-folder"
                )
            label = class_names.index(relative.parts[0])
        sidecar = path.with_suffix(".txt")
        caption = caption_text(sidecar.read_bytes()) if sidecar.is_file() else ""
        yield Record(key=str(relative), image=None, encoded=path.read_bytes(), caption=caption, label=label)


def read_manifest(path: Path) -> Iterator[dict[str, Any]]:
    """Rows of a .jsonl, .csv, .parquet or COCO-captions .json manifest, as dicts."""
    if not path.is_file():
        raise FileNotFoundError(f"manifest {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with path.open(encoding="utf-8") as lines:
            for number, text in enumerate(lines, start=1):
                if text.strip():
                    yield _json_row(text, f"{path} line {number}")
    elif suffix == ".csv":
        with path.open(encoding="utf-8", newline="") as table:
            yield from csv.DictReader(table)
    elif suffix == ".parquet":
        yield from iter_parquet_rows(path)
    elif suffix == ".json":
        yield from _coco_rows(path)
    else:
        raise ValueError(
            f"manifest {path}: unsupported format {suffix!r} (use .jsonl, .csv, .parquet or .json)"
        )


def _json_row(text: str, where: str) -> dict[str, Any]:
    try:
        row = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{where}: not valid JSON ({error})") from error
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    return row


def _coco_rows(path: Path) -> Iterator[dict[str, Any]]:
    """COCO captions json -> one row per image: {"image": file name, "caption": first caption, "image_id"}."""
    coco = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(coco, dict) or not {"images", "annotations"} <= coco.keys():
        raise ValueError(
            f"{path}: a .json manifest must be in COCO captions format ('images', 'annotations')"
        )
    first_caption: dict[int, str] = {}
    for annotation in sorted(coco["annotations"], key=lambda a: a["id"]):
        first_caption.setdefault(annotation["image_id"], annotation["caption"])
    for image in sorted(coco["images"], key=lambda i: i["id"]):
        yield {
            "image": image["file_name"],
            "caption": first_caption.get(image["id"], ""),
            "image_id": image["id"],
        }
