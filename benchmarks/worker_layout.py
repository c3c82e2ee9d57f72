"""Which LocalCluster layout processes tiles fastest here: processes or threads?

The same tiles of a sample slide go through the real task (:func:`wsi_pipeline.worker.process_tile`)
on LocalClusters of different layouts with the same core budget:

* ``2x1``: 2 worker processes x 1 thread, torch 1 thread per task;
* ``1x2``: 1 worker process x 2 threads, torch 1 thread per task (the GIL is shared);
* ``1x1t2``: 1 worker process x 1 thread, torch 2 intra-op threads.

Each layout is warmed up first (one tile per thread: the model load and first-call costs
are not what we compare), then timed over ``--tiles`` tiles streamed with the run's
in-flight bound. Reported: tiles/s, seconds, the summed stage seconds, and the workers'
peak resident memory. The default model is a randomly initialised HoVer-Net fast at
width x0.0625 with its NP bias set to find nuclei. Each layout gets a fresh cluster;
``--repeat`` interleaves rounds so a drifting machine load hits every layout alike.

    .venv/bin/python benchmarks/worker_layout.py --json benchmarks/results/worker_layout.json
    .venv/bin/python benchmarks/worker_layout.py --model hovernet-fast-w025-imp90 --runtime auto --bf16 auto \
        --tile-size 1648 --tiles 6 --repeat 2
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

from _common import save_json

REPO = Path(__file__).resolve().parents[1]
LAYOUTS = {"2x1": (2, 1, 1), "1x2": (1, 2, 1), "1x1t2": (1, 1, 2), "1x2t2": (1, 2, 2)}


def tiny_model(folder: Path, width: float, slide_path: Path) -> Path:
    """A randomly initialised HoVer-Net fast (seeded) saved as our checkpoint, its NP bias
    set so about half of the slide's pixels read as nucleus: post-processing then has
    nuclei to separate, as with a trained model (random weights alone often find none)."""
    import torch

    from wsi_pipeline.classes import CONSEP_CLASSES
    from wsi_pipeline.engine.model import ChannelSpec, HoVerNet
    from wsi_pipeline.engine.weights import save_model
    from wsi_pipeline.slide import open_slide

    torch.manual_seed(1)
    model = HoVerNet("fast", 5, ChannelSpec.scaled(width, "fast", round_to=4)).eval()
    with open_slide(slide_path) as slide:
        x0, y0 = slide.width // 3, slide.height // 3
        patch = torch.from_numpy(slide.read_region_at(x0, y0, 256, 256, 0.25)).permute(2, 0, 1)[None].float()
    with torch.inference_mode():
        logits = model(patch)["np"][0]
        model.decoder.np.u0.conv.bias[1] -= (logits[1] - logits[0]).median()
    meta = {"name": f"random-w{width:g}", "classes": CONSEP_CLASSES, "mpp": 0.25}
    return save_model(model, folder / "random.safetensors", meta=meta)


def tasks_for(slide_path: Path, model_path: Path, tile_size: int, count: int, infer: dict) -> list:
    from wsi_pipeline.engine.infer import InferenceConfig
    from wsi_pipeline.engine.registry import resolve_model
    from wsi_pipeline.engine.weights import load_model
    from wsi_pipeline.slide import SlideSpec, open_slide, tissue_mask
    from wsi_pipeline.tiling import tile_grid
    from wsi_pipeline.worker import TileTask, default_margin

    model_path = resolve_model(str(model_path))
    model = load_model(model_path)
    mpp = float(model.meta["mpp"])
    margin = default_margin(model, mpp=mpp)
    with open_slide(slide_path) as slide:
        tissue = tissue_mask(slide)
        tiles = tile_grid(slide.width, slide.height, (slide.mpp_x, slide.mpp_y), mpp, tile_size, margin, tissue)
    spec = SlideSpec(str(slide_path))
    config = InferenceConfig(threads=1, **infer)
    return [TileTask(spec, tile, str(model_path), mpp, config) for tile in tiles[:count]]


def measure(name: str, tasks: list, warmup: list) -> dict:
    from dataclasses import replace

    from distributed import Client, LocalCluster

    from wsi_pipeline.schedule import stream_tiles

    workers, threads, torch_threads = LAYOUTS[name]
    with_threads = [replace(t, infer=replace(t.infer, threads=torch_threads)) for t in tasks]
    warm = [replace(t, infer=replace(t.infer, threads=torch_threads)) for t in warmup]
    cluster = LocalCluster(
        n_workers=workers,
        threads_per_worker=threads,
        processes=True,
        host="127.0.0.1",
        dashboard_address=None,
        silence_logs=logging.ERROR,
    )
    try:
        with Client(cluster) as client:
            stream_tiles(client, warm[: workers * threads], lambda r: None, max_in_flight=workers * threads)
            stages = {"setup": 0.0, "read": 0.0, "infer": 0.0, "postprocess": 0.0}

            def consume(result) -> None:
                for key in stages:
                    stages[key] += result.seconds.get(key, 0.0)

            start = time.perf_counter()
            stream_tiles(client, with_threads, consume, max_in_flight=2 * workers * threads)
            seconds = time.perf_counter() - start
            rss = client.run(lambda: __import__("psutil").Process().memory_info().rss)
    finally:
        cluster.close()
    return {
        "layout": name,
        "workers": workers,
        "threads_per_worker": threads,
        "torch_threads": torch_threads,
        "tiles": len(tasks),
        "seconds": round(seconds, 2),
        "tiles_per_s": round(len(tasks) / seconds, 4),
        "stage_seconds": {k: round(v, 2) for k, v in stages.items()},
        "worker_rss_mb": sorted(round(v / 2**20) for v in rss.values()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slide", type=Path, default=REPO / "sample_slides" / "CMU-1-Small-Region-pyramid.tif")
    parser.add_argument("--model", default=None, help="model name or checkpoint (default: random HoVer-Net fast)")
    parser.add_argument("--runtime", choices=("auto", "torch", "openvino"), default="torch")
    parser.add_argument("--bf16", choices=("false", "true", "auto"), default="false")
    parser.add_argument("--width", type=float, default=0.0625, help="width of the random default model")
    parser.add_argument("--tile-size", type=int, default=328)
    parser.add_argument("--tiles", type=int, default=6)
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    parser.add_argument("--repeat", type=int, default=1, help="measure the layouts this many rounds, interleaved")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or tiny_model(Path(tmp), args.width, args.slide)
        infer = {"runtime": args.runtime, "bf16": {"false": False, "true": True}.get(args.bf16, "auto")}
        tasks = tasks_for(args.slide, model, args.tile_size, args.tiles + 2, infer)
        warmup, timed = tasks[-2:], tasks[: args.tiles]
        results = []
        for round_ in range(args.repeat):
            for name in args.layouts:
                result = measure(name, timed, warmup) | {"round": round_, "load_average": os.getloadavg()[0]}
                print(json.dumps(result), flush=True)
                results.append(result)
    summary = {
        "slide": str(args.slide),
        "model": str(args.model or f"random HoVer-Net fast x{args.width:g}"),
        "tile_size": args.tile_size,
        "runtime": args.runtime,
        "bf16": args.bf16,
        "cpus": len(os.sched_getaffinity(0)),
        "load_average_at_end": os.getloadavg(),
        "results": results,
    }
    save_json(args.json, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
