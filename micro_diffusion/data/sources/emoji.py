"""Emoji from the npm package `emoji-datasource-google`: 3,786 64x64 RGBA PNGs (1,911 + 1,875 skin tones).

Layout of the unpacked package (as `scripts/get_offline_data.sh emoji` leaves it):
`<root>/emoji.json` (a list of {"name", "image", "category", "subcategory", "unified", "has_img_google",
"skin_variations": {"1F3FB": {"image", "unified", "has_img_google"}, ...}}) and
`<root>/img/google/64/<image>`.
Captions come from the Unicode names ("FATHER CHRISTMAS" -> "an emoji of father christmas, light skin tone");
labels are the category index in sorted order (10 categories). Transparent pixels are kept: precompute
composites images onto white.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from micro_diffusion.data.sources.base import Record, SourceUnavailableError, register_source

EMOJI_PACKAGE = "emoji-datasource-google"
SKIN_TONES = {
    "1F3FB": "light skin tone",
    "1F3FC": "medium-light skin tone",
    "1F3FD": "medium skin tone",
    "1F3FE": "medium-dark skin tone",
    "1F3FF": "dark skin tone",
}


def default_data_dir() -> Path:
    """Where `scripts/get_offline_data.sh` unpacks npm packages ($MICRO_DIFFUSION_DATA, default
    ~/.cache/micro_diffusion)."""
    return Path(
        os.environ.get("MICRO_DIFFUSION_DATA", Path.home() / ".cache" / "micro_diffusion")
    ).expanduser()


@register_source("emoji")
def iter_emoji(
    root: str | Path | None = None,
    include_skin_tones: bool = True,
    caption_template: str = "an emoji of {name}",
) -> Iterator[Record]:
    """Yield every emoji with a Google image, in `emoji.json` order, each followed by its skin tones.

    Args:
        root: the unpacked package folder (default: `default_data_dir() / "emoji-datasource-google"`).
        include_skin_tones: also yield the skin-tone variants.
        caption_template: format string with `{name}` (lower-case name, plus the skin tones when any).
    """
    folder = Path(root).expanduser() if root is not None else default_data_dir() / EMOJI_PACKAGE
    index_path, image_dir = folder / "emoji.json", folder / "img" / "google" / "64"
    if not index_path.is_file() or not image_dir.is_dir():
        raise SourceUnavailableError(
            f"emoji images not found in {folder} (need emoji.json and img/google/64/); install them with "
            "`scripts/get_offline_data.sh emoji` (npm pack emoji-datasource-google), "
            "or pass root=<package folder>"
        )
    entries: list[dict[str, Any]] = json.loads(index_path.read_text(encoding="utf-8"))
    categories = sorted({entry["category"] for entry in entries})
    for entry in entries:
        variants = [(entry, "")]
        if include_skin_tones:
            variants += [
                (variant, _skin_tone_text(code)) for code, variant in entry.get("skin_variations", {}).items()
            ]
        for variant, tone in variants:
            if not variant.get("has_img_google", True):
                continue
            name = entry["name"].lower() + (f", {tone}" if tone else "")
            image_path = image_dir / variant["image"]
            yield Record(
                key=variant["unified"],
                image=None,
                encoded=image_path.read_bytes() if image_path.is_file() else b"",
                caption=caption_template.format(name=name),
                label=categories.index(entry["category"]),
                extra={"category": entry["category"], "subcategory": entry.get("subcategory", "")},
            )


def _skin_tone_text(code: str) -> str:
    """ "1F3FB" -> "light skin tone"; "1F3FB-1F3FF" (two people) -> "light skin tone and dark skin tone"."""
    return " and ".join(SKIN_TONES.get(part, part) for part in code.split("-"))
