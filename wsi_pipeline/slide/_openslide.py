"""The openslide backend: vendor formats (Aperio, Hamamatsu, MIRAX, Leica, Ventana...)
and tiled pyramidal TIFFs.

openslide returns premultiplied-then-unpremultiplied RGBA where areas outside the
scanned region are transparent; we composite on white so "outside" looks like glass
for the tissue detector and the model alike.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from wsi_pipeline.slide._resolution import mpp_from_properties, parse_float
from wsi_pipeline.slide.base import Level, Slide, to_rgb


class OpenSlideSlide(Slide):
    """A slide opened with openslide-python (needs the openslide library, e.g. openslide-bin)."""

    backend = "openslide"

    def __init__(self, path: str | Path, *, mpp: float | None = None, require_mpp: bool = True) -> None:
        import openslide  # imported here: only users of this backend need the C library

        self._handle = openslide.OpenSlide(str(path))
        try:
            props = dict(self._handle.properties)
            levels = [
                Level(int(w), int(h), float(d))
                for (w, h), d in zip(self._handle.level_dimensions, self._handle.level_downsamples, strict=True)
            ]
            associated = sorted(self._handle.associated_images.keys())
        except Exception:
            self._handle.close()
            raise
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

    def _associated_image(self, name: str) -> np.ndarray:
        return to_rgb(np.asarray(self._handle.associated_images[name]))

    def _close(self) -> None:
        self._handle.close()
