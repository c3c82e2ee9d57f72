"""The tile grid: core regions that partition the slide, each read with a margin.

The grid is defined at the *target* resolution (the model's µm/px), in whole pixels:
tile (row, col) owns target pixels ``[col*T, (col+1)*T) x [row*T, (row+1)*T)``, cut
at the slide's edge. Neighbouring cores therefore abut exactly, with no gap or overlap
however the target and level-0 resolutions relate; the level-0 boxes are the same
boxes scaled (fractional when the ratio is), so they partition the slide too.

Each tile is read with a margin of context on every side, clipped at the slide's
border (there is no context to read beyond it). Only tiles whose core touches tissue
are kept, in row-major order, so a run is deterministic.

The engine reads a tile with
``slide.read_region_at(t.read_level0.x0, t.read_level0.y0, t.read.width, t.read.height, mpp)``
and finds the core inside that image at ``t.core_in_read``; target pixel (u, v)
(slide-global) is level-0 ``(u * t.scale_x, v * t.scale_y)``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from wsi_pipeline.slide.base import level0_scale, size_at_mpp
from wsi_pipeline.slide.tissue import TissueMask

_EPS = 1e-6


@dataclass(frozen=True)
class PixelBox:
    """A half-open box ``[x0, x1) x [y0, y1)`` in whole pixels."""

    x0: int
    y0: int
    x1: int
    y1: int

    @property
    def width(self) -> int:
        return self.x1 - self.x0

    @property
    def height(self) -> int:
        return self.y1 - self.y0

    def contains(self, x: float, y: float) -> bool:
        return self.x0 <= x < self.x1 and self.y0 <= y < self.y1

    def shifted(self, dx: int, dy: int) -> PixelBox:
        return PixelBox(self.x0 + dx, self.y0 + dy, self.x1 + dx, self.y1 + dy)

    def as_list(self) -> list[int]:
        return [self.x0, self.y0, self.x1, self.y1]


@dataclass(frozen=True)
class Level0Box:
    """A half-open box in level-0 pixels; fractional when the target resolution is
    not an integer multiple of level 0."""

    x0: float
    y0: float
    x1: float
    y1: float

    @property
    def width(self) -> float:
        return self.x1 - self.x0

    @property
    def height(self) -> float:
        return self.y1 - self.y0

    def contains(self, x: float, y: float) -> bool:
        return self.x0 <= x < self.x1 and self.y0 <= y < self.y1

    def as_list(self, ndigits: int | None = None) -> list[float]:
        values = [self.x0, self.y0, self.x1, self.y1]
        return values if ndigits is None else [round(v, ndigits) for v in values]


@dataclass(frozen=True)
class Tile:
    """One unit of work: a core region (owned results) and the larger read region.

    ``core`` and ``read`` are in slide-global pixels at the target µm/px; the
    ``*_level0`` boxes are the same regions in level-0 pixels, clipped to the slide.
    ``scale_x``/``scale_y`` are level-0 pixels per target pixel.
    """

    index: int
    row: int
    col: int
    core: PixelBox
    read: PixelBox
    core_level0: Level0Box
    read_level0: Level0Box
    scale_x: float
    scale_y: float

    @property
    def core_in_read(self) -> PixelBox:
        """The core inside the read image (pixels at the target µm/px)."""
        return self.core.shifted(-self.read.x0, -self.read.y0)

    @property
    def margins(self) -> tuple[int, int, int, int]:
        """Context actually available (left, top, right, bottom) after clipping."""
        return (
            self.core.x0 - self.read.x0,
            self.core.y0 - self.read.y0,
            self.read.x1 - self.core.x1,
            self.read.y1 - self.core.y1,
        )

    def read_to_level0(self, x: Any, y: Any) -> tuple[Any, Any]:
        """Map coordinates in the read image (target pixels, scalars or arrays) to
        level-0 pixels."""
        return (self.read.x0 + np.asarray(x)) * self.scale_x, (self.read.y0 + np.asarray(y)) * self.scale_y

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def target_size(width0: int, height0: int, mpp0: float | tuple[float, float], target_mpp: float) -> tuple[int, int]:
    """Slide size at ``target_mpp``: every target pixel overlapping the slide
    (:func:`wsi_pipeline.slide.base.size_at_mpp`, so the grid covers exactly the slide's
    :meth:`~wsi_pipeline.slide.base.Slide.size_at`)."""
    return size_at_mpp(width0, height0, mpp0, target_mpp)


def grid_shape(
    width0: int, height0: int, mpp0: float | tuple[float, float], target_mpp: float, tile_px: int
) -> tuple[int, int]:
    """(rows, cols) of the full grid, before tissue selection."""
    width, height = target_size(width0, height0, mpp0, target_mpp)
    return math.ceil(height / tile_px), math.ceil(width / tile_px)


def tile_grid(
    width0: int,
    height0: int,
    mpp0: float | tuple[float, float],
    target_mpp: float,
    tile_px: int,
    margin_px: int,
    tissue: TissueMask | None = None,
) -> list[Tile]:
    """Tiles whose core touches tissue (all tiles when ``tissue`` is None).

    Args:
        width0, height0: level-0 size of the slide.
        mpp0: level-0 µm/px, one value or (x, y).
        target_mpp: the resolution the tiles are processed at.
        tile_px: core size in pixels at ``target_mpp`` (edge tiles are smaller).
        margin_px: context added on each side, in pixels at ``target_mpp``.
        tissue: mask deciding which tiles are kept.
    """
    if tile_px <= 0:
        raise ValueError(f"tile size must be positive, got {tile_px}")
    if margin_px < 0:
        raise ValueError(f"margin must be >= 0, got {margin_px}")
    if width0 <= 0 or height0 <= 0:
        raise ValueError(f"slide size must be positive, got {width0}x{height0}")
    fx, fy = level0_scale(mpp0, target_mpp)
    width, height = target_size(width0, height0, mpp0, target_mpp)
    rows, cols = math.ceil(height / tile_px), math.ceil(width / tile_px)
    touches = _TissueLookup(tissue) if tissue is not None else None
    tiles: list[Tile] = []
    for row in range(rows):
        for col in range(cols):
            core = PixelBox(
                col * tile_px, row * tile_px, min((col + 1) * tile_px, width), min((row + 1) * tile_px, height)
            )
            core0 = _to_level0(core, fx, fy, (width, height), (width0, height0))
            if touches is not None and not touches(core0):
                continue
            read = PixelBox(
                max(core.x0 - margin_px, 0),
                max(core.y0 - margin_px, 0),
                min(core.x1 + margin_px, width),
                min(core.y1 + margin_px, height),
            )
            tiles.append(
                Tile(
                    index=len(tiles),
                    row=row,
                    col=col,
                    core=core,
                    read=read,
                    core_level0=core0,
                    read_level0=_to_level0(read, fx, fy, (width, height), (width0, height0)),
                    scale_x=fx,
                    scale_y=fy,
                )
            )
    return tiles


def _to_level0(box: PixelBox, fx: float, fy: float, size: tuple[int, int], size0: tuple[int, int]) -> Level0Box:
    """The box in level-0 pixels, clipped to the slide.

    The same products for shared edges of neighbours, so level-0 cores abut exactly. A box
    that ends at the grid's last pixel ends at the slide's edge: ``width * fx`` can fall an
    ulp short of ``width0`` (2277 x 1.0979... = 2499.9999999999995 for a 2500 px slide).
    """
    (width, height), (width0, height0) = size, size0
    x1 = float(width0) if box.x1 >= width else min(box.x1 * fx, float(width0))
    y1 = float(height0) if box.y1 >= height else min(box.y1 * fy, float(height0))
    return Level0Box(box.x0 * fx, box.y0 * fy, x1, y1)


class _TissueLookup:
    """Does a level-0 box overlap any tissue pixel? O(1) per box via a summed-area table."""

    def __init__(self, tissue: TissueMask) -> None:
        self.dx, self.dy = tissue.downsample_x, tissue.downsample_y
        mask = np.asarray(tissue.mask, dtype=bool)
        self.rows, self.cols = mask.shape
        self.table = np.zeros((self.rows + 1, self.cols + 1), dtype=np.int64)
        self.table[1:, 1:] = mask.cumsum(axis=0).cumsum(axis=1)

    def __call__(self, box: Level0Box) -> bool:
        # Mask pixels whose footprint overlaps the box with positive area, widened by
        # a hair so float noise can only add a tile, never lose tissue.
        c0 = max(math.floor(box.x0 / self.dx - _EPS), 0)
        r0 = max(math.floor(box.y0 / self.dy - _EPS), 0)
        c1 = min(math.ceil(box.x1 / self.dx + _EPS), self.cols)
        r1 = min(math.ceil(box.y1 / self.dy + _EPS), self.rows)
        if c1 <= c0 or r1 <= r0:
            return False
        t = self.table
        return bool(t[r1, c1] - t[r0, c1] - t[r1, c0] + t[r0, c0] > 0)
