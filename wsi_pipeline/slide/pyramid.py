"""Write a tiled pyramidal TIFF that both openslide and tiffslide read alike.

The layout is the one both libraries agree on (tested empirically, openslide 4.0 and
tiffslide 3): every level is a top-level page (SubIFD pyramids are invisible to
openslide), levels >= 1 are marked SubfileType=reduced-resolution (openslide's
generic-tiff reader otherwise sees only level 0), 256 px JPEG tiles, and resolution
tags in pixels per centimetre on every page. No Aperio-style ImageDescription: an
SVS-looking file with reduced-type levels is read differently by tiffslide.

Levels are streamed strip by strip from the source slide at each level's resolution
(the source's own pyramid does the downsampling), so memory stays bounded.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from wsi_pipeline.atomic import atomic_path
from wsi_pipeline.errors import SlideError
from wsi_pipeline.slide.base import Level, Slide

DEFAULT_TILE = 256
DEFAULT_QUALITY = 85


@dataclass(frozen=True)
class PyramidInfo:
    """What was written."""

    path: Path
    mpp: float
    levels: list[Level] = field(default_factory=list)
    size_bytes: int = 0


def pyramid_levels(width: int, height: int, tile: int = DEFAULT_TILE, min_levels: int = 1) -> list[Level]:
    """Level sizes halving until the whole level fits in one tile (and at least
    ``min_levels`` levels)."""
    levels = [Level(width, height, 1.0)]
    k = 0
    while max(levels[-1].width, levels[-1].height) > tile or len(levels) < min_levels:
        k += 1
        w, h = max(1, math.ceil(width / 2**k)), max(1, math.ceil(height / 2**k))
        if (w, h) == (levels[-1].width, levels[-1].height):
            break
        levels.append(Level(w, h, float(2**k)))
    return levels


def write_pyramid(
    source: Slide,
    out: str | os.PathLike[str],
    *,
    mpp: float | None = None,
    region: tuple[float, float, float, float] | None = None,
    tile: int = DEFAULT_TILE,
    quality: int = DEFAULT_QUALITY,
    description: str = "wsi_pipeline pyramid",
) -> PyramidInfo:
    """Write ``source`` (or a level-0 ``region`` x, y, w, h of it) resampled to
    ``mpp`` (default: the source's own) as a pyramidal TIFF at ``out``.

    The file is written under a temporary name and renamed, so ``out`` is either
    complete or absent.
    """
    import tifffile

    out = Path(out)
    mpp = float(mpp if mpp is not None else source.mpp_x)
    if tile <= 0 or tile % 16:
        raise ValueError(f"TIFF tile size must be a positive multiple of 16, got {tile}")
    x0, y0, w0, h0 = region if region is not None else (0.0, 0.0, float(source.width), float(source.height))
    if w0 <= 0 or h0 <= 0 or x0 < 0 or y0 < 0 or x0 + w0 > source.width or y0 + h0 > source.height:
        raise SlideError(
            source.path,
            f"region x={x0} y={y0} w={w0} h={h0} is not inside the {source.width}x{source.height} px slide",
            "give a region (level-0 pixels) within the slide",
        )
    fx, fy = source.scale(mpp)
    width, height = max(1, round(w0 / fx)), max(1, round(h0 / fy))
    levels = pyramid_levels(width, height, tile)
    raw_bytes = sum(lv.width * lv.height * 3 for lv in levels)

    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as partial, tifffile.TiffWriter(partial, bigtiff=raw_bytes > 2**31) as writer:
        for index, level in enumerate(levels):
            level_mpp = mpp * level.downsample
            pixels_per_cm = 1e4 / level_mpp
            writer.write(
                _tiles(source, x0, y0, level, level_mpp, tile),
                shape=(level.height, level.width, 3),
                dtype=np.uint8,
                tile=(tile, tile),
                photometric="rgb",
                compression="jpeg",
                compressionargs={"level": quality},
                subfiletype=1 if index else 0,
                resolution=(pixels_per_cm, pixels_per_cm),
                resolutionunit="CENTIMETER",
                description=description if index == 0 else None,
                software="wsi_pipeline",
                metadata=None,
            )
    return PyramidInfo(path=out, mpp=mpp, levels=levels, size_bytes=out.stat().st_size)


def _tiles(source: Slide, x0: float, y0: float, level: Level, level_mpp: float, tile: int) -> Iterator[np.ndarray]:
    """Tiles of one output level in row-major order, read one strip of tiles at a time."""
    fx, fy = source.scale(level_mpp)
    cols = math.ceil(level.width / tile)
    rows = math.ceil(level.height / tile)
    for row in range(rows):
        strip = source.read_region_at(x0, y0 + row * tile * fy, cols * tile, tile, level_mpp)
        # Beyond the level's own edge (the last partial tile), keep the image white
        # rather than whatever source pixels lie past the requested region.
        valid_w = level.width - (cols - 1) * tile
        valid_h = min(tile, level.height - row * tile)
        strip[valid_h:] = 255
        strip[:, (cols - 1) * tile + valid_w :] = 255
        for col in range(cols):
            yield strip[:, col * tile : (col + 1) * tile]
