"""Where the tissue is: a boolean mask from a low-resolution thumbnail.

Stained tissue is coloured; glass, dust and scanner background are grey or white. So
the detector thresholds colour saturation (Otsu's threshold on the thumbnail, kept
within a range that real slides fall in, or a fixed value), then cleans up with
morphology whose sizes are in µm so they mean the same at any thumbnail resolution.
It runs at ~8 µm/px: cheap (a 100k x 100k px slide at 0.25 µm/px is a 3k x 3k
thumbnail) and fine enough to decide which 0.5 mm tiles hold tissue.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from wsi_pipeline.slide.base import Slide, level0_scale, size_at_mpp

DEFAULT_MASK_MPP = 8.0
# Otsu's threshold is clipped into this saturation range. Below it, Otsu splits
# scanner noise on a blank slide; above it, on a slide full of tissue it splits pale
# stroma from dark epithelium and would drop the pale part.
OTSU_MIN = 0.05
OTSU_MAX = 0.10


@dataclass(frozen=True)
class TissueCrop:
    """Part of a :class:`TissueMask`: ``mask`` holds its mask pixels from column ``c0``,
    row ``r0`` on, each covering ``downsample_x`` x ``downsample_y`` level-0 pixels."""

    mask: np.ndarray
    c0: int
    r0: int
    downsample_x: float
    downsample_y: float

    def on_grid(self, x0: int, y0: int, width: int, height: int, scale_x: float, scale_y: float) -> np.ndarray:
        """The crop resampled (nearest) onto ``height x width`` pixels whose top-left is pixel
        ``(x0, y0)`` of a grid of ``scale_x`` x ``scale_y`` level-0 pixels per pixel (a tile's
        read region at the inference µm/px). Pixels outside the crop are not tissue."""
        out = np.zeros((height, width), dtype=bool)
        if self.mask.size == 0 or width <= 0 or height <= 0:
            return out
        cols = np.floor((x0 + np.arange(width) + 0.5) * scale_x / self.downsample_x).astype(np.int64) - self.c0
        rows = np.floor((y0 + np.arange(height) + 0.5) * scale_y / self.downsample_y).astype(np.int64) - self.r0
        col_ok = (cols >= 0) & (cols < self.mask.shape[1])
        row_ok = (rows >= 0) & (rows < self.mask.shape[0])
        inside = self.mask[np.ix_(rows[row_ok], cols[col_ok])]
        out[np.ix_(np.flatnonzero(row_ok), np.flatnonzero(col_ok))] = inside
        return out


@dataclass(frozen=True)
class TissueMask:
    """A tissue mask and its geometry: pixel (r, c) covers level-0
    ``[c * downsample_x, (c + 1) * downsample_x) x [r * downsample_y, (r + 1) * downsample_y)``."""

    mask: np.ndarray
    mpp: float
    downsample_x: float
    downsample_y: float
    threshold: float

    @property
    def downsample(self) -> float:
        """Level-0 pixels per mask pixel (horizontally)."""
        return self.downsample_x

    @property
    def area_mm2(self) -> float:
        """Tissue area: mask pixels x their physical area."""
        return float(np.count_nonzero(self.mask)) * self.mpp * self.mpp / 1e6

    @property
    def fraction(self) -> float:
        """Share of the slide (mask pixels) that is tissue."""
        return float(np.count_nonzero(self.mask)) / max(1, self.mask.size)

    @property
    def is_empty(self) -> bool:
        return not bool(self.mask.any())

    def crop(self, x0: float, y0: float, x1: float, y1: float) -> TissueCrop:
        """The mask pixels under the level-0 box ``[x0, x1) x [y0, y1)``, small enough to
        travel with a tile task (a 2000 px tile at 0.25 µm/px is ~60 x 60 mask pixels)."""
        rows, cols = self.mask.shape
        c0 = min(max(int(math.floor(x0 / self.downsample_x)), 0), cols)
        r0 = min(max(int(math.floor(y0 / self.downsample_y)), 0), rows)
        c1 = min(max(int(math.ceil(x1 / self.downsample_x)), c0), cols)
        r1 = min(max(int(math.ceil(y1 / self.downsample_y)), r0), rows)
        return TissueCrop(
            np.ascontiguousarray(self.mask[r0:r1, c0:c1], dtype=bool), c0, r0, self.downsample_x, self.downsample_y
        )

    @classmethod
    def full(cls, width0: int, height0: int, mpp_x: float, mpp_y: float, mpp: float) -> TissueMask:
        """An all-tissue mask (processing without tissue detection)."""
        dx, dy = level0_scale((mpp_x, mpp_y), mpp)
        width, height = size_at_mpp(width0, height0, (mpp_x, mpp_y), mpp)
        return cls(np.ones((height, width), dtype=bool), mpp, dx, dy, 0.0)


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation in [0, 1]: (max - min) / max per pixel, 0 for black."""
    rgb = rgb.astype(np.float32)
    high = rgb.max(axis=2)
    low = rgb.min(axis=2)
    return np.where(high > 0, (high - low) / np.maximum(high, 1.0), 0.0).astype(np.float32)


def otsu_threshold(values: np.ndarray) -> float:
    """Otsu's threshold of values in [0, 1] (256 bins); 1.0 for a constant image."""
    hist, edges = np.histogram(values, bins=256, range=(0.0, 1.0))
    hist = hist.astype(np.float64)
    centres = (edges[:-1] + edges[1:]) / 2
    weight_low = np.cumsum(hist)
    weight_high = weight_low[-1] - weight_low
    sum_low = np.cumsum(hist * centres)
    mean_low = sum_low / np.maximum(weight_low, 1e-12)
    mean_high = (sum_low[-1] - sum_low) / np.maximum(weight_high, 1e-12)
    between = weight_low * weight_high * (mean_low - mean_high) ** 2
    between[(weight_low == 0) | (weight_high == 0)] = -1
    if between.max() <= 0:
        return 1.0
    return float(edges[int(np.argmax(between)) + 1])


def detect_tissue(
    rgb: np.ndarray,
    mpp: float,
    threshold: float | None = None,
    min_area_um2: float = 10_000.0,
    max_hole_um2: float = 10_000.0,
    closing_um: float = 16.0,
) -> tuple[np.ndarray, float]:
    """Tissue mask of an RGB thumbnail at ``mpp`` µm/px; returns (mask, threshold used).

    Args:
        threshold: saturation in [0, 1] above which a pixel is tissue; None picks it
            by Otsu, clipped to [OTSU_MIN, OTSU_MAX].
        min_area_um2: tissue pieces smaller than this are dropped (dust, debris).
        max_hole_um2: holes smaller than this are filled (nuclei-free lumen spots).
        closing_um: gaps narrower than about this are bridged.
    """
    sat = cv2.GaussianBlur(saturation(rgb), (0, 0), sigmaX=1.0)
    if threshold is None:
        threshold = float(np.clip(otsu_threshold(sat), OTSU_MIN, OTSU_MAX))
    mask = sat > threshold
    radius = max(1, round(closing_um / mpp / 2))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    # Pad before closing so tissue touching the border is not eroded by the edge.
    padded = cv2.copyMakeBorder(mask.astype(np.uint8), radius, radius, radius, radius, cv2.BORDER_REPLICATE)
    closed = cv2.morphologyEx(padded, cv2.MORPH_CLOSE, kernel)[radius:-radius, radius:-radius].astype(bool)
    pixel_area = mpp * mpp
    mask = _drop_small(closed, min_area_um2 / pixel_area)
    holes = _drop_small(~mask, max_hole_um2 / pixel_area, keep_border=True)
    return ~holes, threshold


def _drop_small(mask: np.ndarray, min_pixels: float, keep_border: bool = False) -> np.ndarray:
    """``mask`` without 8-connected components smaller than ``min_pixels``; with
    ``keep_border``, components touching the image border are always kept (for holes:
    background open to the outside is not a hole)."""
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    if count <= 1:
        return mask.copy()
    keep = stats[:, cv2.CC_STAT_AREA] >= min_pixels
    if keep_border:
        border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
        keep[border] = True
    keep[0] = False
    return keep[labels]


def tissue_mask(
    slide: Slide,
    mpp: float = DEFAULT_MASK_MPP,
    threshold: float | None = None,
    *,
    thumbnail: np.ndarray | None = None,
    min_area_um2: float = 10_000.0,
    max_hole_um2: float = 10_000.0,
) -> TissueMask:
    """Tissue mask of ``slide`` at ``mpp`` µm/px (a blank slide gives an empty mask).

    ``thumbnail`` lets a caller that already read ``slide.thumbnail(mpp)`` (to draw an
    overlay) avoid reading it twice.
    """
    if thumbnail is None:
        thumbnail = slide.thumbnail(mpp)
    expected = slide.size_at(mpp)
    if thumbnail.shape[1] != expected[0] or thumbnail.shape[0] != expected[1]:
        raise ValueError(f"thumbnail is {thumbnail.shape[1]}x{thumbnail.shape[0]}, expected {expected}")
    mask, used = detect_tissue(
        thumbnail, mpp, threshold=threshold, min_area_um2=min_area_um2, max_hole_um2=max_hole_um2
    )
    fx, fy = slide.scale(mpp)
    return TissueMask(mask=mask, mpp=mpp, downsample_x=fx, downsample_y=fy, threshold=used)
