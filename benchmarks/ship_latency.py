"""Is the shipped default >= 3x faster than its dense parent on this CPU? (issue 6, shipping rule)

Both models are loaded in one process and timed interleaved (parent, default, parent, ...)
on the same random batch, fp32 and bf16, so machine noise hits both alike; the speedup is
the ratio of medians. More rounds than the study's quick check, since this figure decides
what ships.

    python benchmarks/ship_latency.py                       # default vs its parent, batch 4 and 8
    python benchmarks/ship_latency.py --model NAME --parent NAME --iters 10
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from _common import save_json

from wsi_pipeline.engine.macs import count_macs, count_params
from wsi_pipeline.engine.registry import default_model_name, list_models
from wsi_pipeline.engine.weights import load_model
from wsi_pipeline.prune.latency import measure_latency

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "ship_latency.json"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="default: the shipped default")
    p.add_argument("--parent", help="default: the model's parent in `wsi-pipeline models`")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[4, 8])
    p.add_argument("--iters", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    name = args.model or default_model_name()
    entries = {e.name: e for e in list_models()}
    parent_name = args.parent or (entries[name].parent if name in entries else None)
    if not parent_name:
        raise SystemExit(f"{name} lists no parent: pass --parent")
    models = {"parent": load_model(parent_name), "model": load_model(name)}
    result = {
        "model": name,
        "parent": parent_name,
        "params": {k: count_params(m) for k, m in models.items()},
        "macs": {k: count_macs(m) for k, m in models.items()},
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "batches": {},
    }
    for batch in args.batch_sizes:
        timed = measure_latency(models, batch_size=batch, iters=args.iters, warmup=args.warmup)
        row = {}
        for dtype in timed["model"]:
            m, par = timed["model"][dtype], timed["parent"][dtype]
            row[dtype] = {
                "model_ms_per_patch": m["ms_per_patch"],
                "parent_ms_per_patch": par["ms_per_patch"],
                "speedup": round(par["median_s"] / m["median_s"], 3),
                "model_times_s": m["times_s"],
                "parent_times_s": par["times_s"],
            }
            print(f"batch {batch} {dtype}: {name} {m['ms_per_patch']:.1f} ms/patch, {parent_name} "
                  f"{par['ms_per_patch']:.1f} ms/patch -> {row[dtype]['speedup']:.2f}x", flush=True)
        result["batches"][str(batch)] = row
    save_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
