"""The openslide backend: vendor formats (Aperio, Hamamatsu, MIRAX, Leica, Ventana...)
and tiled pyramidal TIFFs.

openslide returns premultiplied-then-unpremultiplied RGBA where areas outside the
scanned region are transparent; we composite on white so "outside" looks like glass
for the tissue detector and the model alike.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from wsi_pipeline.slide._handle import HandleSlide
from wsi_pipeline.slide._resolution import mpp_from_properties, parse_float
from wsi_pipeline.slide.base import to_rgb


class OpenSlideSlide(HandleSlide):
    """A slide opened with openslide-python (needs the openslide library, e.g. openslide-bin)."""

    backend = "openslide"

    def __init__(self, path: str | Path, *, mpp: float | None = None, require_mpp: bool = True) -> None:
        import openslide  # imported here: only users of this backend need the C library

        self._handle = openslide.OpenSlide(str(path))
        with self._closing_on_error():
            props, levels, associated = self._header()
        super().__init__(
            path,
            levels=levels,
            mpp=mpp_from_properties(props, ("openslide.mpp-x", "openslide.mpp-y")),
            objective_power=parse_float(props.get("openslide.objective-power")),
            vendor=props.get("openslide.vendor"),
            properties=props,
            associated_images=associated,
            mpp_override=mpp,
            require_mpp=require_mpp,
        )

    def _read_level(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        downsample = self.levels[level].downsample
        # openslide takes the location in level-0 pixels and divides by the downsample
        # itself; rounding keeps the level-pixel offset within 1/(2*downsample) px.
        location = (round(x * downsample), round(y * downsample))
        region = self._handle.read_region(location, level, (width, height))
        return to_rgb(np.asarray(region))
