"""Engine latency per output pixel: runtimes x precisions x window sizes, against the machine's peak.

For each model (``--checkpoint`` names/paths, or random ``--width`` models), each engine
configuration (torch fp32 eager, torch bf16 autocast, torch.compile, OpenVINO f32 / bf16)
and each window (network input side, ``--sizes``; 256 is the patch-by-patch path, larger
ones whole-tile inference), it times ``TileInferer.predict`` (uint8 windows in,
probabilities out: the engine's real per-call work) and reports **µs per output pixel**
(the figure that compares window sizes: a 256² input yields only 164² outputs), windows/s,
achieved GFLOP/s and the first call (OpenVINO compiles there). The same run measures the
machine's matmul GFLOP/s (``torch.mm`` fp32 and bf16) before and after, because a shared
machine's speed drifts. Each configuration's outputs are compared with torch fp32 eager on
the same windows; the bf16 figures only mean something for trained weights on real H&E
(``--image``): randomly initialised weights amplify rounding until bf16 scrambles them.

    python benchmarks/engine_latency.py --quick
    python benchmarks/engine_latency.py --checkpoint hovernet-fast-w025-imp90 --image tile.png \
        --sizes 256 512 768 1024 1536 --configs fp32_eager bf16 openvino_fp32 openvino_bf16
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from wsi_pipeline.engine.infer import InferenceConfig, TileInferer, bf16_supported
from wsi_pipeline.engine.macs import count_macs, count_params
from wsi_pipeline.engine.model import ChannelSpec, HoVerNet
from wsi_pipeline.engine.weights import load_model

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "engine_latency.json"

# name -> InferenceConfig fields; fp32_eager first: the others are compared with it.
CONFIGS: dict[str, dict[str, Any]] = {
    "fp32_eager": {"channels_last": False},
    "channels_last": {"channels_last": True},
    "bf16": {"channels_last": True, "bf16": True},
    "compile": {"channels_last": True, "compile": True},
    "compile_bf16": {"channels_last": True, "compile": True, "bf16": True},
    "openvino_fp32": {"runtime": "openvino"},
    "openvino_bf16": {"runtime": "openvino", "bf16": True},
}
DEFAULT_CONFIGS = ["fp32_eager", "bf16", "openvino_fp32", "openvino_bf16"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_gflops(device: torch.device, dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    """Best-of-``reps`` GFLOP/s of one n x n x n ``torch.mm`` (2 n³ FLOP): the machine's usable peak."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    torch.mm(a, b)  # warm-up: thread pool, packing buffers, clocks
    _sync(device)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def machine_peaks(device: torch.device) -> dict[str, float]:
    return {
        "fp32": round(matmul_gflops(device, torch.float32), 1),
        "bf16": round(matmul_gflops(device, torch.bfloat16), 1),
    }


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build_model(mode: str, width: float, num_types: int) -> torch.nn.Module:
    torch.manual_seed(0)
    spec = None if width == 1.0 else ChannelSpec.scaled(width, mode)
    return HoVerNet(mode=mode, num_types=num_types, spec=spec)


def input_patches(image: Path | None, batch: int, size: int, gen: torch.Generator) -> np.ndarray:
    """``batch`` uint8 (size, size, 3) windows: random pixels, or random crops of a real RGB image.

    Latency does not depend on the pixels; the comparison with fp32 eager does, so pass a
    real H&E ``--image`` (and a trained ``--checkpoint``) for meaningful differences.
    """
    if image is None:
        return torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8, generator=gen).numpy()
    pixels = np.asarray(Image.open(image).convert("RGB"))
    if min(pixels.shape[:2]) < size:  # a small image is mirrored up to the window
        grow = size - min(pixels.shape[:2])
        pixels = np.pad(pixels, ((0, grow), (0, grow), (0, 0)), mode="symmetric")
    ys = torch.randint(0, pixels.shape[0] - size + 1, (batch,), generator=gen).tolist()
    xs = torch.randint(0, pixels.shape[1] - size + 1, (batch,), generator=gen).tolist()
    return np.stack([pixels[y : y + size, x : x + size] for y, x in zip(ys, xs, strict=True)])


def time_config(
    inferer: TileInferer, patches: np.ndarray, warmup: int, iters: int
) -> tuple[float, list[float], dict[str, np.ndarray]]:
    """(first-call seconds, timed per-batch seconds, outputs of the last call)."""
    t0 = time.perf_counter()
    out = inferer.predict(patches)
    first = time.perf_counter() - t0
    for _ in range(warmup - 1):
        inferer.predict(patches)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        out = inferer.predict(patches)
        times.append(time.perf_counter() - t0)
    return first, times, out


def differences(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict[str, float | None]:
    """Max and mean abs differences per map, and the fraction of NP decisions that flip."""
    out: dict[str, float | None] = {}
    for key in ("np_prob", "hv", "tp_prob"):
        if key in a and key in b:
            d = np.abs(a[key] - b[key])
            out[f"{key}_max_abs"], out[f"{key}_mean_abs"] = float(d.max()), float(d.mean())
    out["np_flip_fraction"] = float(((a["np_prob"] > 0.5) != (b["np_prob"] > 0.5)).mean())
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    result: dict[str, Any] = {
        "benchmark": "engine_latency",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpu": cpu_name(),
            "device": str(device),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "threads": torch.get_num_threads(),
            "bf16_native": bf16_supported(device),
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "settings": {
            "mode": args.mode,
            "iters": args.iters,
            "warmup": args.warmup,
            "sizes": args.sizes,
            "batch_at_model_input_size": args.batch_256,
            "configs": args.configs,
            "num_types": args.num_types,
            "image": str(args.image) if args.image else None,
        },
        # Load average: on a shared machine it explains most run-to-run differences.
        "load_avg_before": [round(x, 2) for x in os.getloadavg()],
        "matmul_gflops_before": machine_peaks(device),
        "models": [],
    }
    print(f"matmul GFLOP/s (2048², before): {result['matmul_gflops_before']}", flush=True)
    gen = torch.Generator().manual_seed(0)
    models = [(f"checkpoint {c}", c, None) for c in args.checkpoint] or [(None, None, w) for w in args.width]
    for label, checkpoint, width in models:
        model = load_model(checkpoint) if checkpoint else build_model(args.mode, width, args.num_types)
        macs_per_patch = count_macs(model)
        entry: dict[str, Any] = {
            "width": width,
            "checkpoint": str(checkpoint) if checkpoint else None,
            "params": count_params(model),
            "gmac_per_patch": round(macs_per_patch / 1e9, 3),
            "input_size": model.input_size,
            "output_size": model.output_size,
            "runs": [],
        }
        print(f"\n{label or f'width {width}'}: {entry['params'] / 1e6:.2f} M params, "
              f"{entry['gmac_per_patch']} GMAC per {model.input_size}² patch", flush=True)
        print(f"{'config':>14} {'window':>6} {'batch':>5} {'us/out px':>9} {'win/s':>7} {'GFLOP/s':>8} "
              f"{'first s':>8} {'mean dNP':>9}")
        for size in args.sizes:
            output = model.output_size_for(size)
            # MACs scale with the input area for a fully convolutional network.
            gflop = 2 * macs_per_patch * (size / model.input_size) ** 2 / 1e9
            batch = args.batch_256 if size == model.input_size else 1
            windows = input_patches(args.image, batch, size, gen)
            reference: dict[str, np.ndarray] | None = None
            for name in args.configs:
                config = InferenceConfig(device=args.device, batch_size=batch, window=size, **CONFIGS[name])
                if config.compile:
                    torch.compiler.reset()  # many graphs would hit dynamo's recompile limit
                inferer = TileInferer(model, config)
                first, times, out = time_config(inferer, windows, args.warmup, args.iters)
                if name == "fp32_eager":
                    reference = out
                median = statistics.median(times)
                run_entry = {
                    "config": name,
                    "runtime": inferer.runtime.name,
                    "precision": inferer.runtime.precision,
                    "window": size,
                    "output": output,
                    "batch_size": batch,
                    "first_call_s": round(first, 3),
                    "batch_s": [round(t, 4) for t in times],
                    "us_per_output_px": round(median / (batch * output * output) * 1e6, 4),
                    "windows_per_s": round(batch / median, 3),
                    "achieved_gflops": round(gflop * batch / median, 1),
                }
                if reference is not None:
                    run_entry["vs_fp32_eager"] = differences(reference, out)
                entry["runs"].append(run_entry)
                d_np = run_entry.get("vs_fp32_eager", {}).get("np_prob_mean_abs")
                print(
                    f"{name:>14} {size:>6} {batch:>5} {run_entry['us_per_output_px']:>9.3f} "
                    f"{run_entry['windows_per_s']:>7.2f} {run_entry['achieved_gflops']:>8.1f} {first:>8.2f} "
                    + ("-" if d_np is None else f"{d_np:9.2e}"),
                    flush=True,
                )
        result["models"].append(entry)
        del model
    result["matmul_gflops_after"] = machine_peaks(device)
    result["load_avg_after"] = [round(x, 2) for x in os.getloadavg()]
    print(f"\nmatmul GFLOP/s (2048², after): {result['matmul_gflops_after']}", flush=True)
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=["fast", "original"], default="fast")
    parser.add_argument("--width", type=float, nargs="+", default=[1.0], help="channel width factors")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 768, 1024, 1280, 1536],
                        help="window (input) sides; the model's own input size runs as a batch of --batch-256")
    parser.add_argument("--batch-256", type=int, default=8, help="windows per call at the model's input size (8)")
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=DEFAULT_CONFIGS)
    parser.add_argument("--iters", type=int, default=2, help="timed iterations per (config, batch)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls first (>= 1: includes compile)")
    parser.add_argument("--quick", action="store_true", help="1 timed iteration, windows 256 and 768")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--checkpoint", nargs="+", default=[], help="trained models (names or paths), not --width")
    parser.add_argument("--image", type=Path, help="cut the input patches from this RGB image (default: random)")
    parser.add_argument("--num-types", type=int, default=5, help="TP classes incl. background (CoNSeP: 5)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON output path")
    args = parser.parse_args(argv)
    if args.quick:
        args.iters = 1
        args.sizes = [256, 768]
    if args.iters < 1 or args.warmup < 1:
        parser.error("--iters and --warmup must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(args.out.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(args.out)
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
