"""End-to-end throughput of `wsi-pipeline run`, and how much of it is the model itself.

For each model and each slide, the real pipeline runs (the batch code, a LocalCluster
sized like `run`'s default, outputs and reports written to a temporary folder); its
report gives wall seconds, tissue mm², core megapixels and nuclei. In the same process
and on the same cluster, a second pass then times only the model forward
(:meth:`~wsi_pipeline.engine.infer.TileInferer.predict_grid`, the engine's batch call)
over the same windows: the slide-wide grid windows the run computed, each once, cut exactly
as the engine cuts them (``worker.window_batches``, only the windows near tissue), in
batches of the run's size. Reading and cutting are
outside the timer. ``--tile-sizes`` repeats the run per tile size (how the default tile
size was chosen); ``read_over_core`` says how much of the read is margin.

    pipeline overhead = end-to-end wall seconds / forward wall seconds

where the forward wall is the time during which at least one forward pass ran (the union of
their intervals over all workers; see ``busy_seconds``): how much longer the whole run takes
than the cluster needs for the forward passes alone (target <= 1.15). Everything else (reading, tissue, post-processing,
stitching, writing, scheduling, idle threads at the end of a slide) is overhead.

    .venv/bin/python benchmarks/throughput.py --json benchmarks/results/throughput.json
    .venv/bin/python benchmarks/throughput.py --models hovernet-fast-w025 DENSE_MODEL_NAME
    .venv/bin/python benchmarks/throughput.py --tile-sizes 992 1312 1648 1968 2624 --json /tmp/tiles.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from _common import save_json

REPO = Path(__file__).resolve().parents[1]
SAMPLES = sorted((REPO / "sample_slides").glob("*.svs")) + sorted((REPO / "sample_slides").glob("*.tif"))


def forward_seconds(item: tuple[Any, list[tuple[int, int]]]) -> dict[str, float]:
    """Time only the model forward over the grid windows this tile is the first to need.

    Runs on a worker; uses the worker's cached engine (the one the pipeline used) and the
    engine's own cut (:func:`~wsi_pipeline.worker.window_batches`), over the windows the
    pipeline computed: those near tissue (all with --no-skip-glass), each shared window
    timed once, by the first tile (in tile order) whose read region meets it.
    """
    from wsi_pipeline.slide import SlideSpec
    from wsi_pipeline.worker import get_inferer, near_tissue, window_batches

    task, owned = item
    inferer = get_inferer(task.model_path, task.infer)
    grid = inferer.grid
    seconds, windows = 0.0, 0
    intervals: list[tuple[float, float]] = []
    with SlideSpec(task.slide.path, task.slide.backend, task.slide.mpp).open() as slide:
        size = slide.size_at(task.mpp)
        mine = set(owned)
        todo = [(i, j) for i, j, _ in near_tissue(task, grid, size) if (i, j) in mine]
        if todo:
            for chunk, batch in window_batches(slide, task, grid, todo, size, inferer.config.batch_size):
                began, wall_began = time.perf_counter(), time.time()
                inferer.predict_grid(batch)
                seconds += time.perf_counter() - began
                intervals.append((wall_began, time.time()))
                windows += len(chunk)
    tile = task.tile
    pixels = tile.read.width * tile.read.height
    return {"forward": seconds, "windows": float(windows), "read_pixels": float(pixels), "intervals": intervals}


def busy_seconds(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of (start, end) intervals: the time at least one forward ran.

    Per-task sums over-count where inferences wait for each other (the OpenVINO layout runs
    one inference at a time per process, each on every core) and under-count nothing where
    workers run in parallel, so the union is the forward's own wall time in both layouts.
    """
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def measure(slide: Path, model: str, out: Path, config_options: dict[str, Any]) -> dict[str, Any]:
    """One pipeline run of one slide, then the forward-only pass over the same tiles."""
    from wsi_pipeline.batch import SlideJob, SlideRun, prepare_model, process_slide, settings_checksum
    from wsi_pipeline.batch.plan import inference_config
    from wsi_pipeline.config import RunConfig
    from wsi_pipeline.schedule import cluster_threads, open_client, stream_tiles
    from wsi_pipeline.shares import tile_windows
    from wsi_pipeline.slide import DEFAULT_MASK_MPP, SlideSpec, tissue_mask
    from wsi_pipeline.tiling import tile_grid
    from wsi_pipeline.worker import TileTask, tissue_extent

    config = RunConfig(model=model, progress=False, **config_options)
    info = prepare_model(config)
    folder = out / slide.stem
    folder.mkdir(parents=True)
    spec = SlideSpec(str(slide), config.backend, config.mpp)
    with spec.open() as opened:
        tissue = tissue_mask(opened, DEFAULT_MASK_MPP)
        mpp0 = (opened.mpp_x, opened.mpp_y)
        tiles = tile_grid(opened.width, opened.height, mpp0, info.mpp, info.tile_size, info.margin, tissue)
    core_megapixels = sum(t.core.width * t.core.height for t in tiles) / 1e6
    with open_client(config) as cluster:
        threads = cluster_threads(cluster.client)
        infer = inference_config(config, cluster.torch_threads, streams=cluster.engine_streams)
        owner: dict[tuple[int, int], int] = {}
        for tile in tiles:
            for i, j, _ in tile_windows(tile, info.grid):
                owner.setdefault((i, j), tile.index)
        tasks = [
            (TileTask(spec, tile, str(info.path), info.mpp, infer, info.postproc,
                      tissue.crop(*tissue_extent(tile, info.grid, info.mpp)) if config.skip_glass else None),
             [ij for ij, first in owner.items() if first == tile.index])
            for tile in tiles
        ]
        # Warm-up: every worker loads the model, as it would have early in a long batch.
        stream_tiles(cluster.client, tasks[:threads], lambda _: None, max_in_flight=threads, fn=forward_seconds)
        run = SlideRun(config, info, cluster, settings_checksum(config, info), config.max_in_flight or 2 * threads)
        nuclei, report = process_slide(SlideJob(slide, slide.stem), run, folder)
        timed: list[dict[str, float]] = []
        stream_tiles(cluster.client, tasks, timed.append, max_in_flight=2 * threads, fn=forward_seconds)
        description = cluster.description
    forward = sum(t["forward"] for t in timed)
    windows = int(sum(t["windows"] for t in timed))
    read_megapixels = sum(t["read_pixels"] for t in timed) / 1e6
    wall = float(report["seconds"]["wall"])
    forward_wall = busy_seconds([span for t in timed for span in t["intervals"]])
    return {
        "slide": slide.name,
        "model": info.name,
        "model_gmac_per_patch": info.macs / 1e9,
        "cluster": description,
        "threads": threads,
        "tiles": report["tiles"]["processed"],
        "tile_size": info.tile_size,
        "margin": info.margin,
        "windows": windows,
        "engine": report.get("engine"),
        "tissue_mm2": report["tissue_mm2"],
        "nuclei": nuclei,
        "wall_s": wall,
        "s_per_tissue_mm2": wall / report["tissue_mm2"] if report["tissue_mm2"] else None,
        "core_megapixels": core_megapixels,
        "core_megapixels_per_s": core_megapixels / wall if wall else None,
        "read_megapixels": read_megapixels,
        "read_over_core": read_megapixels / core_megapixels if core_megapixels else None,
        "tissue_megapixels_per_s": report["throughput"]["tissue_mpx_per_s"],
        "nuclei_per_s": report["throughput"]["nuclei_per_s"],
        "stage_seconds": report["seconds"],
        "forward_s": forward,
        "forward_us_per_core_px": forward_wall / core_megapixels if core_megapixels else None,
        "startup_s": report["seconds"].get("startup"),
        "forward_wall_s": forward_wall,
        "overhead_ratio": wall / forward_wall if forward_wall else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slides", nargs="+", type=Path, default=SAMPLES, help="default: sample_slides/*")
    parser.add_argument("--models", nargs="+", default=[None], help="model names or paths (default: the default)")
    parser.add_argument("--tile-sizes", type=int, nargs="+", default=[None], help="tile core sides to compare")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--threads-per-worker", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--bf16", choices=("false", "true", "auto"), default="auto")
    parser.add_argument("--runtime", choices=("auto", "torch", "openvino"), default="auto")
    parser.add_argument("--window", type=int, default=None, help="network input side (default: the engine's)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    options: dict[str, Any] = {
        "batch_size": args.batch_size,
        "bf16": {"false": False, "true": True}.get(args.bf16, "auto"),
        "runtime": args.runtime,
        "window": args.window,
    }
    for name in ("workers", "threads_per_worker"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for index, (model, tile_size) in enumerate((m, t) for m in args.models for t in args.tile_sizes):
            for slide in args.slides:
                result = measure(slide, model, Path(tmp) / f"{index}", {**options, "tile_size": tile_size})
                print(json.dumps({k: v for k, v in result.items() if k != "stage_seconds"}), flush=True)
                results.append(result)
    summary = {
        "benchmark": "throughput",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpus": len(os.sched_getaffinity(0)),
        "load_average_at_end": os.getloadavg(),
        "options": options,
        "results": results,
    }
    save_json(args.json, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
