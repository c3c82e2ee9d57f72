"""Planning a run once, in the driver: the model, the tile geometry and what decides "done".

Everything here happens before a cluster starts, so a wrong model, an unusable device or
an impossible tile size stops the run in seconds with one clear line instead of failing
every tile on every worker.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from wsi_pipeline.batch.marker import OUTPUT_FORMAT
from wsi_pipeline.config import RunConfig, checksum, file_checksum
from wsi_pipeline.engine.infer import WindowGrid
from wsi_pipeline.engine.postproc import PostprocConfig
from wsi_pipeline.engine.settings import ALIGN, InferenceConfig
from wsi_pipeline.slide import DEFAULT_MASK_MPP

# Measured with the shared window grid (session 14, `benchmarks/throughput.py --slides <both samples>
# --tile-sizes 2304 1648`, default model, OpenVINO bf16): wall 16.5 / 13.9 s on the svs, 7.0 / 6.4 s
# on the pyramid; 1312 gave 7.2 s on the pyramid. Tiles now share the windows under their borders,
# so the size trades post-processing overlap (a 120 px margin) against idle threads at a slide's end.
DEFAULT_TILE_PX = 1648
# Largest Zarr chunk side: chunks divide the tile core so core writes stay chunk-aligned.
MAX_ZARR_CHUNK = 1024


@dataclass(frozen=True)
class ModelInfo:
    """The resolved model: file, checksum and what its metadata says (for tasks and reports)."""

    path: Path
    name: str
    checksum: str
    mpp: float
    classes: list[dict[str, Any]]
    params: int
    macs: int
    input_size: int
    output_size: int
    margin: int
    tile_size: int
    window: int  # the network input side the workers use (resolved --window)
    grid: WindowGrid  # the slide-wide window grid the tiles share (engine.infer.window_grid)
    meta: dict[str, Any] = field(repr=False)
    postproc: PostprocConfig = field(default_factory=PostprocConfig)

    def describe(self) -> dict[str, Any]:
        """The model as reports show it."""
        return {
            "name": self.name,
            "path": str(self.path),
            "checksum": self.checksum,
            "params": self.params,
            "macs": self.macs,
            "mpp": self.mpp,
            "input_size": self.input_size,
            "output_size": self.output_size,
            "description": self.meta.get("description", ""),
            "postproc": asdict(self.postproc),
        }


def default_tile_size() -> int:
    """The tile core side when ``--tile-size`` is not given: :data:`DEFAULT_TILE_PX`.

    A multiple of the encoder's stride (8 px) keeps every tile's windows on the slide-wide
    grid at no cost (the worker pads otherwise). The value is chosen by measurement
    (``benchmarks/throughput.py --tile-sizes``; see its JSON in benchmarks/results/):
    small tiles repeat the margin's recomputation too often, large ones hold more memory
    per tile and leave workers idle at the end of a slide.
    """
    return max(1, round(DEFAULT_TILE_PX / ALIGN)) * ALIGN


def inference_config(
    config: RunConfig, torch_threads: int | None, device: str | None = None, streams: int | None = None
) -> InferenceConfig:
    """How the workers run the network for these options (one place for run and benchmarks).

    ``device``: the device the workers see when it differs from ``--device`` (a local GPU
    worker sees only its own GPU, as ``cuda``). ``streams``: the cluster's OpenVINO streams
    per worker (:attr:`~wsi_pipeline.schedule.RunCluster.engine_streams`, which resolves
    ``--engine-streams``)."""
    return InferenceConfig(
        device=device or config.device, threads=torch_threads, batch_size=config.batch_size, bf16=config.bf16,
        runtime=config.runtime, window=config.window, streams=streams or 1,
    )


def check_device(config: RunConfig) -> None:
    """``--device cuda`` on a machine without a GPU is a mistake of the whole run: refused
    before any cluster starts. Only a GPU device imports torch here (the CPU needs no check);
    on a scheduler or batch cluster the GPUs are on the workers, not beside the driver."""
    if config.device != "cpu" and config.scheduler is None and config.cluster == "local":
        from wsi_pipeline.engine.device import torch_device

        torch_device(config.device)


def prepare_model(config: RunConfig) -> ModelInfo:
    """Load the model once in the driver: its metadata, size and MACs for the reports, the
    tile margin it needs (``--margin`` or the worker's derived default) and the tile size.

    A damaged or foreign model file is refused here, once, with what to do, rather than by
    every worker. A checkpoint of ours whose OpenVINO conversion is already cached on this
    machine was loaded, checked and converted by an earlier run, byte for byte (the cache is
    keyed by the file's checksum), so its header is all this reads: no torch import, seconds
    off every run's start. Any other file is loaded with torch, before the cluster starts,
    because overlapping the two was measured slower (the in-process scheduler and the import
    share the GIL; docs/engine.md).
    """
    from wsi_pipeline.engine.header import describe_file
    from wsi_pipeline.engine.infer import resolve_window, window_grid
    from wsi_pipeline.engine.ir_cache import cached_graph
    from wsi_pipeline.engine.registry import resolve_model
    from wsi_pipeline.worker import default_margin

    check_device(config)
    path = resolve_model(config.model)
    model: Any = describe_file(path)
    if model is not None and cached_graph(model.checksum) is not None:
        params, macs, postproc = model.params, model.macs, model.postproc
    else:
        from wsi_pipeline.engine.macs import count_params, model_macs
        from wsi_pipeline.engine.weights import load_model, model_postproc

        model = load_model(path)
        params, macs, postproc = count_params(model), model_macs(model), model_postproc(model)
    meta = dict(model.meta)
    mpp = float(config.target_mpp or meta.get("mpp") or 0.25)
    margin = config.margin if config.margin is not None else int(default_margin(model, postproc, mpp=mpp))
    tile_size = config.tile_size or default_tile_size()
    window = resolve_window(model, config.window)  # a bad --window stops the run here, in one line
    return ModelInfo(
        path=path,
        name=str(meta.get("name", path.stem)),
        checksum=getattr(model, "checksum", None) or file_checksum(path),  # a ModelFile has it already
        mpp=mpp,
        classes=list(meta.get("classes", [])),
        params=params,
        macs=macs,
        input_size=int(model.input_size),
        output_size=int(model.output_size),
        margin=margin,
        tile_size=tile_size,
        meta=meta,
        postproc=postproc,
        window=window,
        grid=window_grid(model, window),
    )


def resolved_config(config: RunConfig, model: ModelInfo) -> dict[str, Any]:
    """The run's options as JSON, with the derived values (model file, tile, margin, µm/px) filled in."""
    return {
        **config.model_dump(mode="json"),
        "model": str(model.path),
        "tile_size": model.tile_size,
        "margin": model.margin,
        "target_mpp": model.mpp,
        "window": model.window,
    }


def settings_checksum(config: RunConfig, model: ModelInfo) -> str:
    """Checksum of every setting that changes a slide's outputs, with derived values filled in."""
    settings = config.result_settings()
    settings.update(
        margin=model.margin,
        tile_size=model.tile_size,
        target_mpp=model.mpp,
        window=model.window,
        postproc=asdict(model.postproc),
        mask_mpp=DEFAULT_MASK_MPP,
        output_format=OUTPUT_FORMAT,
    )
    return checksum(settings)


def zarr_chunk(tile_size: int) -> int:
    """Chunk side of the label image: the tile size split into equal parts of at most
    :data:`MAX_ZARR_CHUNK`, so a core write covers whole chunks."""
    return math.ceil(tile_size / math.ceil(tile_size / MAX_ZARR_CHUNK))
