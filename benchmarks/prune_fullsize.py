"""What structured pruning does to the real, full-width fast HoVer-Net (37.6 M parameters).

Random weights (accuracy is not the point; no fine-tuning): each structured criterion
prunes the full-width model to {0.5, 0.7, 0.9} of its parameters removed, with its
default ranking (L1/L2 the same ratio per layer, Network Slimming and IMP network-wide),
and every distinct resulting architecture is timed against the dense model in this
process, interleaved (batch 4 on CPU by default; ``--device cuda --batch 16`` on a GPU).

L1 and L2 with uniform ratios choose *which* channels go differently but keep the same
*number* per layer, so their architectures, and hence their figures, coincide: each
distinct architecture is timed once. Freshly initialised BatchNorm gammas are all 1,
which would make Network Slimming's ranking a tie; they are drawn from U(0.05, 1) so the
network-wide allocation is exercised (on a trained model it follows the learned gammas).

Full width costs ~300 GFLOP per 256² patch: on a 2-core CPU one batch of 4 takes tens of
seconds, so the defaults time one round after one warm-up.

    python benchmarks/prune_fullsize.py                       # CPU, batch 4, fp32 + bf16
    python benchmarks/prune_fullsize.py --device cuda --batch 16 --iters 5
    python benchmarks/prune_fullsize.py --width 0.125 --iters 1  # quick smoke test
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from wsi_pipeline.engine.macs import count_macs, count_params
from wsi_pipeline.engine.model import ChannelSpec, HoVerNet
from wsi_pipeline.prune.importance import CRITERIA
from wsi_pipeline.prune.latency import measure_latency
from wsi_pipeline.prune.structured import prune_channels

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "benchmarks" / "results" / "prune_fullsize.json"
GLOBAL_BY_DEFAULT = {"slimming", "imp"}

log = logging.getLogger("prune_fullsize")


def spec_key(model: HoVerNet) -> str:
    return hashlib.sha1(json.dumps(model.spec.to_dict(), sort_keys=True).encode()).hexdigest()[:12]


def build_parent(width: float, seed: int = 0) -> HoVerNet:
    torch.manual_seed(seed)
    spec = ChannelSpec.full("fast") if width == 1.0 else ChannelSpec.scaled(width)
    model = HoVerNet("fast", 6, spec).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(0.05 + 0.95 * torch.rand(m.num_features, generator=generator))
    return model


def markdown(rows: list[dict[str, Any]], dtypes: list[str]) -> str:
    head = "| criterion | ranking | ratio | removed | params (M) | GFLOP / patch |"
    head += "".join(f" {d} ms/patch | {d} speedup |" for d in dtypes)
    sep = "|---|---|---:|---:|---:|---:|" + "---:|---:|" * len(dtypes)
    lines = [head, sep]
    for r in rows:
        line = (
            f"| {r['criterion']} | {r['ranking']} | {r['ratio']:g} | {r['removed']:.3f} | "
            f"{r['params'] / 1e6:.2f} | {r['gflop']:.1f} |"
        )
        for d in dtypes:
            lat = r["latency"][d]
            line += f" {lat['ms_per_patch']:.0f} | {lat['speedup']:.2f} |"
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--width", type=float, default=1.0, help="channel multiplier (1.0 = the real 37.6 M model)")
    p.add_argument("--criteria", nargs="+", default=list(CRITERIA), choices=list(CRITERIA))
    p.add_argument("--ratios", nargs="+", type=float, default=[0.5, 0.7, 0.9])
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--iters", type=int, default=1, help="timed rounds (after one warm-up)")
    p.add_argument("--threads", type=int)
    p.add_argument("--round-to", type=int, default=8)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)

    parent = build_parent(args.width)
    parent_params, parent_macs = count_params(parent), count_macs(parent)
    log.info("parent: %.2f M parameters, %.1f GFLOP per patch", parent_params / 1e6, 2 * parent_macs / 1e9)
    rows: list[dict[str, Any]] = []
    models: dict[str, HoVerNet] = {"parent": parent}
    for criterion in args.criteria:
        c = CRITERIA[criterion]
        global_ranking = criterion in GLOBAL_BY_DEFAULT
        for ratio in args.ratios:
            t0 = time.perf_counter()
            result = prune_channels(
                parent, c.scorer, ratio, global_ranking=global_ranking, normalize=c.normalize, round_to=args.round_to
            )
            key = spec_key(result.model)
            models.setdefault(key, result.model)
            rows.append(
                {
                    "criterion": criterion,
                    "ranking": "global" if global_ranking else "uniform",
                    "ratio": ratio,
                    "removed": round(result.removed_fraction, 4),
                    "params": result.params_after,
                    "gflop": round(2 * count_macs(result.model) / 1e9, 2),
                    "architecture": key,
                    "prune_seconds": round(time.perf_counter() - t0, 1),
                }
            )
            log.info("%s %.2f: %.3f removed (%s)", criterion, ratio, result.removed_fraction, key)
    log.info("timing %d distinct models (incl. the parent) on %s, batch %d", len(models), args.device, args.batch)
    latency = measure_latency(
        models, batch_size=args.batch, dtypes=args.dtypes, warmup=1, iters=args.iters, device=args.device
    )
    for row in rows:
        own, base = latency[row["architecture"]], latency["parent"]
        row["latency"] = {
            d: {**own[d], "speedup": round(base[d]["median_s"] / own[d]["median_s"], 3)} for d in args.dtypes
        }
    device_name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"
    result = {
        "width": args.width,
        "parent": {"params": parent_params, "gflop": round(2 * parent_macs / 1e9, 2), "latency": latency["parent"]},
        "device": device_name,
        "batch": args.batch,
        "threads": torch.get_num_threads(),
        "iters": args.iters,
        "round_to": args.round_to,
        "torch": torch.__version__,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    base = latency["parent"]
    print(
        f"dense: {parent_params / 1e6:.2f} M parameters, {2 * parent_macs / 1e9:.1f} GFLOP/patch, "
        + ", ".join(f"{d} {base[d]['ms_per_patch']:.0f} ms/patch" for d in args.dtypes)
        + f" ({device_name}, batch {args.batch})"
    )
    print(markdown(rows, args.dtypes))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
