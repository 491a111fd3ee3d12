"""Readers yielding (image, caption, label) records; importing this package registers them all.

General formats: `folder` (sidecar .txt or a manifest), `tar` (webdataset shards), `parquet` (image bytes +
caption column). Built-in offline sets: `emoji`, `fashion_mnist`, `clipart` (installed by
`scripts/get_offline_data.sh`) and the procedural `shapes`. Look readers up with `get_source(name)`.
"""

from micro_diffusion.data.sources import (  # noqa: F401
    clipart,
    emoji,
    fashion_mnist,
    folder,
    parquet,
    shapes,
    tar,
)
from micro_diffusion.data.sources.base import (
    Record,
    SourceUnavailableError,
    available_sources,
    get_source,
    register_source,
)

__all__ = ["Record", "SourceUnavailableError", "available_sources", "get_source", "register_source"]
