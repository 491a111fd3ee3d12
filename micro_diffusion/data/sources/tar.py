"""Reader for webdataset-style tar shards (CC12M's `cc12m-wds`, SA-1B's archives, img2dataset output).

A sample is the run of consecutive members sharing a key, the member path up to the first dot of its file
name: `000123.jpg`, `000123.txt`, `000123.json`, `000123.cls` form the sample `000123`. The caption comes from
the `.txt` member, a field of the `.json` member, or a separate folder of `<key>.txt` files (SA-1B's LLaVA
captions ship apart from the images). A sample without an image member is passed on with empty bytes and
counted by the converter as "missing image". Members are read in memory, never extracted, so member names
cannot escape.
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from micro_diffusion.data.sources.base import Record, register_source
from micro_diffusion.data.sources.files import caption_text, expand_paths, label_value

TAR_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


@register_source("tar")
def iter_tar(
    paths: str | Sequence[str],
    caption_extension: str = "txt",
    caption_json_field: str | None = None,
    caption_dir: str | Path | None = None,
    label_extension: str = "cls",
    extra_json_fields: Sequence[str] = (),
) -> Iterator[Record]:
    """Yield one record per sample of each tar shard, shards in sorted order.

    Args:
        paths: shard paths or glob patterns, e.g. "cc12m/cc12m-train-00{00..22}.tar" expanded by the shell,
            or "cc12m/*.tar".
        caption_extension: member holding the caption text.
        caption_json_field: take the caption from this field of the `.json` member instead.
        caption_dir: take the caption from `<caption_dir>/<key file name>.txt` instead (missing file -> "").
        label_extension: member holding an integer label (absent -> -1).
        extra_json_fields: fields of the `.json` member copied into `Record.extra`.
    """
    captions_folder = Path(caption_dir).expanduser() if caption_dir is not None else None
    if captions_folder is not None and not captions_folder.is_dir():
        raise FileNotFoundError(f"caption folder {captions_folder} does not exist")
    for shard in expand_paths(paths, "tar shard"):
        for key, members in _iter_samples(shard):
            where = f"{shard} sample {key!r}"
            metadata = _json_member(members, where) if caption_json_field or extra_json_fields else {}
            if captions_folder is not None:
                caption_file = captions_folder / f"{Path(key).name}.txt"
                caption = caption_text(caption_file.read_bytes()) if caption_file.is_file() else ""
            elif caption_json_field is not None:
                caption = caption_text(metadata.get(caption_json_field))
            else:
                caption = caption_text(members.get(caption_extension))
            label = members.get(label_extension)
            yield Record(
                key=f"{shard.name}/{key}",
                image=None,
                encoded=next((members[ext] for ext in TAR_IMAGE_EXTENSIONS if ext in members), b""),
                caption=caption,
                label=label_value(label, where) if label is not None else -1,
                extra={field: metadata.get(field) for field in extra_json_fields},
            )


def _iter_samples(shard: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) for each run of consecutive members sharing a key, streaming the shard."""
    key: str | None = None
    members: dict[str, bytes] = {}
    try:
        with tarfile.open(shard, mode="r|*") as archive:
            for member in archive:
                if not member.isfile():
                    continue
                member_key, extension = _split_member_name(member.name)
                if member_key != key:
                    if key is not None:
                        yield key, members
                    key, members = member_key, {}
                data = archive.extractfile(member)
                members[extension] = data.read() if data is not None else b""
    except (tarfile.TarError, EOFError, OSError) as error:
        raise ValueError(f"tar shard {shard} is unreadable or truncated: {error}") from error
    if key is not None:
        yield key, members


def _split_member_name(name: str) -> tuple[str, str]:
    """ "dir/000123.seg.png" -> ("dir/000123", "seg.png"): the key ends at the first dot of the file name."""
    folder, _, file_name = name.rpartition("/")
    stem, _, extension = file_name.partition(".")
    return (f"{folder}/{stem}" if folder else stem), extension.lower()


def _json_member(members: dict[str, bytes], where: str) -> dict:
    if "json" not in members:
        return {}
    try:
        metadata = json.loads(members["json"])
    except json.JSONDecodeError as error:
        raise ValueError(f"{where}: .json member is not valid JSON ({error})") from error
    return metadata if isinstance(metadata, dict) else {}
