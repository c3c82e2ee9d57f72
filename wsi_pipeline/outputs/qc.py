"""Quality control for the report: what a person needs to judge a slide's segmentation.

A density map says where nuclei are, not whether they are right. This module gives the
report what does:

- :class:`NucleiQC`, one more stitcher sink, keeps per-class counts, areas and
  confidences and a histogram of nucleus areas (log bins, so fragments and merged blobs
  show as their own humps), in memory bounded by the number of classes;
- :func:`choose_crops` picks a few windows spread over the tissue, from the densest to
  the sparsest parts (sparse regions are where missed nuclei hide, dense ones where
  merges do), using only the density grid;
- :func:`read_crops` reads those windows from the slide at the inference µm/px and draws
  every nucleus outline in its class colour, taking the polygons of just those windows
  from the GeoParquet table (:func:`~wsi_pipeline.outputs.parquet.nuclei_in_box`), so a
  slide of any size never has all its polygons in memory;
- :func:`qc_warnings` turns the numbers into the sentences a user must read before
  trusting the slide: nuclei cut at tile edges, low-confidence classes, fragments.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wsi_pipeline.nuclei import Nucleus
from wsi_pipeline.outputs.fields import (
    LOW_CONFIDENCE,
    UNTYPED_NAME,
    class_mean_probability,
    class_table,
    class_vote_fraction,
)

# A nucleus smaller than this is a fragment (an over-split or cut nucleus, debris):
# smaller than any real nucleus at 40x, the definition docs/postproc.md measures with.
FRAGMENT_UM2 = 10.0
AREA_EDGES = np.geomspace(1.0, 1000.0, 61)  # µm², 20 bins per decade
CROP_PX = 400  # crop side at the inference µm/px (100 µm at 0.25 µm/px)
CROP_COUNT = 6
# Warn when this share of the classified nuclei is low-confidence, or of all nuclei
# fragments. The shipped default leaves ~16% fragments on its own dev split
# (docs/postproc.md), so a quarter is unusual for it rather than every slide's lot.
LOW_CONFIDENCE_WARNING = 0.25
FRAGMENT_WARNING = 0.25


class NucleiQC:
    """Per-class statistics and the area histogram of a slide's nuclei (a stitcher sink).

    ``classes``: the model's foreground classes; type 0 (untyped) is always counted.
    """

    def __init__(self, classes: Sequence[Mapping[str, Any]]) -> None:
        self.classes = class_table(classes)
        types = max(self.classes) + 1
        self.count = np.zeros(types, dtype=np.int64)
        self.area_sum = np.zeros(types, dtype=np.float64)
        self.mean_prob_sum = np.zeros(types, dtype=np.float64)
        self.vote_sum = np.zeros(types, dtype=np.float64)
        self.low_confidence = np.zeros(types, dtype=np.int64)
        # Bin 0: below AREA_EDGES[0]; bin len(AREA_EDGES): at or above the last edge.
        self.histogram = np.zeros((types, len(AREA_EDGES) + 1), dtype=np.int64)
        self.fragments = 0

    def add(self, nucleus: Nucleus) -> None:
        t = int(nucleus.type)
        if not 0 <= t < self.count.size:
            raise ValueError(f"nucleus {nucleus.label} has type {t}, expected 0..{self.count.size - 1}")
        area = float(nucleus.area_um2 or 0.0)
        self.count[t] += 1
        self.area_sum[t] += area
        self.histogram[t, int(np.searchsorted(AREA_EDGES, area, side="right"))] += 1
        self.fragments += area < FRAGMENT_UM2
        mean, votes = class_mean_probability(nucleus), class_vote_fraction(nucleus)
        if mean is not None:
            self.mean_prob_sum[t] += mean
            self.low_confidence[t] += mean < LOW_CONFIDENCE
        if votes is not None:
            self.vote_sum[t] += votes

    @property
    def total(self) -> int:
        return int(self.count.sum())

    def summary(self) -> dict[str, Any]:
        """JSON-ready figures for report.json and the report's per-class table."""
        total = self.total
        typed = int(self.count[1:].sum())
        rows = []
        for t, cls in sorted(self.classes.items()):
            n = int(self.count[t])
            scored = n if t > 0 else 0
            rows.append(
                {
                    "id": t,
                    "name": cls["name"],
                    "color": list(cls["color"]),
                    "count": n,
                    "share": n / total if total else 0.0,
                    "mean_area_um2": self.area_sum[t] / n if n else None,
                    "median_area_um2": _histogram_median(self.histogram[t]),
                    "mean_class_probability": self.mean_prob_sum[t] / scored if scored else None,
                    "mean_vote_fraction": self.vote_sum[t] / scored if scored else None,
                    "low_confidence": int(self.low_confidence[t]),
                }
            )
        low = int(self.low_confidence.sum())
        return {
            "nuclei": total,
            "classified": typed,
            "untyped": int(self.count[0]),
            "low_confidence": low,
            "low_confidence_fraction": low / typed if typed else 0.0,
            "low_confidence_below": LOW_CONFIDENCE,
            "fragments": int(self.fragments),
            "fragment_fraction": self.fragments / total if total else 0.0,
            "fragment_below_um2": FRAGMENT_UM2,
            "per_class": rows,
            "area_histogram": {
                "edges_um2": AREA_EDGES.round(4).tolist(),
                "counts": self.histogram.sum(0).tolist(),
                "per_class": {
                    cls["name"]: self.histogram[t].tolist() for t, cls in sorted(self.classes.items()) if self.count[t]
                },
            },
        }


def _histogram_median(counts: np.ndarray) -> float | None:
    """The median area from the log-binned histogram (the bin's geometric centre)."""
    total = int(counts.sum())
    if not total:
        return None
    index = int(np.searchsorted(np.cumsum(counts), (total + 1) / 2))
    if index == 0:
        return float(AREA_EDGES[0])
    if index >= len(AREA_EDGES):
        return float(AREA_EDGES[-1])
    return float(math.sqrt(AREA_EDGES[index - 1] * AREA_EDGES[index]))


def qc_warnings(qc: Mapping[str, Any], edge_touching: int, margin: int) -> list[str]:
    """The warnings the QC figures call for (the run adds blank-slide and upsampling ones)."""
    warnings = []
    total = int(qc.get("nuclei", 0))
    if edge_touching and total:
        warnings.append(
            f"{edge_touching} nuclei ({edge_touching / total:.1%}) touch the edge of their tile's read region and "
            f"may be cut at tile borders: rerun with a larger --margin (now {margin} px)"
        )
    if qc.get("classified") and qc["low_confidence_fraction"] >= LOW_CONFIDENCE_WARNING:
        warnings.append(
            f"{qc['low_confidence_fraction']:.0%} of the classified nuclei are low-confidence (mean probability of "
            f"their class below {qc['low_confidence_below']:g}): class calls are unreliable on this slide "
            "(stain, scanner or tissue unlike the training data?)"
        )
    if total and qc["fragment_fraction"] >= FRAGMENT_WARNING:
        warnings.append(
            f"{qc['fragment_fraction']:.0%} of the nuclei are smaller than {qc['fragment_below_um2']:g} µm² "
            "(fragments: over-segmentation, cut nuclei or debris)"
        )
    return warnings


@dataclass(frozen=True)
class CropWindow:
    """A region of the slide shown in the report: level-0 box, size at the inference
    µm/px, and why it was chosen (its rank from densest to sparsest)."""

    x0: float
    y0: float
    width: float
    height: float
    width_px: int
    height_px: int
    kind: str
    density_per_mm2: float

    @property
    def box(self) -> tuple[float, float, float, float]:
        return self.x0, self.y0, self.x0 + self.width, self.y0 + self.height

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Crop:
    """A window read from the slide, without and with the nucleus outlines drawn."""

    window: CropWindow
    image: np.ndarray
    outlined: np.ndarray
    nuclei: int
    per_class: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        return {**self.window.to_dict(), "nuclei": self.nuclei, "per_class": dict(self.per_class)}


def choose_crops(
    counts: np.ndarray,
    cell: float,
    tissue_mask: np.ndarray | None,
    tissue_downsample: tuple[float, float],
    slide_size: tuple[int, int],
    slide_mpp: tuple[float, float],
    mpp: float,
    *,
    size: int = CROP_PX,
    count: int = CROP_COUNT,
) -> list[CropWindow]:
    """Up to ``count`` windows of ``size`` x ``size`` px at ``mpp``, spread over the tissue
    and over the range of nucleus densities.

    ``counts``: nuclei per cell of a grid of ``cell`` level-0 px (the report's density
    grid, all classes); ``tissue_mask``: the tissue mask with its level-0 px per mask px.
    Every tissue cell is a candidate, scored by the nuclei in a window centred on it;
    the i-th window goes to the candidate nearest the i-th density quantile (densest
    first, sparsest last) that lies farthest from the windows already chosen, so the
    crops neither overlap nor cluster. No tissue: no crops.
    """
    from scipy import ndimage

    width0, height0 = slide_size
    fx, fy = mpp / slide_mpp[0], mpp / slide_mpp[1]
    crop_w, crop_h = min(size * fx, float(width0)), min(size * fy, float(height0))
    rows, cols = counts.shape
    centres_y, centres_x = np.mgrid[0:rows, 0:cols].astype(np.float64)
    centres_x, centres_y = (centres_x + 0.5) * cell, (centres_y + 0.5) * cell
    if tissue_mask is not None and tissue_mask.any():
        mr = np.minimum((centres_y / tissue_downsample[1]).astype(int), tissue_mask.shape[0] - 1)
        mc = np.minimum((centres_x / tissue_downsample[0]).astype(int), tissue_mask.shape[1] - 1)
        candidate = tissue_mask[mr, mc] & (centres_x < width0) & (centres_y < height0)
    else:
        candidate = counts > 0
    if not candidate.any():
        return []
    kh, kw = max(1, round(crop_h / cell)), max(1, round(crop_w / cell))
    window_counts = ndimage.uniform_filter(counts.astype(np.float64), size=(kh, kw), mode="constant") * kh * kw
    window_mm2 = kh * kw * cell * cell * slide_mpp[0] * slide_mpp[1] / 1e6
    index = np.flatnonzero(candidate.ravel())
    order = index[np.argsort(-window_counts.ravel()[index], kind="stable")]  # densest first
    n = len(order)
    count = min(count, n)
    # Each candidate's window, clamped inside the slide.
    bx = np.clip(centres_x.ravel()[order] - crop_w / 2, 0.0, width0 - crop_w)
    by = np.clip(centres_y.ravel()[order] - crop_h / 2, 0.0, height0 - crop_h)
    chosen: list[int] = []  # positions in ``order``
    reach = max(1, n // (2 * count))
    for i in range(count):
        target = 0 if count == 1 else round(i * (n - 1) / (count - 1))
        pool = np.arange(max(0, target - reach), min(n, target + reach + 1))
        pool = pool[~np.isin(pool, chosen)]
        if not pool.size:
            continue
        if not chosen:
            pick = pool[np.argmin(np.abs(pool - target))]
        else:
            # Gap to the nearest chosen window in window sizes (>= 1: no overlap).
            gaps = np.min(
                np.maximum(
                    np.abs(bx[pool, None] - bx[chosen][None, :]) / crop_w,
                    np.abs(by[pool, None] - by[chosen][None, :]) / crop_h,
                ),
                axis=1,
            )
            pick = pool[np.argmax(gaps)]
        chosen.append(int(pick))
    windows = []
    for rank, pos in enumerate(chosen):
        windows.append(
            CropWindow(
                x0=float(bx[pos]),
                y0=float(by[pos]),
                width=float(crop_w),
                height=float(crop_h),
                width_px=max(1, round(crop_w / fx)),
                height_px=max(1, round(crop_h / fy)),
                kind=_kind(rank, len(chosen)),
                density_per_mm2=float(window_counts.ravel()[order[pos]] / window_mm2),
            )
        )
    return windows


def _kind(rank: int, total: int) -> str:
    if total == 1:
        return "tissue"
    q = rank / (total - 1)
    if q == 0:
        return "densest"
    if q == 1:
        return "sparsest"
    return "dense" if q < 0.4 else ("middle" if q <= 0.6 else "sparse")


def read_crops(
    slide: Any,
    windows: Sequence[CropWindow],
    mpp: float,
    table: Path,
    classes: Sequence[Mapping[str, Any]],
    *,
    thickness: int = 2,
) -> list[Crop]:
    """Read each window from the open ``slide`` at ``mpp`` and draw the outlines of the
    nuclei ``table`` (the GeoParquet file) holds there, each in its class colour."""
    from wsi_pipeline.outputs.parquet import nuclei_in_box

    colors = {t: tuple(int(v) for v in cls["color"]) for t, cls in class_table(classes).items()}
    names = {t: cls["name"] for t, cls in class_table(classes).items()}
    crops = []
    for window in windows:
        image = slide.read_region_at(window.x0, window.y0, window.width_px, window.height_px, mpp)
        rows = nuclei_in_box(table, window.box, columns=("class_id", "centroid_x", "centroid_y", "geometry"))
        outlined = draw_outlines(image, window, rows, colors, thickness=thickness)
        cx = np.asarray(rows.column("centroid_x"))
        cy = np.asarray(rows.column("centroid_y"))
        x0, y0, x1, y1 = window.box
        inside = (cx >= x0) & (cx < x1) & (cy >= y0) & (cy < y1)
        types = np.asarray(rows.column("class_id"))[inside]
        values, numbers = np.unique(types, return_counts=True)
        per_class = {names.get(int(t), UNTYPED_NAME): int(n) for t, n in zip(values, numbers, strict=True)}
        crops.append(Crop(window, image, outlined, int(inside.sum()), per_class))
    return crops


def draw_outlines(
    image: np.ndarray,
    window: CropWindow,
    rows: Any,
    colors: Mapping[int, tuple[int, int, int]],
    *,
    thickness: int = 2,
) -> np.ndarray:
    """A copy of ``image`` (the window at the inference µm/px) with the outline of every
    polygon of ``rows`` (a table with ``class_id`` and WKB ``geometry`` in level-0 px)
    drawn in its class colour. Hard-edged lines, so the colours stay exact."""
    import cv2
    import shapely

    out = np.ascontiguousarray(image.copy())
    if rows.num_rows == 0:
        return out
    fx = window.width / window.width_px
    fy = window.height / window.height_px
    shift = 4  # cv2 takes sub-pixel points as fixed-point integers with this many fractional bits
    geometries = shapely.from_wkb(np.asarray(rows.column("geometry").to_pylist(), dtype=object))
    types = np.asarray(rows.column("class_id"))
    for t in np.unique(types):
        rings = []
        for geometry in geometries[types == t]:
            xy = shapely.get_coordinates(shapely.get_exterior_ring(geometry))
            # Vertices lie on pixel edges; cv2's integer points are pixel centres.
            u = (xy[:, 0] - window.x0) / fx - 0.5
            v = (xy[:, 1] - window.y0) / fy - 0.5
            rings.append(np.round(np.column_stack([u, v]) * (1 << shift)).astype(np.int32))
        color = colors.get(int(t), (160, 160, 160))
        cv2.polylines(out, rings, isClosed=True, color=color, thickness=thickness, lineType=cv2.LINE_8, shift=shift)
    return out
