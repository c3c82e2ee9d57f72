"""INT8 post-training quantisation with NNCF: is it faster than bf16 here, and as accurate?

Issue 10 asks to measure before deciding. This script:

1. converts the model with the engine's own OpenVINO runtime (the cached, verified IR);
2. quantises it with NNCF (``nncf.quantize``, mixed preset) on real calibration crops cut
   from the *training* images of CoNSeP and MoNuSeg (the dev split stays unseen);
3. times bf16, f32 and INT8 side by side on the same windows, interleaved over
   ``--rounds`` so that a shared machine's drift hits all three alike (median ratios);
4. scores the dev split (PQ, AJI, F1 and the rest of `evaluate`'s keys) with the
   torch fp32 reference, OpenVINO bf16 and OpenVINO INT8, all at the same window size.

The decision rule (issue 10): ship INT8 only if it is faster than bf16 here *and* its dev
PQ stays within 0.005 of fp32. The JSON holds every figure; docs/engine.md quotes it.

    .venv/bin/python benchmarks/int8.py --json benchmarks/results/int8.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from _common import save_json

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
DATASETS = {"consep": DATA / "consep" / "train", "monuseg": DATA / "monuseg" / "train"}


def calibration_crops(train_images: list[np.ndarray], side: int, count: int, seed: int) -> list[np.ndarray]:
    """``count`` random (1, side, side, 3) uint8 crops of training images (mirrored up if small)."""
    rng = np.random.default_rng(seed)
    crops = []
    for i in range(count):
        image = train_images[i % len(train_images)]
        if min(image.shape[:2]) < side:
            grow = side - min(image.shape[:2])
            image = np.pad(image, ((0, grow), (0, grow), (0, 0)), mode="symmetric")
        y = int(rng.integers(0, image.shape[0] - side + 1))
        x = int(rng.integers(0, image.shape[1] - side + 1))
        crops.append(np.ascontiguousarray(image[None, y : y + side, x : x + side]))
    return crops


def quantised_runtime(model: Any, crops: list[np.ndarray], threads: int | None, subset: int) -> Any:
    """An OpenVINO runtime whose graph NNCF has quantised to INT8 (bf16 for what stays float)."""
    import nncf

    from wsi_pipeline.engine.runtime import OpenVINORuntime

    runtime = OpenVINORuntime(model, precision="bf16", threads=threads, label="int8")
    runtime._model = nncf.quantize(
        runtime._model,
        nncf.Dataset(crops),
        preset=nncf.QuantizationPreset.MIXED,
        subset_size=min(subset, len(crops)),
        fast_bias_correction=True,
    )
    runtime.name = "openvino-int8"
    return runtime


def time_rounds(runtimes: dict[str, Any], windows: np.ndarray, rounds: int) -> dict[str, list[float]]:
    """Seconds per call of each runtime, interleaved round by round (warm-up call first)."""
    for runtime in runtimes.values():
        runtime.run(windows)
    times: dict[str, list[float]] = {name: [] for name in runtimes}
    for _ in range(rounds):
        for name, runtime in runtimes.items():
            began = time.perf_counter()
            runtime.run(windows)
            times[name].append(time.perf_counter() - began)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model name or path (default: the shipped default)")
    parser.add_argument("--window", type=int, default=None, help="window side (default: the engine's)")
    parser.add_argument("--calibration", type=int, default=64, help="calibration crops (64)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (5)")
    parser.add_argument("--threads", type=int, default=None, help="threads for every runtime (default: torch's)")
    parser.add_argument("--no-accuracy", action="store_true", help="timing only")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    import torch

    from wsi_pipeline.data import load_dataset, load_dev_split, split_dev
    from wsi_pipeline.engine.infer import DEFAULT_WINDOW, InferenceConfig, TileInferer
    from wsi_pipeline.engine.registry import default_model_name
    from wsi_pipeline.engine.runtime import OpenVINORuntime
    from wsi_pipeline.engine.weights import load_model
    from wsi_pipeline.evaluate import evaluate_samples

    if args.threads:
        torch.set_num_threads(args.threads)
    name = args.model or default_model_name()
    window = args.window or DEFAULT_WINDOW
    dev_sources = load_dev_split(REPO / "configs" / "dev_split.yaml")
    splits = {key: split_dev(load_dataset(folder).samples, dev_sources) for key, folder in DATASETS.items()}
    train_images = [s.image for train, _ in splits.values() for s in train]
    crops = calibration_crops(train_images, window, args.calibration, seed=0)

    started = time.perf_counter()
    int8 = quantised_runtime(load_model(name), crops, args.threads, args.calibration)
    quantise_seconds = time.perf_counter() - started
    runtimes = {
        "openvino_bf16": OpenVINORuntime(load_model(name), precision="bf16", threads=args.threads),
        "openvino_f32": OpenVINORuntime(load_model(name), precision="f32", threads=args.threads),
        "openvino_int8": int8,
    }
    windows = crops[0]
    times = time_rounds(runtimes, windows, args.rounds)
    median = {k: statistics.median(v) for k, v in times.items()}
    output = window - 92
    timing = {
        k: {"s_per_window": median[k], "us_per_output_px": median[k] / output**2 * 1e6, "seconds": v}
        for k, v in times.items()
    }
    ratios = {
        "int8_over_bf16": median["openvino_int8"] / median["openvino_bf16"],
        "f32_over_bf16": median["openvino_f32"] / median["openvino_bf16"],
    }
    print("s per window:", {k: round(v, 4) for k, v in median.items()}, "ratios:", ratios, flush=True)

    accuracy: dict[str, Any] = {}
    if not args.no_accuracy:
        engines = {
            "torch_fp32": TileInferer(load_model(name), InferenceConfig(window=window, batch_size=1)),
            "openvino_bf16": TileInferer(load_model(name), InferenceConfig(runtime="openvino", bf16=True,
                                                                            window=window, batch_size=1)),
        }
        quantised = TileInferer(load_model(name), InferenceConfig(window=window, batch_size=1))
        quantised.runtime = int8
        engines["openvino_int8"] = quantised
        keys = ("pq", "aji", "f1_detection", "dq", "sq", "mpq", "type_accuracy")
        for engine_name, inferer in engines.items():
            accuracy[engine_name] = {}
            for dataset, (_, dev) in splits.items():
                scores = evaluate_samples(inferer.model, dev, inferer=inferer)
                accuracy[engine_name][dataset] = {k: scores.get(k) for k in keys}
                print(engine_name, dataset, {k: round(v, 4) for k, v in accuracy[engine_name][dataset].items()
                                             if isinstance(v, float)}, flush=True)
    pq_drop = {
        dataset: accuracy["torch_fp32"][dataset]["pq"] - accuracy["openvino_int8"][dataset]["pq"]
        for dataset in DATASETS
    } if accuracy else {}
    ship = bool(accuracy) and ratios["int8_over_bf16"] < 1.0 and all(d <= 0.005 for d in pq_drop.values())
    summary = {
        "benchmark": "int8",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": name,
        "window": window,
        "threads": torch.get_num_threads() if args.threads is None else args.threads,
        "calibration_crops": args.calibration,
        "calibration_from": "training images of CoNSeP and MoNuSeg (dev split excluded)",
        "quantise_seconds": quantise_seconds,
        "timing": timing,
        "ratios": ratios,
        "accuracy_dev": accuracy,
        "pq_drop_int8_vs_fp32": pq_drop,
        "ship_int8": ship,
        "rule": "ship only if faster than bf16 here and dev PQ within 0.005 of fp32",
    }
    print("ship INT8:", ship, "PQ drop:", pq_drop, flush=True)
    save_json(args.json, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
