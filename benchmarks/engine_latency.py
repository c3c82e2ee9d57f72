"""Per-patch latency of the HoVer-Net engine under each fast path, against the machine's peak.

For each model width and each engine configuration (fp32 eager NCHW, channels_last, bf16
autocast, torch.compile) and batch size, it times ``TileInferer.predict_patches`` (uint8
patches in, probabilities out: the engine's real per-batch work) and reports seconds per
patch, patches/s and achieved GFLOP/s. The same run measures the machine's matmul GFLOP/s
(``torch.mm`` fp32 and bf16), before and after the model timings, because a shared machine's
speed drifts: achieved / matmul GFLOP/s is the figure that stays comparable across machines.
Each configuration's outputs are also compared with fp32 eager on the same patches; the
bf16 figures only mean something for trained weights (``--checkpoint``) on real H&E
(``--image``): randomly initialised weights amplify rounding until bf16 scrambles them.

Full-width fast HoVer-Net costs ~300 GFLOP per 256² patch: on a 2-core CPU that is seconds
per patch, so keep ``--iters`` small (``--quick`` = 1 timed iteration, batches 1 and 4).

    python benchmarks/engine_latency.py --quick
    python benchmarks/engine_latency.py --width 1.0 0.25 --iters 3 --out results.json
    python benchmarks/engine_latency.py --checkpoint model.safetensors --image tile.png
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
}
DEFAULT_CONFIGS = ["fp32_eager", "channels_last", "bf16", "compile"]


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


def input_patches(image: Path | None, batch: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """``batch`` uint8 (size, size, 3) patches: random pixels, or random crops of a real RGB image.

    Latency does not depend on the pixels; the comparison with fp32 eager does, so pass a
    real H&E ``--image`` (and a trained ``--checkpoint``) for meaningful differences.
    """
    if image is None:
        return torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8, generator=gen)
    pixels = np.asarray(Image.open(image).convert("RGB"))
    if min(pixels.shape[:2]) < size:
        raise SystemExit(f"{image}: {pixels.shape[1]}x{pixels.shape[0]} px is smaller than a {size}² patch")
    ys = torch.randint(0, pixels.shape[0] - size + 1, (batch,), generator=gen).tolist()
    xs = torch.randint(0, pixels.shape[1] - size + 1, (batch,), generator=gen).tolist()
    return torch.from_numpy(np.stack([pixels[y : y + size, x : x + size] for y, x in zip(ys, xs, strict=True)]))


def time_config(
    inferer: TileInferer, patches: torch.Tensor, warmup: int, iters: int
) -> tuple[float, list[float], dict[str, torch.Tensor]]:
    """(first-call seconds, timed per-batch seconds, outputs of the last call)."""
    device = inferer.device
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = inferer.predict_patches(patches)
        _sync(device)
        first = time.perf_counter() - t0
        for _ in range(warmup - 1):
            inferer.predict_patches(patches)
            _sync(device)
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            out = inferer.predict_patches(patches)
            _sync(device)
            times.append(time.perf_counter() - t0)
    return first, times, {k: v.float().cpu() for k, v in out.items()}


def max_abs(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], key: str) -> float | None:
    if key not in a or key not in b:
        return None
    return float((a[key] - b[key]).abs().max())


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
            "batch_sizes": args.batch_sizes,
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
    models = [(f"checkpoint {args.checkpoint}", None)] if args.checkpoint else [(None, w) for w in args.width]
    for label, width in models:
        model = load_model(args.checkpoint) if args.checkpoint else build_model(args.mode, width, args.num_types)
        size = model.input_size
        macs = count_macs(model)
        gflop = 2 * macs / 1e9
        entry: dict[str, Any] = {
            "width": width,
            "checkpoint": str(args.checkpoint) if args.checkpoint else None,
            "params": count_params(model),
            "gmac_per_patch": round(macs / 1e9, 3),
            "gflop_per_patch": round(gflop, 3),
            "input_size": size,
            "output_size": model.output_size,
            "runs": [],
        }
        print(
            f"\n{label or f'width {width}'}: {entry['params'] / 1e6:.2f} M params, {gflop:.1f} GFLOP per {size}² patch",
            flush=True,
        )
        print(f"{'config':>14} {'batch':>5} {'s/patch':>9} {'patch/s':>8} {'GFLOP/s':>8} {'first s':>8} {'dNP':>8}")
        # The same patches for every config, so outputs can be compared with fp32 eager.
        batches = {b: input_patches(args.image, b, size, gen) for b in args.batch_sizes}
        reference: dict[int, dict[str, torch.Tensor]] = {}
        for name in args.configs:
            for batch in args.batch_sizes:
                config = InferenceConfig(device=args.device, batch_size=batch, **CONFIGS[name])
                if config.compile:
                    # Fresh compile caches: many (width, batch) graphs would hit dynamo's
                    # recompile limit and silently fall back to eager.
                    torch.compiler.reset()
                inferer = TileInferer(model, config)
                first, times, out = time_config(inferer, batches[batch], args.warmup, args.iters)
                if name == "fp32_eager":
                    reference[batch] = out
                median = statistics.median(times)
                run_entry = {
                    "config": name,
                    "batch_size": batch,
                    "uses_bf16": inferer.uses_bf16,
                    "first_call_s": round(first, 3),
                    "batch_s": [round(t, 4) for t in times],
                    "s_per_patch": round(median / batch, 4),
                    "patches_per_s": round(batch / median, 3),
                    "achieved_gflops": round(gflop * batch / median, 1),
                }
                ref = reference.get(batch)
                if ref is not None:
                    run_entry["vs_fp32_eager_max_abs"] = {
                        key: max_abs(ref, out, key) for key in ("np_prob", "hv", "tp_prob")
                    }
                entry["runs"].append(run_entry)
                d_np = run_entry.get("vs_fp32_eager_max_abs", {}).get("np_prob")
                print(
                    f"{name:>14} {batch:>5} {run_entry['s_per_patch']:>9.3f} {run_entry['patches_per_s']:>8.2f} "
                    f"{run_entry['achieved_gflops']:>8.1f} {first:>8.2f} " + ("-" if d_np is None else f"{d_np:.2e}"),
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
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=DEFAULT_CONFIGS)
    parser.add_argument("--iters", type=int, default=2, help="timed iterations per (config, batch)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls first (>= 1: includes compile)")
    parser.add_argument("--quick", action="store_true", help="1 timed iteration, batch sizes 1 and 4")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--checkpoint", type=Path, help="benchmark trained weights instead of --width models")
    parser.add_argument("--image", type=Path, help="cut the input patches from this RGB image (default: random)")
    parser.add_argument("--num-types", type=int, default=5, help="TP classes incl. background (CoNSeP: 5)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON output path")
    args = parser.parse_args(argv)
    if args.quick:
        args.iters = 1
        args.batch_sizes = [b for b in args.batch_sizes if b <= 4] or [1]
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
