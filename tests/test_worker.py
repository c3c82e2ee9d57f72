"""One tile of work: caches, slide-global coordinates, ownership, edge counting, the margin.

Real parts throughout: slides are pyramidal TIFFs written from real MoNuSeg crops, the
engine is either a small randomly initialised HoVer-Net saved as a checkpoint or the
ground-truth maps of the crop (``GroundTruthMaps``), whose nuclei are known exactly.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import shapely
import tifffile
import torch
from PIL import Image

from wsi_pipeline.classes import CONSEP_CLASSES
from wsi_pipeline.data.gt_maps import GroundTruthMaps
from wsi_pipeline.engine.infer import InferenceConfig, Maps, window_grid
from wsi_pipeline.engine.model import ChannelSpec, HoVerNet
from wsi_pipeline.engine.postproc import PostprocConfig
from wsi_pipeline.engine.weights import save_model
from wsi_pipeline.engine.window_cache import shared_cache
from wsi_pipeline.shares import plan_shares, tile_windows
from wsi_pipeline.slide._image import ArraySlide
from wsi_pipeline.slide.base import SlideSpec
from wsi_pipeline.slide.pyramid import write_pyramid
from wsi_pipeline.tiling import PixelBox, Tile, tile_grid
from wsi_pipeline.worker import (
    TileResult,
    TileTask,
    cache_info,
    clear_caches,
    default_margin,
    infer_tile,
    postproc_reach,
    process_tile,
)

TILE = "TCGA-21-5784-01Z-00-DX1"


@pytest.fixture(autouse=True)
def _one_thread_fresh_caches(torch_one_thread):
    """One torch thread, and caches emptied after each test so the next starts cold."""
    yield
    clear_caches()


def tiny_model() -> HoVerNet:
    torch.manual_seed(0)
    return HoVerNet("fast", 5, ChannelSpec.scaled(0.0625, round_to=4))


@pytest.fixture(scope="module")
def crop(monuseg_train: Path) -> tuple[np.ndarray, np.ndarray]:
    """A real 500x500 H&E crop at 0.25 µm/px and its instance labels."""
    image = tifffile.imread(monuseg_train / "images" / f"{TILE}.tif")[:500, :500, :3].copy()
    labels = np.load(monuseg_train / "labels" / f"{TILE}.npz")["inst_map"][:500, :500].astype(np.int32)
    return image, labels


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("model") / "tiny"
    return str(save_model(tiny_model(), path, {"name": "tiny", "classes": CONSEP_CLASSES, "mpp": 0.25}))


# ----------------------------------------------------------------------------- margin
def test_default_margin_adds_nucleus_and_postproc_reach() -> None:
    """The network's context is read beyond the margin by the grid's windows, so the margin
    is the nucleus and the post-processing only, whatever the model's mode."""
    fast = tiny_model()
    assert postproc_reach() == 10 + 4 + 1
    assert postproc_reach(PostprocConfig(sobel_ksize=11, marker_open_size=3)) == 5 + 2 + 1
    # 25 µm at 0.25 µm/px = 100 px, + 15 = 115, rounded up to the 8 px stride grid
    assert default_margin(fast, mpp=0.25) == 120
    assert default_margin(fast, mpp=0.25, max_nucleus_um=30) == 136  # 120 + 15 = 135
    fast.meta = {"mpp": 0.5}
    assert default_margin(fast) == 72  # 50 + 15 = 65
    original = HoVerNet("original", 5, ChannelSpec.scaled(0.0625, "original", round_to=4))
    assert default_margin(original, mpp=0.25) == 120
    with pytest.raises(ValueError):
        default_margin(fast, mpp=0.0)


# ----------------------------------------------------------------------------- engine maps
GRID_WINDOW = 256  # 164 px out, trim 10: a 144 px step, so a 492 px slide is a 4 x 4 grid


def _grid_run(slide: Path, model_path: str, tile_px: int, margin: int, *, share: bool = True,
              threads: int = 1) -> tuple[list[Maps], list[Tile]]:
    """Every tile's maps of a 492 px slide, tiles run by ``threads`` task threads of this process."""
    from concurrent.futures import ThreadPoolExecutor

    tiles = tile_grid(492, 492, 0.25, 0.25, tile_px, margin)
    config = InferenceConfig(threads=1, window=GRID_WINDOW)
    grid = window_grid(tiny_model(), GRID_WINDOW)
    shares = plan_shares(tiles, grid) if share else {}
    tasks = [TileTask(SlideSpec(str(slide)), t, model_path, 0.25, config, shares=shares.get(t.index, ()))
             for t in tiles]
    with ThreadPoolExecutor(threads) as pool:
        maps = [made.maps for made in pool.map(infer_tile, tasks)]
    return maps, tiles


@pytest.fixture(scope="module")
def grid_slide(crop: tuple[np.ndarray, np.ndarray], tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("grid") / "crop.tif"
    write_pyramid(ArraySlide(np.ascontiguousarray(crop[0][:492, :492]), mpp=0.25), path)
    return path


def _gap(maps: Maps, whole: Maps, read: PixelBox) -> float:
    box = (slice(read.y0, read.y1), slice(read.x0, read.x1))
    return max(
        float(np.abs(maps.np_prob - whole.np_prob[box]).max()),
        float(np.abs(maps.hv - whole.hv[(slice(None), *box)]).max()),
        float(np.abs(maps.tp_prob - whole.tp_prob[(slice(None), *box)]).max()),
    )


def test_tiles_cut_their_maps_from_one_slide_wide_window_grid(grid_slide: Path, model_path: str) -> None:
    """Every tile's maps are the whole slide's maps over its read region, margins included,
    because every tile is cut from the same windows; and a window under a tile border is
    computed once and read by its other tiles from the process' cache, which is empty
    once its last reader is done.

    4 tiles of 246 px with 100 px margins on a 4 x 4 grid of 144 px windows: each tile
    reads 3 x 3 windows, 36 reads of 16 windows."""
    clear_caches()
    whole, _ = _grid_run(grid_slide, model_path, 492, 0)
    assert (whole[0].windows_run, whole[0].windows_total) == (16, 16)
    clear_caches()
    maps, tiles = _grid_run(grid_slide, model_path, 246, 100)
    assert [(m.windows_total) for m in maps] == [9, 9, 9, 9]
    assert sum(m.windows_run for m in maps) == 16  # each window once
    assert sum(m.windows_reused for m in maps) == 36 - 16
    assert len(shared_cache()) == 0 and shared_cache().bytes == 0  # the last readers freed them
    for tile, tile_maps in zip(tiles, maps, strict=True):
        # The same windows in other batches: equal but for the kernels' batch-dependent rounding.
        assert _gap(tile_maps, whole[0], tile.read) <= 1e-5

    clear_caches()  # without the plan nothing is shared: the same maps, each tile computing its own
    alone, _ = _grid_run(grid_slide, model_path, 246, 100, share=False)
    assert sum(m.windows_run for m in alone) == 36 and sum(m.windows_reused for m in alone) == 0
    for tile, tile_maps in zip(tiles, alone, strict=True):
        assert _gap(tile_maps, whole[0], tile.read) <= 1e-5


def test_task_threads_compute_a_shared_window_once(grid_slide: Path, model_path: str) -> None:
    """Two task threads on neighbouring tiles at once: a window one thread is computing is
    waited for by the other, never computed twice, and the maps are those of one thread."""
    clear_caches()
    one, _ = _grid_run(grid_slide, model_path, 164, 48)
    clear_caches()
    two, tiles = _grid_run(grid_slide, model_path, 164, 48, threads=2)
    distinct = {(i, j) for tile in tiles for i, j, _ in tile_windows(tile, window_grid(tiny_model(), GRID_WINDOW))}
    assert sum(m.windows_run for m in two) == len(distinct) == sum(m.windows_run for m in one)
    assert len(shared_cache()) == 0
    for a, b in zip(one, two, strict=True):
        assert np.array_equal(a.np_prob, b.np_prob) and np.array_equal(a.hv, b.hv)


# ----------------------------------------------------------------------------- with a model
def test_process_tile_with_a_model(crop: tuple[np.ndarray, np.ndarray], model_path: str, tmp_path: Path) -> None:
    slide_path = tmp_path / "crop.tif"
    write_pyramid(ArraySlide(crop[0][:300, :300], mpp=0.25), slide_path)
    tiles = tile_grid(300, 300, 0.25, 0.25, 150, 164)
    clear_caches()
    results = [process_tile(TileTask(SlideSpec(str(slide_path)), t, model_path, 0.25)) for t in tiles[:2]]
    assert cache_info() == {"slides_opened": 1, "models_loaded": 1}  # per process, not per tile
    assert all(r.nuclei for r in results) and any(r.spill for r in results)  # the checks below run

    for tile, result in zip(tiles, results, strict=False):
        assert result.index == tile.index
        assert result.core_labels.dtype == np.int32
        assert result.core_labels.shape == (tile.core.height, tile.core.width)
        assert result.core_labels.min() >= 0 and result.core_labels.max() <= len(result.nuclei)
        assert set(result.seconds) == {"setup", "read", "infer", "postprocess"}
        assert result.engine == "torch f32"
        assert ":" in result.worker
        for nucleus in result.nuclei:
            x, y = nucleus.centroid
            assert tile.core_level0.contains(x, y)  # owned: centroid in the core
            assert nucleus.class_probs.shape == (5,) and 0 <= nucleus.type < 5
            assert nucleus.area_um2 == pytest.approx(nucleus.area_px * 0.0625)
            assert nucleus.polygon.dtype == np.float64 and shapely.Polygon(nucleus.polygon).is_valid
        for u0, v0, patch in result.spill:
            assert patch.dtype == np.int32 and patch.max() <= len(result.nuclei)
            ys, xs = np.nonzero(patch)
            u, v = u0 + xs, v0 + ys
            assert not np.any((u >= tile.core.x0) & (u < tile.core.x1) & (v >= tile.core.y0) & (v < tile.core.y1))
            assert u.min() >= tile.read.x0 and u.max() < tile.read.x1
        restored = pickle.loads(pickle.dumps(result))
        assert isinstance(restored, TileResult) and len(restored.nuclei) == len(result.nuclei)
    task = TileTask(SlideSpec(str(slide_path)), tiles[0], model_path, 0.25)
    assert pickle.loads(pickle.dumps(task)) == task


def test_a_read_smaller_than_the_model_input(model_path: str, tmp_path: Path) -> None:
    """A slide narrower than the network's context still works (padded with glass)."""
    path = tmp_path / "sliver.png"
    Image.fromarray(np.full((30, 120, 3), 200, np.uint8)).save(path)
    tile = tile_grid(120, 30, 0.25, 0.25, 64, 0)[0]
    result = process_tile(TileTask(SlideSpec(str(path), mpp=0.25), tile, model_path, 0.25))
    assert result.core_labels.shape == (30, 64)


# ----------------------------------------------------------------------------- ground truth
@pytest.fixture(scope="module")
def upsampled(crop: tuple[np.ndarray, np.ndarray], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The crop as a slide whose level 0 is at 0.125 µm/px: 2 level-0 px per target px."""
    path = tmp_path_factory.mktemp("slide") / "x2.tif"
    write_pyramid(ArraySlide(crop[0], mpp=0.25), path, mpp=0.125)
    return path


def test_nuclei_are_slide_global_and_whole(crop: tuple[np.ndarray, np.ndarray], upsampled: Path) -> None:
    """Owned nuclei, rebuilt from core labels + spill, are the annotated nuclei, with
    level-0 centroids/bboxes at 2x the target pixels."""
    _, labels = crop
    gt = GroundTruthMaps(labels)
    tiles = tile_grid(1000, 1000, 0.125, 0.25, 200, 164)
    assert (tiles[4].scale_x, tiles[4].read.x0) == (2.0, 36)  # level-0 px per target px; an offset read
    total = exact = 0
    for tile in tiles:
        result = process_tile(TileTask(SlideSpec(str(upsampled)), tile, "", 0.25), gt)
        canvas = np.zeros(labels.shape, np.int32)
        canvas[tile.core.y0 : tile.core.y1, tile.core.x0 : tile.core.x1] = result.core_labels
        for u0, v0, patch in result.spill:
            region = canvas[v0 : v0 + patch.shape[0], u0 : u0 + patch.shape[1]]
            assert not np.any((region > 0) & (patch > 0))  # spill never overlaps the core
            region[patch > 0] = patch[patch > 0]
        for k, nucleus in enumerate(result.nuclei, start=1):
            total += 1
            mask = canvas == k
            assert mask.sum() == nucleus.area_px  # whole: every pixel came back
            values, counts = np.unique(labels[mask], return_counts=True)
            truth = labels == values[np.argmax(counts)]
            if not np.array_equal(mask, truth):
                continue  # post-processing split/merged touching annotations: no exact reference
            exact += 1
            rows, cols = np.nonzero(truth)
            assert nucleus.centroid == pytest.approx((2 * (cols.mean() + 0.5), 2 * (rows.mean() + 0.5)))
            assert nucleus.bbox == (2 * cols.min(), 2 * rows.min(), 2 * (cols.max() + 1), 2 * (rows.max() + 1))
            polygon = shapely.Polygon(nucleus.polygon)
            bx0, by0, bx1, by1 = polygon.bounds
            x0, y0, x1, y1 = nucleus.bbox
            assert x0 <= bx0 and y0 <= by0 and bx1 <= x1 and by1 <= y1
            assert polygon.area == pytest.approx(4 * nucleus.area_px, rel=0.35)  # 4 level-0 px per target px
    assert exact >= 0.6 * total and exact > 50  # measured: 87 of 124


def test_edge_touching_counts_cut_nuclei_but_not_the_slide_border(
    crop: tuple[np.ndarray, np.ndarray], upsampled: Path
) -> None:
    _, labels = crop
    gt = GroundTruthMaps(labels)
    spec = SlideSpec(str(upsampled))

    def touching(tile_px: int, margin: int) -> int:
        tiles = tile_grid(1000, 1000, 0.125, 0.25, tile_px, margin)
        return sum(process_tile(TileTask(spec, t, "", 0.25), gt).edge_touching for t in tiles)

    assert touching(250, 0) > 10  # no margin: owned nuclei cut by the core edge
    assert touching(250, 164) == 0
    whole = process_tile(TileTask(spec, tile_grid(1000, 1000, 0.125, 0.25, 500, 0)[0], "", 0.25), gt)
    assert any(n.bbox[2] == 1000 or n.bbox[3] == 1000 for n in whole.nuclei)  # nuclei touch the border ...
    assert whole.edge_touching == 0  # ... which is not a cut


def test_maps_of_the_wrong_size_are_refused(crop: tuple[np.ndarray, np.ndarray], upsampled: Path) -> None:
    tile = tile_grid(1000, 1000, 0.125, 0.25, 250, 64)[0]

    def small(rgb: np.ndarray, task: TileTask) -> Maps:
        return GroundTruthMaps(crop[1]).window(0, 0, 10, 10)

    with pytest.raises(ValueError, match="maps of shape"):
        process_tile(TileTask(SlideSpec(str(upsampled)), tile, "", 0.25), small)
