"""One tile of work: read it, run the engine, keep only the nuclei this tile owns.

A Dask worker receives a :class:`TileTask` (paths and numbers, never handles or
models: slide handles hold native resources and do not pickle, models are large)
and returns a :class:`TileResult` holding only what the stitcher needs: the owned
nuclei in slide-global level-0 coordinates, their pixels inside the tile's core,
and the pieces of them that spill into the neighbouring cores. Everything else
(the maps, the read image, the instance map of the whole read region) is freed
before returning, so a result is small next to the tile's working memory.

Ownership (DESIGN.md, Stitching): a nucleus belongs to the tile whose core holds
its centroid. Cores partition the slide, so every centroid has exactly one owner;
the read margin around the core is there so that an owned nucleus is seen whole.
One that touches the read region's outer edge anyway (where that edge is not the
slide's border) may be cut, and is counted in ``edge_touching``.

Per-process caches: workers process many tiles of the same slide with the same
model, so slides and models are opened once and kept (:func:`get_inferer`,
:func:`cache_info`). A Dask worker runs tasks in several threads of one process:
the model is shared (read-only inference is thread-safe), slide handles are kept
per thread because not every backend promises thread-safe reads on one handle.
"""

from __future__ import annotations

import math
import os
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from wsi_pipeline.engine.header import describe_file
from wsi_pipeline.engine.infer import ALIGN, InferenceConfig, Maps, TileInferer, WindowGrid
from wsi_pipeline.engine.postproc import PostprocConfig, postprocess
from wsi_pipeline.engine.registry import resolve_model
from wsi_pipeline.engine.window_cache import CachedWindow, WindowCache, shared_cache
from wsi_pipeline.nuclei import Nucleus, TileResult
from wsi_pipeline.shares import WindowShare, tile_windows
from wsi_pipeline.slide.base import Slide, SlideSpec
from wsi_pipeline.slide.tissue import TissueCrop
from wsi_pipeline.tiling import Tile

__all__ = [
    "MAX_NUCLEUS_UM",
    "MapsFn",
    "TileResult",
    "TileTask",
    "cache_info",
    "clear_caches",
    "TileMaps",
    "default_margin",
    "finish_tile",
    "get_inferer",
    "glass_reach",
    "grid_maps",
    "warm_engine",
    "infer_tile",
    "near_tissue",
    "postproc_reach",
    "window_batches",
    "process_tile",
    "tissue_extent",
]

# Open slides kept per thread, least recently used dropped first. A worker rarely
# alternates between more slides than this (the scheduler feeds one slide at a time).
SLIDE_CACHE_SIZE = 4
# Loaded models kept per process; a full HoVer-Net is ~150 MB of weights.
MODEL_CACHE_SIZE = 2

# Largest distance from a nucleus' centroid to its farthest boundary point, in µm.
# Measured on the ground truth of the 18,216 CoNSeP and 4,949 MoNuSeg training nuclei
# here (0.25 µm/px): median 3-4 µm, 99.9th percentile 12.5 µm, maximum 23.9 µm.
MAX_NUCLEUS_UM = 25.0


@dataclass(frozen=True)
class TileTask:
    """Everything a worker needs for one tile; paths and numbers only, so it pickles.

    ``model_path`` is the resolved checkpoint file; ``mpp`` the inference µm/px (the
    tile grid's target resolution). ``tissue``: the slide's tissue mask under the tile's
    network windows and :data:`MAX_NUCLEUS_UM` around them (:func:`tissue_extent`);
    windows farther than that from any tissue are not computed (``None``: every window is).
    ``shares``: the windows this tile shares with the slide's other tiles
    (:func:`wsi_pipeline.shares.plan_shares`; empty: nothing is left for anyone).
    """

    slide: SlideSpec
    tile: Tile
    model_path: str
    mpp: float
    infer: InferenceConfig = field(default_factory=InferenceConfig)
    postproc: PostprocConfig = field(default_factory=PostprocConfig)
    tissue: TissueCrop | None = None
    shares: tuple[WindowShare, ...] = ()

    def glass_reach(self) -> int:
        """Pixels from tissue within which windows are computed (:data:`MAX_NUCLEUS_UM`)."""
        return glass_reach(self.mpp)


def glass_reach(mpp: float) -> int:
    """Pixels (at ``mpp``) from tissue within which network windows are computed: a nucleus
    reaches at most :data:`MAX_NUCLEUS_UM` from its tissue."""
    return math.ceil(MAX_NUCLEUS_UM / mpp)


def tissue_extent(tile: Tile, grid: WindowGrid, mpp: float) -> tuple[float, float, float, float]:
    """The level-0 box (x0, y0, x1, y1) whose tissue decides which of ``tile``'s windows run:
    the windows meeting its read region and the glass reach around them. The driver crops
    the tissue mask to it for the task (:attr:`TileTask.tissue`)."""
    x0, y0, x1, y1 = _reach_box(tile_windows(tile, grid), grid, glass_reach(mpp))
    return (max(x0, 0) * tile.scale_x, max(y0, 0) * tile.scale_y, x1 * tile.scale_x, y1 * tile.scale_y)


def _reach_box(windows: list[tuple[int, int, Any]], grid: WindowGrid, reach: int) -> tuple[int, int, int, int]:
    """The slide px box (unclipped) of the windows' contributed px, grown by ``reach``."""
    return (
        min(j for _, j, _ in windows) * grid.step - reach,
        min(i for i, _, _ in windows) * grid.step - reach,
        (max(j for _, j, _ in windows) + 1) * grid.step + reach,
        (max(i for i, _, _ in windows) + 1) * grid.step + reach,
    )


# (rgb of the read region, task) -> maps of the same height/width.
MapsFn = Callable[[np.ndarray, TileTask], Maps]


# ----------------------------------------------------------------------------- caches
_thread_state = threading.local()
_models_lock = threading.Lock()
_inferers: OrderedDict[tuple[str, InferenceConfig], TileInferer] = OrderedDict()
_counts = {"slides_opened": 0, "models_loaded": 0}
_counts_lock = threading.Lock()


def _slide_cache() -> OrderedDict[SlideSpec, Slide]:
    cache = getattr(_thread_state, "slides", None)
    if cache is None:
        cache = _thread_state.slides = OrderedDict()
    return cache


def _open_slide(spec: SlideSpec) -> Slide:
    """The open slide for ``spec`` (this thread's), opening it on first use."""
    cache = _slide_cache()
    slide = cache.get(spec)
    if slide is not None and not slide.closed:
        cache.move_to_end(spec)
        return slide
    slide = spec.open()
    with _counts_lock:
        _counts["slides_opened"] += 1
    cache[spec] = slide
    while len(cache) > SLIDE_CACHE_SIZE:
        _, old = cache.popitem(last=False)
        old.close()
    return slide


def get_inferer(model_path: str, infer: InferenceConfig | None = None) -> TileInferer:
    """This process' engine for ``model_path``: the checkpoint is loaded once per
    (path, config) and reused for every later tile.

    Public so a Dask worker plugin can warm it up before the first tile arrives.

    A checkpoint of ours is described from its header (:func:`describe_file`) and only
    loaded with torch when the runtime needs the network: an OpenVINO worker whose model's
    conversion is cached never imports torch (seconds at every start).
    """
    config = infer if infer is not None else InferenceConfig()
    key = (str(model_path), config)
    with _models_lock:
        inferer = _inferers.get(key)
        if inferer is not None:
            _inferers.move_to_end(key)
            return inferer
        # One model per (checkpoint, config): the engine moves the model to its device
        # and memory layout in place, so two configs cannot share one copy safely.
        path = resolve_model(key[0])
        model: Any = describe_file(path)
        if model is None:  # a legacy format: only loading it says what it holds
            from wsi_pipeline.engine.weights import load_model

            model = load_model(path, device=config.device)
        inferer = TileInferer(model, config, label=str(model.meta.get("name") or key[0]))
        with _counts_lock:
            _counts["models_loaded"] += 1
        _inferers[key] = inferer
        while len(_inferers) > MODEL_CACHE_SIZE:
            _inferers.popitem(last=False)
        return inferer


def warm_engine(model_path: str, infer: InferenceConfig | None = None) -> float:
    """Load the model and prepare the runtime for the engine's full window (conversion read
    from the cache, compilation, first inference), so the first tile does not pay for it.

    The batch submits this to every worker as soon as the cluster is up, while the driver
    is still finding the tissue of the first slide. Returns the seconds it took.
    """
    start = time.perf_counter()
    inferer = get_inferer(model_path, infer)
    side = inferer.window
    inferer.predict(np.full((1, side, side, 3), 255, dtype=np.uint8))
    return time.perf_counter() - start


def cache_info() -> dict[str, int]:
    """How many slides were opened and models loaded by this process since the last clear."""
    with _counts_lock:
        return dict(_counts)


def clear_caches() -> None:
    """Close this thread's slides, drop every cached model and shared window (tests, memory pressure)."""
    cache = _slide_cache()
    while cache:
        _, slide = cache.popitem()
        slide.close()
    with _models_lock:
        _inferers.clear()
    shared_cache().clear()
    with _counts_lock:
        for key in _counts:
            _counts[key] = 0


# ----------------------------------------------------------------------------- margin
def postproc_reach(config: PostprocConfig | None = None) -> int:
    """How far (px) a pixel's post-processed label can depend on the maps around it.

    Sobel of the HV maps (ksize // 2), then the marker opening (erosion then dilation,
    2 * radius), plus 1 for the 3x3 Gaussian on the watershed surface. Connected
    components and hole filling are not local, but only matter for nuclei that reach
    the read edge, which the margin is there to prevent.
    """
    cfg = config or PostprocConfig()
    return cfg.sobel_ksize // 2 + 2 * (cfg.marker_open_size // 2) + 1


def default_margin(
    model: object,
    postproc: PostprocConfig | None = None,
    *,
    mpp: float | None = None,
    max_nucleus_um: float = MAX_NUCLEUS_UM,
) -> int:
    """Margin (px at the inference µm/px) that keeps every owned nucleus whole and away
    from the read edge, rounded up to a multiple of the encoder's stride (8 px).

    Sum of two reaches, from the core edge outwards:

    * the nucleus: an owned nucleus has its centroid in the core, and reaches at most
      ``max_nucleus_um`` from it (:data:`MAX_NUCLEUS_UM`: 25 µm, above the largest
      centroid-to-boundary distance measured on 23k annotated nuclei);
    * the post-processing: :func:`postproc_reach` (15 px with the defaults).

    The network's own context is not part of it: a tile's maps are cut from the slide-wide
    window grid (:func:`grid_maps`), whose windows read their context from the slide itself,
    beyond the margin, so the maps at the read edge are already the whole slide's.
    Rounded up to a multiple of :data:`~wsi_pipeline.engine.infer.ALIGN` so that tile
    reads stay on the stride grid. HoVer-Net at 0.25 µm/px: 100 + 15 = 115 -> 120 px.

    ``model``: anything with a ``meta["mpp"]`` when ``mpp`` is not given.
    """
    if mpp is None:
        meta: dict[str, Any] = getattr(model, "meta", None) or {}
        mpp = float(meta.get("mpp", 0.25))
    if not (mpp > 0 and max_nucleus_um >= 0):
        raise ValueError(f"mpp must be > 0 and max_nucleus_um >= 0, got {mpp}, {max_nucleus_um}")
    need = math.ceil(max_nucleus_um / mpp - 1e-9) + postproc_reach(postproc)
    return math.ceil(need / ALIGN) * ALIGN


# ----------------------------------------------------------------------------- the tile
@dataclass
class TileMaps:
    """A tile's maps and how they were made: the first half of a tile's work.

    ``seconds``: {"read", "setup", "infer"} ("setup" only when the model ran); ``engine``:
    "runtime precision" of the engine that made them ("" for a ``maps_fn``). On a GPU
    worker this is the step that holds the GPU; :func:`finish_tile` needs none.
    """

    maps: Maps
    seconds: dict[str, float]
    engine: str = ""


def infer_tile(task: TileTask, maps_fn: MapsFn | None = None) -> TileMaps:
    """Compute the NP/HV/TP maps of the tile's read region (see :func:`process_tile`).

    Start-up is its own stage: the model load and runtime conversion of a worker's first
    tile, and each new window shape's compilation, are counted in "setup", not "infer".
    """
    tile = task.tile
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    slide = _open_slide(task.slide)
    engine = ""
    if maps_fn is not None:
        rgb = slide.read_region_at(
            tile.read_level0.x0, tile.read_level0.y0, tile.read.width, tile.read.height, task.mpp
        )
        seconds["read"] = time.perf_counter() - start
        start = time.perf_counter()
        maps = maps_fn(rgb, task)
        seconds["infer"] = time.perf_counter() - start
    else:
        opened = time.perf_counter() - start
        start = time.perf_counter()
        inferer = get_inferer(task.model_path, task.infer)
        compiled_before = float(getattr(inferer.runtime, "compile_seconds", 0.0))
        seconds["setup"] = time.perf_counter() - start
        start = time.perf_counter()
        maps, read_seconds = grid_maps(inferer, slide, task)
        compiled = float(getattr(inferer.runtime, "compile_seconds", 0.0)) - compiled_before
        seconds["read"] = opened + read_seconds
        seconds["setup"] += compiled
        seconds["infer"] = time.perf_counter() - start - compiled - read_seconds
        engine = f"{inferer.runtime.name} {inferer.runtime.precision}"
    if maps.np_prob.shape != (tile.read.height, tile.read.width):
        raise ValueError(f"maps of shape {maps.np_prob.shape} for a {tile.read.height}x{tile.read.width} read region")
    return TileMaps(maps, seconds, engine)


def finish_tile(task: TileTask, made: TileMaps) -> TileResult:
    """Post-process a tile's maps and keep the nuclei whose centroid lies in its core.

    Needs no GPU and does not read the region again (only the slide's size, from the
    open handle), so a GPU worker can run it on any of its CPU threads.
    """
    slide_w, slide_h = _open_slide(task.slide).size_at(task.mpp)
    start = time.perf_counter()
    maps = made.maps
    windows = (int(maps.windows_run), int(maps.windows_total), int(maps.windows_reused))
    post = postprocess(maps.np_prob, maps.hv, maps.tp_prob, config=task.postproc, mpp=task.mpp)
    del maps  # the float maps are the bulk of a tile's memory; only labels are needed now
    made.maps = None  # type: ignore[assignment]
    out = _owned(task, post.inst_map, post.nuclei, (slide_w, slide_h))
    del post
    out.seconds = {**made.seconds, "postprocess": time.perf_counter() - start}
    out.engine = made.engine
    out.windows = windows
    return out


def process_tile(task: TileTask, maps_fn: MapsFn | None = None) -> TileResult:
    """Read one tile, segment it, and keep the nuclei whose centroid lies in its core:
    :func:`infer_tile` then :func:`finish_tile` in one task (CPU workers).

    ``maps_fn`` replaces the model as the source of NP/HV/TP maps: it gets the read
    region's RGB and the task and must return :class:`Maps` of the same size. It is
    for alternative engines such as maps derived from ground-truth labels (stitching
    checks, post-processing upper bounds); with it, ``task.model_path`` is not loaded.

    The model's maps are cut from the slide-wide window grid (:func:`grid_maps`): every
    window sits on the same phase of the encoder's stride grid and reads its context from
    the slide, so a pixel's prediction does not depend on the tiling (see
    :mod:`wsi_pipeline.engine.infer`), and windows under tile borders are computed once.
    """
    return finish_tile(task, infer_tile(task, maps_fn))


Box = tuple[int, int, int, int]
WindowMaps = dict[str, np.ndarray]


def _reflect(coords: np.ndarray, size: int) -> np.ndarray:
    """Slide coordinates for ``coords`` that may lie beyond ``[0, size)``, mirrored about
    the edge pixels (numpy's "reflect" padding, repeated as often as needed)."""
    if size == 1:
        return np.zeros_like(coords)
    period = 2 * size - 2
    folded = np.mod(coords, period)
    return np.where(folded < size, folded, period - folded)


def _read_mirrored(slide: Slide, tile: Tile, mpp: float, box: Box, size: tuple[int, int]) -> np.ndarray:
    """RGB of the slide px ``box`` at ``mpp``, the parts beyond the slide mirrored about its
    edge. Mirrored slide-wide, not per read, so a window at the slide's edge sees the same
    pixels whichever tile reads it (what a whole-slide run would feed the network)."""
    x0, y0, x1, y1 = box
    width, height = size
    if x0 >= 0 and y0 >= 0 and x1 <= width and y1 <= height:
        return slide.read_region_at(x0 * tile.scale_x, y0 * tile.scale_y, x1 - x0, y1 - y0, mpp)
    xs, ys = _reflect(np.arange(x0, x1), width), _reflect(np.arange(y0, y1), height)
    lx, ly = int(xs.min()), int(ys.min())
    region = slide.read_region_at(lx * tile.scale_x, ly * tile.scale_y, int(xs.max()) + 1 - lx, int(ys.max()) + 1 - ly,
                                  mpp)
    return region[np.ix_(ys - ly, xs - lx)]


def near_tissue(task: TileTask, grid: WindowGrid, size: tuple[int, int]) -> list[tuple[int, int, Box]]:
    """The windows meeting the tile's read region (:func:`~wsi_pipeline.shares.tile_windows`)
    that have tissue within the glass reach of the px they contribute (all of them without a
    tissue mask). Glass holds no nuclei, and one whose pixels reach into such a window is
    still computed whole. The decision depends only on the slide-wide tissue mask, so every
    tile decides alike about a window they share. ``size``: the slide at the task's µm/px."""
    windows = tile_windows(task.tile, grid)
    if task.tissue is None:
        return windows
    tile, reach = task.tile, task.glass_reach()
    width, height = size
    x0, y0, x1, y1 = _reach_box(windows, grid, reach)
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)
    mask = task.tissue.on_grid(x0, y0, x1 - x0, y1 - y0, tile.scale_x, tile.scale_y)
    kept = []
    for i, j, part in windows:
        cx0, cy0, cx1, cy1 = grid.contributed(i, j)
        rows = slice(max(cy0 - reach - y0, 0), max(min(cy1, height) + reach - y0, 0))
        cols = slice(max(cx0 - reach - x0, 0), max(min(cx1, width) + reach - x0, 0))
        if mask[rows, cols].any():
            kept.append((i, j, part))
    return kept


def window_batches(
    slide: Slide, task: TileTask, grid: WindowGrid, todo: list[tuple[int, int]], size: tuple[int, int],
    batch_size: int,
) -> Iterator[tuple[list[tuple[int, int]], np.ndarray]]:
    """The input batches of grid windows ``todo``: (their indices, uint8 (N, side, side, 3)).

    The slide is read once, as the bounding box of the windows' inputs (mirrored beyond its
    edges, :func:`_read_mirrored`), before the first batch. Public so benchmarks can time
    the forward passes alone over exactly these windows.
    """
    s, border, side = grid.step, grid.border, grid.input_side
    x0 = min(j for _, j in todo) * s - border
    y0 = min(i for i, _ in todo) * s - border
    x1 = (max(j for _, j in todo) + 1) * s + border
    y1 = (max(i for i, _ in todo) + 1) * s + border
    rgb = _read_mirrored(slide, task.tile, task.mpp, (x0, y0, x1, y1), size)
    for first in range(0, len(todo), batch_size):
        chunk = todo[first : first + batch_size]
        yield chunk, np.stack([rgb[i * s - border - y0 : i * s - border - y0 + side,
                                   j * s - border - x0 : j * s - border - x0 + side] for i, j in chunk])


def _compute_windows(
    inferer: TileInferer, slide: Slide, task: TileTask, grid: WindowGrid, todo: list[tuple[int, int]],
    size: tuple[int, int],
) -> tuple[dict[tuple[int, int], WindowMaps], float]:
    """The maps of grid windows ``todo`` (each step x step px), and the seconds spent reading."""
    out: dict[tuple[int, int], WindowMaps] = {}
    start = time.perf_counter()
    batches = window_batches(slide, task, grid, todo, size, inferer.config.batch_size)
    chunk, batch = next(batches)  # the read happens here
    read_seconds = time.perf_counter() - start
    while True:
        pred = inferer.predict_grid(batch)
        for k, key in enumerate(chunk):
            out[key] = {name: value[k] for name, value in pred.items()}
        following = next(batches, None)
        if following is None:
            return out, read_seconds
        chunk, batch = following


def grid_maps(
    inferer: TileInferer, slide: Slide, task: TileTask, cache: WindowCache | None = None
) -> tuple[Maps, float]:
    """The maps of the tile's read region, cut from the slide-wide window grid, and the
    seconds spent reading the slide.

    Each window meeting the read region comes from one of three places: glass (not
    computed, read as background: NP 0, HV 0, type 0 certain), this process' window cache
    (a neighbouring tile computed it and left this tile's part, :attr:`TileTask.shares`),
    or the network. Windows this tile computes and shares are left in the cache for the
    other tiles that read them. A window another task thread is computing is waited for,
    after this tile has computed its own, so two threads never wait on each other.
    """
    cache = cache if cache is not None else shared_cache()
    tile, read = task.tile, task.tile.read
    grid = inferer.grid
    size = slide.size_at(task.mpp)
    windows = tile_windows(tile, grid)
    kept = near_tissue(task, grid, size)
    shares = {(share.i, share.j): share for share in task.shares}
    np_prob = np.zeros((read.height, read.width), np.float32)
    hv = np.zeros((2, read.height, read.width), np.float32)
    tp_prob = None if inferer.num_types is None else np.zeros((inferer.num_types, read.height, read.width), np.float32)
    if tp_prob is not None:
        tp_prob[0] = 1.0

    def place(part: Box, origin: tuple[int, int], source: WindowMaps | CachedWindow) -> None:
        x0, y0, x1, y1 = part
        dst = (slice(y0 - read.y0, y1 - read.y0), slice(x0 - read.x0, x1 - read.x0))
        src = (slice(y0 - origin[1], y1 - origin[1]), slice(x0 - origin[0], x1 - origin[0]))
        maps = source if isinstance(source, dict) else vars(source)
        np_prob[dst] = maps["np_prob"][src]
        hv[(slice(None), *dst)] = maps["hv"][(slice(None), *src)]
        if tp_prob is not None:
            tp_prob[(slice(None), *dst)] = maps["tp_prob"][(slice(None), *src)]

    def key(i: int, j: int) -> tuple[Any, ...]:
        return (task.slide, task.mpp, task.model_path, task.infer, grid, i, j)

    claimed: set[tuple[int, int]] = set()
    computed = reused = 0
    read_seconds = 0.0
    parts = {(i, j): part for i, j, part in kept}
    pending = list(parts)
    try:
        while pending:
            todo, waits = [], []
            for ij in pending:
                got = cache.acquire(key(*ij)) if ij in shares else None
                if isinstance(got, threading.Event):
                    waits.append((ij, got))
                elif isinstance(got, CachedWindow) and got.covers(parts[ij]):
                    place(parts[ij], got.box[:2], got)
                    reused += 1
                else:  # a miss (claimed if shared) or an entry that lacks this tile's part
                    if got is None and ij in shares:
                        claimed.add(ij)
                    todo.append(ij)
            if todo:
                fresh, seconds = _compute_windows(inferer, slide, task, grid, todo, size)
                read_seconds += seconds
                computed += len(todo)
                for ij, maps in fresh.items():
                    origin = grid.contributed(*ij)[:2]
                    place(parts[ij], origin, maps)
                    if ij in claimed:
                        cache.publish(key(*ij), _leave(shares[ij], origin, maps))
                        claimed.discard(ij)
            for _, event in waits:
                event.wait()
            pending = [ij for ij, _ in waits]
    finally:
        for ij in claimed:
            cache.abandon(key(*ij))
    maps = Maps(np_prob=np_prob, hv=hv, tp_prob=tp_prob, windows_run=computed, windows_total=len(windows),
                windows_reused=reused)
    return maps, read_seconds


def _leave(share: WindowShare, origin: tuple[int, int], maps: WindowMaps) -> CachedWindow:
    """The part of a freshly computed window that the other tiles read, copied out of the batch."""
    x0, y0, x1, y1 = share.box
    src = (slice(y0 - origin[1], y1 - origin[1]), slice(x0 - origin[0], x1 - origin[0]))
    tp = maps.get("tp_prob")
    return CachedWindow(
        box=share.box,
        np_prob=maps["np_prob"][src].copy(),
        hv=maps["hv"][(slice(None), *src)].copy(),
        tp_prob=None if tp is None else tp[(slice(None), *src)].copy(),
        readers=share.readers,
    )


def _owned(task: TileTask, inst_map: np.ndarray, nuclei: list[Nucleus], slide_size: tuple[int, int]) -> TileResult:
    """Keep the nuclei whose centroid lies in the core; express them slide-globally."""
    tile = task.tile
    read, core = tile.read, tile.core
    inner = tile.core_in_read
    sx, sy = tile.scale_x, tile.scale_y
    # Which read edges are inside the slide (there a nucleus may be cut by the read).
    open_left, open_top = read.x0 > 0, read.y0 > 0
    open_right, open_bottom = read.x1 < slide_size[0], read.y1 < slide_size[1]

    lut = np.zeros(int(inst_map.max()) + 1, dtype=np.int32)
    kept: list[Nucleus] = []
    touching = 0
    for nucleus in nuclei:
        cx, cy = nucleus.centroid
        if not core.contains(read.x0 + cx, read.y0 + cy):
            continue
        kept.append(nucleus.placed(read.x0, read.y0, sx, sy, task.mpp, label=len(kept) + 1))
        lut[nucleus.label] = len(kept)
        x0, y0, x1, y1 = nucleus.bbox
        if (
            (open_left and x0 <= 0)
            or (open_top and y0 <= 0)
            or (open_right and x1 >= read.width)
            or (open_bottom and y1 >= read.height)
        ):
            touching += 1

    owned = lut[inst_map]
    core_labels = owned[inner.y0 : inner.y1, inner.x0 : inner.x1].copy()
    owned[inner.y0 : inner.y1, inner.x0 : inner.x1] = 0
    spill = []
    # The read region outside the core as four bands: above, below, left, right.
    bands = (
        (0, inner.y0, 0, read.width),
        (inner.y1, read.height, 0, read.width),
        (inner.y0, inner.y1, 0, inner.x0),
        (inner.y0, inner.y1, inner.x1, read.width),
    )
    for r0, r1, c0, c1 in bands:
        if r1 <= r0 or c1 <= c0:
            continue
        band = owned[r0:r1, c0:c1]
        rows = np.flatnonzero(band.any(axis=1))
        if not rows.size:
            continue
        cols = np.flatnonzero(band.any(axis=0))
        patch = band[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].copy()
        spill.append((read.x0 + c0 + int(cols[0]), read.y0 + r0 + int(rows[0]), patch))
    return TileResult(
        index=tile.index,
        nuclei=kept,
        core_labels=core_labels,
        spill=spill,
        edge_touching=touching,
        seconds={},
        worker=f"{socket.gethostname()}:{os.getpid()}",
    )
