"""The slide object every backend returns: geometry, resolution, and reads at a µm/px.

Backends (openslide, tiffslide, plain images) only know how to read an in-bounds
window of one pyramid level. Everything that must behave identically whichever
library opened the file lives here: choosing the level, padding outside the slide
with white, resampling to the target resolution with exact geometry, and the error
messages. That is what makes the two backends give the same answers on the same
file (tests/test_slide_compat.py checks it).

Coordinates: level-0 pixels, x right, y down, pixel ``i`` covering ``[i, i + 1)``.
A read "at mpp" has output pixels that each cover ``mpp / mpp_x`` level-0 pixels
horizontally and ``mpp / mpp_y`` vertically.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from wsi_pipeline.errors import SlideError
from wsi_pipeline.slide._resample import PREFILTER_FROM, resample

# A level up to this much coarser than the target still counts as "not coarser":
# pyramid downsamples are often 2.0003 rather than 2 because level sizes are rounded.
_LEVEL_TOLERANCE = 1e-3
# Targets finer than level 0 by more than this are reported as upsampled
# (0.25 µm/px from a 0.2527 µm/px "40x" scan is not worth a warning).
UPSAMPLE_TOLERANCE = 0.05
# Largest source window read in one piece; bigger reads are split into chunks so a
# thumbnail of a huge single-level slide never holds the whole level in memory.
_MAX_WINDOW_PX = 4096
_SUBPIXEL_EPS = 1e-6

_MPP_FIX = (
    "pass the resolution explicitly, e.g. --mpp 0.25 for a 40x scan or --mpp 0.5 for 20x "
    "(open_slide(..., mpp=...) from Python)"
)


@dataclass(frozen=True)
class Level:
    """One pyramid level: its size in pixels and its downsample from level 0."""

    width: int
    height: int
    downsample: float

    def to_dict(self) -> dict[str, Any]:
        return {"width": self.width, "height": self.height, "downsample": self.downsample}


@dataclass(frozen=True)
class SlideSpec:
    """What a worker needs to reopen the same slide the same way: slide handles hold
    native resources and do not pickle, so tasks carry this instead."""

    path: str
    backend: str = "auto"
    mpp: float | None = None

    def open(self) -> Slide:
        from wsi_pipeline.slide.opener import open_slide

        return open_slide(self.path, backend=self.backend, mpp=self.mpp)


class Slide(ABC):
    """A whole-slide image (or plain image) opened read-only.

    Subclasses open their handle, then call ``super().__init__`` with what they found,
    and implement :meth:`_read_level` (an in-bounds window of one level, RGB uint8)
    and :meth:`_associated_image`.
    """

    backend: str = ""

    def __init__(
        self,
        path: str | Path,
        *,
        levels: Sequence[Level],
        mpp: tuple[float | None, float | None, str | None],
        objective_power: float | None,
        vendor: str | None,
        properties: Mapping[str, Any],
        associated_images: Sequence[str],
        mpp_override: float | None = None,
        require_mpp: bool = True,
    ) -> None:
        self.path = Path(path)
        self._closed = False
        if not levels or levels[0].width <= 0 or levels[0].height <= 0:
            self.close()
            raise SlideError(self.path, "has no image data (no level or an empty level 0)", "check that it is a slide")
        self.levels: tuple[Level, ...] = tuple(levels)
        self.width = self.levels[0].width
        self.height = self.levels[0].height
        self.objective_power = objective_power
        self.vendor = vendor
        self.properties: dict[str, str] = {str(k): str(v) for k, v in properties.items() if v is not None}
        self.associated_images: tuple[str, ...] = tuple(associated_images)
        self.mpp_override = mpp_override
        if mpp_override is not None:
            self._mpp_x: float | None = mpp_override
            self._mpp_y: float | None = mpp_override
            self.mpp_source: str | None = "override"
        else:
            self._mpp_x, self._mpp_y, self.mpp_source = mpp
        if require_mpp and self._mpp_x is None:
            self.close()
            raise SlideError(self.path, "has no µm/px (resolution) in its metadata", _MPP_FIX)

    # ----------------------------------------------------------------- backend API
    @abstractmethod
    def _read_level(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """RGB uint8 (height, width, 3) of level ``level`` at level pixel (x, y);
        the window is always inside the level."""

    @abstractmethod
    def _associated_image(self, name: str) -> np.ndarray:
        """RGB uint8 associated image (label, macro, thumbnail...)."""

    def _close(self) -> None:  # noqa: B027 - optional hook; plain images hold nothing
        """Release the backend's handle."""

    # ------------------------------------------------------------------ properties
    @property
    def dimensions(self) -> tuple[int, int]:
        return self.width, self.height

    @property
    def level_count(self) -> int:
        return len(self.levels)

    @property
    def has_mpp(self) -> bool:
        return self._mpp_x is not None

    @property
    def mpp_x(self) -> float:
        """µm per level-0 pixel horizontally."""
        if self._mpp_x is None:
            raise SlideError(self.path, "has no µm/px (resolution) in its metadata", _MPP_FIX)
        return self._mpp_x

    @property
    def mpp_y(self) -> float:
        """µm per level-0 pixel vertically."""
        if self._mpp_y is None:
            raise SlideError(self.path, "has no µm/px (resolution) in its metadata", _MPP_FIX)
        return self._mpp_y

    @property
    def spec(self) -> SlideSpec:
        """How to reopen this slide identically in another process."""
        return SlideSpec(str(self.path), self.backend, self.mpp_override)

    # ----------------------------------------------------------------- resolution
    def scale(self, mpp: float) -> tuple[float, float]:
        """Level-0 pixels per output pixel (x, y) for a read at ``mpp``."""
        _check_mpp(mpp)
        return level0_scale((self.mpp_x, self.mpp_y), mpp)

    def size_at(self, mpp: float) -> tuple[int, int]:
        """(width, height) of the whole slide at ``mpp``: every output pixel that
        overlaps the slide, the last one possibly only partly (read as white)."""
        _check_mpp(mpp)
        return size_at_mpp(self.width, self.height, (self.mpp_x, self.mpp_y), mpp)

    def best_level(self, mpp: float) -> int:
        """Index of the coarsest level that is not coarser than ``mpp``; level 0 when
        even level 0 is coarser (the read then upsamples)."""
        finest = max(self.mpp_x, self.mpp_y)
        best = 0
        for index, level in enumerate(self.levels):
            if level.downsample * finest <= mpp * (1 + _LEVEL_TOLERANCE) and (
                level.downsample > self.levels[best].downsample
            ):
                best = index
        return best

    def upsample_factor(self, mpp: float) -> float:
        """How much finer ``mpp`` is than level 0 (> 1 means upsampled)."""
        _check_mpp(mpp)
        return min(self.mpp_x, self.mpp_y) / mpp

    def is_upsampled(self, mpp: float, tolerance: float = UPSAMPLE_TOLERANCE) -> bool:
        """True when reads at ``mpp`` invent detail: the target is finer than level 0
        by more than ``tolerance`` (e.g. a 20x slide read for a 40x model)."""
        return self.upsample_factor(mpp) > 1 + tolerance

    # ---------------------------------------------------------------------- reads
    def read_region_at(self, x0: float, y0: float, width: int, height: int, mpp: float) -> np.ndarray:
        """RGB uint8 (height, width, 3) at ``mpp`` whose top-left corner is level-0
        (x0, y0); output pixel (j, i) covers level-0 ``[x0 + i*fx, x0 + (i+1)*fx)`` with
        ``fx = mpp / mpp_x`` (same for y). x0/y0 may be fractional; areas outside
        the slide are white.

        This is the exact form the tile grid uses: sizes are given at the target
        resolution, so tiles come out at exactly the requested pixel size.
        """
        if width < 0 or height < 0:
            raise ValueError(f"negative read size {width}x{height}")
        fx, fy = self.scale(mpp)
        level = self.best_level(mpp)
        downsample = self.levels[level].downsample
        step_x, step_y = fx / downsample, fy / downsample
        # Split reads whose source window would be too large into row/column chunks.
        rows = max(1, math.ceil(height * step_y / _MAX_WINDOW_PX))
        cols = max(1, math.ceil(width * step_x / _MAX_WINDOW_PX))
        if rows == 1 and cols == 1:
            return self._read_chunk(level, x0, y0, width, height, step_x, step_y)
        out = np.empty((height, width, 3), dtype=np.uint8)
        row_edges = np.linspace(0, height, rows + 1).round().astype(int)
        col_edges = np.linspace(0, width, cols + 1).round().astype(int)
        for r0, r1 in zip(row_edges[:-1], row_edges[1:], strict=True):
            for c0, c1 in zip(col_edges[:-1], col_edges[1:], strict=True):
                out[r0:r1, c0:c1] = self._read_chunk(
                    level, x0 + c0 * fx, y0 + r0 * fy, int(c1 - c0), int(r1 - r0), step_x, step_y
                )
        return out

    def read(self, x: float, y: float, w: float, h: float, mpp: float | None = None) -> np.ndarray:
        """RGB uint8 of the level-0 box (x, y, w, h) at ``mpp`` (default: level-0 pixels).

        Output size: ``round(w * mpp_x / mpp)`` x ``round(h * mpp_y / mpp)`` (Python's
        round, half to even). When exact sizes matter (tiles), use
        :meth:`read_region_at`, which takes the size at the target resolution instead.
        """
        if mpp is None:
            return self._read_chunk(0, x, y, round(w), round(h), 1.0, 1.0)
        fx, fy = self.scale(mpp)
        return self.read_region_at(x, y, round(w / fx), round(h / fy), mpp)

    def thumbnail(self, mpp: float) -> np.ndarray:
        """The whole slide at ``mpp`` (size :meth:`size_at`), read in bounded chunks
        from the best pyramid level."""
        width, height = self.size_at(mpp)
        return self.read_region_at(0.0, 0.0, width, height, mpp)

    def associated_image(self, name: str) -> np.ndarray:
        """An associated image (label, macro, thumbnail...) as RGB uint8."""
        if name not in self.associated_images:
            known = ", ".join(self.associated_images) or "none"
            raise SlideError(self.path, f"has no associated image {name!r} (it has: {known})", None)
        self._check_open()
        return self._associated_image(name)

    # ------------------------------------------------------------------ lifecycle
    def info(self) -> dict[str, Any]:
        """A JSON-ready description (what ``wsi-pipeline inspect`` prints)."""
        return {
            "path": str(self.path),
            "backend": self.backend,
            "width": self.width,
            "height": self.height,
            "mpp_x": self._mpp_x,
            "mpp_y": self._mpp_y,
            "mpp_source": self.mpp_source,
            "levels": [level.to_dict() for level in self.levels],
            "objective_power": self.objective_power,
            "vendor": self.vendor,
            "associated_images": list(self.associated_images),
        }

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        mpp = f"{self._mpp_x:g}" if self._mpp_x is not None else "?"
        return f"<{type(self).__name__} {self.path.name} {self.width}x{self.height} @ {mpp} µm/px>"

    # ------------------------------------------------------------------ internals
    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"slide {self.path} is closed")

    def _read_chunk(
        self,
        level: int,
        x0: float,
        y0: float,
        width: int,
        height: int,
        step_x: float,
        step_y: float,
    ) -> np.ndarray:
        downsample = self.levels[level].downsample
        # Continuous source coordinates in the level, and an integer window around them
        # with context for the interpolation. When shrinking by 2x or more, the window
        # starts at the first footprint so the block-averaging grid lines up with it
        # (context before it would bleed into the first output pixels).
        sx0, sy0 = x0 / downsample, y0 / downsample
        sx1, sy1 = sx0 + width * step_x, sy0 + height * step_y
        pad = 2
        before = 0 if min(step_x, step_y) >= PREFILTER_FROM else pad
        wx0 = math.floor(sx0 + _SUBPIXEL_EPS) - before
        wy0 = math.floor(sy0 + _SUBPIXEL_EPS) - before
        wx1 = math.ceil(sx1 - _SUBPIXEL_EPS) + pad + math.ceil(step_x)
        wy1 = math.ceil(sy1 - _SUBPIXEL_EPS) + pad + math.ceil(step_y)
        window = self._read_window(level, wx0, wy0, wx1 - wx0, wy1 - wy0)
        return resample(window, sx0 - wx0, sy0 - wy0, step_x, step_y, width, height)

    def _read_window(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """Any window of a level; the parts outside it are white."""
        self._check_open()
        lvl = self.levels[level]
        out = np.full((height, width, 3), 255, dtype=np.uint8)
        ix0, iy0 = max(x, 0), max(y, 0)
        ix1, iy1 = min(x + width, lvl.width), min(y + height, lvl.height)
        if ix1 <= ix0 or iy1 <= iy0:
            return out
        try:
            region = self._read_level(level, ix0, iy0, ix1 - ix0, iy1 - iy0)
        except SlideError:
            raise
        except Exception as exc:  # backends raise many types; all mean a damaged file here
            raise SlideError(
                self.path,
                f"could not be read at level {level}, pixels ({ix0}, {iy0}) size "
                f"{ix1 - ix0}x{iy1 - iy0} ({self.backend}: {type(exc).__name__}: {exc})",
                "the file is probably truncated or corrupt: copy it again from the scanner or "
                "archive; if it opens in another viewer, try --backend openslide|tiffslide",
            ) from exc
        out[iy0 - y : iy1 - y, ix0 - x : ix1 - x] = region
        return out


def level0_scale(mpp0: float | tuple[float, float], target_mpp: float) -> tuple[float, float]:
    """Level-0 pixels per target pixel (x, y) of a slide at ``mpp0`` µm/px (one value or (x, y))."""
    mpp_x, mpp_y = (mpp0, mpp0) if isinstance(mpp0, int | float) else mpp0
    if not (mpp_x > 0 and mpp_y > 0 and target_mpp > 0):
        raise ValueError(f"µm/px must be positive: slide {mpp0}, target {target_mpp}")
    return target_mpp / mpp_x, target_mpp / mpp_y


def size_at_mpp(width0: float, height0: float, mpp0: float | tuple[float, float], target_mpp: float) -> tuple[int, int]:
    """(width, height) at ``target_mpp`` of a level-0 extent ``width0`` x ``height0`` at ``mpp0``.

    Every target pixel that overlaps the extent counts, the last one possibly only
    partly (read as white), ignoring float noise (4440.0000000001 -> 4440), at least 1.
    The one definition of "a slide's size at a resolution": the slide's own
    :meth:`Slide.size_at`, the tile grid and the all-tissue mask use it, so a thumbnail,
    the grid and the label image always agree on the size of the same slide.
    """
    fx, fy = level0_scale(mpp0, target_mpp)
    return _ceil(width0 / fx), _ceil(height0 / fy)


def _check_mpp(mpp: float) -> None:
    if not (isinstance(mpp, int | float) and math.isfinite(mpp) and mpp > 0):
        raise ValueError(f"target µm/px must be a positive number, got {mpp!r}")


def _ceil(value: float) -> int:
    """Ceiling that ignores float noise (4440.0000000001 -> 4440)."""
    return max(1, math.ceil(value - _SUBPIXEL_EPS))


def to_rgb(array: np.ndarray) -> np.ndarray:
    """Any decoded pixel array as RGB uint8: grey replicated, alpha composited on
    white (transparent areas are outside the scanned region, i.e. glass), 16-bit
    scaled down."""
    arr = np.asarray(array)
    if arr.dtype == np.uint16:
        arr = (arr // 257).astype(np.uint8)
    elif arr.dtype != np.uint8:
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    if arr.ndim == 2:
        arr = arr[..., None]
    channels = arr.shape[2]
    if channels == 1:
        return np.repeat(arr, 3, axis=2)
    if channels == 2:  # grey + alpha
        arr = np.concatenate([np.repeat(arr[..., :1], 3, axis=2), arr[..., 1:]], axis=2)
        channels = 4
    if channels == 4:
        alpha = arr[..., 3:4].astype(np.uint16)
        rgb = arr[..., :3].astype(np.uint16)
        return ((rgb * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)
    return np.ascontiguousarray(arr[..., :3])
