"""OpenVINO streams against one all-core inference, alone and beside post-processing.

A worker's task threads overlap one tile's inference with another tile's post-processing.
With one stream an inference spans every core and its threads meet at each layer, so a
post-processing thread that takes one of the cores stalls all of it; with one stream per
core each window runs on one core. This times, on windows cut from a sample slide at the
model's µm/px, in one process and in alternating rounds (the shared machine drifts):

* ``one_stream``: windows in turn, one stream over ``--threads`` cores (the default layout);
* ``one_stream_beside_post``: the same while another thread post-processes maps non-stop;
* ``streams``: the same windows through ``OpenVINORuntime(streams=threads)`` (async requests);
* ``streams_beside_post``: that while another thread post-processes.

    python benchmarks/engine_streams.py --windows 12 --rounds 2 --json benchmarks/results/engine_streams.json

Quote the ratios of one run, never a lone time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from _common import save_json

from wsi_pipeline.engine.postproc import postprocess
from wsi_pipeline.engine.runtime import OpenVINORuntime
from wsi_pipeline.engine.weights import load_model
from wsi_pipeline.slide.opener import open_slide

ROOT = Path(__file__).resolve().parent.parent


def windows(slide: Path, side: int, count: int, mpp: float) -> np.ndarray:
    """``count`` windows of ``side`` px at ``mpp`` from the slide's middle, left to right."""
    with open_slide(slide) as handle:
        width, height = handle.size_at(mpp)
        y0 = max(0, height // 2 - side // 2)
        x0 = max(0, width // 2 - (count * side) // 2)
        strip = handle.read_region_at(x0, y0, min(count * side, width - x0), side, mpp)
    cuts = [strip[:, i * side : (i + 1) * side] for i in range(strip.shape[1] // side)]
    while len(cuts) < count:
        cuts.append(cuts[len(cuts) % max(1, len(cuts))])
    return np.stack(cuts[:count])


def timed(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def beside_post(fn: Any, maps: dict[str, np.ndarray], mpp: float) -> float:
    """Seconds of ``fn()`` while another thread post-processes ``maps`` over and over."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            postprocess(maps["np_prob"][0], maps["hv"][0], maps["tp_prob"][0], mpp=mpp)

    thread = threading.Thread(target=loop)
    thread.start()
    try:
        return timed(fn)
    finally:
        stop.set()
        thread.join()


def run(args: argparse.Namespace) -> dict[str, Any]:
    model = load_model(args.model)
    mpp = float(model.meta.get("mpp", 0.25))
    batch = windows(args.slide, args.window, args.windows, mpp)
    engines = {
        "one_stream": OpenVINORuntime(model, precision=args.precision, threads=args.threads),
        "streams": OpenVINORuntime(model, precision=args.precision, threads=args.threads, streams=args.threads),
    }
    maps = engines["one_stream"].run(batch[:1])  # compiles; the maps feed the post-processing thread
    engines["streams"].run(batch[:1])
    seconds: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for name, engine in engines.items():
            seconds.setdefault(name, []).append(timed(lambda e=engine: e.run(batch)))
            seconds.setdefault(f"{name}_beside_post", []).append(beside_post(lambda e=engine: e.run(batch), maps, mpp))
    median = {name: statistics.median(values) for name, values in seconds.items()}
    return {
        "benchmark": "engine_streams",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python", "benchmarks/engine_streams.py", *sys.argv[1:]]),
        "model": str(args.model),
        "slide": str(args.slide),
        "window": args.window,
        "windows": args.windows,
        "threads": args.threads,
        "precision": args.precision,
        "load_average_at_end": list(os.getloadavg()),
        "seconds": seconds,
        "median_s": median,
        "ratios": {
            "streams_over_one_stream": median["streams"] / median["one_stream"],
            "streams_beside_post_over_one_stream_beside_post": median["streams_beside_post"]
            / median["one_stream_beside_post"],
            "one_stream_slowdown_beside_post": median["one_stream_beside_post"] / median["one_stream"],
            "streams_slowdown_beside_post": median["streams_beside_post"] / median["streams"],
        },
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=str(ROOT / "models" / "hovernet-fast-w025-imp90.safetensors"))
    parser.add_argument("--slide", type=Path, default=ROOT / "sample_slides" / "CMU-1-Small-Region.svs")
    parser.add_argument("--window", type=int, default=768, help="network input side (768)")
    parser.add_argument("--windows", type=int, default=12, help="windows per timed call (12)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="engine threads (all cores)")
    parser.add_argument("--precision", choices=["bf16", "f32"], default="bf16")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="write the summary here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    summary = run(args)
    for name, value in summary["median_s"].items():
        print(f"{name:28s} {value:7.2f} s")
    for name, value in summary["ratios"].items():
        print(f"{name:50s} {value:5.2f}")
    save_json(args.json, summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
