"""What resuming inside a slide saves: a run killed at about half of a slide's tiles, rerun.

Three runs of the real CLI (``python -m wsi_pipeline run``) on one slide, each into its own
out folder: an undisturbed one; one killed with SIGKILL (no clean-up at all, as a lost
node or the OOM killer does) once half of the slide's tiles are checkpointed in its
partial folder; and the rerun of that one, which resumes from the checkpointed tiles.
Reported: the slide's seconds (the process list's, which leave out the cluster start) of
the undisturbed run and of the rerun, the time the rerun saved, and whether the rerun's
GeoJSON features and label images equal the undisturbed run's.

    .venv/bin/python benchmarks/resume.py --json benchmarks/results/resume.json

Extra ``wsi-pipeline run`` options go after ``--`` (default ``--bf16 auto``, as ``make run``).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import gzip
import json
import os
import signal
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


def command(slide: Path, out: Path, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "wsi_pipeline", "run", str(slide), "--out", str(out), "--no-progress", *extra]


def slide_row(out: Path) -> dict[str, str]:
    with (out / "process_list.csv").open(newline="") as f:
        return next(iter(csv.DictReader(f)))


def content(folder: Path, name: str) -> tuple[list[Any], Any, Any]:
    """GeoJSON features and both label images of a slide's outputs."""
    import numpy as np
    import zarr

    with gzip.open(folder / f"{name}.geojson.gz", "rt", encoding="utf-8") as f:
        features = json.load(f)["features"]
    store = zarr.open_group(folder / f"{name}.zarr", mode="r")
    return features, np.asarray(store["nuclei/0"][:]), np.asarray(store["nuclei_class/0"][:])


def same(a: Path, b: Path, name: str) -> bool:
    import numpy as np

    left, right = content(a, name), content(b, name)
    return left[0] == right[0] and np.array_equal(left[1], right[1]) and np.array_equal(left[2], right[2])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slide", type=Path, default=REPO / "sample_slides" / "CMU-1-Small-Region.svs")
    parser.add_argument("--fraction", type=float, default=0.5, help="kill once this share of the tiles is saved")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("extra", nargs="*", help="more wsi-pipeline run options (after --)")
    args = parser.parse_args()
    extra = args.extra or ["--bf16", "auto"]
    name = args.slide.stem
    with tempfile.TemporaryDirectory(prefix="resume-bench-") as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        subprocess.run(command(args.slide, root / "ref", extra), check=True, env=ENV, cwd=REPO,
                       stdout=subprocess.DEVNULL)
        undisturbed_wall = time.perf_counter() - started
        total = json.loads((root / "ref" / name / "report.json").read_text())["tiles"]["processed"]
        undisturbed = float(slide_row(root / "ref")["seconds"])

        killed = root / "killed"
        tiles = killed / f".{name}.partial" / ".tiles"
        started = time.perf_counter()
        driver = subprocess.Popen(command(args.slide, killed, extra), env=ENV, cwd=REPO, start_new_session=True,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            while len(list(tiles.glob("tile-*.npz"))) < max(1, round(total * args.fraction)):
                if driver.poll() is not None:
                    raise SystemExit(f"the run ended (exit {driver.returncode}) before it could be killed")
                time.sleep(0.1)
            os.killpg(driver.pid, signal.SIGKILL)  # the driver and its LocalCluster's workers
            driver.wait(timeout=60)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(driver.pid, signal.SIGKILL)
        killed_after = time.perf_counter() - started
        kept = len(list(tiles.glob("tile-*.npz")))

        started = time.perf_counter()
        subprocess.run(command(args.slide, killed, extra), check=True, env=ENV, cwd=REPO, stdout=subprocess.DEVNULL)
        rerun_wall = time.perf_counter() - started
        rerun = float(slide_row(killed)["seconds"])
        resumed = json.loads((killed / name / "report.json").read_text())["tiles"]["resumed"]
        identical = same(root / "ref" / name, killed / name, name)
    summary = {
        "slide": args.slide.name,
        "options": extra,
        "tiles": total,
        "killed_after_tiles": kept,
        "killed_after_s": round(killed_after, 2),
        "resumed_tiles": resumed,
        "undisturbed_slide_s": round(undisturbed, 2),
        "rerun_slide_s": round(rerun, 2),
        "saved_s": round(undisturbed - rerun, 2),
        "saved_fraction": round((undisturbed - rerun) / undisturbed, 3),
        "undisturbed_command_s": round(undisturbed_wall, 2),
        "rerun_command_s": round(rerun_wall, 2),
        "identical_outputs": identical,
        "cpus": len(os.sched_getaffinity(0)),
        "load_average": os.getloadavg(),
    }
    print(json.dumps(summary, indent=2))
    save_json(args.json, summary)
    return 0 if identical and resumed == kept else 1


if __name__ == "__main__":
    sys.exit(main())
