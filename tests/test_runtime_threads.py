"""OpenVINO runtime under concurrent task threads (the default local layout runs two).

Found by the side-by-side benchmark: two Dask task threads making their first inference at
the same moment deadlocked inside pyopenvino (a function-local static's guard vs the GIL).
Each check runs in a fresh process whose runtime loads the converted model from the cache
(a conversion would run pyopenvino once before the threads start), with a timeout: a
deadlock fails the test instead of hanging the suite.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest

if importlib.util.find_spec("openvino") is None:  # found, not imported (see test_runtime_openvino.py)
    pytest.skip("OpenVINO is not installed (pip install openvino)", allow_module_level=True)

SCRIPT = textwrap.dedent(
    """
    import threading, numpy as np, torch
    from wsi_pipeline.engine.model import ChannelSpec, HoVerNet
    from wsi_pipeline.engine.runtime import OpenVINORuntime
    torch.manual_seed(0)
    model = HoVerNet(mode="fast", num_types=5, spec=ChannelSpec.scaled(0.0625, "fast")).eval()
    runtime = OpenVINORuntime(model, precision="f32", threads=STREAMS, streams=STREAMS)
    barrier = threading.Barrier(4)
    sides = [256, 264, 272, 280]
    out = {}
    def work(side):
        x = np.random.default_rng(side).integers(0, 256, (3, side, side, 3), dtype=np.uint8)
        barrier.wait()
        out[side] = runtime.run(x)["np_prob"].shape
    threads = [threading.Thread(target=work, args=(s,)) for s in sides]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert out == {s: (3, s - 92, s - 92) for s in sides}, out
    print("ok")
    """
)


@pytest.mark.parametrize("streams", [1, 2], ids=["one-stream-serialised", "two-streams-concurrent"])
def test_first_inferences_from_several_threads_at_once_do_not_deadlock(tmp_path, streams: int) -> None:
    """With one stream the process serialises inferences; with two, the threads' windows run
    concurrently (async requests, no process lock): both must survive simultaneous starts."""
    env = {**os.environ, "WSI_PIPELINE_CACHE": str(tmp_path / "cache")}
    script = f"STREAMS = {streams}\n" + SCRIPT
    for attempt in range(4):  # the first converts (and fills the cache), the others load it
        try:
            done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                                  env=env)
        except subprocess.TimeoutExpired:
            pytest.fail(f"attempt {attempt}: the threads deadlocked (no answer in 120 s)")
        assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]
