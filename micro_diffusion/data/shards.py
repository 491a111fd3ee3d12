"""Checks that an MDS folder is whole before a job reads it: finished writing, every shard of full size.

Streaming writes `index.json` even when the writer is interrupted (its context manager finishes the index on
any exception), so the index's presence proves nothing. `convert` therefore writes `COMPLETE_FILE` last, and a
truncated or half-copied shard is caught by comparing its size with the index, with an error naming the shard
and the command that remakes it, instead of a decoding error deep inside a run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

INDEX_FILE = "index.json"
COMPLETE_FILE = "convert_complete.json"


def read_index(folder: Path, remake: str) -> list[dict[str, Any]]:
    """The shard entries of `folder/index.json`; FileNotFoundError / ValueError saying `remake` otherwise."""
    path = folder / INDEX_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {remake}")
    try:
        return json.loads(path.read_text())["shards"]
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path} is not a readable MDS index ({error}): {remake}") from error


def check_shard_files(folder: Path, shards: list[dict[str, Any]], remake: str) -> None:
    """Raise ValueError naming the first shard file whose size differs from its index entry.

    A shard counts as present in its uncompressed form, or else in its compressed form; a shard with
    neither is reported missing.
    """
    for shard in shards:
        forms = [shard.get("raw_data"), shard.get("zip_data")]
        present = [form for form in forms if form and (folder / form["basename"]).is_file()]
        if not present:
            name = (shard.get("raw_data") or shard["zip_data"])["basename"]
            raise ValueError(f"{folder}: shard {name} is missing: {remake}")
        form = present[0]
        size = (folder / form["basename"]).stat().st_size
        if size != form["bytes"]:
            raise ValueError(
                f"{folder}: shard {form['basename']} is {size} bytes, its {INDEX_FILE} says {form['bytes']} "
                f"(truncated or damaged): {remake}"
            )


def mark_complete(folder: Path, samples: int) -> None:
    """Record that a convert into `folder` finished with `samples` rows (atomically: written, then renamed)."""
    temporary = folder / f"{COMPLETE_FILE}.tmp"
    temporary.write_text(json.dumps({"samples": samples}) + "\n")
    os.replace(temporary, folder / COMPLETE_FILE)


def check_complete(folder: Path, shards: list[dict[str, Any]], remake: str) -> None:
    """Raise RuntimeError unless `folder` holds a finished convert whose row count matches its index."""
    try:
        samples = json.loads((folder / COMPLETE_FILE).read_text())["samples"]
    except (OSError, ValueError, KeyError, TypeError):
        raise RuntimeError(
            f"{folder}: the convert that wrote it did not finish (no {COMPLETE_FILE}), so its shards may lack "
            f"rows: {remake}"
        ) from None
    indexed = sum(shard["samples"] for shard in shards)
    if samples != indexed:
        raise RuntimeError(
            f"{folder}: {INDEX_FILE} lists {indexed} rows but the finished convert wrote {samples}: {remake}"
        )
