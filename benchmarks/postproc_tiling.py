"""How much does HoVer post-processing depend on the tile? Whole image vs 4 overlapping tiles.

For each MoNuSeg training tile (1000 x 1000 at 0.25 um/px) the ground-truth
instance map is turned into NP/HV maps and degraded the way a network's
output is (blurred NP with noise; HV under-scaled by a factor that drifts
smoothly across the image, blurred, with correlated noise), so that the
min-max normalisation of the official recipe sees different extremes in
different tiles. The maps are post-processed once whole, and once as 4 tiles
(2 x 2 cores of 500 px plus ``--margin`` px of context, clipped to the image);
a tile keeps the nuclei whose centroid lies in its core, as the stitcher does.
For ``hv_norm`` "minmax" (official) and "none" (fixed constants) it reports
the PQ between the stitched and the whole-image instance maps, the fraction of
whole-image nuclei reproduced pixel-identically, and the PQ of both against
the ground truth.

    .venv/bin/python benchmarks/postproc_tiling.py --json out/postproc_tiling.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from wsi_pipeline import metrics
from wsi_pipeline.data.targets import hv_map
from wsi_pipeline.engine.postproc import PostprocConfig, postprocess, sobel_range

SHARED_DATA = Path(os.environ.get("WSI_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
DEFAULT_DATA = SHARED_DATA / "monuseg" / "train" / "labels"


def degraded_maps(inst: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """NP/HV maps resembling a trained network's: soft edges, under-confident and noisy HV."""
    h, w = inst.shape
    np_prob = ndi.gaussian_filter((inst > 0).astype(np.float32), 1.0) + rng.normal(0, 0.05, inst.shape)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    # HV amplitude drifting from ~0.75 to ~0.95 across the image (stain/focus changes).
    scale = 0.85 + 0.1 * np.sin(2 * np.pi * (0.7 * xx + 0.4 * yy + rng.uniform()))
    hv = hv_map(inst)
    noisy = [
        ndi.gaussian_filter(c * scale, 1.5) + ndi.gaussian_filter(rng.normal(0, 0.08, inst.shape), 1.0) for c in hv
    ]
    return np.clip(np_prob, 0, 1).astype(np.float32), np.clip(np.stack(noisy), -1, 1).astype(np.float32)


def tiled(np_prob: np.ndarray, hv: np.ndarray, config: PostprocConfig, margin: int) -> tuple[np.ndarray, int]:
    """Post-process 2 x 2 overlapping tiles and stitch by centroid ownership.

    Returns the stitched instance map and the number of pixels two owned
    nuclei both claimed (0 when tiles agree on their overlaps).
    """
    h, w = np_prob.shape
    out = np.zeros((h, w), dtype=np.int32)
    conflicts, next_id = 0, 1
    for cy0, cy1 in ((0, h // 2), (h // 2, h)):
        for cx0, cx1 in ((0, w // 2), (w // 2, w)):
            y0, y1 = max(cy0 - margin, 0), min(cy1 + margin, h)
            x0, x1 = max(cx0 - margin, 0), min(cx1 + margin, w)
            res = postprocess(np_prob[y0:y1, x0:x1], hv[:, y0:y1, x0:x1], config=config)
            for nuc in res.nuclei:
                gx, gy = nuc.centroid[0] + x0, nuc.centroid[1] + y0
                if not (cx0 <= gx < cx1 and cy0 <= gy < cy1):
                    continue
                bx0, by0, bx1, by1 = nuc.bbox
                mask = res.inst_map[by0:by1, bx0:bx1] == nuc.label
                dest = out[y0 + by0 : y0 + by1, x0 + bx0 : x0 + bx1]
                conflicts += int((mask & (dest > 0)).sum())
                dest[mask] = next_id
                next_id += 1
    return out, conflicts


def identical_fraction(whole: np.ndarray, stitched: np.ndarray) -> float:
    """Share of whole-image nuclei whose pixel set is exactly one stitched nucleus."""
    ids = np.unique(whole[whole > 0])
    if ids.size == 0:
        return float("nan")
    stitched_area = np.bincount(stitched.ravel())
    same = 0
    for lab, sl in enumerate(ndi.find_objects(whole), start=1):
        if sl is None:
            continue
        a = whole[sl] == lab
        b_ids = np.unique(stitched[sl][a])
        if b_ids.size == 1 and b_ids[0] > 0 and stitched_area[b_ids[0]] == int(a.sum()):
            same += 1
    return same / ids.size


def calibration(maps: list[tuple[str, np.ndarray]]) -> dict[str, float]:
    """Median per-tile Sobel extremes of ground-truth HV: where the fixed constants come from."""
    ranges = np.array([sobel_range(hv_map(inst)) for _, inst in maps])
    return {
        "sobel_low_median": float(np.median(ranges[:, 0])),
        "sobel_high_median": float(np.median(ranges[:, 1])),
        "sobel_low_range": [float(ranges[:, 0].min()), float(ranges[:, 0].max())],
        "sobel_high_range": [float(ranges[:, 1].min()), float(ranges[:, 1].max())],
    }


def consep_roundtrip(folder: Path, step: int) -> dict[str, dict[str, object]]:
    """GT inst/type maps -> NP/HV/TP -> post-processing -> score against the GT, per mode."""
    files = sorted((folder / "labels").glob("*.npz"))[::step]
    data = []
    for f in files:
        with np.load(f) as d:
            inst, types = d["inst_map"].astype(np.int32), d["type_map"].astype(np.int64)
        n_types = max(5, int(types.max()) + 1)  # CoNSeP: background + 4 classes
        tp = np.eye(n_types, dtype=np.float32)[types].transpose(2, 0, 1)
        data.append((f.stem, inst, types, (inst > 0).astype(np.float32), hv_map(inst), tp))
    out: dict[str, dict[str, object]] = {}
    for mode in ("minmax", "none"):
        cfg = PostprocConfig(hv_norm=mode)
        items = []
        for name, inst, types, np_prob, hv, tp in data:
            res = postprocess(np_prob, hv, tp, config=cfg)
            lookup = np.array([0] + [n.type for n in res.nuclei])
            items.append((name, inst, types, res.inst_map, lookup[res.inst_map]))
        scores = metrics.score_images(items)
        keys = ("dice", "aji", "aji_plus", "dq", "sq", "pq", "f1_detection", "type_accuracy", "mpq")
        out[mode] = {"crops": len(data), **{k: scores[k] for k in keys}}
        print(f"consep round trip {mode:>7}: " + ", ".join(f"{k}={scores[k]:.4f}" for k in keys))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--labels", type=Path, default=DEFAULT_DATA, help="folder of MoNuSeg NAME.npz (inst_map)")
    parser.add_argument("--margin", type=int, default=64, help="context px around each 500 px core")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, default=0, help="only the first N tiles (0 = all)")
    parser.add_argument(
        "--consep",
        type=Path,
        default=SHARED_DATA / "consep" / "train",
        help="CoNSeP train folder for the GT round trip (skipped if absent)",
    )
    parser.add_argument("--consep-step", type=int, default=4, help="use every N-th CoNSeP crop")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)

    files = sorted(args.labels.glob("*.npz"))[: args.limit or None]
    if not files:
        print(f"no .npz files in {args.labels}", file=sys.stderr)
        return 2
    rng = np.random.default_rng(args.seed)
    maps = []
    for f in files:
        inst = np.load(f)["inst_map"].astype(np.int32)
        maps.append((f.stem, inst, *degraded_maps(inst, rng)))

    report: dict[str, object] = {"tiles": len(files), "margin_px": args.margin, "seed": args.seed, "modes": {}}
    report["calibration"] = calibration([(name, inst) for name, inst, *_ in maps])
    print("calibration (median tile Sobel extremes of GT HV): " + json.dumps(report["calibration"]))
    for mode in ("minmax", "none"):
        cfg = PostprocConfig(hv_norm=mode)
        rows, t0 = [], time.perf_counter()
        for name, inst, np_prob, hv in maps:
            whole = postprocess(np_prob, hv, config=cfg).inst_map
            stitched, conflicts = tiled(np_prob, hv, cfg, args.margin)
            rows.append(
                {
                    "name": name,
                    "pq_tiled_vs_whole": metrics.pq(whole, stitched)[2],
                    "identical_nuclei": identical_fraction(whole, stitched),
                    "conflict_px": conflicts,
                    "pq_whole_vs_gt": metrics.pq(inst, whole)[2],
                    "pq_tiled_vs_gt": metrics.pq(inst, stitched)[2],
                    "nuclei_whole": int(whole.max()),
                }
            )
        summary = {
            k: float(np.mean([r[k] for r in rows]))
            for k in ("pq_tiled_vs_whole", "identical_nuclei", "pq_whole_vs_gt", "pq_tiled_vs_gt")
        }
        summary["min_pq_tiled_vs_whole"] = float(min(r["pq_tiled_vs_whole"] for r in rows))
        summary["conflict_px"] = int(sum(r["conflict_px"] for r in rows))
        summary["seconds"] = round(time.perf_counter() - t0, 1)
        report["modes"][mode] = {"summary": summary, "images": rows}
        print(
            f"{mode:>7}: "
            + ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items())
        )
    if (args.consep / "labels").is_dir():
        report["consep_roundtrip"] = consep_roundtrip(args.consep, args.consep_step)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
