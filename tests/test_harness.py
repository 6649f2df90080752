"""The test harness's own guarantees: a subprocess that times out takes every process it started with it."""

import subprocess
import sys
import time

import pytest
from pipeline_runs import run_captured

# a parent that starts a child in a session of its own (as torchrun starts its ranks); both hold stdout
SPAWN = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
print(child.pid, flush=True)
time.sleep(600)
"""


def test_a_timeout_kills_the_command_and_the_processes_it_started():
    start = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired) as stopped:
        run_captured([sys.executable, "-c", SPAWN], timeout=5)
    assert time.monotonic() - start < 60
    child = int(stopped.value.output.split()[0])
    time.sleep(0.5)
    assert not running(child)


def running(pid: int) -> bool:
    """Alive and not a zombie (a killed orphan stays one until something reaps it)."""
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")
