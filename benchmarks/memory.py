"""Peak memory of `wsi-pipeline run` as the slide grows: it should stay flat.

Two slides are generated from the pyramid sample: a base crop, and a 2 x 2 mosaic of
that crop (4x the tissue area, same tissue). Each is processed by the real command in
a subprocess (``wsi-pipeline run``, LocalCluster as by default) while this script polls
the resident memory (RSS) of the whole process tree every ``--interval`` seconds: the
driver, the Dask scheduler thread, the nannies and the workers. Reported per slide:
peak RSS of the tree (sum over processes at one instant), of the driver, and of the
largest worker; and the ratio 4x / 1x of each (target <= 1.1: memory must not grow with
the slide; tiles in flight are bounded, outputs stream to disk).

The base crop holds enough tiles to fill the in-flight bound (2 x worker threads), so
both runs are in steady state. Defaults keep it to a few minutes with the default model
on 2 cores; ``--model PATH`` with a small model makes a quick check.

    .venv/bin/python benchmarks/memory.py --json benchmarks/results/memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from _common import save_json

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "sample_slides" / "CMU-1-Small-Region-pyramid.tif"
CLI = Path(sys.executable).with_name("wsi-pipeline")


def make_slides(folder: Path, region: tuple[int, int, int, int]) -> tuple[Path, Path]:
    """The base crop of the sample (level-0 x, y, w, h) and its 2 x 2 mosaic, as pyramidal TIFFs."""
    from wsi_pipeline.slide import open_slide
    from wsi_pipeline.slide._image import ArraySlide
    from wsi_pipeline.slide.pyramid import write_pyramid

    x, y, w, h = region
    with open_slide(SAMPLE) as sample:
        crop = sample.read(x, y, w, h)
        mpp = sample.mpp_x
    base, mosaic = folder / "base.tif", folder / "mosaic4x.tif"
    with ArraySlide(crop, mpp=mpp, path="base") as slide:
        write_pyramid(slide, base, description="memory benchmark: base crop")
    with ArraySlide(np.tile(crop, (2, 2, 1)), mpp=mpp, path="mosaic") as slide:
        write_pyramid(slide, mosaic, description="memory benchmark: 2 x 2 mosaic of the base crop")
    return base, mosaic


def tree_rss(root: psutil.Process) -> tuple[int, int, int]:
    """(sum over the tree, the root's, the largest descendant's) RSS in bytes, now."""
    total = driver = largest = 0
    try:
        driver = root.memory_info().rss
        total = driver
        for child in root.children(recursive=True):
            try:
                rss = child.memory_info().rss
            except psutil.Error:
                continue
            total += rss
            largest = max(largest, rss)
    except psutil.Error:
        pass
    return total, driver, largest


def run_and_watch(slide: Path, out: Path, argv: list[str], interval: float) -> dict[str, Any]:
    """Run `wsi-pipeline run` on one slide, polling the process tree's memory."""
    command = [str(CLI), "run", str(slide), "--out", str(out), "--no-progress", *argv]
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    root = psutil.Process(process.pid)
    peak_total = peak_driver = peak_worker = 0
    while process.poll() is None:
        total, driver, worker = tree_rss(root)
        peak_total, peak_driver, peak_worker = (
            max(peak_total, total),
            max(peak_driver, driver),
            max(peak_worker, worker),
        )
        time.sleep(interval)
    output = process.stdout.read() if process.stdout else ""
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({process.returncode}):\n{output[-3000:]}")
    report = json.loads((out / slide.stem / "report.json").read_text())
    return {
        "slide": slide.name,
        "tissue_mm2": report["tissue_mm2"],
        "tiles": report["tiles"]["processed"],
        "nuclei": report["nuclei"]["total"],
        "seconds": time.perf_counter() - started,
        "peak_rss_total_mb": peak_total / 2**20,
        "peak_rss_driver_mb": peak_driver / 2**20,
        "peak_rss_largest_child_mb": peak_worker / 2**20,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model name or path (default: the shipped default)")
    parser.add_argument(
        "--region",
        type=int,
        nargs=4,
        default=(600, 600, 1968, 1968),
        metavar=("X", "Y", "W", "H"),
        help="base crop of the pyramid sample, level-0 px (default: 600 600 1968 1968)",
    )
    parser.add_argument("--tile-size", type=int, default=656, help="tile core px (default 656: 9 tiles in the base)")
    parser.add_argument("--interval", type=float, default=0.2, help="seconds between memory polls")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    options = ["--tile-size", str(args.tile_size)] + (["--model", args.model] if args.model else [])
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        base, mosaic = make_slides(folder, tuple(args.region))
        results = []
        for slide in (base, mosaic):
            result = run_and_watch(slide, folder / f"out-{slide.stem}", options, args.interval)
            print(json.dumps(result), flush=True)
            results.append(result)
    one, four = results
    ratios = {
        key.replace("peak_rss_", "").replace("_mb", ""): four[key] / one[key]
        for key in ("peak_rss_total_mb", "peak_rss_driver_mb", "peak_rss_largest_child_mb")
        if one[key]
    }
    summary = {
        "benchmark": "memory",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpus": len(os.sched_getaffinity(0)),
        "options": options,
        "tissue_ratio": four["tissue_mm2"] / one["tissue_mm2"] if one["tissue_mm2"] else None,
        "results": results,
        "peak_ratio_4x_over_1x": ratios,
        "target": "<= 1.1",
    }
    print(json.dumps({"tissue_ratio": summary["tissue_ratio"], "peak_ratio_4x_over_1x": ratios}))
    save_json(args.json, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
