"""What the openslide and tiffslide backends share: a handle with openslide's API.

tiffslide mirrors openslide-python's interface (``properties``, ``level_dimensions``,
``level_downsamples``, ``associated_images``, ``close``), so both backends read a
slide's header, its associated images and close it the same way. Only opening, the
µm/px fallback and region reads differ, and those stay in each backend.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from wsi_pipeline.slide.base import Level, Slide, to_rgb


class HandleSlide(Slide):
    """A slide read through an openslide-style handle, kept in ``self._handle``."""

    _handle: Any

    @contextmanager
    def _closing_on_error(self) -> Iterator[None]:
        """Close the handle if reading its header fails: the slide object is never built,
        so nothing else would release the file."""
        try:
            yield
        except Exception:
            self._handle.close()
            raise

    def _header(self) -> tuple[dict[str, Any], list[Level], list[str]]:
        """The handle's properties, pyramid levels and sorted associated image names."""
        props = dict(self._handle.properties)
        levels = [
            Level(int(w), int(h), float(d))
            for (w, h), d in zip(self._handle.level_dimensions, self._handle.level_downsamples, strict=True)
        ]
        return props, levels, sorted(self._handle.associated_images.keys())

    def _associated_image(self, name: str) -> np.ndarray:
        return to_rgb(np.asarray(self._handle.associated_images[name]))

    def _close(self) -> None:
        self._handle.close()
