"""Helpers shared by the file-based readers: path patterns, safe paths, caption and label cells."""

from __future__ import annotations

import glob
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def expand_paths(patterns: str | Path | Sequence[str | Path], what: str) -> list[Path]:
    """Files matching one or more glob patterns (or plain paths), sorted and de-duplicated.

    Raises FileNotFoundError naming the pattern when a pattern matches nothing, so a typo in a shard list
    cannot silently shrink a dataset.
    """
    if isinstance(patterns, str | Path):
        patterns = [patterns]
    paths: set[Path] = set()
    for pattern in patterns:
        matches = glob.glob(str(Path(pattern).expanduser()), recursive=True)
        files = [Path(match) for match in matches if Path(match).is_file()]
        if not files:
            raise FileNotFoundError(f"no {what} file matches {str(pattern)!r}")
        paths.update(files)
    return sorted(paths)


def safe_join(root: Path, relative: str) -> Path:
    """`root / relative` resolved; refuses absolute paths and `..` leaving `root` (itself resolved)."""
    path = (root / relative).resolve()
    if not path.is_relative_to(root):
        raise ValueError(f"image path {relative!r} points outside the image folder {root}")
    return path


def caption_text(value: Any) -> str | bytes:
    """A caption cell -> stripped text; a list gives its first item; None, NaN or bytes are handled.

    Bytes that are not valid UTF-8 are returned as they are, for the converter to count as a skipped record.
    """
    if isinstance(value, list | tuple):
        value = value[0] if value else None
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            return value
    if value is None or (isinstance(value, float) and value != value):
        return ""
    return str(value).strip()


def label_value(value: Any, where: str) -> int:
    """A label cell -> int, with an error naming the row when it is not an integer."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace").strip()
    try:
        return int(value)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{where}: label {value!r} is not an integer") from error
