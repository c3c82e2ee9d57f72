"""Freed activations stay in the process: no page-fault storm per batch."""

from __future__ import annotations

import subprocess
import sys

import pytest

_PROBE = """
import resource, sys
import numpy as np
if sys.argv[1] == "keep":
    from wsi_pipeline.engine._malloc import keep_freed_memory
    assert keep_freed_memory()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    a = np.ones(64 * 2**20 // 8)  # 64 MB, above glibc's largest mmap threshold
    del a
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only")
def test_large_allocations_reuse_pages_after_keep_freed_memory() -> None:
    faults = {
        mode: int(
            subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True).stdout
        )
        for mode in ("default", "keep")
    }
    # 20 x 64 MB: ~16 k faults each time by default, once in all when memory is kept.
    assert faults["keep"] * 4 < faults["default"], faults
