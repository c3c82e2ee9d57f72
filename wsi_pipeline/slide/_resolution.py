"""Physical resolution (µm per pixel) from slide metadata.

Slides state their resolution in several dialects: ``openslide.mpp-x``,
``tiffslide.mpp-x``, or the plain TIFF tags XResolution + ResolutionUnit, which many
non-microscopy tools fill with a screen value (72 or 300 dpi). A wrong µm/px silently
rescales every nucleus, so values outside what a microscope produces are treated as
missing and the user is asked for ``--mpp``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

# A 100x oil objective is ~0.05 µm/px, a 1x overview ~10-20 µm/px. 72..1200 dpi
# (352..21 µm/px), the usual values written by image editors, fall outside.
MPP_PLAUSIBLE_MIN = 0.05
MPP_PLAUSIBLE_MAX = 20.0

_UM_PER_UNIT = {"centimeter": 1e4, "cm": 1e4, "3": 1e4, "inch": 25400.0, "2": 25400.0}


def parse_float(value: Any) -> float | None:
    """A positive finite float from a property value, or None."""
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(number) or number <= 0:
        return None
    return number


def plausible_mpp(value: float | None) -> float | None:
    """``value`` if it is a microscopy resolution, else None."""
    if value is None or not MPP_PLAUSIBLE_MIN <= value <= MPP_PLAUSIBLE_MAX:
        return None
    return value


def _rational(value: Any) -> float | None:
    if isinstance(value, tuple | list) and len(value) == 2:
        num, den = parse_float(value[0]), parse_float(value[1])
        return None if num is None or den is None else num / den
    return parse_float(value)


def mpp_from_resolution(resolution: Any, unit: Any) -> float | None:
    """µm/px from a TIFF (X|Y)Resolution (pixels per unit, maybe a rational pair) and
    its ResolutionUnit (name, enum or number); None when the unit is not physical."""
    pixels_per_unit = _rational(resolution)
    if pixels_per_unit is None:
        return None
    key = str(getattr(unit, "name", unit)).strip().lower()
    um_per_unit = _UM_PER_UNIT.get(key)
    if um_per_unit is None:
        return None
    return um_per_unit / pixels_per_unit


def mpp_from_properties(
    properties: Mapping[str, Any], mpp_keys: tuple[str, str], tiff_prefix: str = "tiff."
) -> tuple[float | None, float | None, str | None]:
    """(mpp_x, mpp_y, source) from a property map: the backend's own keys first, then
    TIFF resolution tags. A missing y falls back to x (square pixels)."""
    mpp_x = plausible_mpp(parse_float(properties.get(mpp_keys[0])))
    mpp_y = plausible_mpp(parse_float(properties.get(mpp_keys[1])))
    if mpp_x is not None:
        return mpp_x, mpp_y or mpp_x, mpp_keys[0]
    unit = properties.get(f"{tiff_prefix}ResolutionUnit")
    mpp_x = plausible_mpp(mpp_from_resolution(properties.get(f"{tiff_prefix}XResolution"), unit))
    mpp_y = plausible_mpp(mpp_from_resolution(properties.get(f"{tiff_prefix}YResolution"), unit))
    if mpp_x is not None:
        return mpp_x, mpp_y or mpp_x, "TIFF resolution tags"
    return None, None, None
