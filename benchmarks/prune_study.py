"""The pruning study: which criterion, schedule and ratio keep HoVer-Net accurate on this CPU?

Grid (issue 6, item 6), every point starting from the same dense parent with the same
fine-tuning budget (``--minutes-per-point`` of training time on the parent's training
data, dev tiles held out):

* structured: {l1, l2, slimming, imp} x {oneshot, iterative (``--steps``)} x ratios
  {0.3, 0.5, 0.7, 0.9} of the parameters removed: 32 points;
* unstructured: {layer-wise, network-wide} x sparsities {0.5, 0.75, 0.875, 0.9375, 0.95},
  fine-tuned with their masks: 10 points.

Each point is evaluated on the dev split (``configs/dev_split.yaml``: PQ, AJI, Dice,
detection F1, mPQ) and timed against the parent *in the same process*, interleaved
(batch 4, fp32 and bf16). Results go to JSON after every point; a rerun skips the
points already there (the parent's checksum must match, so results of two different
parents are never mixed). ``--report-only`` rewrites ``docs/pruning.md`` and its plots
from the JSON.

Budget (2-core CPU, width x0.25 parent, 2.37 M parameters): a dev evaluation costs
~1-2 min (the parent's is timed first and the projected total printed), the latency
comparison ~10 s, pruning itself seconds. With the default 1 min of fine-tuning per point
the 42 points take about 42 x (1 + ~1.5) min = ~1 h 45 min.

    python benchmarks/prune_study.py --parent /work/runs/hovernet-fast-w025.safetensors
    python benchmarks/prune_study.py --parent ... --only 'l1-*-0.7' 'unstructured-*-0.9375'
    python benchmarks/prune_study.py --report-only
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import logging
import os
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from wsi_pipeline.config import file_checksum

REPO = Path(__file__).resolve().parents[1]
DEFAULT_JSON = REPO / "benchmarks" / "results" / "prune_study.json"
DEFAULT_DOCS = REPO / "docs" / "pruning.md"
DEFAULT_MODELS = REPO.parent / "runs" / "prune_study"
DEFAULT_FULLSIZE = [
    REPO / "benchmarks" / "results" / "prune_fullsize.json",
    REPO / "benchmarks" / "results" / "prune_fullsize_gpu.json",
]
SHIPPED = REPO / "models" / "hovernet-fast-w025-imp90.safetensors"
SHIPPED_EVAL = REPO / "docs" / "eval" / "hovernet-fast-w025-imp90-study-dev.json"
DEFAULT_DATA = [
    REPO.parent / "shared" / "data" / "consep" / "train",
    REPO.parent / "shared" / "data" / "monuseg" / "train",
]

STRUCTURED_METHODS = ("l1", "l2", "slimming", "imp")
SCHEDULES = ("oneshot", "iterative")
STRUCTURED_RATIOS = (0.3, 0.5, 0.7, 0.9)
UNSTRUCTURED_METHODS = ("unstructured-layer", "unstructured-global")
UNSTRUCTURED_RATIOS = (0.5, 0.75, 0.875, 0.9375, 0.95)
CONTROL_LRS = (1.0e-4, 1.0e-3)  # PruneConfig.finetune_lr and IMP's rewind LR (the parent's training LR)
METRICS = ("pq", "aji", "dice", "f1_detection", "mpq")
COLORS = {
    "l1": "tab:blue",
    "l2": "tab:orange",
    "slimming": "tab:green",
    "imp": "tab:red",
    "unstructured-layer": "tab:purple",
    "unstructured-global": "tab:brown",
    "control": "black",
}
NEGLIGIBLE_PQ = 0.01  # "negligible loss": at most 1 PQ point, the shipping criterion of issue 6
SHIP = {"removed": 0.70, "pq_drop": 0.01, "speedup": 3.0}

log = logging.getLogger("prune_study")


# ---------------------------------------------------------------------------------------------
# The grid
# ---------------------------------------------------------------------------------------------
def point_id(method: str, schedule: str, ratio: float) -> str:
    return f"{method}-{schedule}-{ratio:g}"


def grid(steps: int) -> list[dict[str, Any]]:
    """Every point, the ones the two claims hinge on (0.7, 0.9375) first so partial runs say something."""
    points = []
    for ratio in (0.7, 0.9, 0.5, 0.3):
        for method in STRUCTURED_METHODS:
            for schedule in SCHEDULES:
                points.append(
                    {
                        "id": point_id(method, schedule, ratio),
                        "method": method,
                        "schedule": schedule,
                        "steps": 1 if schedule == "oneshot" else steps,
                        "ratio": ratio,
                    }
                )
    for ratio in (0.9375, 0.5, 0.95, 0.75, 0.875):
        for method in UNSTRUCTURED_METHODS:
            points.append(
                {
                    "id": point_id(method, "oneshot", ratio),
                    "method": method,
                    "schedule": "oneshot",
                    "steps": 1,
                    "ratio": ratio,
                }
            )
    # Controls: the parent fine-tuned with the same budget, nothing removed, at the one-shot
    # fine-tuning LR and at IMP's rewound LR. Without them "pruned beats parent" is ambiguous.
    controls = [
        {"id": f"control-lr{lr:g}", "method": "control", "schedule": "oneshot", "steps": 1, "ratio": 0.0, "lr": lr}
        for lr in CONTROL_LRS
    ]
    # Structured 0.7/0.9 first, then the unstructured points, then the remaining structured ones.
    structured_first = [p for p in points if p["method"] in STRUCTURED_METHODS and p["ratio"] >= 0.7]
    unstructured = [p for p in points if p["method"] in UNSTRUCTURED_METHODS]
    rest = [p for p in points if p not in structured_first and p not in unstructured]
    return controls + structured_first + unstructured + rest


# ---------------------------------------------------------------------------------------------
# Results file
# ---------------------------------------------------------------------------------------------
def load_results(path: Path) -> dict[str, Any]:
    if path.is_file():
        return json.loads(path.read_text())
    return {"points": {}}


def save_results(path: Path, results: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(path)


def machine() -> dict[str, Any]:
    name = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    return {"cpu": name, "cores": os.cpu_count(), "torch": torch.__version__, "python": sys.version.split()[0]}


# ---------------------------------------------------------------------------------------------
# Running points
# ---------------------------------------------------------------------------------------------
def dev_scores(model: torch.nn.Module, samples: list, threads: int, device: str = "cpu") -> dict[str, Any]:
    """Dev metrics in fp32 everywhere, so points scored on a GPU and on a CPU are comparable."""
    from wsi_pipeline.engine.infer import InferenceConfig
    from wsi_pipeline.engine.postproc import PostprocConfig
    from wsi_pipeline.evaluate import evaluate_samples

    config = InferenceConfig(batch_size=8, threads=threads, bf16=False, device=device)
    scores = evaluate_samples(model, samples, config, PostprocConfig())
    model.to("cpu")
    out = {k: scores.get(k) for k in (*METRICS, "aji_plus", "dq", "sq", "f1_type", "n_images", "seconds")}
    out["pq_per_type"] = scores.get("pq_per_type")
    return out


def run_point(
    point: dict[str, Any],
    parent: torch.nn.Module,
    train: list,
    dev: list,
    args: argparse.Namespace,
    data_names: list[str],
) -> dict[str, Any]:
    from wsi_pipeline.engine.macs import count_macs, count_params
    from wsi_pipeline.engine.weights import save_model
    from wsi_pipeline.prune.latency import compare_latency
    from wsi_pipeline.prune.schedule import Finetune, PruneConfig, run_control, run_pruning
    from wsi_pipeline.prune.unstructured import sparsity, storage_sizes
    from wsi_pipeline.train import TrainConfig

    started = time.perf_counter()
    base = TrainConfig(
        batch_size=args.batch_size, threads=args.threads, seed=0, device=args.device, workers=args.workers
    )
    finetune = Finetune(
        train, minutes=args.minutes_per_point, epochs=args.epochs_per_point, base=base, datasets=data_names
    )
    if point["method"] == "control":
        outcome = run_control(parent, finetune, point["lr"])
    else:
        cfg = PruneConfig(point["method"], point["ratio"], point["schedule"], point["steps"])
        outcome = run_pruning(parent, cfg, finetune)
    model = outcome.model
    t_eval = time.perf_counter()
    dev_result = dev_scores(model, dev, args.threads, args.device)
    eval_s = time.perf_counter() - t_eval
    latency = None
    if args.latency_iters > 0:
        latency = compare_latency(
            model, parent, batch_size=4, iters=args.latency_iters, warmup=1, threads=args.threads
        )
    record: dict[str, Any] = {
        **point,
        "kind": outcome.lineage["kind"],
        "global": outcome.lineage["global"],
        "achieved_ratio": outcome.lineage["achieved_ratio"],
        "params": count_params(model),
        "macs": count_macs(model),
        "dev": dev_result,
        "latency": latency,
        "finetune": {k: outcome.lineage["finetune"][k] for k in ("train_minutes", "optimizer_steps")},
        "rounds": outcome.rounds,
        "eval_seconds": round(eval_s, 1),
        "spec": model.spec.to_dict(),
        "finetune_device": args.device,
    }
    meta = {
        k: v
        for k, v in (getattr(parent, "meta", {}) or {}).items()
        if k not in ("path", "format", "spec", "mode", "num_types", "metrics", "lineage", "name", "description")
    }
    meta.update(
        name=f"study-{point['id']}",
        description=f"pruning study point {point['id']}",
        params=record["params"],
        macs=record["macs"],
        lineage={**outcome.lineage, "latency": latency},
        metrics={"dev": {k: v for k, v in dev_result.items() if k != "pq_per_type"}},
    )
    if record["kind"] == "unstructured":
        stats = sparsity(model)
        record["sparsity"] = {"prunable": stats["prunable"], "overall": stats["overall"]}
        record["nonzero_params"] = int(round(count_params(model) - stats["zero_weights"]))
        record["storage_bytes"] = storage_sizes(model, meta)
        meta["storage_bytes"] = record["storage_bytes"]
    args.models_dir.mkdir(parents=True, exist_ok=True)
    record["model_path"] = str(save_model(model, args.models_dir / f"{point['id']}.safetensors", meta))
    record["seconds"] = round(time.perf_counter() - started, 1)
    record["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
    return record


def run_study(args: argparse.Namespace) -> dict[str, Any]:
    from wsi_pipeline.data import load_dataset, load_dev_split, split_dev
    from wsi_pipeline.engine.macs import count_macs, count_params
    from wsi_pipeline.engine.weights import load_model
    from wsi_pipeline.prune.latency import measure_latency
    from wsi_pipeline.prune.schedule import PruneConfig

    torch.set_num_threads(args.threads)
    parent_sha = file_checksum(args.parent)
    results = load_results(args.json)
    if results.get("parent") and results["parent"]["sha256"] != parent_sha:
        raise SystemExit(
            f"{args.json} holds results for another parent ({results['parent']['path']}, sha256 "
            f"{results['parent']['sha256'][:12]}...): pass a new --json, or delete it to start over"
        )
    parent = load_model(args.parent)
    datasets = [load_dataset(p) for p in args.data]
    samples = [s for d in datasets for s in d.samples]
    train, dev = split_dev(samples, load_dev_split(args.dev_split) if args.dev_split else load_dev_split())
    train, dev = list(train), list(dev)
    if args.dev_limit:
        dev = dev[: args.dev_limit]
    study_config = {
        "minutes_per_point": args.minutes_per_point,
        "epochs_per_point": args.epochs_per_point,
        "finetune_device": args.device,
        "steps": args.steps,
        "threads": args.threads,
        "batch_size": args.batch_size,
        "latency_iters": args.latency_iters,
        "dev_images": len(dev),
        "train_images": len(train),
        "data": [str(p) for p in args.data],
        "round_to": PruneConfig.round_to,
        "max_layer_ratio": PruneConfig.max_layer_ratio,
    }
    if results.get("config") and results["config"] != study_config:
        raise SystemExit(f"{args.json} was made with other settings {results['config']}: pass a new --json")
    results["config"] = study_config
    results.setdefault("machine", machine())
    if not results.get("parent"):
        t0 = time.perf_counter()
        parent_dev = dev_scores(parent, dev, args.threads, args.device)
        eval_s = time.perf_counter() - t0
        latency = None
        if args.latency_iters > 0:
            latency = measure_latency({"parent": parent}, batch_size=4, iters=args.latency_iters, warmup=1)["parent"]
        results["parent"] = {
            "path": str(args.parent),
            "sha256": parent_sha,
            "name": parent.meta.get("name"),
            "params": count_params(parent),
            "macs": count_macs(parent),
            "dev": parent_dev,
            "latency": latency,
            "eval_seconds": round(eval_s, 1),
        }
        save_results(args.json, results)
    todo = [p for p in grid(args.steps) if not args.only or any(fnmatch.fnmatch(p["id"], pat) for pat in args.only)]
    todo = [p for p in todo if p["id"] not in results["points"]]
    if args.minutes_per_point:
        per_point = args.minutes_per_point + (results["parent"]["eval_seconds"] + 20) / 60
        print(
            f"{len(todo)} points to run; projected <= {len(todo) * per_point:.0f} min "
            f"({args.minutes_per_point} min fine-tuning + <= {per_point - args.minutes_per_point:.1f} min "
            "evaluation/latency each)",
            flush=True,
        )
    else:
        print(f"{len(todo)} points to run, {args.epochs_per_point} fine-tuning epochs each", flush=True)
    data_names = [str(p) for p in args.data]
    for i, point in enumerate(todo):
        log.info("point %d/%d: %s", i + 1, len(todo), point["id"])
        try:
            record = run_point(point, parent, train, dev, args, data_names)
        except Exception as exc:  # one broken point must not end a two-hour background run
            log.exception("point %s failed; it will be retried on the next run", point["id"])
            results.setdefault("failed", {})[point["id"]] = f"{type(exc).__name__}: {exc}"
            save_results(args.json, results)
            continue
        results.get("failed", {}).pop(point["id"], None)
        results["points"][point["id"]] = record
        save_results(args.json, results)
        speed = f"fp32 {record['latency']['fp32']['speedup']:.2f}x, " if record["latency"] else ""
        print(
            f"[{i + 1}/{len(todo)}] {point['id']}: removed {record['achieved_ratio']:.3f}, "
            f"PQ {record['dev']['pq']:.4f} (parent {results['parent']['dev']['pq']:.4f}), "
            f"{speed}{record['seconds']:.0f} s",
            flush=True,
        )
    return results


# ---------------------------------------------------------------------------------------------
# Shards (parallel runs, e.g. on a GPU machine) and CPU timing afterwards
# ---------------------------------------------------------------------------------------------
def merge_results(target: Path, shards: list[Path]) -> dict[str, Any]:
    """Fold the points of shard JSONs into ``target``; shards of another parent or config are refused."""
    results = load_results(target)
    for shard_path in shards:
        shard = load_results(shard_path)
        if not shard.get("parent"):
            raise SystemExit(f"{shard_path} has no parent record: not a prune_study result")
        if results.get("parent") and results["parent"]["sha256"] != shard["parent"]["sha256"]:
            raise SystemExit(f"{shard_path} was made from another parent than {target}")
        if results.get("config") and results["config"] != shard["config"]:
            raise SystemExit(f"{shard_path} was made with other settings than {target}: {shard['config']}")
        results.setdefault("parent", shard["parent"])
        results.setdefault("config", shard["config"])
        results.setdefault("machine", shard.get("machine"))
        for pid, record in shard["points"].items():
            results["points"].setdefault(pid, record)
        for pid, reason in (shard.get("failed") or {}).items():
            if pid not in results["points"]:
                results.setdefault("failed", {})[pid] = reason
    for pid in list(results.get("failed", {})):
        if pid in results["points"]:
            del results["failed"][pid]
    save_results(target, results)
    print(f"{target}: {len(results['points'])} points after merging {len(shards)} shard(s)")
    return results


def architecture_of(record: dict[str, Any], parent: torch.nn.Module) -> torch.nn.Module:
    """A model that runs exactly like the point's: latency depends on shapes and zeros, not on values.

    Structured points are rebuilt from their channel spec; unstructured points are the parent
    with the magnitude masks of their ratio, which is the zero pattern fine-tuning kept.
    """
    import copy

    from wsi_pipeline.engine.model import ChannelSpec, HoVerNet
    from wsi_pipeline.prune.schedule import UNSTRUCTURED
    from wsi_pipeline.prune.unstructured import apply_masks, magnitude_masks

    if record["kind"] == "unstructured":
        model = copy.deepcopy(parent)
        with torch.no_grad():
            apply_masks(model, magnitude_masks(model, record["ratio"], UNSTRUCTURED[record["method"]]))
        return model
    torch.manual_seed(0)
    return HoVerNet(parent.mode, parent.num_types, ChannelSpec.from_dict(record["spec"])).eval()


def retime(args: argparse.Namespace) -> dict[str, Any]:
    """CPU latency (batch 4, fp32 and bf16, interleaved with the parent) for points that lack it."""
    from wsi_pipeline.engine.weights import load_model
    from wsi_pipeline.prune.latency import compare_latency, measure_latency

    torch.set_num_threads(args.threads)
    results = load_results(args.json)
    if not results.get("parent"):
        raise SystemExit(f"{args.json} has no results yet: run the study first")
    parent_path = args.parent or Path(results["parent"]["path"])
    if file_checksum(parent_path) != results["parent"]["sha256"]:
        raise SystemExit(f"{parent_path} is not the parent the study in {args.json} was run from")
    parent = load_model(parent_path)
    iters = args.latency_iters or 3
    if not results["parent"].get("latency"):
        results["parent"]["latency"] = measure_latency({"parent": parent}, batch_size=4, iters=iters, warmup=1)[
            "parent"
        ]
    results.setdefault("config", {})["retime"] = {
        "machine": machine(),
        "latency_iters": iters,
        "threads": torch.get_num_threads(),
    }
    todo = [pid for pid, r in results["points"].items() if not r.get("latency")]
    for i, pid in enumerate(todo):
        record = results["points"][pid]
        model = architecture_of(record, parent)
        record["latency"] = compare_latency(model, parent, batch_size=4, iters=iters, warmup=1)
        record["latency_source"] = "timed on this CPU from the point's architecture (and zero pattern)"
        save_results(args.json, results)
        print(f"[{i + 1}/{len(todo)}] {pid}: fp32 {record['latency']['fp32']['speedup']:.2f}x, "
              f"bf16 {record['latency']['bf16']['speedup']:.2f}x", flush=True)
    return results


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------
def _f(value: Any, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _delta(value: float | None, base: float | None) -> str:
    if value is None or base is None:
        return "-"
    return f"{value - base:+.4f}"


def _point_rows(results: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    order = {
        p["id"]: i
        for i, p in enumerate(
            sorted(
                grid(results.get("config", {}).get("steps", 3)), key=lambda p: (p["method"], p["schedule"], p["ratio"])
            )
        )
    }
    rows = [r for r in results["points"].values() if r["kind"] == kind]
    return sorted(rows, key=lambda r: order.get(r["id"], 1e9))


def structured_table(results: dict[str, Any]) -> list[str]:
    parent = results["parent"]
    lines = [
        "| method | schedule | ratio | removed | params (M) | GMAC | fp32 ms/patch | speedup fp32 | speedup bf16 "
        "| PQ | ΔPQ | AJI | Dice | F1 det | mPQ | ft steps (min) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| parent | - | 0 | 0 | {parent['params'] / 1e6:.3f} | {parent['macs'] / 1e9:.2f} | "
        f"{parent['latency']['fp32']['ms_per_patch']:.0f} | 1.00 | 1.00 | {_f(parent['dev']['pq'])} | - | "
        f"{_f(parent['dev']['aji'])} | {_f(parent['dev']['dice'])} | {_f(parent['dev']['f1_detection'])} | "
        f"{_f(parent['dev']['mpq'])} | - |",
    ]
    for r in _point_rows(results, "control"):
        lines.append(_structured_row(f"control (no pruning), lr {r['lr']:g} | - | 0 | 0", r, parent))
    for r in _point_rows(results, "structured"):
        steps = f" x{r['steps']}" if r["steps"] > 1 else ""
        lead = f"{r['method']} | {r['schedule']}{steps} | {r['ratio']:g} | {r['achieved_ratio']:.3f}"
        lines.append(_structured_row(lead, r, parent))
    return lines


def _structured_row(lead: str, r: dict[str, Any], parent: dict[str, Any]) -> str:
    """One table row: ``lead`` names the point, the rest is the same for pruned points and controls."""
    d, lat = r["dev"], r["latency"]
    return (
        f"| {lead} | {r['params'] / 1e6:.3f} | {r['macs'] / 1e9:.2f} | "
        f"{1000 * lat['fp32']['model_s'] / 4:.0f} | {lat['fp32']['speedup']:.2f} | {lat['bf16']['speedup']:.2f} | "
        f"{_f(d['pq'])} | {_delta(d['pq'], parent['dev']['pq'])} | {_f(d['aji'])} | {_f(d['dice'])} | "
        f"{_f(d['f1_detection'])} | {_f(d['mpq'])} | {_ft(r)} |"
    )


def _ft(record: dict[str, Any]) -> str:
    ft = record["finetune"]
    return f"{ft['optimizer_steps']} ({ft['train_minutes']:.1f})"


def unstructured_table(results: dict[str, Any]) -> list[str]:
    parent = results["parent"]
    lines = [
        "| method | sparsity | zeroed (conv / all) | PQ | ΔPQ | AJI | Dice | F1 det | mPQ "
        "| file MB (dense / gzip / sparse) | speedup fp32 | speedup bf16 | ft steps (min) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in _point_rows(results, "unstructured"):
        d, lat, s, st = r["dev"], r["latency"], r["sparsity"], r["storage_bytes"]
        lines.append(
            f"| {r['method'].removeprefix('unstructured-')} | {r['ratio']:g} | "
            f"{s['prunable']:.4f} / {s['overall']:.4f} | "
            f"{_f(d['pq'])} | {_delta(d['pq'], parent['dev']['pq'])} | {_f(d['aji'])} | {_f(d['dice'])} | "
            f"{_f(d['f1_detection'])} | {_f(d['mpq'])} | {st['dense'] / 1e6:.2f} / {st['dense_gzip'] / 1e6:.2f} / "
            f"{st['sparse'] / 1e6:.2f} | {lat['fp32']['speedup']:.2f} | {lat['bf16']['speedup']:.2f} | "
            f"{_ft(r)} |"
        )
    return lines


def plots(results: dict[str, Any], docs: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parent = results["parent"]
    names = []
    for xkey, fname, xlabel in (
        ("params", "pruning_pq_params.png", "parameters (M; non-zero for unstructured)"),
        (
            "latency",
            "pruning_pq_latency.png",
            "CPU latency, fp32, batch 4: parent's ms/patch / speedup measured interleaved with the parent",
        ),
    ):
        fig, ax = plt.subplots(figsize=(7.5, 5))
        series: dict[str, list[tuple[float, float]]] = {}
        for r in results["points"].values():
            label = f"{r['method']} {r['schedule']}" if r["kind"] == "structured" else r["method"]
            if r["kind"] == "control":
                label = f"control (no pruning) lr {r['lr']:g}"
            if xkey == "params":
                x = (r.get("nonzero_params") or r["params"]) / 1e6
            else:  # the interleaved ratio is robust to machine noise; absolute times of separate runs are not
                x = parent["latency"]["fp32"]["ms_per_patch"] / r["latency"]["fp32"]["speedup"]
            series.setdefault(label, []).append((x, r["dev"]["pq"]))
        for label, pts in sorted(series.items()):
            pts.sort()
            method = label.split()[0]
            style = "--" if "iterative" in label else "-"
            marker = "s" if method.startswith("unstructured") else ("o" if style == "-" else "^")
            if method == "control":
                marker = "X"
            ax.plot(
                [p[0] for p in pts],
                [p[1] for p in pts],
                style,
                marker=marker,
                ms=4,
                label=label,
                color=COLORS.get(method, "grey"),
            )
        px = parent["params"] / 1e6 if xkey == "params" else parent["latency"]["fp32"]["ms_per_patch"]
        ax.scatter([px], [parent["dev"]["pq"]], marker="*", s=180, c="k", zorder=5, label="dense parent")
        ax.axhline(parent["dev"]["pq"] - NEGLIGIBLE_PQ, color="grey", lw=0.8, ls=":", label="parent - 1 PQ point")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("PQ (dev split)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        fig.savefig(docs.parent / fname, dpi=110)
        plt.close(fig)
        names.append(fname)
    return names


def _structured_claim(results: dict[str, Any]) -> str:
    parent_pq = results["parent"]["dev"]["pq"]
    deep = [r for r in results["points"].values() if r["kind"] == "structured" and r["achieved_ratio"] >= 0.695]
    if not deep:
        return "Not yet measured: no structured point with >= 70% of the parameters removed is in the results."
    best = max(deep, key=lambda r: r["dev"]["pq"])
    drop = parent_pq - best["dev"]["pq"]
    ok = drop <= NEGLIGIBLE_PQ
    controls = {r["lr"]: r for r in results["points"].values() if r["kind"] == "control"}
    verdict = "Confirmed" if ok else "Not confirmed"
    if ok and controls and _control_for(best, controls)["dev"]["pq"] - best["dev"]["pq"] > NEGLIGIBLE_PQ:
        verdict = "Confirmed against the parent, not against an equally fine-tuned dense control"
    text = (
        f"**{verdict}** on our data. The best structured point with >= 70% of the "
        f"parameters removed is {best['id']} ({best['achieved_ratio']:.1%} removed): PQ {best['dev']['pq']:.4f} vs "
        f"the parent's {parent_pq:.4f}, a drop of {drop * 100:.2f} PQ points "
        f"({'within' if ok else 'beyond'} the 1-point bound we call negligible), at "
        f"{best['latency']['fp32']['speedup']:.2f}x the parent's fp32 speed."
    )
    if controls:
        text += (
            " The parent is under-trained (16 CPU epochs), so fine-tuning alone moves PQ: the controls, the "
            "parent fine-tuned with the same budget and nothing removed, reach "
            + ", ".join(f"PQ {c['dev']['pq']:.4f} at lr {lr:g}" for lr, c in sorted(controls.items()))
            + ". Against the control of its own fine-tuning LR (IMP rewinds to the parent's training LR, 1e-3; "
            "L1/L2/Slimming fine-tune at 1e-4), "
            f"{best['id']} is {(best['dev']['pq'] - _control_for(best, controls)['dev']['pq']) * 100:+.2f} PQ points: "
            "that, not the comparison with the parent, is the cost of pruning itself. Part of IMP's lead over L1 "
            "(the same filter-norm criterion) is its higher fine-tuning LR, the rest its network-wide ranking."
        )
    pairs = []
    for r in deep:
        if r["schedule"] == "iterative":
            twin = results["points"].get(point_id(r["method"], "oneshot", r["ratio"]))
            if twin:
                pairs.append(r["dev"]["pq"] - twin["dev"]["pq"])
    if pairs:
        mean = sum(pairs) / len(pairs)
        text += (
            f" Iterative minus one-shot PQ at >= 70% (same budget), averaged over {len(pairs)} criterion/ratio "
            f"pairs: {mean * 100:+.2f} points ({'iterative' if mean > 0 else 'one-shot'} better)."
        )
    return text


def _control_for(record: dict[str, Any], controls: dict[float, dict[str, Any]]) -> dict[str, Any]:
    lr = max(CONTROL_LRS) if record["method"] == "imp" else min(CONTROL_LRS)
    return controls.get(lr) or next(iter(controls.values()))


def _shipped_section() -> list[str]:
    """What ships: a study point fine-tuned further, scored the study's way (fp32, pooled dev split)."""
    if not (SHIPPED.is_file() and SHIPPED_EVAL.is_file()):
        return []
    from wsi_pipeline.engine.weights import read_metadata

    meta = read_metadata(SHIPPED)
    lineage = meta.get("lineage") or {}
    scores = json.loads(SHIPPED_EVAL.read_text())
    further = lineage.get("further_training") or []
    phases = "; ".join(f"{f.get('train_minutes')} min on {f.get('device')}, best dev epoch {f.get('best_epoch')}"
                       for f in further)
    return [
        "## The shipped default",
        "",
        f"`{meta.get('name')}` is study point **{lineage.get('method')}-{lineage.get('schedule')}-"
        f"{lineage.get('ratio'):g}** ({lineage.get('achieved_ratio', 0):.1%} of the parameters removed), the most "
        "accurate point with >= 70% removed and >= 3x the parent's CPU speed, fine-tuned further "
        f"({phases or 'no further training'}): scored like the study (fp32, {scores.get('n_images')} pooled dev "
        "images) it reaches PQ "
        f"{scores['pq']:.4f}, AJI {scores['aji']:.4f}, Dice {scores['dice']:.4f}, F1 {scores['f1_detection']:.4f}, "
        f"mPQ {scores['mpq']:.4f}. Per-dataset figures and latency are in its model card "
        f"(`models/{meta.get('name')}.md`).",
        "",
    ]


def _unstructured_claim(results: dict[str, Any]) -> str:
    parent_pq = results["parent"]["dev"]["pq"]
    pts = {(r["method"], r["ratio"]): r for r in results["points"].values() if r["kind"] == "unstructured"}
    if not pts:
        return "Not yet measured: no unstructured point is in the results."
    parts = []
    at = [pts[(m, 0.9375)] for m in UNSTRUCTURED_METHODS if (m, 0.9375) in pts]
    if at:
        best = max(at, key=lambda r: r["dev"]["pq"])
        if parent_pq:
            rel = (parent_pq - best["dev"]["pq"]) / parent_pq
            parts.append(
                f"**93.75% sparsity with < 2% loss: {'confirmed' if rel < 0.02 else 'not confirmed'}.** Best at "
                f"93.75%: {best['method']} with PQ {best['dev']['pq']:.4f}, {rel:.1%} below the parent's "
                f"{parent_pq:.4f} (relative; {100 * (parent_pq - best['dev']['pq']):.2f} PQ points)."
            )
        else:
            parts.append("The parent's PQ is 0: a relative loss is undefined.")
    comparisons = []
    for ratio in UNSTRUCTURED_RATIOS:
        layer, glob = pts.get(("unstructured-layer", ratio)), pts.get(("unstructured-global", ratio))
        if layer and glob:
            comparisons.append((ratio, layer["dev"]["pq"] - glob["dev"]["pq"]))
    if comparisons:
        small = [d for r, d in comparisons if r <= 0.75]
        large = [d for r, d in comparisons if r >= 0.9375]
        detail = ", ".join(f"{r:g}: {d * 100:+.2f}" for r, d in comparisons)
        verdict = (
            "confirmed"
            if small and large and all(d > 0 for d in small) and all(d < 0 for d in large)
            else "not confirmed"
        )
        parts.append(
            f"**Layer-wise better at small ratios, network-wide at large ones: {verdict}.** Layer-wise minus "
            f"network-wide PQ, in points, by sparsity: {detail}."
        )
    speed = [r["latency"]["fp32"]["speedup"] for r in pts.values()]
    parts.append(
        f"As expected with dense kernels, zeros do not make the model faster: fp32 speedups of the unstructured "
        f"points range {min(speed):.2f}x-{max(speed):.2f}x (noise around 1); only the file shrinks."
    )
    return " ".join(parts)


def _ship_candidate(results: dict[str, Any]) -> str:
    parent_pq = results["parent"]["dev"]["pq"]
    rows = [r for r in results["points"].values() if r["kind"] == "structured"]
    ok = [
        r
        for r in rows
        if r["achieved_ratio"] >= SHIP["removed"]
        and parent_pq - r["dev"]["pq"] <= SHIP["pq_drop"]
        and r["latency"]["fp32"]["speedup"] >= SHIP["speedup"]
    ]
    if ok:
        best = max(ok, key=lambda r: r["dev"]["pq"])
        return (
            f"Study point meeting all three shipping criteria with the study's budget: **{best['id']}** "
            f"({best['achieved_ratio']:.1%} removed, PQ {best['dev']['pq']:.4f}, "
            f"{best['latency']['fp32']['speedup']:.2f}x fp32 in the quick timing above)."
        )
    if not rows:
        return "No structured point measured yet."
    fast = [r for r in rows if r["achieved_ratio"] >= SHIP["removed"] and r["latency"]["fp32"]["speedup"] >= 3]
    close = max(fast or rows, key=lambda r: r["dev"]["pq"])
    return (
        "With the study's 12-epoch budget no point meets all three shipping criteria (>= 70% removed, <= 1 PQ "
        f"point below the parent, >= 3x faster in fp32). The most accurate point that is >= 70% smaller and "
        f">= 3x faster is {close['id']} ({close['achieved_ratio']:.1%} removed, PQ {close['dev']['pq']:.4f}, "
        f"{close['latency']['fp32']['speedup']:.2f}x); it ships after further fine-tuning (next section). "
        "Points with the same GMAC run at the same speed: differences between such points in the speedup "
        "columns (e.g. imp one-shot vs iterative at 0.7) are timing noise on this shared 2-core machine."
    )


def _shown(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def _ms(value: float) -> str:
    return f"{value:.2f}" if value < 10 else f"{value:.0f}"


def fullsize_section(path: Path) -> list[str]:
    """The full-width table of ``benchmarks/prune_fullsize.py``, where it has been run."""
    if not path.is_file():
        return []
    data = json.loads(path.read_text())
    dtypes = list(data["parent"]["latency"])
    base = data["parent"]
    lines = [
        f"## Full-width fast HoVer-Net (random weights), {data['device']}",
        "",
        f"What the same structured criteria do to the real architecture (width x{data['width']:g}: "
        f"{base['params'] / 1e6:.2f} M parameters, {base['gflop']:.1f} GFLOP per 256² patch), no fine-tuning; "
        f"latency on {data['device']}, batch {data['batch']}, {data['threads']} threads, median of {data['iters']} "
        f"round(s) interleaved with the dense model (dense: "
        + ", ".join(f"{d} {_ms(base['latency'][d]['ms_per_patch'])} ms/patch" for d in dtypes)
        + f"). From `{_shown(path)}` ({data['date']}).",
        "",
        "| criterion | ranking | ratio | removed | params (M) | GFLOP / patch |"
        + "".join(f" {d} ms/patch | {d} speedup |" for d in dtypes),
        "|---|---|---:|---:|---:|---:|" + "---:|---:|" * len(dtypes),
    ]
    for r in data["rows"]:
        line = (
            f"| {r['criterion']} | {r['ranking']} | {r['ratio']:g} | {r['removed']:.3f} | "
            f"{r['params'] / 1e6:.2f} | {r['gflop']:.1f} |"
        )
        line += "".join(f" {_ms(r['latency'][d]['ms_per_patch'])} | {r['latency'][d]['speedup']:.2f} |" for d in dtypes)
        lines.append(line)
    return [*lines, ""]


def _budget(cfg: dict[str, Any]) -> str:
    if cfg.get("epochs_per_point"):
        return f"{cfg['epochs_per_point']} epochs"
    return f"{cfg['minutes_per_point']} min"


def _latency_iters(cfg: dict[str, Any]) -> int:
    return (cfg.get("retime") or {}).get("latency_iters") or cfg["latency_iters"]


def _latency_cpu(cfg: dict[str, Any], mach: dict[str, Any]) -> str:
    retimed = (cfg.get("retime") or {}).get("machine")
    m = retimed or mach
    return f"{m.get('cpu', '?')} ({m.get('cores', '?')} cores, torch {m.get('torch', '?')})"


def _latency_note(cfg: dict[str, Any]) -> str:
    if not cfg.get("retime"):
        return ""
    return (
        "; the points were fine-tuned on a GPU machine and timed here afterwards from their architecture "
        "(structured) or zero pattern (unstructured), which is all latency depends on"
    )


def write_report(
    results: dict[str, Any],
    docs: Path,
    json_path: Path = DEFAULT_JSON,
    fullsize_json: Path | list[Path] = DEFAULT_FULLSIZE,
) -> None:
    docs.parent.mkdir(parents=True, exist_ok=True)
    parent, cfg, mach = results["parent"], results["config"], results.get("machine", {})
    figures = plots(results, docs) if results["points"] else []
    n_done = len(results["points"])
    n_all = len(grid(cfg["steps"]))
    lines = [
        "# Pruning study",
        "",
        f"Generated by `benchmarks/prune_study.py` from `{_shown(json_path)}` "
        f"({n_done} of {n_all} points{'' if n_done == n_all else ': partial, the study is resumable'}).",
        "",
        f"**Parent**: `{parent.get('name')}` ({parent['params'] / 1e6:.3f} M parameters, "
        f"{parent['macs'] / 1e9:.2f} GMAC per 256² patch), dev PQ {_f(parent['dev']['pq'])}, "
        f"AJI {_f(parent['dev']['aji'])}, Dice {_f(parent['dev']['dice'])}, F1 {_f(parent['dev']['f1_detection'])}, "
        f"mPQ {_f(parent['dev']['mpq'])} on {cfg['dev_images']} dev images.",
        "",
        f"**Budget**: every point gets {_budget(cfg)} of fine-tuning ({cfg['train_images']} training images, "
        f"batch {cfg['batch_size']}, on {cfg.get('finetune_device', 'cpu')}; iterative schedules split it over "
        f"{cfg['steps']} rounds, Network Slimming over its sparsity phase and rounds). Dev metrics in fp32. "
        f"Latency: batch 4, 256² patches, channels_last, median of {_latency_iters(cfg)} interleaved rounds with "
        f"the parent in the same process, {(cfg.get('retime') or cfg).get('threads', cfg['threads'])} threads on "
        f"{_latency_cpu(cfg, mach)}"
        f"{_latency_note(cfg)}.",
        "",
        "Methods: L1/L2 rank channels by their producing filters' norms with the same ratio in every layer; "
        "Network Slimming trains with an L1 penalty on BatchNorm gammas, then prunes by |gamma| network-wide; IMP "
        "ranks by filter L1 norm network-wide and fine-tunes with learning-rate rewinding. `ratio` is the fraction "
        "of the parent's parameters removed (structured) or of its conv weights zeroed (unstructured).",
        "",
        "## Seed claims",
        "",
        "1. *Structured pruning of U-Net-style nets, skips handled, compresses >= 70% with negligible loss.* "
        + _structured_claim(results),
        "",
        "2. *Unstructured magnitude pruning keeps ~93.75% sparsity with < 2% loss; layer-wise better at small "
        "ratios, network-wide at large ones.* " + _unstructured_claim(results),
        "",
        _ship_candidate(results),
        "",
        *_shipped_section(),
        "## Structured",
        "",
        *structured_table(results),
        "",
        "## Unstructured",
        "",
        *unstructured_table(results),
        "",
    ]
    for fig in figures:
        lines += [f"![{fig}]({fig})", ""]
    for path in fullsize_json if isinstance(fullsize_json, list) else [fullsize_json]:
        lines += fullsize_section(path)
    lines += [
        "## Reproduce",
        "",
        "```",
        "# one machine (CPU or GPU); --only PATTERN... and --json SHARD.json split it over parallel processes",
        f"python benchmarks/prune_study.py --parent {parent['path']} --epochs-per-point "
        f"{cfg.get('epochs_per_point') or 12} --steps {cfg['steps']} --device cuda --workers 1 --latency-iters 0",
        "python benchmarks/prune_study.py --merge SHARD.json...   # fold parallel shards into the results",
        "python benchmarks/prune_study.py --retime                # CPU latency of every point, on this machine",
        "python benchmarks/prune_study.py --report-only",
        "python benchmarks/prune_fullsize.py   # full-width table (CPU; --device cuda --batch 16 on a GPU)",
        "```",
        "",
    ]
    docs.write_text("\n".join(lines))


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parent", type=Path, help="the dense parent checkpoint (required unless --report-only)")
    p.add_argument("--data", nargs="+", type=Path, default=DEFAULT_DATA, help="labelled datasets (train + dev)")
    p.add_argument("--dev-split", type=Path, help="YAML of held-out sources (default configs/dev_split.yaml)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--minutes-per-point", type=float, help="fine-tuning budget per point in minutes")
    budget.add_argument("--epochs-per-point", type=int, help="fine-tuning budget per point in epochs (default 12)")
    p.add_argument("--device", default="cpu", help="fine-tune and evaluate on this torch device (cpu, cuda)")
    p.add_argument("--workers", type=int, default=0, help="data-loading worker processes while fine-tuning")
    p.add_argument("--steps", type=int, default=3, help="rounds of the iterative schedule (default 3)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument(
        "--latency-iters", type=int, default=3, help="CPU timing rounds per point (0: leave it to --retime)"
    )
    p.add_argument("--merge", nargs="+", type=Path, metavar="JSON", help="fold shard results into --json, then stop")
    p.add_argument("--retime", action="store_true", help="time, on this CPU, every point that has no latency yet")
    p.add_argument("--only", nargs="+", metavar="PATTERN", help="run only point ids matching these globs")
    p.add_argument("--dev-limit", type=int, help="evaluate only the first N dev images (smoke tests)")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON)
    p.add_argument("--docs", type=Path, default=DEFAULT_DOCS)
    p.add_argument("--models-dir", type=Path, default=DEFAULT_MODELS, help="where each point's model is saved")
    p.add_argument(
        "--fullsize-json", type=Path, nargs="+", default=DEFAULT_FULLSIZE, help="prune_fullsize.py results to include"
    )
    p.add_argument("--report-only", action="store_true", help="only regenerate the docs from --json")
    args = p.parse_args(argv)
    if args.minutes_per_point is None and args.epochs_per_point is None:
        args.epochs_per_point = 12
    if not (args.report_only or args.merge or args.retime) and args.parent is None:
        p.error("--parent is required (or pass --report-only)")
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    if args.merge:
        results = merge_results(args.json, args.merge)
    elif args.retime:
        results = retime(args)
    elif args.report_only:
        results = load_results(args.json)
        if not results.get("parent"):
            raise SystemExit(f"{args.json} has no results yet: run the study first")
    else:
        results = run_study(args)
    untimed = [pid for pid, r in results["points"].items() if not r.get("latency")]
    if untimed or not results["parent"].get("latency"):
        print(f"{len(untimed)} point(s) have no CPU latency yet: run --retime on the CPU to report on, "
              "then --report-only")
        return 0
    write_report(results, args.docs, args.json, args.fullsize_json)
    print(f"wrote {args.docs} ({len(results['points'])} points)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
