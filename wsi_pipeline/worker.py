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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from wsi_pipeline.engine.header import describe_file
from wsi_pipeline.engine.infer import ALIGN, InferenceConfig, Maps, TileInferer
from wsi_pipeline.engine.postproc import PostprocConfig, postprocess
from wsi_pipeline.engine.registry import resolve_model
from wsi_pipeline.nuclei import Nucleus, TileResult
from wsi_pipeline.slide.base import Slide, SlideSpec
from wsi_pipeline.slide.tissue import TissueCrop
from wsi_pipeline.tiling import PixelBox, Tile

__all__ = [
    "MAX_NUCLEUS_UM",
    "MapsFn",
    "PatchGeometry",
    "TileResult",
    "TileTask",
    "cache_info",
    "clear_caches",
    "TileMaps",
    "default_margin",
    "finish_tile",
    "get_inferer",
    "warm_engine",
    "infer_tile",
    "model_maps",
    "postproc_reach",
    "process_tile",
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
    tile grid's target resolution). ``tissue``: the slide's tissue mask under the read
    region; network windows farther than :data:`MAX_NUCLEUS_UM` from any tissue are not
    computed (``None``: every window is).
    """

    slide: SlideSpec
    tile: Tile
    model_path: str
    mpp: float
    infer: InferenceConfig = field(default_factory=InferenceConfig)
    postproc: PostprocConfig = field(default_factory=PostprocConfig)
    tissue: TissueCrop | None = None

    def glass_reach(self) -> int:
        """Pixels from tissue within which windows are computed (:data:`MAX_NUCLEUS_UM`)."""
        return math.ceil(MAX_NUCLEUS_UM / self.mpp)

    def tissue_pixels(self) -> np.ndarray | None:
        """The tissue mask on the read region's own pixels (``None`` without a mask)."""
        if self.tissue is None:
            return None
        read, tile = self.tile.read, self.tile
        return self.tissue.on_grid(read.x0, read.y0, read.width, read.height, tile.scale_x, tile.scale_y)


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
    """Close this thread's slides and drop every cached model (tests, memory pressure)."""
    cache = _slide_cache()
    while cache:
        _, slide = cache.popitem()
        slide.close()
    with _models_lock:
        _inferers.clear()
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


class PatchGeometry(Protocol):
    """What :func:`default_margin` needs of a model: HoVer-Net's patch sizes."""

    input_size: int
    output_size: int


def default_margin(
    model: PatchGeometry,
    postproc: PostprocConfig | None = None,
    *,
    mpp: float | None = None,
    max_nucleus_um: float = MAX_NUCLEUS_UM,
) -> int:
    """Margin (px at the inference µm/px) that keeps every owned nucleus whole and away
    from the read edge, rounded up to a multiple of the encoder's stride (8 px).

    Sum of three reaches, from the core edge outwards:

    * the nucleus: an owned nucleus has its centroid in the core, and reaches at most
      ``max_nucleus_um`` from it (:data:`MAX_NUCLEUS_UM`: 25 µm, above the largest
      centroid-to-boundary distance measured on 23k annotated nuclei);
    * the post-processing: :func:`postproc_reach` (15 px with the defaults);
    * the network: the engine mirrors the image at the read edge, so a pixel's
      prediction is only the whole-slide one if its own context, ``(input - output)
      / 2`` px (46 for HoVer-Net fast), is real tissue.

    Rounded up to a multiple of :data:`~wsi_pipeline.engine.infer.ALIGN` because the
    worker puts the engine's windows on the slide-wide stride grid (see
    :func:`process_tile`), which costs nothing when the read origin already lies on it,
    i.e. when both the tile size and the margin are multiples of 8. HoVer-Net fast at
    0.25 µm/px: 100 + 15 + 46 = 161 -> 168 px.

    ``model``: a loaded HoVer-Net, or anything with ``input_size``/``output_size``
    (and a ``meta["mpp"]`` when ``mpp`` is not given).
    """
    if mpp is None:
        meta: dict[str, Any] = getattr(model, "meta", None) or {}
        mpp = float(meta.get("mpp", 0.25))
    if not (mpp > 0 and max_nucleus_um >= 0):
        raise ValueError(f"mpp must be > 0 and max_nucleus_um >= 0, got {mpp}, {max_nucleus_um}")
    input_size, output_size = int(model.input_size), int(model.output_size)
    context = (input_size - output_size) // 2
    need = math.ceil(max_nucleus_um / mpp - 1e-9) + postproc_reach(postproc) + context
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
    """Read the tile's region and compute its NP/HV/TP maps (see :func:`process_tile`).

    Start-up is its own stage: the model load and runtime conversion of a worker's first
    tile, and each new window shape's compilation, are counted in "setup", not "infer".
    """
    tile = task.tile
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    slide = _open_slide(task.slide)
    rgb = slide.read_region_at(tile.read_level0.x0, tile.read_level0.y0, tile.read.width, tile.read.height, task.mpp)
    seconds["read"] = time.perf_counter() - start
    engine = ""
    if maps_fn is not None:
        start = time.perf_counter()
        maps = maps_fn(rgb, task)
        seconds["infer"] = time.perf_counter() - start
    else:
        start = time.perf_counter()
        inferer = get_inferer(task.model_path, task.infer)
        compiled_before = float(getattr(inferer.runtime, "compile_seconds", 0.0))
        seconds["setup"] = time.perf_counter() - start
        start = time.perf_counter()
        maps = model_maps(inferer, rgb, tile.read, task.tissue_pixels(), task.glass_reach())
        compiled = float(getattr(inferer.runtime, "compile_seconds", 0.0)) - compiled_before
        seconds["setup"] += compiled
        seconds["infer"] = time.perf_counter() - start - compiled
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
    windows = (int(maps.windows_run), int(maps.windows_total))
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

    The engine's windows are aligned to the slide's stride grid: the read image is
    mirrored by ``read.x0 % 8`` (and y) px on the left/top before inference and the maps
    cropped back, so every window sees its pixels at the phase a whole-slide run would.
    Without that, a prediction would depend on the tiling (the encoder's stride-8
    sampling; see :mod:`wsi_pipeline.engine.infer`). Nothing is padded when tile size
    and margin are multiples of 8 (:func:`default_margin` is).
    """
    return finish_tile(task, infer_tile(task, maps_fn))


def model_maps(
    inferer: TileInferer, rgb: np.ndarray, read: PixelBox, tissue: np.ndarray | None = None, reach: int = 0
) -> Maps:
    """The engine's maps for the read region, its windows on the slide-wide stride grid.

    ``tissue`` (bool, the read region's pixels) and ``reach``: windows on glass are left out
    (:meth:`TileInferer.infer`)."""
    height, width = rgb.shape[:2]
    step = ALIGN
    sx, sy = read.x0 % step, read.y0 % step
    # A read smaller than the engine accepts (a sliver of a tiny slide) is padded with
    # glass-white below/right; those pixels are cropped away with the rest.
    grow_h = max(0, inferer.min_side - (height + sy))
    grow_w = max(0, inferer.min_side - (width + sx))
    if sx or sy:
        rgb = np.pad(rgb, ((sy, 0), (sx, 0), (0, 0)), mode="symmetric")
        if tissue is not None:
            tissue = np.pad(tissue, ((sy, 0), (sx, 0)), mode="symmetric")
    if grow_h or grow_w:
        rgb = np.pad(rgb, ((0, grow_h), (0, grow_w), (0, 0)), constant_values=255)
        if tissue is not None:
            tissue = np.pad(tissue, ((0, grow_h), (0, grow_w)), constant_values=False)
    maps = inferer.infer(rgb, tissue, reach)
    if not (sx or sy or grow_h or grow_w):
        return maps
    window = (slice(sy, sy + height), slice(sx, sx + width))
    return Maps(
        np_prob=np.ascontiguousarray(maps.np_prob[window]),
        hv=np.ascontiguousarray(maps.hv[(slice(None), *window)]),
        tp_prob=None if maps.tp_prob is None else np.ascontiguousarray(maps.tp_prob[(slice(None), *window)]),
        windows_run=maps.windows_run,
        windows_total=maps.windows_total,
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
