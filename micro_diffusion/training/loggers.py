"""A text-file logger that keeps a run's whole history across restarts.

Composer 0.32.1's FileLogger stores its `overwrite` argument as a one-element tuple (always true), so every
restart of a run truncated its log: after a resume, `metrics.txt` (and the loss plot drawn from it) began at the
resume point. `ResumableFileLogger` opens its file once the checkpoint is loaded: a run that continues from step
k keeps the lines of steps before k and appends; a run that starts at step 0 starts a new file.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from composer.core import State
from composer.loggers import FileLogger, Logger

from micro_diffusion.compat import set_file_logger_run_name

__all__ = ["ResumableFileLogger"]

_STEP = re.compile(r"\[metric\]\[batch=(\d+)\]")


class ResumableFileLogger(FileLogger):
    """Composer's FileLogger (same arguments, but `overwrite`, which resuming decides), appending on resume.

    Lines logged before the checkpoint is loaded wait in memory. When a run resumes at batch k, the metrics the
    previous attempt logged for batches k and later (after the checkpoint it resumes from) are dropped, so each
    batch appears once.
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

    def init(self, state: State, logger: Logger) -> None:
        set_file_logger_run_name(self, state.run_name)  # what Composer's init does, less opening the file

    def after_load(self, state: State, logger: Logger) -> None:
        path = Path(self.filename)
        path.parent.mkdir(parents=True, exist_ok=True)
        resumed_at = int(state.timestamp.batch)
        if resumed_at and path.exists():
            _drop_metrics_from(path, resumed_at)
        self.file = open(path, "a+" if resumed_at else "w+", buffering=self.buffer_size)  # noqa: SIM115


def _drop_metrics_from(path: Path, batch: int) -> None:
    """Rewrite `path` without the metric lines of `batch` and later (atomically: a crash keeps the old file)."""
    kept = path.with_name(path.name + ".resume")
    with open(path, errors="replace") as source, open(kept, "w") as target:
        for line in source:
            step = _STEP.match(line)
            if step is None or int(step.group(1)) < batch:
                target.write(line)
    os.replace(kept, path)
