"""Calibrate the HoVer post-processing on a model's own dev-split predictions (issue 11).

The shipped thresholds and size limits were set on ground-truth maps; a trained network's
maps are softer (NP below 1 inside nuclei, HV ramps flatter), which shows as fragments and
merged blobs. This script predicts the dev split once (fp32, whole images), keeps the maps in
memory, and re-runs only the post-processing for each setting:

1. one parameter at a time around the current values: its effect on PQ, AJI, detection F1
   and the share of predicted nuclei under 10 µm² (per dataset and pooled);
2. coordinate descent on the pooled PQ (mean of the datasets' PQ, as the pruning study
   pools them), two passes over the parameters;

and writes the JSON (every evaluated setting) and, with ``--write``, a copy of the model
under a new name whose metadata carries the chosen values (``postproc``), so the model
brings its own post-processing wherever it runs. The dev split is whole held-out source
tiles (``configs/dev_split.yaml``); an independent evaluation on other splits checks the
result, so nothing here is tuned on a test set.

    python benchmarks/calibrate_postproc.py --model hovernet-fast-w025-imp90 \\
        --json benchmarks/results/postproc_calibration.json [--write models/NEW.safetensors --name NEW]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from _common import save_json

from wsi_pipeline.data import load_dataset, load_dev_split, split_dev
from wsi_pipeline.engine.infer import InferenceConfig, TileInferer
from wsi_pipeline.engine.postproc import DEFAULT_MAP_MPP, PostprocConfig, postprocess
from wsi_pipeline.engine.registry import resolve_model
from wsi_pipeline.engine.weights import load_model, model_postproc, save_model
from wsi_pipeline.evaluate import type_map_from
from wsi_pipeline.metrics import score_images

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "postproc_calibration.json"
SMALL_UM2 = 10.0  # below any real nucleus at 40x (a small lymphocyte is ~20 µm²)

GRID: dict[str, Sequence[Any]] = {
    "np_threshold": (0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65),
    "marker_threshold": (0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55),
    "marker_open_size": (3, 5, 7),
    "min_object_um2": (0.625, 2.0, 4.0, 6.0, 8.0, 10.0),
    "min_marker_um2": (0.625, 1.5, 3.0, 5.0),
    "fill_holes": (False, True),
}


def _shown(path: Path) -> str:
    """A path as the JSON and the model's metadata record it: relative to the repository."""
    path = Path(path).resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def predict(model: Any, samples: Sequence[Any]) -> list[tuple[Any, Any]]:
    """The model's fp32 maps for every sample (kept: post-processing is what varies)."""
    inferer = TileInferer(model, InferenceConfig(batch_size=8, bf16=False))
    return [(sample, inferer.infer(sample.image)) for sample in samples]


def score(predictions: Sequence[tuple[Any, Any]], config: PostprocConfig, mpp: float) -> dict[str, float | None]:
    items = []
    areas: list[np.ndarray] = []
    for sample, maps in predictions:
        result = postprocess(maps.np_prob, maps.hv, maps.tp_prob, config=config, mpp=mpp)
        pred_type = type_map_from(result, result.inst_map.shape) if maps.tp_prob is not None else None
        true_type = sample.type_map if pred_type is not None else None
        items.append((sample.name, sample.inst_map, true_type, result.inst_map,
                      pred_type if true_type is not None else None))
        areas.append(np.array([n.area_px for n in result.nuclei], dtype=np.float64) * mpp * mpp)
    scores = score_images(items)
    sizes = np.concatenate(areas) if areas else np.zeros(0)
    return {
        "pq": scores["pq"], "aji": scores["aji"], "dice": scores["dice"], "f1_detection": scores["f1_detection"],
        "mpq": scores.get("mpq"), "nuclei": int(sizes.size),
        "small_fraction": float((sizes < SMALL_UM2).mean()) if sizes.size else None,
    }


def evaluate(sets: dict[str, list[tuple[Any, Any]]], config: PostprocConfig, mpp: float) -> dict[str, Any]:
    per = {name: score(preds, config, mpp) for name, preds in sets.items()}
    pooled = float(np.mean([s["pq"] for s in per.values()]))
    return {"config": dataclasses.asdict(config), "pooled_pq": pooled, "datasets": per}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="model name or checkpoint (default: the shipped default)")
    p.add_argument("--consep", type=Path, default=DATA / "consep" / "train")
    p.add_argument("--monuseg", type=Path, default=DATA / "monuseg" / "train")
    p.add_argument("--dev-split", type=Path, default=REPO / "configs" / "dev_split.yaml")
    p.add_argument("--passes", type=int, default=2, help="coordinate-descent passes")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", type=Path, default=DEFAULT_OUT)
    p.add_argument("--write", type=Path, help="save a copy of the model with the chosen values here (new name)")
    p.add_argument("--name", help="model name of the --write copy (default: its file stem)")
    args = p.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    path = resolve_model(args.model)
    shown = _shown(path)
    if args.write is not None and args.write.resolve() == path.resolve():
        raise SystemExit(f"--write {args.write} is the model itself: a calibrated model gets a new file and name")
    model = load_model(path)
    mpp = float(model.meta.get("mpp") or DEFAULT_MAP_MPP)
    dev = load_dev_split(args.dev_split)
    started = time.perf_counter()
    sets = {}
    for name, folder in (("consep", args.consep), ("monuseg", args.monuseg)):
        _, samples = split_dev(load_dataset(folder).samples, dev)
        sets[name] = predict(model, samples)
        print(f"{name}: {len(samples)} dev images predicted", file=sys.stderr)
    predict_s = time.perf_counter() - started

    start_config = model_postproc(model)
    baseline = evaluate(sets, start_config, mpp)
    print(f"baseline pooled PQ {baseline['pooled_pq']:.4f}", file=sys.stderr)
    sweeps: dict[str, list[dict[str, Any]]] = {}
    for param, values in GRID.items():
        sweeps[param] = [evaluate(sets, dataclasses.replace(start_config, **{param: v}), mpp) for v in values]
        best = max(sweeps[param], key=lambda r: r["pooled_pq"])
        print(f"{param}: best {best['config'][param]} -> {best['pooled_pq']:.4f}", file=sys.stderr)

    current, current_score = start_config, baseline
    history = []
    for _ in range(args.passes):
        changed = False
        for param, values in GRID.items():
            for value in values:
                if getattr(current, param) == value:
                    continue
                trial = evaluate(sets, dataclasses.replace(current, **{param: value}), mpp)
                history.append(trial)
                if trial["pooled_pq"] > current_score["pooled_pq"] + 1e-4:
                    current, current_score, changed = dataclasses.replace(current, **{param: value}), trial, True
        if not changed:
            break
    summary = {
        "model": shown,
        "model_name": model.meta.get("name"),
        "mpp": mpp,
        "dev_split": _shown(args.dev_split),
        "images": {k: len(v) for k, v in sets.items()},
        "small_um2": SMALL_UM2,
        "predict_seconds": round(predict_s, 1),
        "seconds": round(time.perf_counter() - started, 1),
        "baseline": baseline,
        "one_at_a_time": sweeps,
        "chosen": current_score,
        "descent": history,
    }
    save_json(args.json, summary)
    print(f"chosen pooled PQ {current_score['pooled_pq']:.4f} (baseline {baseline['pooled_pq']:.4f}): "
          f"{dataclasses.asdict(current)}", file=sys.stderr)
    if args.write is not None:
        meta = {k: v for k, v in model.meta.items() if k not in ("path", "format")}
        meta["name"] = args.name or args.write.name.split(".")[0]
        meta["postproc"] = current.to_meta()
        meta["postproc_calibration"] = {
            "from": shown, "dev_split": _shown(args.dev_split), "pooled_pq": current_score["pooled_pq"],
            "baseline_pooled_pq": baseline["pooled_pq"], "script": "benchmarks/calibrate_postproc.py",
        }
        args.write.parent.mkdir(parents=True, exist_ok=True)
        save_model(model, args.write, meta)
        print(f"wrote {args.write}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
