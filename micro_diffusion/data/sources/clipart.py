"""Clip art from the Debian package `openclipart-png`: 8,121 public-domain PNGs in 22 category folders.

Files: /usr/share/openclipart/png/<category>[/<sub-folder>...]/<name>_<NN>.png. The path is the only text,
so the caption is built from it: "animals/mammals/seal_01.png" -> "clip art of seal, animals, mammals". File
names often end in an (abbreviated) author name that cannot be told apart from the subject reliably, so it is
kept. The label is the index of the top-level category in sorted order. Images are RGBA/P/LA and from 20 px to
~30,000 px on the long side: the converter's size filter and decompression-bomb guard count what they drop.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

from micro_diffusion.data.sources.base import Record, SourceUnavailableError, register_source

CLIPART_DIR = Path("/usr/share/openclipart/png")
_NUMBER_SUFFIX = re.compile(r"[_-]*\d*$")


@register_source("clipart")
def iter_clipart(
    root: str | Path | None = None, caption_template: str = "clip art of {name}"
) -> Iterator[Record]:
    """Yield every PNG under `root` (default: the Debian package's folder) in sorted path order.

    Args:
        root: the clip-art folder.
        caption_template: format string with `{name}` ("seal, animals, mammals").
    """
    folder = Path(root).expanduser() if root is not None else CLIPART_DIR
    paths = sorted(folder.rglob("*.png")) if folder.is_dir() else []
    if not paths:
        raise SourceUnavailableError(
            f"no clip-art PNGs found in {folder}; install them with `scripts/get_offline_data.sh clipart` "
            "(runs `apt-get install -y openclipart-png`), or pass root=<folder>"
        )
    categories = sorted({path.relative_to(folder).parts[0] for path in paths if path.parent != folder})
    for path in paths:
        relative = path.relative_to(folder)
        yield Record(
            key=str(relative),
            image=None,
            encoded=path.read_bytes(),
            caption=caption_template.format(name=caption_from_path(relative)),
            label=categories.index(relative.parts[0]) if len(relative.parts) > 1 else -1,
            extra={"path": str(relative)},
        )


def caption_from_path(relative: Path) -> str:
    """ "animals/mammals/seal_01.png" -> "seal, animals, mammals" (file subject first, then the folders)."""
    subject = _words(_NUMBER_SUFFIX.sub("", relative.stem)) or _words(relative.stem)
    return ", ".join([subject, *(_words(part) for part in relative.parts[:-1])])


def _words(text: str) -> str:
    return " ".join(re.split(r"[_\s-]+", text)).strip()
