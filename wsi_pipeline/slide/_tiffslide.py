"""The tiffslide backend: pure-Python (tifffile + zarr) reader of TIFF-based slides.

Handles what openslide refuses, e.g. untiled or single-page TIFFs (MoNuSeg tiles), and
needs no C library. Written against the tiffslide 2/3 API; features that moved
between versions (``as_array``, the tifffile handle) are detected, not version-checked.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np

from wsi_pipeline.slide._handle import HandleSlide
from wsi_pipeline.slide._resolution import (
    mpp_from_properties,
    mpp_from_resolution,
    parse_float,
    plausible_mpp,
)
from wsi_pipeline.slide.base import to_rgb


class TiffSlideSlide(HandleSlide):
    """A slide opened with tiffslide."""

    backend = "tiffslide"

    def __init__(self, path: str | Path, *, mpp: float | None = None, require_mpp: bool = True) -> None:
        import tiffslide

        self._handle = tiffslide.TiffSlide(str(path))
        with self._closing_on_error():
            props, levels, associated = self._header()
            found = mpp_from_properties(props, ("tiffslide.mpp-x", "tiffslide.mpp-y"))
            if found[0] is None:
                found = self._mpp_from_tags()
            self._as_array = "as_array" in inspect.signature(self._handle.read_region).parameters
        super().__init__(
            path,
            levels=levels,
            mpp=found,
            objective_power=parse_float(props.get("tiffslide.objective-power")),
            # tiffslide reports no vendor for plain TIFFs; openslide calls them generic-tiff.
            vendor=props.get("tiffslide.vendor") or "generic-tiff",
            properties=props,
            associated_images=associated,
            mpp_override=mpp,
            require_mpp=require_mpp,
        )

    def _mpp_from_tags(self) -> tuple[float | None, float | None, str | None]:
        """Resolution tags of the first page, for tiffslide versions that do not map them."""
        tif = getattr(self._handle, "ts_tifffile", None)
        if tif is None or not getattr(tif, "pages", None):
            return None, None, None
        tags = tif.pages[0].tags
        unit = tags.get("ResolutionUnit")
        unit_value = unit.value if unit is not None else None
        values = []
        for name in ("XResolution", "YResolution"):
            tag = tags.get(name)
            values.append(plausible_mpp(mpp_from_resolution(tag.value, unit_value)) if tag else None)
        if values[0] is None:
            return None, None, None
        return values[0], values[1] or values[0], "TIFF resolution tags"

    def _level0_location(self, coord: int, downsample: float) -> int:
        """A level-0 coordinate that tiffslide maps back to level pixel ``coord``
        (it truncates ``location / downsample``)."""
        location = round(coord * downsample)
        while int(location / downsample) < coord:
            location += 1
        while location > 0 and int(location / downsample) > coord:
            location -= 1
        return location

    def _read_level(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        downsample = self.levels[level].downsample
        location = (self._level0_location(x, downsample), self._level0_location(y, downsample))
        if self._as_array:
            region = self._handle.read_region(location, level, (width, height), as_array=True)
        else:
            region = np.asarray(self._handle.read_region(location, level, (width, height)))
        return to_rgb(region)
