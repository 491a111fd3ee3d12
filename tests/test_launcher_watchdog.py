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



# A worker whose launcher dies during its slow start-up (train.py's imports), before it arms the watchdog.
LATE_WORKER = """
import os, sys, time
from micro_diffusion.training.launcher_watchdog import exit_with_launcher
open(sys.argv[1], "w").write(str(os.getpid()))
while not os.path.exists(sys.argv[2]):
    time.sleep(0.1)
assert exit_with_launcher(poll_seconds=0.2)
while True:
    time.sleep(0.1)
"""

# A pipeline runner stand-in: starts a child that sleeps, the way pipeline.run_subprocess starts a launcher.
RUNNER = """
import subprocess, sys
from micro_diffusion.training.launcher_watchdog import stop_with_parent
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], preexec_fn=stop_with_parent)
open(sys.argv[1], "w").write(str(child.pid))
child.wait()
"""


def _wait_for_pid(pid_file: Path, process: subprocess.Popen) -> int:
    deadline = time.monotonic() + 120
    while not pid_file.exists() or not pid_file.read_text():
        assert process.poll() is None and time.monotonic() < deadline, "the child did not start"
        time.sleep(0.1)
    return int(pid_file.read_text())


def _gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if alive(pid):
        os.kill(pid, signal.SIGKILL)
        return False
    return True


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads process states from /proc")
def test_a_worker_whose_launcher_died_before_it_armed_stops(tmp_path):
    worker, pid_file, go = tmp_path / "worker.py", tmp_path / "worker.pid", tmp_path / "go"
    worker.write_text(LATE_WORKER)
    launcher = subprocess.Popen(
        [sys.executable, "-m", "composer.cli", "-n", "1", str(worker), str(pid_file), str(go)],
        env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    worker_pid = _wait_for_pid(pid_file, launcher)
    launcher.send_signal(signal.SIGKILL)
    launcher.wait()
    go.touch()
    assert _gone_within(worker_pid, 10), "a worker armed after its launcher died went on running"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux's prctl")
def test_a_launcher_started_by_the_pipeline_runner_stops_with_the_runner(tmp_path):
    runner_script, pid_file = tmp_path / "runner.py", tmp_path / "child.pid"
    runner_script.write_text(RUNNER)
    runner = subprocess.Popen([sys.executable, str(runner_script), str(pid_file)],
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    child_pid = _wait_for_pid(pid_file, runner)
    runner.send_signal(signal.SIGKILL)
    runner.wait()
    assert _gone_within(child_pid, 10), "the runner's child went on running after the runner was killed"
