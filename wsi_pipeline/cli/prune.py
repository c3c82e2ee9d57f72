"""`wsi-pipeline prune MODEL --method M --ratio R ... --out PATH`: prune a HoVer-Net.

Structured methods (l1, l2, slimming, imp) remove whole channels and write a physically
smaller model; unstructured ones zero single weights (same shapes, compressible file).
Fine-tuning data (``--finetune``) has the dev split's held-out tiles removed, so the
pruned model can still be evaluated on them. Parameters, MACs and latency of the model
before and after are printed, the latency measured in this process, interleaved.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from wsi_pipeline.errors import ConfigError

log = logging.getLogger(__name__)

METHOD_CHOICES = ("l1", "l2", "slimming", "imp", "unstructured-layer", "unstructured-global")
DEFAULT_ITERATIVE_STEPS = 3


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prune",
        help="prune a HoVer-Net (structured: L1, L2, Network Slimming, IMP; unstructured magnitude)",
        description="Prune a HoVer-Net checkpoint, optionally fine-tune it, and write the pruned model.",
    )
    p.add_argument("model", metavar="MODEL", help="checkpoint path or shipped model name")
    p.add_argument("--method", required=True, choices=METHOD_CHOICES,
                   help="importance criterion (structured) or magnitude masks (unstructured-*)")
    p.add_argument(
        "--ratio",
        required=True,
        type=float,
        help="fraction of parameters removed (structured) or of conv weights zeroed (unstructured)",
    )
    p.add_argument("--schedule", choices=("oneshot", "iterative"), help="default: oneshot (iterative if --steps > 1)")
    p.add_argument(
        "--steps", type=int, help=f"rounds of prune + fine-tune (iterative; default {DEFAULT_ITERATIVE_STEPS})"
    )
    p.add_argument(
        "--global",
        dest="global_ranking",
        action="store_true",
        default=None,
        help="rank channels network-wide instead of the same ratio per layer (default for slimming, imp)",
    )
    p.add_argument("--finetune", nargs="+", type=Path, metavar="DATASET", help="labelled datasets to fine-tune on")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--epochs", type=int, help="fine-tuning epochs (whole schedule)")
    budget.add_argument("--minutes", type=float, help="fine-tuning wall-clock minutes (whole schedule)")
    p.add_argument("--out", required=True, type=Path, help="pruned model file to write (.safetensors)")
    p.add_argument("--round-to", type=int, default=8, help="channel counts kept in multiples of this (default 8)")
    p.add_argument("--max-layer-ratio", type=float, default=0.9, help="no layer loses more than this (default 0.9)")
    p.add_argument("--no-lr-rewind", action="store_true", help="imp: fine-tune at a small LR instead of rewinding")
    p.add_argument("--dev-split", type=Path, help="YAML of held-out sources kept out of fine-tuning")
    p.add_argument("--batch-size", type=int, help="fine-tuning batch size (default 8)")
    p.add_argument("--threads", type=int, help="torch threads")
    p.add_argument("--latency-iters", type=int, default=3, help="timed rounds per model and precision (0: skip)")
    p.add_argument("--name", help="model name in its metadata (default: the --out stem)")
    p.add_argument("--description", help="one-line description for `wsi-pipeline models`")
    p.set_defaults(func=run)


def _schedule(args: argparse.Namespace) -> tuple[str, int]:
    schedule = args.schedule or ("iterative" if args.steps and args.steps > 1 else "oneshot")
    steps = args.steps if args.steps is not None else (DEFAULT_ITERATIVE_STEPS if schedule == "iterative" else 1)
    return schedule, steps


def _finetune(args: argparse.Namespace) -> Any:
    if not args.finetune:
        if args.epochs is not None or args.minutes is not None:
            raise ConfigError(None, "--epochs/--minutes given without --finetune", "add --finetune DATASET...")
        return None
    if args.epochs is None and args.minutes is None:
        raise ConfigError(None, "--finetune needs a budget", "add --epochs E or --minutes M")
    from wsi_pipeline.data import load_dataset, load_dev_split, split_dev
    from wsi_pipeline.prune.schedule import Finetune
    from wsi_pipeline.train import TrainConfig

    datasets = [load_dataset(path) for path in args.finetune]
    samples = [s for d in datasets for s in d.samples]
    dev_sources = load_dev_split(args.dev_split) if args.dev_split else load_dev_split()
    train_samples, held_out = split_dev(samples, dev_sources)
    log.info("fine-tuning on %d images (%d dev images held out)", len(train_samples), len(held_out))
    options: dict[str, Any] = {}
    if args.batch_size:
        options["batch_size"] = args.batch_size
    if args.threads:
        options["threads"] = args.threads
    return Finetune(
        train_samples,
        epochs=args.epochs,
        minutes=args.minutes,
        base=TrainConfig(**options),
        datasets=[str(p) for p in args.finetune],
        progress=True,
    )


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def _summary_rows(before: dict[str, Any], after: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    rows = [
        (
            "parameters",
            f"{before['params'] / 1e6:.3f} M",
            f"{after['params'] / 1e6:.3f} M",
            f"-{100 * (1 - after['params'] / before['params']):.1f}%",
        ),
        (
            "GMAC / patch",
            f"{before['macs'] / 1e9:.3f}",
            f"{after['macs'] / 1e9:.3f}",
            f"-{100 * (1 - after['macs'] / before['macs']):.1f}%",
        ),
    ]
    for dtype, lat in (after.get("latency") or {}).items():
        rows.append(
            (
                f"latency {dtype}, batch 4",
                f"{lat['parent_s']:.3f} s",
                f"{lat['model_s']:.3f} s",
                f"{lat['speedup']:.2f}x faster",
            )
        )
    return rows


def run(args: argparse.Namespace) -> int:
    import torch

    from wsi_pipeline.engine.macs import count_macs, count_params
    from wsi_pipeline.engine.weights import load_model, save_model
    from wsi_pipeline.prune.latency import compare_latency
    from wsi_pipeline.prune.schedule import PruneConfig, run_pruning
    from wsi_pipeline.prune.unstructured import sparsity, storage_sizes

    if args.threads:
        torch.set_num_threads(args.threads)
    schedule, steps = _schedule(args)
    cfg = PruneConfig(
        method=args.method,
        ratio=args.ratio,
        schedule=schedule,
        steps=steps,
        global_ranking=args.global_ranking,
        round_to=args.round_to,
        max_layer_ratio=args.max_layer_ratio,
        lr_rewind=not args.no_lr_rewind,
    )
    if args.latency_iters < 0:
        raise ConfigError(None, f"--latency-iters {args.latency_iters} must be >= 0", "use e.g. 3, or 0 to skip")
    parent = load_model(args.model)
    finetune = _finetune(args)
    outcome = run_pruning(parent, cfg, finetune)
    pruned = outcome.model

    before = {"params": count_params(parent), "macs": count_macs(parent)}
    after: dict[str, Any] = {"params": count_params(pruned), "macs": count_macs(pruned)}
    if args.latency_iters:
        after["latency"] = compare_latency(pruned, parent, batch_size=4, iters=args.latency_iters, warmup=1)
    lineage = dict(outcome.lineage)
    if after.get("latency"):
        lineage["latency"] = after["latency"]
    parent_meta = dict(getattr(parent, "meta", {}) or {})
    if parent_meta.get("lineage"):
        lineage["parent_lineage"] = parent_meta["lineage"]
    name = args.name or args.out.name.split(".")[0]
    dropped = ("path", "format", "spec", "mode", "num_types", "metrics", "lineage", "name", "description")
    meta = {k: v for k, v in parent_meta.items() if k not in dropped}
    meta.update(
        name=name,
        description=args.description or f"{args.method} pruned ({args.ratio:.0%}, {schedule}) from {lineage['parent']}",
        params=after["params"],
        macs=after["macs"],
        lineage=lineage,
        metrics={},
    )
    if not cfg.structured:
        stats = sparsity(pruned)
        after["sparsity"] = {k: stats[k] for k in ("prunable", "overall")}
        after["storage"] = storage_sizes(pruned, meta)
        meta["sparsity"] = after["sparsity"]
        meta["storage_bytes"] = after["storage"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    written = save_model(pruned, args.out, meta)

    print(f"{args.method} {schedule} (steps {steps}) ratio {args.ratio}: {lineage['parent']} -> {written}")
    rows = _summary_rows(before, after)
    print(f"{'':26} {'before':>14} {'after':>14}  change")
    for label, b, a, change in rows:
        print(f"{label:26} {b:>14} {a:>14}  {change}")
    if "sparsity" in after:
        s = after["sparsity"]
        print(f"sparsity: {s['prunable']:.4f} of conv weights, {s['overall']:.4f} of all parameters")
        st = after["storage"]
        print(
            f"storage: dense {_mb(st['dense'])} (gzip {_mb(st['dense_gzip'])}), "
            f"sparse bitmask+values {_mb(st['sparse'])} (gzip {_mb(st['sparse_gzip'])})"
        )
    if lineage.get("finetune"):
        ft = lineage["finetune"]
        print(f"fine-tuning: {ft['optimizer_steps']} steps, {ft['train_minutes']:.1f} min on {ft['samples']} images")
    print(
        json.dumps(
            {
                "out": str(written),
                "params": after["params"],
                "macs": after["macs"],
                "achieved_ratio": lineage["achieved_ratio"],
            }
        )
    )
    return 0
