"""Plain images (PNG, JPEG, in-memory arrays) seen as one-level slides.

Such files carry no trustworthy µm/px (PNG/JPEG dpi fields are screen values), so the
resolution must be given. They are decoded whole, which is fine for the crops and
tiles they usually are; a large scan belongs in a pyramidal TIFF instead.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from wsi_pipeline.errors import SlideError
from wsi_pipeline.slide.base import Level, Slide, to_rgb

# PIL refuses larger images as possible decompression bombs; we say why and what to do.
MAX_IMAGE_PIXELS = 30_000 * 30_000


class ArraySlide(Slide):
    """An RGB array held in memory, with a known µm/px (tests, synthetic samples)."""

    backend = "array"

    def __init__(
        self,
        array: np.ndarray,
        *,
        mpp: float | None,
        path: str | Path = "<array>",
        require_mpp: bool = True,
        vendor: str | None = None,
    ) -> None:
        self._array = to_rgb(array)
        height, width = self._array.shape[:2]
        super().__init__(
            path,
            levels=[Level(width, height, 1.0)],
            mpp=(None, None, None),
            objective_power=None,
            vendor=vendor,
            properties={},
            associated_images=(),
            mpp_override=mpp,
            require_mpp=require_mpp,
        )

    def _read_level(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        return self._array[y : y + height, x : x + width]

    def _associated_image(self, name: str) -> np.ndarray:
        raise KeyError(name)

    def _close(self) -> None:
        self._array = np.zeros((0, 0, 3), dtype=np.uint8)


class ImageSlide(ArraySlide):
    """A PNG/JPEG (or any file PIL decodes) opened as a single-level slide."""

    backend = "image"

    def __init__(self, path: str | Path, *, mpp: float | None = None, require_mpp: bool = True) -> None:
        from PIL import Image

        path = Path(path)
        with Image.open(path) as image:
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise SlideError(
                    path,
                    f"is a {image.width}x{image.height} plain image, too large to decode whole",
                    "convert it to a tiled pyramidal TIFF (e.g. `vips tiffsave IN OUT.tif --tile "
                    "--pyramid --compression jpeg`) and open that",
                )
            if image.mode not in ("RGB", "RGBA", "L", "LA"):
                image = image.convert("RGBA" if "transparency" in image.info else "RGB")
            array = np.asarray(image)
        if require_mpp and mpp is None:
            raise SlideError(
                path,
                "is a plain image, which carries no reliable µm/px",
                "pass its resolution, e.g. --mpp 0.25 for a 40x crop (open_slide(..., mpp=...) in Python)",
            )
        super().__init__(array, mpp=mpp, path=path, require_mpp=require_mpp, vendor="image")
