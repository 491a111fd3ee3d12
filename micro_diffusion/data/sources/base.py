"""The record every source yields, and the registry that maps a source name to its reader."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from PIL import Image


@dataclass
class Record:
    """One training example as read from a source.

    Attributes:
        key: unique, stable id of the example inside its source (used in error messages and for resume).
        image: the decoded image (any mode; converters convert to RGB), or None when `encoded` is given.
        caption: the text prompt ("" when the source has none); the raw bytes when the caption file is not
            valid UTF-8, which the converter counts as a skipped record.
        label: integer class label, or -1 when the source has no labels.
        extra: source-specific ground truth (e.g. the object list of a shapes image), JSON-serialisable.
        encoded: the image file's bytes as stored by a file-based source, decoded later by `open_image`
            (so that decoding runs in the converter's worker processes, and an unreadable file becomes a
            counted skip instead of an exception inside the reader); b"" when the file is missing.
    """

    key: str
    image: Image.Image | None
    caption: str | bytes
    label: int = -1
    extra: dict[str, Any] = field(default_factory=dict)
    encoded: bytes | None = None

    def __post_init__(self) -> None:
        if self.image is None and self.encoded is None:
            raise ValueError(f"record {self.key!r}: give the decoded image or its encoded bytes")

    def open_image(self) -> Image.Image:
        """The image, decoding `encoded` lazily (PIL reads pixels on `load()`); raises on unreadable bytes."""
        if self.image is not None:
            return self.image
        if not self.encoded:
            raise FileNotFoundError(f"record {self.key!r} has no image data")
        return Image.open(io.BytesIO(self.encoded))


class SourceUnavailableError(RuntimeError):
    """A packaged source is not installed; the message says exactly what to run."""


SourceFactory = Callable[..., Iterator[Record]]
_SOURCES: dict[str, SourceFactory] = {}


def register_source(name: str) -> Callable[[SourceFactory], SourceFactory]:
    """Decorator: make a reader available as `get_source(name)` and `micro-diffusion convert --source name`."""

    def decorator(factory: SourceFactory) -> SourceFactory:
        if name in _SOURCES:
            raise ValueError(f"source {name!r} registered twice")
        _SOURCES[name] = factory
        return factory

    return decorator


def get_source(name: str) -> SourceFactory:
    """Return the reader registered under `name` (importing the built-in readers first)."""
    from micro_diffusion.data import sources  # noqa: F401  (registers the built-in readers)

    if name not in _SOURCES:
        raise KeyError(f"unknown source {name!r}; available: {sorted(_SOURCES)}")
    return _SOURCES[name]


def available_sources() -> list[str]:
    from micro_diffusion.data import sources  # noqa: F401

    return sorted(_SOURCES)
