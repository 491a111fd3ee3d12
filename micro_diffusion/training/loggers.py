"""Composer loggers, fixed for resumed runs: a text-file logger that keeps a run's whole history across restarts,
and a W&B logger that does not ask its server for a checkpoint it never stored.

Composer 0.32.1's FileLogger stores its `overwrite` argument as a one-element tuple (always true), so every
restart of a run truncated its log: after a resume, `metrics.txt` (and the loss plot drawn from it) began at the
resume point. `ResumableFileLogger` opens its file once the checkpoint is loaded: a run that continues from step
k keeps the lines of steps before k and appends; a run that starts at step 0 starts a new file.

A filename without a rank field ("{rank}", "{local_rank}") names one file for all processes: only global rank 0
writes it (two ranks rewriting one file on resume raced, and each metric line appeared once per rank).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from composer.core import State
from composer.loggers import FileLogger, Logger
from composer.loggers import WandBLogger as ComposerWandBLogger
from composer.utils import dist

from micro_diffusion.compat import set_file_logger_run_name

__all__ = ["ResumableFileLogger", "WandBLogger"]

_STEP = re.compile(r"\[metric\]\[batch=(\d+)\]")


class ResumableFileLogger(FileLogger):
    """Composer's FileLogger (same arguments, but `overwrite`, which resuming decides), appending on resume.

    Lines logged before the checkpoint is loaded wait in memory. When a run resumes at batch k, the metrics the
    previous attempt logged for batches k and later (after the checkpoint it resumes from) are dropped, so each
    batch appears once. A filename shared by all ranks (no "{rank}" or "{local_rank}" in it) is written by global
    rank 0 alone.
    """

    def __init__(
        self,
        filename: str = "{run_name}/logs-rank{rank}.txt",
        remote_file_name: str | None = None,
        *,
        capture_stdout: bool = True,
        capture_stderr: bool = True,
        buffer_size: int = 1,
        log_traces: bool = True,
        flush_interval: int = 100,
    ) -> None:
        super().__init__(
            filename, remote_file_name, capture_stdout=capture_stdout, capture_stderr=capture_stderr,
            buffer_size=buffer_size, log_traces=log_traces, flush_interval=flush_interval,
        )
        shared = not any(field in filename for field in ("{rank}", "{local_rank}"))
        self._writes = not shared or dist.get_global_rank() == 0

    def init(self, state: State, logger: Logger) -> None:
        set_file_logger_run_name(self, state.run_name)  # what Composer's init does, less opening the file

    def after_load(self, state: State, logger: Logger) -> None:
        if not self._writes:
            self.file = open(os.devnull, "w")  # noqa: SIM115  (FileLogger's events expect an open file)
            return
        path = Path(self.filename)
        path.parent.mkdir(parents=True, exist_ok=True)
        resumed_at = int(state.timestamp.batch)
        if resumed_at and path.exists():
            _drop_metrics_from(path, resumed_at)
        self.file = open(path, "a+" if resumed_at else "w+", buffering=self.buffer_size)  # noqa: SIM115

    def write(self, prefix: str, s: str) -> None:
        if self._writes:
            super().write(prefix, s)

    def _flush_file(self, logger: Logger) -> None:
        # Composer 0.32.1's FileLogger flushes and uploads (`logger.upload_file`) here; a rank that does not write
        # must not upload its empty file over rank 0's.
        if self._writes:
            super()._flush_file(logger)


class WandBLogger(ComposerWandBLogger):
    """Composer's WandBLogger (same arguments), which looks for a checkpoint among the run's W&B artifacts only
    when it uploads them (`log_artifacts`) and is online.

    With autoresume and no local checkpoint (every first run of a stage), Composer 0.32.1 asks each logger to
    download the latest checkpoint; its WandBLogger asks the W&B server through `wandb.Api()` even when it never
    uploads checkpoints, which needs an API key and, offline, retries the network at length.
    """

    def download_file(
        self, remote_file_name: str, destination: str, overwrite: bool = False, progress_bar: bool = True
    ) -> None:
        # `_log_artifacts` and `_init_kwargs` hold Composer 0.32.1's `log_artifacts` and `init_kwargs` arguments.
        mode = self._init_kwargs.get("mode") or os.environ.get("WANDB_MODE", "online")
        if not self._log_artifacts or mode in ("offline", "disabled"):
            raise FileNotFoundError(f"{remote_file_name}: this W&B logger does not store checkpoints (log_artifacts "
                                    f"{self._log_artifacts}, mode {mode})")
        super().download_file(remote_file_name, destination, overwrite, progress_bar)


def _drop_metrics_from(path: Path, batch: int) -> None:
    """Rewrite `path` without the metric lines of `batch` and later (atomically: a crash keeps the old file)."""
    kept = path.with_name(path.name + ".resume")
    with open(path, errors="replace") as source, open(kept, "w") as target:
        for line in source:
            step = _STEP.match(line)
            if step is None or int(step.group(1)) < batch:
                target.write(line)
    os.replace(kept, path)
