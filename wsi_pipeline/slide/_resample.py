"""Resample a pixel window onto an output grid with exact geometry.

Reading "at a target µm/px" means mapping each output pixel onto a (generally
fractional) footprint in a pyramid level. Getting that mapping exactly right, rather
than approximately with a plain resize, is what lets neighbouring tiles abut without
a half-pixel seam, and lets nuclei found in a tile be mapped back to level-0
coordinates without drift. The convention everywhere: pixel ``i`` covers the
continuous interval ``[i, i + 1)``; its centre is ``i + 0.5``.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

# Above this many source pixels per output pixel, block-average by an integer factor
# first: bilinear sampling alone would alias (skip pixels) when shrinking that much.
PREFILTER_FROM = 2.0


def resample(
    src: np.ndarray,
    origin_x: float,
    origin_y: float,
    step_x: float,
    step_y: float,
    out_w: int,
    out_h: int,
) -> np.ndarray:
    """Sample ``src`` on a regular grid; output pixel ``(j, i)`` covers the source
    interval ``[origin + i * step, origin + (i + 1) * step)`` per axis.

    ``src`` is an HxWx3 uint8 window that must contain every footprint (plus one pixel
    of context for interpolation; the caller pads). ``step < 1`` upsamples (bicubic),
    ``step >= 2`` is block-averaged by an integer factor first (area resampling, so
    thumbnails do not alias), the rest is bilinear. Integer origins with a step of 1
    are a plain copy, so native-resolution reads are bit-exact.
    """
    if out_w <= 0 or out_h <= 0:
        return np.zeros((max(out_h, 0), max(out_w, 0), 3), dtype=np.uint8)
    if step_x == 1.0 and step_y == 1.0 and float(origin_x).is_integer() and float(origin_y).is_integer():
        x0, y0 = int(origin_x), int(origin_y)
        return np.ascontiguousarray(src[y0 : y0 + out_h, x0 : x0 + out_w])

    factor = int(math.floor(min(step_x, step_y))) if min(step_x, step_y) >= PREFILTER_FROM else 1
    if factor > 1:
        h = (src.shape[0] // factor) * factor
        w = (src.shape[1] // factor) * factor
        src = cv2.resize(src[:h, :w], (w // factor, h // factor), interpolation=cv2.INTER_AREA)
        origin_x, origin_y = origin_x / factor, origin_y / factor
        step_x, step_y = step_x / factor, step_y / factor

    # Inverse map: output centre (i + 0.5) -> source centre-based index.
    matrix = np.array(
        [
            [step_x, 0.0, origin_x + 0.5 * step_x - 0.5],
            [0.0, step_y, origin_y + 0.5 * step_y - 0.5],
        ],
        dtype=np.float64,
    )
    interpolation = cv2.INTER_CUBIC if max(step_x, step_y) < 1.0 else cv2.INTER_LINEAR
    return cv2.warpAffine(
        src,
        matrix,
        (out_w, out_h),
        flags=interpolation | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_REPLICATE,
    )
