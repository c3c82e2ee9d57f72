"""A training budget is counted without the time the process spends stopped (kill -STOP / -CONT)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

CHILD = """
import json, sys, time
from wsi_pipeline.budget_clock import BudgetClock
with BudgetClock() as clock:
    counted, start = 0.0, time.perf_counter()
    print("ready", flush=True)
    while time.perf_counter() - start < 2.5:
        time.sleep(0.02)
        counted += clock.step()
    print(json.dumps({"counted": counted, "wall": time.perf_counter() - start, "paused": clock.paused_steps}))
"""


@pytest.mark.skipif(not hasattr(signal, "SIGSTOP"), reason="needs POSIX job-control signals")
def test_a_stopped_and_continued_process_does_not_count_the_stop() -> None:
    child = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "ready"
    time.sleep(0.5)
    os.kill(child.pid, signal.SIGSTOP)
    time.sleep(1.5)
    os.kill(child.pid, signal.SIGCONT)
    out, _ = child.communicate(timeout=30)
    result = json.loads(out)
    assert result["paused"] == 1
    # The 1.5 s stop is not counted; the ~2.5 s of running steps are (one step, the stopped one,
    # as a typical 20 ms step).
    assert result["wall"] > 2.4
    assert abs(result["counted"] - (result["wall"] - 1.5)) < 0.4, result


def test_a_running_process_counts_its_wall_time() -> None:
    from wsi_pipeline.budget_clock import BudgetClock

    with BudgetClock() as clock:
        start, counted = time.perf_counter(), 0.0
        for _ in range(5):
            time.sleep(0.02)
            counted += clock.step()
        wall = time.perf_counter() - start
    assert clock.paused_steps == 0
    assert counted == pytest.approx(wall, abs=0.01)
    assert signal.getsignal(signal.SIGCONT) in (signal.SIG_DFL, None)
