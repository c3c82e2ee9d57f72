"""HoVer-Net post-processing: NP/HV/TP maps -> labelled nuclei.

The recipe is HoVer-Net's (Graham et al. 2019, ``models/hovernet/post_proc.py``
of the official code): threshold NP at 0.5, drop small blobs, take Sobel
derivatives of the HV maps (x map along x, y map along y), turn them into a
boundary "energy", keep the blob pixels of low energy as markers and run a
marker-controlled watershed inside the blobs. Every step is a whole-array
operation; only contour tracing loops, once per nucleus, on its bbox crop.

Tile dependence (see ``docs/postproc.md`` for the measurement): the official
code min-max normalises the Sobel responses over the whole input, so the
boundary threshold of one nucleus depends on the steepest gradient anywhere
in the tile. ``hv_norm="none"`` (the default) replaces the tile's min/max with
fixed constants expressed in physical gradient units, so a pixel's energy
depends only on its neighbourhood and tiled and whole-image results agree.
``hv_norm="minmax"`` reproduces the official behaviour.

Coordinates follow the pixel-edge convention: pixel (row r, col c) covers
x in [c, c+1], y in [r, r+1]. Centroids, contours and bboxes of a map whose
top-left corner sits at level-0 position (ox, oy) with level-0 pixels per map
pixel ``s`` therefore map to level 0 as ``(ox + x * s, oy + y * s)``, exactly.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from functools import cache
from typing import Any, Literal

import cv2
import numpy as np
from scipy import ndimage as ndi
from skimage.measure import find_contours
from skimage.segmentation import relabel_sequential, watershed

from wsi_pipeline.classes import majority_types
from wsi_pipeline.errors import ConfigError
from wsi_pipeline.nuclei import Nucleus

HvNorm = Literal["none", "minmax"]

__all__ = [
    "HvNorm",
    "PostprocConfig",
    "PostprocResult",
    "boundary_energy",
    "describe_nuclei",
    "instance_map",
    "postprocess",
    "sobel_range",
]


# The maps' µm/px when a caller gives none: every shipped model and the public HoVer-Net
# checkpoints run at 0.25 µm/px (40x).
DEFAULT_MAP_MPP = 0.25


@dataclass(frozen=True)
class PostprocConfig:
    """Parameters of the HoVer post-processing (defaults: the official fast pipeline).

    Object and marker size limits are areas in µm² (``min_object_um2``,
    ``min_marker_um2``), converted to pixels at the maps' µm/px, so one model's
    calibrated values hold when it runs at another resolution; the defaults are
    the official 10 px at 0.25 µm/px. ``fill_holes`` fills enclosed holes of each
    nucleus (a pale chromatin centre read as background). Each model may carry
    its own values in its metadata (:meth:`from_meta`), calibrated on its own
    dev-split predictions (``benchmarks/calibrate_postproc.py``).

    ``sobel_low``/``sobel_high`` are used only with ``hv_norm="none"``: they are
    the fixed stand-ins for the tile's minimum and maximum Sobel response, in
    units of "HV value per pixel" (the raw [-1, 1] map), calibrated on ground
    truth HV maps of CoNSeP/MoNuSeg at 0.25 um/px (docs/postproc.md).
    """

    np_threshold: float = 0.5
    min_object_um2: float = 0.625
    sobel_ksize: int = 21
    marker_threshold: float = 0.4
    marker_open_size: int = 5
    min_marker_um2: float = 0.625
    fill_holes: bool = False
    hv_norm: HvNorm = "none"
    sobel_low: float = -0.29
    sobel_high: float = 0.175

    def pixels(self, um2: float, mpp: float) -> int:
        """An area in µm² as a whole number of pixels at ``mpp`` µm/px."""
        return int(round(um2 / (mpp * mpp)))

    def to_meta(self) -> dict[str, float | int | str | bool]:
        """The values as a model's metadata stores them."""
        return dict(asdict(self))

    @classmethod
    def from_meta(cls, values: Any, source: str = "model metadata") -> PostprocConfig:
        """The post-processing a model's metadata names (missing keys: the defaults).

        A model file is data from somewhere else: a wrong key or a value out of range is
        refused with the file named, never silently replaced by a default.
        """
        fix = ("remove or correct the 'postproc' entry of that model's metadata "
               "(benchmarks/calibrate_postproc.py writes a calibrated copy under a new name)")
        if values is None:
            return cls()
        if not isinstance(values, dict):
            raise ConfigError(source, f"its 'postproc' metadata is a {type(values).__name__}, not a mapping", fix)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(source, f"its 'postproc' metadata has unknown keys {unknown} (known: {sorted(known)})",
                              fix)
        try:
            return cls(**values)
        except ConfigError as exc:
            raise ConfigError(source, f"its 'postproc' metadata is out of range: {exc.problem}", fix) from None
        except TypeError as exc:
            raise ConfigError(source, f"its 'postproc' metadata is malformed ({exc})", fix) from None

    def __post_init__(self) -> None:
        problems = []
        if not 0.0 < self.np_threshold < 1.0:
            problems.append(f"np_threshold={self.np_threshold} must lie strictly between 0 and 1")
        for name in ("min_object_um2", "min_marker_um2"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 200.0:
                problems.append(f"{name}={value!r} must be an area between 0 and 200 µm²")
        if not isinstance(self.fill_holes, bool):
            problems.append(f"fill_holes={self.fill_holes!r} must be true or false")
        if self.sobel_ksize not in (1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31):
            problems.append(f"sobel_ksize={self.sobel_ksize} must be odd and between 1 and 31")
        if not 0.0 < self.marker_threshold < 1.0:
            problems.append(f"marker_threshold={self.marker_threshold} must lie strictly between 0 and 1")
        if self.marker_open_size < 1:
            problems.append("marker_open_size must be >= 1")
        if self.hv_norm not in ("none", "minmax"):
            problems.append(f"hv_norm={self.hv_norm!r} must be 'none' or 'minmax'")
        if not self.sobel_low < 0.0 < self.sobel_high:
            problems.append("sobel_low must be < 0 < sobel_high")
        if problems:
            raise ConfigError(
                None,
                "invalid post-processing settings: " + "; ".join(problems),
                "use the defaults (the official HoVer-Net fast-pipeline values) unless you have measured better ones",
            )


@dataclass
class PostprocResult:
    """Instance map (int32, 0 = background, labels 1..N) and one Nucleus per label, in label order.

    The nuclei are in the maps' pixel grid: ``polygon`` float32 (marching squares at
    half-pixel resolution, always a valid simple polygon for shapely), ``bbox`` whole
    pixels, ``area_um2`` and ``uuid`` unset (the worker places them in the slide).
    """

    inst_map: np.ndarray
    nuclei: list[Nucleus]


def postprocess(
    np_prob: np.ndarray,
    hv: np.ndarray,
    tp_prob: np.ndarray | None = None,
    *,
    config: PostprocConfig | None = None,
    mpp: float = DEFAULT_MAP_MPP,
) -> PostprocResult:
    """Turn the engine's maps into labelled nuclei with geometry and class.

    ``np_prob`` (H, W) is the nucleus probability, ``hv`` (2, H, W) the
    horizontal (x) and vertical (y) maps in [-1, 1], ``tp_prob`` (C, H, W)
    the type softmax with background at index 0, or None; ``mpp`` the maps'
    µm/px (for the size limits in µm²).
    """
    cfg = config or PostprocConfig()
    np_prob, hv, tp_prob = _check_maps(np_prob, hv, tp_prob)
    inst_map = instance_map(np_prob, hv, cfg, mpp)
    return PostprocResult(inst_map=inst_map, nuclei=describe_nuclei(inst_map, np_prob, tp_prob))


def instance_map(
    np_prob: np.ndarray, hv: np.ndarray, config: PostprocConfig, mpp: float = DEFAULT_MAP_MPP
) -> np.ndarray:
    """Marker-controlled watershed of the HoVer recipe; labels 1..N consecutive (int32)."""
    min_object = config.pixels(config.min_object_um2, mpp)
    blob = _remove_small(ndi.label(np_prob >= config.np_threshold)[0], min_object) > 0
    energy = boundary_energy(hv, config)
    # Outside the blobs the energy is irrelevant: the official code subtracts (1 - blob) and clips.
    energy = np.where(blob, energy, 0.0).astype(np.float32)
    dist = -cv2.GaussianBlur((1.0 - energy) * blob, (3, 3), 0)

    marker = blob & (energy < config.marker_threshold)
    marker = ndi.binary_fill_holes(marker).astype(np.uint8)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (config.marker_open_size,) * 2)
    marker = cv2.morphologyEx(marker, cv2.MORPH_OPEN, kernel)
    marker = _remove_small(ndi.label(marker)[0], config.pixels(config.min_marker_um2, mpp))

    labels = watershed(dist, markers=marker, mask=blob).astype(np.int32)
    if config.fill_holes:
        labels = _fill_holes(labels)
    # Watershed pieces below the object size are fragments, not nuclei (the blob filter saw them joined).
    labels = _remove_small(labels, min_object)
    return relabel_sequential(labels)[0].astype(np.int32)


def _fill_holes(labels: np.ndarray) -> np.ndarray:
    """Fill holes enclosed by one nucleus with its label.

    A hole of one nucleus is a hole of the union of all nuclei whose every 4-neighbour
    carries that nucleus' label; a gap that two touching nuclei enclose together stays
    background. One pass over the whole map (not one fill per nucleus: a tile holds
    thousands).
    """
    holes = ndi.binary_fill_holes(labels > 0) & (labels == 0)
    if not holes.any():
        return labels
    hole_ids, count = ndi.label(holes)
    # Every (hole, nucleus) pair that touches, from the four neighbour directions.
    pairs = []
    for dy, dx in ((0, 1), (0, -1), (1, 0), (-1, 0)):
        h = hole_ids[max(dy, 0) : hole_ids.shape[0] + min(dy, 0), max(dx, 0) : hole_ids.shape[1] + min(dx, 0)]
        n = labels[max(-dy, 0) : labels.shape[0] + min(-dy, 0), max(-dx, 0) : labels.shape[1] + min(-dx, 0)]
        touch = (h > 0) & (n > 0)
        pairs.append(np.stack([h[touch], n[touch]], axis=1))
    pairs = np.unique(np.concatenate(pairs), axis=0)
    neighbours = np.bincount(pairs[:, 0], minlength=count + 1)
    fill = np.zeros(count + 1, dtype=labels.dtype)
    single = pairs[neighbours[pairs[:, 0]] == 1]
    fill[single[:, 0]] = single[:, 1]
    out = labels.copy()
    out[holes] = fill[hole_ids[holes]]
    return out


def boundary_energy(hv: np.ndarray, config: PostprocConfig) -> np.ndarray:
    """Per-pixel boundary energy in [0, 1]: high where the HV maps jump (between nuclei).

    The Sobel response of the x map along x (and y map along y) is positive
    inside a nucleus (the map rises from -1 to 1) and strongly negative where
    one nucleus ends and the next begins; energy = 1 - normalised response.
    """
    k = config.sobel_ksize
    energies = []
    for channel, (dx, dy) in zip(hv, ((1, 0), (0, 1)), strict=True):
        channel = np.ascontiguousarray(channel, dtype=np.float32)
        if config.hv_norm == "minmax":
            # Official: rescale the map then the response to [0, 1] over this input (tile-dependent).
            scaled = cv2.normalize(channel, None, 0.0, 1.0, cv2.NORM_MINMAX, dtype=cv2.CV_32F)
            response = cv2.Sobel(scaled, cv2.CV_64F, dx, dy, ksize=k)
            norm = cv2.normalize(response, None, 0.0, 1.0, cv2.NORM_MINMAX, dtype=cv2.CV_32F)
        else:
            # Fixed: response in HV units per pixel, then the calibrated constant range.
            gradient = cv2.Sobel(channel, cv2.CV_64F, dx, dy, ksize=k) / _ramp_gain(k)
            lo, hi = config.sobel_low, config.sobel_high
            norm = np.clip((gradient - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)
        energies.append(1.0 - norm)
    return np.maximum(energies[0], energies[1])


def sobel_range(hv: np.ndarray, ksize: int = 21) -> tuple[float, float]:
    """The (min, max) gradient, in HV units per pixel, that min-max normalisation would use here.

    The medians of these over representative tiles are the fixed
    ``sobel_low``/``sobel_high`` of ``hv_norm="none"``: the defaults come from
    ground-truth maps of the 13 MoNuSeg training tiles; a model whose HV maps
    are systematically softer can be calibrated on its own validation output.
    """
    lows, highs = [], []
    for channel, (dx, dy) in zip(hv, ((1, 0), (0, 1)), strict=True):
        grad = cv2.Sobel(np.ascontiguousarray(channel, dtype=np.float32), cv2.CV_64F, dx, dy, ksize=ksize)
        grad /= _ramp_gain(ksize)
        lows.append(float(grad.min()))
        highs.append(float(grad.max()))
    return float(np.mean(lows)), float(np.mean(highs))


@cache
def _ramp_gain(ksize: int) -> float:
    """Sobel output for a unit-slope ramp: divides the response into a true gradient (per pixel)."""
    ramp = np.tile(np.arange(2 * ksize + 1, dtype=np.float64), (2 * ksize + 1, 1))
    return float(cv2.Sobel(ramp, cv2.CV_64F, 1, 0, ksize=ksize)[ksize, ksize])


def _remove_small(labels: np.ndarray, min_size: int) -> np.ndarray:
    """Zero the components smaller than ``min_size`` px (as skimage.remove_small_objects)."""
    if min_size <= 1 or labels.max() == 0:
        return labels
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_size
    keep[0] = False
    return np.where(keep[labels], labels, 0)


def describe_nuclei(inst_map: np.ndarray, np_prob: np.ndarray, tp_prob: np.ndarray | None = None) -> list[Nucleus]:
    """Measure every label of a consecutive instance map: geometry, majority type, class means.

    Sums per label use ``np.bincount`` over the nucleus pixels (one pass per
    quantity, no per-pixel Python work); only contours are traced per nucleus.
    """
    n = int(inst_map.max())
    if n == 0:
        return []
    # Work on nucleus pixels only: every per-label sum is one bincount over them.
    pix = np.flatnonzero(inst_map)
    lab = inst_map.ravel()[pix]
    rows, cols = np.divmod(pix, inst_map.shape[1])
    area = np.bincount(lab, minlength=n + 1)
    safe_area = np.maximum(area, 1)
    cx = np.bincount(lab, weights=cols, minlength=n + 1) / safe_area + 0.5
    cy = np.bincount(lab, weights=rows, minlength=n + 1) / safe_area + 0.5

    if tp_prob is not None:
        n_cls = tp_prob.shape[0]
        probs = [tp_prob[c].ravel()[pix] for c in range(n_cls)]
        class_probs = np.stack([np.bincount(lab, weights=p, minlength=n + 1) for p in probs], axis=1)
        class_probs /= safe_area[:, None]
        # Per-pixel arg-max class (first maximum wins, as np.argmax), one channel at a time.
        best, pix_type = probs[0].copy(), np.zeros(pix.size, dtype=np.int64)
        for c in range(1, n_cls):
            better = probs[c] > best
            best[better], pix_type[better] = probs[c][better], c
        types, votes = majority_types(lab, pix_type, num_labels=n + 1, num_types=n_cls)
        type_prob = votes / safe_area
    else:
        class_probs = np.zeros((n + 1, 0), dtype=np.float32)
        types = np.zeros(n + 1, dtype=np.int64)
        type_prob = np.bincount(lab, weights=np_prob.ravel()[pix], minlength=n + 1) / safe_area

    nuclei = []
    for label, sl in enumerate(ndi.find_objects(inst_map), start=1):
        if sl is None:
            continue
        y0, y1 = sl[0].start, sl[0].stop
        x0, x1 = sl[1].start, sl[1].stop
        contour = _trace_contour(inst_map[sl] == label)
        contour += np.array([x0, y0], dtype=np.float32)
        nuclei.append(
            Nucleus(
                label=label,
                polygon=contour,
                centroid=(float(cx[label]), float(cy[label])),
                bbox=(int(x0), int(y0), int(x1), int(y1)),
                area_px=int(area[label]),
                type=int(types[label]),
                type_prob=float(type_prob[label]),
                class_probs=class_probs[label].astype(np.float32),
            )
        )
    return nuclei


def _trace_contour(mask: np.ndarray) -> np.ndarray:
    """Outer boundary of a mask crop as (x, y) float32 vertices, pixel-edge convention.

    Marching squares at level 0.5 on the zero-padded crop runs through the
    mid-points of boundary pixel edges, so even a one-pixel-wide object gives
    a non-degenerate simple polygon (unlike pixel-centre chains, which fold
    back on themselves). Holes are ignored; with several pieces the largest wins.
    """
    padded = np.pad(mask.astype(np.uint8), 1)
    rings = find_contours(padded, 0.5, fully_connected="high")
    best, best_area = None, -1.0
    for ring in rings:
        xy = ring[:, ::-1]  # (row, col) -> (x, y)
        area = abs(_signed_area(xy))
        if area > best_area:
            best, best_area = xy, area
    assert best is not None  # a non-empty mask always has a boundary
    if np.array_equal(best[0], best[-1]):
        best = best[:-1]
    best = _drop_collinear(best)
    # padded index p is crop index p - 1, whose pixel-edge coordinate is (p - 1) + 0.5
    return (best - 0.5).astype(np.float32)


def _signed_area(xy: np.ndarray) -> float:
    x, y = xy[:, 0], xy[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


def _drop_collinear(ring: np.ndarray) -> np.ndarray:
    """Remove vertices lying on the straight line through their neighbours (open ring)."""
    prev = np.roll(ring, 1, axis=0)
    nxt = np.roll(ring, -1, axis=0)
    a, b = ring - prev, nxt - ring
    cross = a[:, 0] * b[:, 1] - a[:, 1] * b[:, 0]
    keep = np.abs(cross) > 1e-9
    return ring[keep] if keep.sum() >= 3 else ring


def _check_maps(
    np_prob: np.ndarray, hv: np.ndarray, tp_prob: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Validate shapes early: a transposed or channel-last map would otherwise give silent garbage."""
    np_prob = np.asarray(np_prob, dtype=np.float32)
    hv = np.asarray(hv, dtype=np.float32)
    if np_prob.ndim != 2:
        raise ValueError(f"np_prob must be (H, W), got shape {np_prob.shape}")
    if hv.shape != (2, *np_prob.shape):
        raise ValueError(f"hv must be (2, H, W) = (2, {np_prob.shape[0]}, {np_prob.shape[1]}), got {hv.shape}")
    if tp_prob is not None:
        tp_prob = np.asarray(tp_prob, dtype=np.float32)
        if tp_prob.ndim != 3 or tp_prob.shape[1:] != np_prob.shape or tp_prob.shape[0] < 2:
            raise ValueError(f"tp_prob must be (C>=2, H, W) matching np_prob {np_prob.shape}, got {tp_prob.shape}")
    return np_prob, hv, tp_prob
