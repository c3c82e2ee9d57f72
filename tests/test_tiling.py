"""Tile grid: cores partition the slide, cover all tissue, margins stay inside."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wsi_pipeline.slide import TissueMask
from wsi_pipeline.tiling import grid_shape, target_size, tile_grid


def _mask(width0: int, height0: int, mpp0: float, mask_mpp: float, seed: int, density: float) -> TissueMask:
    full = TissueMask.full(width0, height0, mpp0, mpp0, mask_mpp)
    rng = np.random.default_rng(seed)
    bits = rng.random(full.mask.shape) < density
    return TissueMask(bits, mask_mpp, full.downsample_x, full.downsample_y, 0.1)


grids = st.fixed_dictionaries(
    {
        "width0": st.integers(1, 2000),
        "height0": st.integers(1, 2000),
        "mpp0": st.sampled_from([0.2277, 0.25, 0.2527, 0.499, 0.5]),
        "target_mpp": st.sampled_from([0.25, 0.5, 0.3]),
        "tile_px": st.integers(48, 700),
        "margin_px": st.integers(0, 100),
        "mask_mpp": st.sampled_from([4.0, 8.0, 13.0]),
        "seed": st.integers(0, 1000),
        "density": st.sampled_from([0.0, 0.02, 0.3, 1.0]),
    }
)


@settings(max_examples=150, deadline=None)
@given(grids)
def test_grid_properties(g: dict) -> None:
    mask = _mask(g["width0"], g["height0"], g["mpp0"], g["mask_mpp"], g["seed"], g["density"])
    tiles = tile_grid(g["width0"], g["height0"], g["mpp0"], g["target_mpp"], g["tile_px"], g["margin_px"], mask)
    width, height = target_size(g["width0"], g["height0"], g["mpp0"], g["target_mpp"])

    # Deterministic row-major order, compact indices.
    assert [t.index for t in tiles] == list(range(len(tiles)))
    assert [(t.row, t.col) for t in tiles] == sorted((t.row, t.col) for t in tiles)

    # Cores never overlap (at the target resolution, where they are whole pixels).
    painted = np.zeros((height, width), dtype=np.uint8)
    for t in tiles:
        painted[t.core.y0 : t.core.y1, t.core.x0 : t.core.x1] += 1
    assert painted.max() <= 1

    for t in tiles:
        # Margins stay inside the slide, and contain the core.
        assert 0 <= t.read.x0 <= t.core.x0 < t.core.x1 <= t.read.x1 <= width
        assert 0 <= t.read.y0 <= t.core.y0 < t.core.y1 <= t.read.y1 <= height
        assert t.read_level0.x0 >= 0 and t.read_level0.x1 <= g["width0"]
        assert t.read_level0.y0 >= 0 and t.read_level0.y1 <= g["height0"]
        assert all(0 <= m <= g["margin_px"] for m in t.margins)
        # Level-0 boxes are the target boxes scaled, clipped to the slide.
        assert t.core_level0.x0 == pytest.approx(t.core.x0 * t.scale_x)
        assert t.core_level0.x1 == pytest.approx(min(t.core.x1 * t.scale_x, g["width0"]))
        assert t.core_in_read.width == t.core.width and t.core_in_read.x0 == t.core.x0 - t.read.x0

    # Every tissue pixel is covered by cores: the level-0 area of its footprint
    # (inside the slide) equals its total overlap with the (disjoint) cores.
    rows, cols = mask.mask.shape
    fx0 = np.arange(cols) * mask.downsample_x
    fx1 = np.minimum(fx0 + mask.downsample_x, g["width0"])
    fy0 = np.arange(rows) * mask.downsample_y
    fy1 = np.minimum(fy0 + mask.downsample_y, g["height0"])
    if tiles:
        cx0, cx1, cy0, cy1 = (
            np.array([getattr(t.core_level0, k) for t in tiles])[:, None] for k in ("x0", "x1", "y0", "y1")
        )
        ox = np.clip(np.minimum(fx1, cx1) - np.maximum(fx0, cx0), 0, None)  # tiles x cols
        oy = np.clip(np.minimum(fy1, cy1) - np.maximum(fy0, cy0), 0, None)  # tiles x rows
        covered = oy.T @ ox
    else:
        covered = np.zeros((rows, cols))
    footprint = np.clip(fy1 - fy0, 0, None)[:, None] * np.clip(fx1 - fx0, 0, None)[None, :]
    tissue = mask.mask & (footprint > 0)
    np.testing.assert_allclose(covered[tissue], footprint[tissue], rtol=1e-6)

    # Kept tiles touch tissue; an all-tissue mask keeps the whole grid.
    if g["density"] == 0.0:
        assert tiles == []
    if g["density"] == 1.0:
        rows, cols = grid_shape(g["width0"], g["height0"], g["mpp0"], g["target_mpp"], g["tile_px"])
        assert len(tiles) == rows * cols


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 5000),
    st.sampled_from([0.2277, 0.2527, 0.499]),
    st.sampled_from([0.25, 0.5]),
    st.integers(16, 512),
)
def test_level0_cores_abut_exactly(width0: int, mpp0: float, target: float, tile_px: int) -> None:
    tiles = tile_grid(width0, 1, mpp0, target, tile_px, 8)  # one row of tiles
    assert {t.row for t in tiles} == {0}
    for left, right in zip(tiles, tiles[1:], strict=False):
        assert left.core.x1 == right.core.x0
        assert left.core_level0.x1 == right.core_level0.x0  # bit-identical floats
    assert tiles[0].core_level0.x0 == 0 and tiles[-1].core_level0.x1 == width0


def test_aperio_grid_at_40x() -> None:
    # The sample slide (2220 x 2967 at 0.499) processed at 0.25 µm/px in 2048 px tiles.
    tiles = tile_grid(2220, 2967, 0.499, 0.25, 2048, 64)
    assert target_size(2220, 2967, 0.499, 0.25) == (4432, 5923)
    assert len(tiles) == 9 and (tiles[-1].row, tiles[-1].col) == (2, 2)
    middle = tiles[4]
    assert middle.core.as_list() == [2048, 2048, 4096, 4096]
    assert middle.read.as_list() == [1984, 1984, 4160, 4160]
    assert middle.core_in_read.as_list() == [64, 64, 2112, 2112]
    assert middle.read_level0.x0 == pytest.approx(1984 * 0.25 / 0.499)
    corner = tiles[-1]
    assert corner.core.as_list() == [4096, 4096, 4432, 5923]
    assert corner.margins == (64, 64, 0, 0)
    assert corner.core_level0.x1 == 2220 and corner.core_level0.y1 == 2967
    x, y = corner.read_to_level0(np.array([0.0, 64.0]), np.array([0.0, 64.0]))
    np.testing.assert_allclose(x, [4032 * 0.25 / 0.499, 4096 * 0.25 / 0.499])


def test_tiles_without_tissue_are_skipped() -> None:
    mask = TissueMask.full(4000, 4000, 0.25, 0.25, 8.0)
    bits = np.zeros_like(mask.mask)
    bits[0, 0] = True  # one mask pixel = 32 x 32 level-0 px, in tile (0, 0)
    tiles = tile_grid(4000, 4000, 0.25, 0.25, 1000, 50, TissueMask(bits, 8.0, 32.0, 32.0, 0.1))
    assert [(t.row, t.col) for t in tiles] == [(0, 0)]
    assert tiles[0].index == 0


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="tile size"):
        tile_grid(100, 100, 0.25, 0.25, 0, 0)
    with pytest.raises(ValueError, match="margin"):
        tile_grid(100, 100, 0.25, 0.25, 10, -1)
    with pytest.raises(ValueError, match="µm/px"):
        tile_grid(100, 100, 0.0, 0.25, 10, 0)


def test_grid_shape_counts_partial_tiles() -> None:
    assert grid_shape(1000, 1000, 0.25, 0.25, 300) == (math.ceil(1000 / 300),) * 2
