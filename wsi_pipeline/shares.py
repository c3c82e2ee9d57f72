"""Which network windows neighbouring tiles share, planned once in the driver.

Every tile's maps are cut from the slide-wide window grid
(:class:`~wsi_pipeline.engine.infer.WindowGrid`), so a window under a tile border belongs
to the read regions of two tiles (four at a corner). The driver knows every tile of the
slide; a worker only knows its own. So the driver tells each tile, per shared window, how
many other tiles will read it and which part of it they read (the bounding box of their
read regions inside the window): whichever of them computes the window first leaves that
part in its process' :class:`~wsi_pipeline.engine.window_cache.WindowCache`, and the last
reader frees it. Windows only one tile reads are not listed (nothing to leave behind).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from wsi_pipeline.engine.infer import WindowGrid
from wsi_pipeline.tiling import Tile

__all__ = ["WindowShare", "plan_shares", "tile_windows"]

Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class WindowShare:
    """Window ``(i, j)`` of the grid as one tile sees it: ``readers``, how many other tiles
    read it; ``box`` (x0, y0, x1, y1, slide px at the inference µm/px), the part they read."""

    i: int
    j: int
    readers: int
    box: Box


def tile_windows(tile: Tile, grid: WindowGrid) -> list[tuple[int, int, Box]]:
    """(i, j, the part of the tile's read region in it) for every window meeting the read region."""
    read = tile.read
    out = []
    for i in grid.indices(read.y0, read.y1):
        for j in grid.indices(read.x0, read.x1):
            x0, y0, x1, y1 = grid.contributed(i, j)
            out.append((i, j, (max(x0, read.x0), max(y0, read.y0), min(x1, read.x1), min(y1, read.y1))))
    return out


def plan_shares(tiles: Iterable[Tile], grid: WindowGrid) -> dict[int, tuple[WindowShare, ...]]:
    """For each tile index, the windows it shares with other tiles of ``tiles`` (the tiles
    that will run: a resumed slide's checkpointed tiles read nothing)."""
    users: dict[tuple[int, int], list[tuple[int, Box]]] = defaultdict(list)
    for tile in tiles:
        for i, j, part in tile_windows(tile, grid):
            users[(i, j)].append((tile.index, part))
    shares: dict[int, list[WindowShare]] = defaultdict(list)
    for (i, j), readers in users.items():
        if len(readers) < 2:
            continue
        for index, _ in readers:
            others = [part for other, part in readers if other != index]
            box = (
                min(p[0] for p in others), min(p[1] for p in others),
                max(p[2] for p in others), max(p[3] for p in others),
            )
            shares[index].append(WindowShare(i, j, len(others), box))
    return {index: tuple(found) for index, found in shares.items()}
