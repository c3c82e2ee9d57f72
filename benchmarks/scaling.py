"""How one slide's throughput scales with workers: local 1 and 2, and SLURM 1 and 2.

The real CLI (``python -m wsi_pipeline run SLIDE``) processes one slide into a fresh out
folder per configuration:

- ``local-1``, ``local-2``: a LocalCluster of 1 / 2 single-threaded worker processes;
- ``slurm-1``, ``slurm-2``: ``--cluster slurm`` with 1 / 2 workers, each in a SLURM job of
  one core (dask-jobqueue, ``sbatch``), on a single-node SLURM cluster this script starts
  on localhost with ``tests/slurm_cluster.py`` (needs root, ``slurm-wlm`` and ``munge``;
  without them the SLURM rows are skipped, saying why).

Per run, from the slide's ``report.json``: ``tiles_per_s`` (tiles / the slide's tile
phase, first submission to last result), ``s_per_mm2`` (the slide's wall seconds, tissue
detection to report, per mm² of tissue), the slide's wall seconds, and the speed-up of
both against ``local-1``. The cluster start (LocalCluster processes, SLURM jobs queued and
started) is outside the slide's seconds and reported apart (``command_s``). Each worker's
first tile includes its model load and compilation, as in any real run (``startup_s``).
``--repeat`` interleaves rounds (the machine's load drifts) and keeps every run.

    sudo .venv/bin/python benchmarks/scaling.py --json benchmarks/results/scaling.json

Extra ``wsi-pipeline run`` options go after ``--extra`` (default ``--bf16 auto``, as ``make run``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from _common import save_json

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}
ENV.pop("DASK_SCHEDULER_ADDRESS", None)
JOB_MEMORY = "3GB"  # per one-core worker job: the default model's worker (~450 MB) plus tiles, generously


@contextlib.contextmanager
def slurm_cluster(folder: Path) -> Iterator[Any]:
    """A one-node SLURM cluster on localhost (tests/slurm_cluster.py), or None with the reason."""
    from slurm_cluster import SlurmUnavailableError, local_slurm

    try:
        with local_slurm(folder) as cluster:
            yield cluster
    except SlurmUnavailableError as exc:
        print(f"SLURM rows skipped: {exc}", file=sys.stderr)
        yield None


def run_once(slide: Path, label: str, workers: int, extra: list[str], root: Path, slurm: Any) -> dict[str, Any]:
    out = root / f"{label}-{time.monotonic_ns()}"
    args = [sys.executable, "-m", "wsi_pipeline", "run", str(slide), "--out", str(out), "--no-progress",
            "--workers", str(workers), *extra]
    env = ENV
    if label.startswith("slurm"):
        config = root / f"{label}.yaml"
        config.write_text(yaml.safe_dump({"cluster_options": {
            "queue": slurm.partition, "cores": 1, "memory": JOB_MEMORY, "walltime": "00:30:00", "interface": "lo",
            "log_directory": str(root / "jobs")}}), encoding="utf-8")
        args += ["--cluster", "slurm", "--config", str(config)]
        env = slurm.env(ENV)
    else:
        args += ["--threads-per-worker", "1"]
    started = time.perf_counter()
    result = subprocess.run(args, capture_output=True, text=True, env=env, cwd=root, timeout=1800)
    command_s = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{label} failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
    report = json.loads(next(out.glob("*/report.json")).read_text())
    tiles, seconds = report["tiles"]["processed"], report["seconds"]
    return {
        "config": label,
        "workers": workers,
        "cluster": report["config"]["cluster"],
        "tiles": tiles,
        "tissue_mm2": round(report["tissue_mm2"], 4),
        "slide_s": round(seconds["wall"], 2),
        "tiles_s": round(seconds["tiles_wall"], 2),
        "tiles_per_s": round(tiles / seconds["tiles_wall"], 4),
        "s_per_mm2": round(seconds["wall"] / report["tissue_mm2"], 2),
        "startup_s": round(report["startup"].get("workers", 0.0), 2),
        "command_s": round(command_s, 2),
        "load_average_1min": os.getloadavg()[0],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slide", type=Path, default=REPO / "sample_slides" / "CMU-1-Small-Region.svs")
    parser.add_argument("--repeat", type=int, default=1, help="interleaved rounds over the configurations")
    parser.add_argument("--no-slurm", action="store_true", help="local rows only")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=["--bf16", "auto"],
                        help="more wsi-pipeline run options (last)")
    args = parser.parse_args()
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="scaling-bench-") as tmp:
        root = Path(tmp)
        root.chmod(0o755)
        with (contextlib.nullcontext(None) if args.no_slurm else slurm_cluster(root / "slurm")) as slurm:
            configs = [("local-1", 1), ("local-2", 2)] + ([("slurm-1", 1), ("slurm-2", 2)] if slurm else [])
            for round_ in range(args.repeat):
                for label, workers in (configs if round_ % 2 == 0 else configs[::-1]):
                    runs.append(run_once(args.slide, label, workers, args.extra, root, slurm))
                    print(json.dumps(runs[-1]), flush=True)
    table: dict[str, dict[str, Any]] = {}
    for label in dict.fromkeys(r["config"] for r in runs):
        mine = [r for r in runs if r["config"] == label]
        table[label] = {
            "workers": mine[0]["workers"],
            "cluster": mine[0]["cluster"],
            "tiles": mine[0]["tiles"],
            "tissue_mm2": mine[0]["tissue_mm2"],
            **{key: round(statistics.median(r[key] for r in mine), 3)
               for key in ("tiles_per_s", "s_per_mm2", "slide_s", "tiles_s", "command_s")},
        }
    base = table["local-1"]
    for row in table.values():
        row["speedup_tiles"] = round(row["tiles_per_s"] / base["tiles_per_s"], 2)
        row["speedup_slide"] = round(base["slide_s"] / row["slide_s"], 2)
    summary = {"slide": args.slide.name, "options": args.extra, "cpus": len(os.sched_getaffinity(0)),
               "repeat": args.repeat, "table": table, "runs": runs}
    print(json.dumps(table, indent=2))
    print("\n| config | workers | tiles/s | s/mm² | slide s | speed-up (tiles/s) | speed-up (slide) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, row in table.items():
        print(f"| {label} | {row['workers']} | {row['tiles_per_s']:.3f} | {row['s_per_mm2']:.0f} | "
              f"{row['slide_s']:.1f} | {row['speedup_tiles']:.2f} | {row['speedup_slide']:.2f} |")
    save_json(args.json, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
