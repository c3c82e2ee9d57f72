"""Segmentation and classification metrics with HoVer-Net's official definitions.

Definitions follow ``metrics/stats_utils.py`` and ``compute_stats.py`` of the
official HoVer-Net code and the PanNuke evaluation (``PanNuke-metrics``):

* Per image, then averaged over images: binary Dice (``get_dice_1``), AJI
  (each GT nucleus paired with its highest-IoU prediction, predictions may be
  reused), AJI+ (one-to-one Hungarian pairing on IoU), DQ/SQ/PQ (unique pairs
  with IoU > 0.5).
* Pooled over all images: detection F1, type accuracy and per-type F1
  (weights 2, 2, 1, 1), after pairing centroids per image with the Hungarian
  algorithm on Euclidean distance and keeping pairs at most 12 px apart.
* mPQ, PanNuke convention: per image, the PQ of each class present in that
  image's ground truth (restricting both maps to instances of the class; a
  class absent from the GT is skipped, even if predicted), averaged over the
  classes, then over images.

Deliberate differences from the official scripts, none of which change a
result on a non-degenerate image: undefined values (both maps empty) are
``None`` rather than NaN or a ZeroDivisionError, and are skipped in the means;
SQ is an exact mean IoU (the official adds 1e-6 to the divisor); an image
without nuclei contributes nothing to the pooled detection counts (the
official inserts a dummy nucleus at (0, 0), which pairs with another dummy);
centroids are not truncated to integers before pairing.

This module is the single home of the metric logic: ``score_images`` is what
the CLI and the evaluation call.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment

from wsi_pipeline.classes import majority_types
from wsi_pipeline.errors import DataError

PAIRING_RADIUS_PX = 12.0
F1_TYPE_WEIGHTS = (2.0, 2.0, 1.0, 1.0)

__all__ = [
    "PAIRING_RADIUS_PX",
    "aji",
    "aji_plus",
    "centroids_and_types",
    "detection_and_type_stats",
    "dice",
    "pair_centroids",
    "pq",
    "score_images",
]


# --------------------------------------------------------------------------- overlaps


def _consecutive(inst: np.ndarray) -> tuple[np.ndarray, int]:
    """Relabel an instance map to 1..N (0 stays background), keeping the label order."""
    ids, inverse = np.unique(inst, return_inverse=True)
    inverse = inverse.reshape(inst.shape)
    if ids[0] == 0:
        return inverse.astype(np.int64), len(ids) - 1
    return inverse.astype(np.int64) + 1, len(ids)


@dataclass
class _Overlap:
    """Sparse table of overlapping (GT, prediction) instance pairs, 0-based indices."""

    n_true: int
    n_pred: int
    area_true: np.ndarray
    area_pred: np.ndarray
    t: np.ndarray
    p: np.ndarray
    inter: np.ndarray

    @property
    def union(self) -> np.ndarray:
        return self.area_true[self.t] + self.area_pred[self.p] - self.inter

    @property
    def iou(self) -> np.ndarray:
        return self.inter / self.union


def _overlap(true: np.ndarray, pred: np.ndarray) -> _Overlap:
    """Count every pair's intersection in one pass (no per-instance masks)."""
    if true.shape != pred.shape:
        raise ValueError(f"maps differ in size: true {true.shape}, pred {pred.shape}")
    t_map, n_true = _consecutive(np.asarray(true))
    p_map, n_pred = _consecutive(np.asarray(pred))
    area_true = np.bincount(t_map.ravel(), minlength=n_true + 1)[1:].astype(np.float64)
    area_pred = np.bincount(p_map.ravel(), minlength=n_pred + 1)[1:].astype(np.float64)
    both = (t_map > 0) & (p_map > 0)
    codes = (t_map[both] - 1) * max(n_pred, 1) + (p_map[both] - 1)
    pair_codes, counts = np.unique(codes, return_counts=True)
    return _Overlap(
        n_true=n_true,
        n_pred=n_pred,
        area_true=area_true,
        area_pred=area_pred,
        t=pair_codes // max(n_pred, 1),
        p=pair_codes % max(n_pred, 1),
        inter=counts.astype(np.float64),
    )


def _hungarian_max_iou(ov: _Overlap) -> np.ndarray:
    """Indices into the overlap table of a one-to-one pairing maximising total IoU.

    Only instances that overlap something can be paired, so the dense matrix
    is built on those rows and columns alone.
    """
    if ov.t.size == 0:
        return np.zeros(0, dtype=np.int64)
    rows, t_idx = np.unique(ov.t, return_inverse=True)
    cols, p_idx = np.unique(ov.p, return_inverse=True)
    iou = np.zeros((rows.size, cols.size))
    iou[t_idx, p_idx] = ov.iou
    r, c = linear_sum_assignment(-iou)
    keep = iou[r, c] > 0
    lookup = np.full((rows.size, cols.size), -1, dtype=np.int64)
    lookup[t_idx, p_idx] = np.arange(ov.t.size)
    return lookup[r[keep], c[keep]]


# --------------------------------------------------------------------------- per-image metrics


def dice(true: np.ndarray, pred: np.ndarray) -> float:
    """Binary Dice of the foregrounds (official ``get_dice_1``); NaN when both are empty."""
    t, p = np.asarray(true) > 0, np.asarray(pred) > 0
    if t.shape != p.shape:
        raise ValueError(f"maps differ in size: true {t.shape}, pred {p.shape}")
    denom = int(t.sum()) + int(p.sum())
    return math.nan if denom == 0 else 2.0 * int((t & p).sum()) / denom


def _aji_from_pairs(ov: _Overlap, chosen: np.ndarray) -> float:
    """Aggregated Jaccard from chosen overlap-table rows; unpaired instances join the union."""
    if ov.n_true == 0 and ov.n_pred == 0:
        return math.nan
    inter = ov.inter[chosen].sum()
    union = ov.union[chosen].sum()
    paired_t = np.zeros(ov.n_true, dtype=bool)
    paired_p = np.zeros(ov.n_pred, dtype=bool)
    paired_t[ov.t[chosen]] = True
    paired_p[ov.p[chosen]] = True
    union += ov.area_true[~paired_t].sum() + ov.area_pred[~paired_p].sum()
    return float(inter / union)


def aji(true: np.ndarray, pred: np.ndarray) -> float:
    """AJI (MoNuSeg): each GT nucleus with its best-IoU prediction, reuse allowed.

    A prediction paired with several GT nuclei counts in each union (the
    known over-penalisation of AJI). Ties go to the lowest prediction label.
    0 when exactly one map is empty, NaN when both are.
    """
    ov = _overlap(true, pred)
    return _aji_from_pairs(ov, _best_iou_per_true(ov))


def _best_iou_per_true(ov: _Overlap) -> np.ndarray:
    """Overlap-table row of each GT nucleus' best-IoU prediction (ties: lowest prediction label)."""
    if ov.t.size == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.lexsort((ov.p, -ov.iou, ov.t))
    first = np.ones(order.size, dtype=bool)
    first[1:] = ov.t[order][1:] != ov.t[order][:-1]
    return order[first]


def aji_plus(true: np.ndarray, pred: np.ndarray) -> float:
    """AJI+ (HoVer-Net): one-to-one pairing maximising the summed IoU, no over-penalisation."""
    ov = _overlap(true, pred)
    return _aji_from_pairs(ov, _hungarian_max_iou(ov))


def _pq_pairs(ov: _Overlap, iou: float) -> np.ndarray:
    """Overlap-table rows matched for PQ: IoU > threshold, unique by construction when >= 0.5."""
    if iou >= 0.5:
        return np.flatnonzero(ov.iou > iou)
    chosen = _hungarian_max_iou(ov)
    return chosen[ov.iou[chosen] > iou]


def _pq_from_counts(tp: int, fp: int, fn: int, iou_sum: float) -> tuple[float, float, float]:
    if tp + fp + fn == 0:
        return math.nan, math.nan, math.nan
    dq = tp / (tp + 0.5 * fp + 0.5 * fn)
    sq = iou_sum / tp if tp else 0.0
    return dq, sq, dq * sq


def pq(true: np.ndarray, pred: np.ndarray, iou: float = 0.5) -> tuple[float, float, float]:
    """(DQ, SQ, PQ) of one image: pairs with IoU > ``iou``; NaNs when both maps are empty.

    Below 0.5 pairs are no longer unique, so a Hungarian pairing on IoU is
    used first (as the official ``get_fast_pq``).
    """
    if iou < 0:
        raise ValueError("iou threshold must be >= 0")
    ov = _overlap(true, pred)
    chosen = _pq_pairs(ov, iou)
    tp = int(chosen.size)
    return _pq_from_counts(tp, ov.n_pred - tp, ov.n_true - tp, float(ov.iou[chosen].sum()))


# --------------------------------------------------------------------------- detection and types


def centroids_and_types(inst_map: np.ndarray, type_map: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Centroid (x, y) (mean pixel index) and majority type of every instance, in label order.

    The type is :func:`wsi_pipeline.classes.majority_types` (the one rule the
    post-processing and the datasets use too): background (0) pixels of
    ``type_map`` inside the instance are ignored, an instance whose pixels are
    all 0 gets type 0. Without a ``type_map`` every type is 0.
    """
    inst, n = _consecutive(np.asarray(inst_map))
    if n == 0:
        return np.zeros((0, 2), dtype=np.float64), np.zeros(0, dtype=np.int64)
    flat = inst.ravel()
    area = np.bincount(flat, minlength=n + 1)[1:].astype(np.float64)
    rows, cols = np.indices(inst.shape)
    cx = np.bincount(flat, weights=cols.ravel(), minlength=n + 1)[1:] / area
    cy = np.bincount(flat, weights=rows.ravel(), minlength=n + 1)[1:] / area
    centroids = np.stack([cx, cy], axis=1)
    if type_map is None:
        return centroids, np.zeros(n, dtype=np.int64)
    types = np.asarray(type_map).astype(np.int64)
    if types.shape != inst.shape:
        raise ValueError(f"type_map {types.shape} and inst_map {inst.shape} differ in size")
    if types.min() < 0:
        raise ValueError("type_map holds negative values")
    majority, _ = majority_types(flat, types, num_labels=n + 1)
    return centroids, majority[1:]


def pair_centroids(
    true_xy: np.ndarray, pred_xy: np.ndarray, radius: float = PAIRING_RADIUS_PX
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hungarian pairing on Euclidean distance, then pairs farther than ``radius`` are dropped.

    As the official ``pair_coordinates``: the assignment minimises the total
    distance over all points before the radius cut. Returns ``pairs`` (K, 2)
    of (true index, pred index), then the unpaired true and pred indices.
    """
    true_xy = np.asarray(true_xy, dtype=np.float64).reshape(-1, 2)
    pred_xy = np.asarray(pred_xy, dtype=np.float64).reshape(-1, 2)
    if len(true_xy) == 0 or len(pred_xy) == 0:
        return (
            np.zeros((0, 2), dtype=np.int64),
            np.arange(len(true_xy), dtype=np.int64),
            np.arange(len(pred_xy), dtype=np.int64),
        )
    dist = np.linalg.norm(true_xy[:, None, :] - pred_xy[None, :, :], axis=-1)
    r, c = linear_sum_assignment(dist)
    keep = dist[r, c] <= radius
    pairs = np.stack([r[keep], c[keep]], axis=1).astype(np.int64)
    unpaired_true = np.setdiff1d(np.arange(len(true_xy)), pairs[:, 0])
    unpaired_pred = np.setdiff1d(np.arange(len(pred_xy)), pairs[:, 1])
    return pairs, unpaired_true.astype(np.int64), unpaired_pred.astype(np.int64)


def detection_and_type_stats(
    paired_true_type: np.ndarray,
    paired_pred_type: np.ndarray,
    unpaired_true_type: np.ndarray,
    unpaired_pred_type: np.ndarray,
    *,
    type_ids: Sequence[int] | None = None,
    typed: bool = True,
    weights: Sequence[float] = F1_TYPE_WEIGHTS,
) -> dict[str, Any]:
    """Detection F1, type accuracy and per-type F1 from pooled pairing results.

    Each argument holds one type per nucleus: of the paired GT and predicted
    nuclei (same order) and of the unpaired ones. Per type c, over the pairs
    where either side is c: F1_c = 2(TP+TN) / (2(TP+TN) + w0 FP + w1 FN
    + w2 FP_d + w3 FN_d), FP_d/FN_d the unpaired predictions/GT of type c (TN
    is 0 within those pairs; kept to mirror the paper's formula).
    ``type_ids`` defaults to the types present in the GT, background excluded.
    With ``typed=False`` only the detection figures are computed.
    """
    pt, pp = np.asarray(paired_true_type), np.asarray(paired_pred_type)
    ut, up = np.asarray(unpaired_true_type), np.asarray(unpaired_pred_type)
    tp, fp, fn = int(pt.size), int(up.size), int(ut.size)
    out: dict[str, Any] = {
        "f1_detection": _ratio(2 * tp, 2 * tp + fp + fn),
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "type_accuracy": None,
        "f1_type": None,
    }
    if not typed:
        return out
    out["type_accuracy"] = _ratio(int((pt == pp).sum()), tp)
    if type_ids is None:
        type_ids = sorted(int(t) for t in np.unique(np.concatenate([pt, ut])) if t != 0)
    w0, w1, w2, w3 = weights
    f1_type: dict[str, float | None] = {}
    for c in type_ids:
        sel = (pt == c) | (pp == c)
        st, sp = pt[sel], pp[sel]
        tp_dt = int(((st == c) & (sp == c)).sum())
        tn_dt = int(((st != c) & (sp != c)).sum())
        fp_dt = int(((st != c) & (sp == c)).sum())
        fn_dt = int(((st == c) & (sp != c)).sum())
        fp_d, fn_d = int((up == c).sum()), int((ut == c).sum())
        good = 2 * (tp_dt + tn_dt)
        f1_type[str(int(c))] = _ratio(good, good + w0 * fp_dt + w1 * fn_dt + w2 * fp_d + w3 * fn_d)
    out["f1_type"] = f1_type
    return out


def _ratio(num: float, den: float) -> float | None:
    return None if den == 0 else float(num) / float(den)


# --------------------------------------------------------------------------- the whole evaluation


ScoreItem = tuple[str, np.ndarray, np.ndarray | None, np.ndarray, np.ndarray | None]


def _class_pq(ov: _Overlap, true_types: np.ndarray, pred_types: np.ndarray) -> dict[str, float | None]:
    """Per-class PQ of one image (PanNuke): classes absent from the GT are skipped.

    Restricting both maps to class c keeps every IoU between two class-c
    instances, so the pairs come from the one overlap table.
    """
    matched = ov.iou > 0.5
    out: dict[str, float | None] = {}
    for c in sorted(int(x) for x in np.unique(true_types) if x != 0):
        rows = matched & (true_types[ov.t] == c) & (pred_types[ov.p] == c)
        tp = int(rows.sum())
        n_true, n_pred = int((true_types == c).sum()), int((pred_types == c).sum())
        out[str(c)] = _pq_from_counts(tp, n_pred - tp, n_true - tp, float(ov.iou[rows].sum()))[2]
    return out


def _clean(x: float | None) -> float | None:
    return None if x is None or math.isnan(x) else float(x)


def _mean(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def score_images(items: Iterable[ScoreItem]) -> dict[str, Any]:
    """Score predictions against ground truth; the structure the CLI writes as JSON.

    ``items`` yields ``(name, true_inst, true_type | None, pred_inst,
    pred_type | None)`` and is consumed once, one image at a time. Type
    metrics (``type_accuracy``, ``f1_type``, ``mpq``, ``pq_per_type``) are
    computed over the images that have both type maps (``n_typed_images``), so a
    dev split mixing typed (CoNSeP) and instance-only (MoNuSeg) images still
    reports classification; they are None when no image is typed. Detection F1
    pools every image. Undefined values (e.g. both maps of an image empty) are
    None and are left out of the means.
    """
    rows: list[dict[str, Any]] = []
    pooled: dict[str, list[np.ndarray]] = {"pt": [], "pp": [], "ut": [], "up": []}
    pooled_typed: dict[str, list[np.ndarray]] = {"pt": [], "pp": [], "ut": [], "up": []}
    n_typed = 0
    per_class: dict[str, list[float | None]] = {}
    for name, true_inst, true_type, pred_inst, pred_type in items:
        true_inst, pred_inst = np.asarray(true_inst), np.asarray(pred_inst)
        _check_sizes(name, true_inst, true_type, pred_inst, pred_type)
        ov = _overlap(true_inst, pred_inst)
        matched = _pq_pairs(ov, 0.5)
        tp = int(matched.size)
        dq, sq, pq_value = _pq_from_counts(tp, ov.n_pred - tp, ov.n_true - tp, float(ov.iou[matched].sum()))
        row: dict[str, Any] = {
            "name": name,
            "dice": _clean(dice(true_inst, pred_inst)),
            "aji": _clean(_aji_from_pairs(ov, _best_iou_per_true(ov))),
            "aji_plus": _clean(_aji_from_pairs(ov, _hungarian_max_iou(ov))),
            "dq": _clean(dq),
            "sq": _clean(sq),
            "pq": _clean(pq_value),
            "n_true": ov.n_true,
            "n_pred": ov.n_pred,
        }
        t_xy, t_types = centroids_and_types(true_inst, true_type)
        p_xy, p_types = centroids_and_types(pred_inst, pred_type)
        pairs, un_t, un_p = pair_centroids(t_xy, p_xy)
        image_typed = true_type is not None and pred_type is not None
        for pool in (pooled, pooled_typed) if image_typed else (pooled,):
            pool["pt"].append(t_types[pairs[:, 0]])
            pool["pp"].append(p_types[pairs[:, 1]])
            pool["ut"].append(t_types[un_t])
            pool["up"].append(p_types[un_p])
        row.update(paired=int(len(pairs)), missed=int(len(un_t)), false_positives=int(len(un_p)))
        if image_typed:
            n_typed += 1
            class_pq = {k: _clean(v) for k, v in _class_pq(ov, t_types, p_types).items()}
            row["pq_per_type"] = class_pq
            row["mpq"] = _mean(class_pq.values())
            for k, v in class_pq.items():
                per_class.setdefault(k, []).append(v)
        rows.append(row)

    def _cat(pool: dict[str, list[np.ndarray]]) -> dict[str, np.ndarray]:
        return {k: np.concatenate(v) if v else np.zeros(0, dtype=np.int64) for k, v in pool.items()}

    cat = _cat(pooled)
    det = detection_and_type_stats(cat["pt"], cat["pp"], cat["ut"], cat["up"], typed=False)
    typed = n_typed > 0
    types = {"type_accuracy": None, "f1_type": None}
    if typed:
        tcat = _cat(pooled_typed)
        types = detection_and_type_stats(tcat["pt"], tcat["pp"], tcat["ut"], tcat["up"], typed=True)
    result: dict[str, Any] = {
        "n_images": len(rows),
        "n_typed_images": n_typed,
        **{k: _mean(r[k] for r in rows) for k in ("dice", "aji", "aji_plus", "dq", "sq", "pq")},
        "f1_detection": det["f1_detection"],
        "type_accuracy": types["type_accuracy"],
        "f1_type": types["f1_type"],
        "mpq": _mean(r.get("mpq") for r in rows) if typed else None,
        "pq_per_type": (
            {k: _mean(v) for k, v in sorted(per_class.items(), key=lambda kv: int(kv[0]))} if typed else None
        ),
        "detection": {"tp": det["tp"], "fp": det["fp"], "fn": det["fn"], "radius_px": PAIRING_RADIUS_PX},
        "images": rows,
    }
    return result


def _check_sizes(
    name: str,
    true_inst: np.ndarray,
    true_type: np.ndarray | None,
    pred_inst: np.ndarray,
    pred_type: np.ndarray | None,
) -> None:
    """Refuse mismatched maps up front, naming the image: comparing them would be meaningless."""
    fix = "predictions must be made on the same image, at the same resolution, as the ground truth"
    if true_inst.ndim != 2 or pred_inst.ndim != 2:
        raise DataError(name, f"instance maps must be 2-D, got {true_inst.shape} (GT), {pred_inst.shape} (pred)")
    if true_inst.shape != pred_inst.shape:
        raise DataError(name, f"prediction is {pred_inst.shape} but ground truth is {true_inst.shape}", fix)
    for label, tmap in (("ground-truth", true_type), ("predicted", pred_type)):
        if tmap is not None and np.asarray(tmap).shape != true_inst.shape:
            raise DataError(name, f"{label} type_map is {np.asarray(tmap).shape}, inst_map {true_inst.shape}", fix)
