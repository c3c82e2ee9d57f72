"""Idle workers between slides: a batch with one slide at a time vs two in flight.

With one slide at a time the workers wait, after each slide's last tiles, for the driver
to close the slide's outputs, reread its crops and write its report, and then to find the
next slide's tissue before its first tile. ``--slides-in-flight 2`` (the default) starts the
next slide when the previous one has submitted its last tile, so those seconds overlap
with tile work. This runs the real CLI over the same slides (default: ``sample_slides/``,
as ``make run``) with ``--slides-in-flight 1`` and ``2``, in interleaved rounds (the
shared machine's load drifts), each into a fresh out folder, and reports per mode:

- ``batch_s``: the run's own seconds (the CLI's summary line; includes the cluster start);
- ``slides_s``: ``batch_s`` less the run's start-up (driver model load, cluster start),
  i.e. from the first slide's start to the last slide's end;
- ``busy_s``: the workers' summed tile seconds (read + infer + post-process + their
  start-up, from each slide's report.json);
- ``busy_fraction``: ``busy_s / (worker threads x slides_s)``: the share of the workers'
  time spent on tiles (the rest is idle);
- ``idle_s``: ``worker threads x slides_s - busy_s``.

    .venv/bin/python benchmarks/overlap.py --json benchmarks/results/overlap.json

Extra ``wsi-pipeline run`` options go after ``--`` (default ``--bf16 auto``, as ``make run``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import save_json

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}
ENV.pop("DASK_SCHEDULER_ADDRESS", None)
SUMMARY = re.compile(r"slide\(s\): .* in ([0-9.]+) s \(local cluster: (\d+) worker\(s\) x (\d+) thread\(s\)")


def one_run(inputs: list[str], in_flight: int, extra: list[str]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="overlap-bench-") as tmp:
        out = Path(tmp) / "out"
        started = time.perf_counter()
        result = subprocess.run(
            [sys.executable, "-m", "wsi_pipeline", "run", *inputs, "--out", str(out), "--no-progress",
             "--slides-in-flight", str(in_flight), *extra],
            capture_output=True, text=True, env=ENV, cwd=REPO, check=True,
        )
        command_s = time.perf_counter() - started
        found = SUMMARY.search(result.stdout)
        if found is None:
            raise SystemExit(f"no summary line in the run's output:\n{result.stdout}")
        batch_s, workers, threads = float(found[1]), int(found[2]), int(found[3])
        reports = [json.loads(p.read_text()) for p in sorted(out.glob("*/report.json"))]
    startup = sum(float(v) for r in reports for k, v in r["startup"].items() if k != "workers")
    busy = sum(
        sum(float(r["seconds"].get(k, 0.0)) for k in ("read", "infer", "postprocess")) + float(
            r["startup"].get("workers", 0.0))
        for r in reports
    )
    slides_s = batch_s - startup
    capacity = workers * threads * slides_s
    return {
        "slides_in_flight": in_flight,
        "slides": len(reports),
        "tiles": sum(r["tiles"]["processed"] for r in reports),
        "command_s": round(command_s, 2),
        "batch_s": batch_s,
        "startup_s": round(startup, 2),
        "slides_s": round(slides_s, 2),
        "busy_s": round(busy, 2),
        "busy_fraction": round(busy / capacity, 3),
        "idle_s": round(capacity - busy, 2),
        "threads": workers * threads,
        "load_average_1min": os.getloadavg()[0],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="*", default=[str(REPO / "sample_slides")])
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds of (1, 2)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=["--bf16", "auto"],
                        help="more wsi-pipeline run options (last)")
    args = parser.parse_args()
    runs: list[dict[str, Any]] = []
    for round_ in range(args.rounds):
        for in_flight in ((1, 2) if round_ % 2 == 0 else (2, 1)):
            runs.append(one_run(args.inputs, in_flight, args.extra))
            print(json.dumps(runs[-1]), flush=True)

    def median(mode: int, key: str) -> float:
        return statistics.median(r[key] for r in runs if r["slides_in_flight"] == mode)

    summary = {
        "inputs": args.inputs,
        "options": args.extra,
        "runs": runs,
        "median": {
            str(mode): {key: median(mode, key) for key in ("batch_s", "slides_s", "busy_s", "busy_fraction", "idle_s")}
            for mode in (1, 2)
        },
    }
    one, two = summary["median"]["1"], summary["median"]["2"]
    summary["idle_removed_s"] = round(one["idle_s"] - two["idle_s"], 2)
    summary["wall_saved_s"] = round(one["slides_s"] - two["slides_s"], 2)
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}, indent=2))
    save_json(args.json, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
