"""Killing the Composer launcher (SIGKILL, so it cannot clean up) stops its workers instead of orphaning them."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from micro_diffusion.training import launcher_watchdog

REPO = Path(__file__).resolve().parents[1]

# A stand-in for train.py's worker: arms the watchdog as train() does, then "trains" forever.
WORKER = """
import os, sys, time
from micro_diffusion.training.launcher_watchdog import exit_with_launcher
assert exit_with_launcher(poll_seconds=0.2)
open(sys.argv[1], "w").write(str(os.getpid()))
while True:
    time.sleep(0.1)
"""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # a zombie is dead, it only waits for its parent to reap it
        return stat.read().rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads process states from /proc")
def test_a_worker_stops_when_its_launcher_is_killed(tmp_path):
    worker, pid_file = tmp_path / "worker.py", tmp_path / "worker.pid"
    worker.write_text(WORKER)
    launcher = subprocess.Popen(
        [sys.executable, "-m", "composer.cli", "-n", "1", str(worker), str(pid_file)],
        env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while not pid_file.exists() or not pid_file.read_text():
            assert launcher.poll() is None and time.monotonic() < deadline, "the worker did not start"
            time.sleep(0.1)
        worker_pid = int(pid_file.read_text())
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
        deadline = time.monotonic() + 10
        while alive(worker_pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        orphaned = alive(worker_pid)
    finally:
        launcher.kill()
    if orphaned:
        os.kill(worker_pid, signal.SIGKILL)
    assert not orphaned, "the worker went on running after its launcher was killed"


def test_only_launched_workers_are_armed(monkeypatch):
    monkeypatch.setattr(launcher_watchdog, "STARTED_BY_LAUNCHER", False)
    assert launcher_watchdog.exit_with_launcher() is False, "a plain `python train.py` must outlive its shell"

