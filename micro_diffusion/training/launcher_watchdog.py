"""A training worker stops when its launcher dies.

The Composer launcher (`composer -n N train.py`) starts one worker process per rank and is their parent. Killed
with SIGKILL, it cannot stop them, and an orphaned worker would go on training and writing checkpoints into the
save folder that a rerun reads. `exit_with_launcher()` makes the worker follow its launcher: on Linux the kernel
sends it SIGTERM when the parent dies (prctl PR_SET_PDEATHSIG), and a daemon thread that polls the parent pid
does the same everywhere else, and covers a launcher that died before the signal was armed: the launcher's pid is
noted when this module is imported, which train.py does before its slow imports. `stop_with_parent` gives a child
process the same signal, so a launcher started by the pipeline runner stops when the runner is killed.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

__all__ = ["exit_with_launcher", "stop_with_parent"]

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
# How long the worker has to stop after SIGTERM (a handler may have been installed) before it is ended.
GRACE_SECONDS = 30.0
# Read when the process starts (this module is imported before anything runs): Composer sets LOCAL_RANK itself
# when it initialises a single process, so reading it later cannot tell a launched worker from a plain run.
STARTED_BY_LAUNCHER = "LOCAL_RANK" in os.environ
LAUNCHER_PID = os.getppid() if STARTED_BY_LAUNCHER else None


def exit_with_launcher(poll_seconds: float = 1.0) -> bool:
    """Arm the worker to stop when its launcher, the parent process, dies. Only processes started by a launcher
    (LOCAL_RANK set at start, as the Composer launcher and torchrun do) are armed: a plain `python train.py` run
    under nohup must outlive its shell. Returns whether it armed."""
    if not STARTED_BY_LAUNCHER:
        return False
    stop_with_parent()
    threading.Thread(target=_follow, args=(LAUNCHER_PID, poll_seconds), name="launcher-watchdog", daemon=True).start()
    return True


def stop_with_parent() -> None:
    """Have the kernel send this process SIGTERM when its parent dies (Linux; elsewhere nothing). Also usable as a
    `subprocess` `preexec_fn`, where it arms the child."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")


def _follow(launcher: int, poll_seconds: float) -> None:
    """Wait until the parent is no longer `launcher`, then stop this process (SIGTERM, then a hard exit)."""
    while os.getppid() == launcher:
        time.sleep(poll_seconds)
    print(f"[train] the launcher (pid {launcher}) is gone: stopping this worker", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(GRACE_SECONDS)
    os._exit(128 + signal.SIGTERM)
