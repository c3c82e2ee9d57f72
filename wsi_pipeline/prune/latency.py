"""Latency of pruned models against their parent, measured in the same process.

This machine's speed drifts by up to 50% between minutes (shared cores, a training job
beside us), so a pruned model timed today against a parent timed yesterday says nothing.
Here every model is timed *interleaved*: each round runs one batch of every model in
every precision before the next round starts, so drift hits them all alike, and the
median over rounds is reported. Batch 4 of full-size patches (256 px in fast mode),
channels_last, as the engine runs them; fp32 and bf16 autocast. bf16 is only fast where
the CPU computes it natively (AVX-512 BF16 / AMX); elsewhere it is emulated and slower,
which the figures then show rather than hide.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from wsi_pipeline.errors import ConfigError

__all__ = ["DTYPES", "compare_latency", "measure_latency"]

DTYPES = ("fp32", "bf16")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def measure_latency(
    models: Mapping[str, nn.Module],
    *,
    batch_size: int = 4,
    input_size: int | None = None,
    dtypes: Sequence[str] = DTYPES,
    warmup: int = 1,
    iters: int = 3,
    device: str = "cpu",
    threads: int | None = None,
) -> dict[str, dict[str, dict[str, Any]]]:
    """Seconds per batch of each model in each precision: ``result[name][dtype]``.

    Each entry holds ``median_s``, ``min_s``, ``times_s`` (every timed round) and
    ``ms_per_patch``. Models are switched to eval mode and channels_last in place.
    """
    unknown = [d for d in dtypes if d not in DTYPES]
    if unknown or not dtypes:
        raise ConfigError(None, f"unknown precision(s) {unknown or dtypes}", f"use some of {list(DTYPES)}")
    if iters < 1 or warmup < 0 or batch_size < 1:
        raise ConfigError(None, f"iters={iters}, warmup={warmup}, batch_size={batch_size}", "use iters >= 1")
    if threads is not None:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    if input_size is None:
        sizes = {int(getattr(m, "input_size", 256)) for m in models.values()}
        if len(sizes) != 1:
            raise ConfigError(None, f"models take different input sizes {sorted(sizes)}", "pass input_size=")
        input_size = sizes.pop()
    for model in models.values():
        model.eval()
        model.to(device=dev, memory_format=torch.channels_last)
    generator = torch.Generator().manual_seed(0)
    x = (torch.rand(batch_size, 3, input_size, input_size, generator=generator) * 255).to(dev)
    x = x.contiguous(memory_format=torch.channels_last)
    times: dict[str, dict[str, list[float]]] = {name: {d: [] for d in dtypes} for name in models}
    for round_ in range(warmup + iters):
        for dtype in dtypes:
            for name, model in models.items():
                with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dtype == "bf16"):
                    _sync(dev)
                    start = time.perf_counter()
                    model(x)
                    _sync(dev)
                    elapsed = time.perf_counter() - start
                if round_ >= warmup:
                    times[name][dtype].append(elapsed)
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for name, per_dtype in times.items():
        out[name] = {}
        for dtype, values in per_dtype.items():
            median = statistics.median(values)
            out[name][dtype] = {
                "median_s": round(median, 5),
                "min_s": round(min(values), 5),
                "times_s": [round(v, 5) for v in values],
                "ms_per_patch": round(1000.0 * median / batch_size, 3),
            }
    return out


def compare_latency(model: nn.Module, parent: nn.Module, **kwargs: Any) -> dict[str, dict[str, float]]:
    """``{dtype: {model_s, parent_s, speedup}}``: median seconds per batch, parent / model."""
    result = measure_latency({"model": model, "parent": parent}, **kwargs)
    out = {}
    for dtype in result["model"]:
        m, p = result["model"][dtype]["median_s"], result["parent"][dtype]["median_s"]
        out[dtype] = {"model_s": m, "parent_s": p, "speedup": round(p / m, 3) if m > 0 else float("nan")}
    return out
