"""One slide end to end, and the batch rules around it.

:func:`process_slide` opens the slide, finds the tissue on a thumbnail, lays the tile grid
at the model's µm/px, streams the tiles through Dask
(:func:`~wsi_pipeline.schedule.stream_tiles`) into the stitcher, whose sinks write the
GeoJSON, the GeoParquet table and the OME-Zarr and gather the report's figures, then
reads a few crops (and, with ``--zarr-image``, the image for the Zarr) and writes the
report.

:func:`run_slide_job` adds the rules that make a batch safe to rerun: a slide is skipped
only if its done marker still matches the slide, the model, the settings and every output
(:mod:`wsi_pipeline.batch.marker`); outputs are written into ``OUT/.<name>.partial/`` and
renamed to ``OUT/<name>/`` only when complete, so a reader never sees half a slide and an
interrupted run leaves nothing under the real name; a failure is recorded, never raised.
The out-folder lock (:mod:`wsi_pipeline.batch.lock`) guarantees the partial folder is this
run's alone.

The partial folder also holds the tiles completed so far (:mod:`wsi_pipeline.batch.checkpoint`).
An interrupted or killed run leaves it behind; the next run resumes from it when it was made
for the same slide file, model and settings (and discards it, saying why, otherwise): the
saved tile results are replayed into a fresh stitcher while the workers compute the missing
tiles, so the outputs equal an undisturbed run's.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from wsi_pipeline.batch.checkpoint import TileCheckpoint, has_checkpoint
from wsi_pipeline.batch.inputs import SlideJob
from wsi_pipeline.batch.marker import (
    other_results,
    read_done_marker,
    skip_problem,
    slide_identity,
    write_done_marker,
)
from wsi_pipeline.batch.plan import ModelInfo, inference_config, resolved_config, zarr_chunk
from wsi_pipeline.config import RunConfig
from wsi_pipeline.engine.settings import DEFAULT_WINDOW
from wsi_pipeline.errors import WsiPipelineError
from wsi_pipeline.outputs.report import SlideReport
from wsi_pipeline.schedule import RunCluster, TileBudget, stream_tiles
from wsi_pipeline.slide import DEFAULT_MASK_MPP, SlideSpec, tissue_mask
from wsi_pipeline.tiling import Tile, grid_shape, target_size, tile_grid

log = logging.getLogger(__name__)

Status = Literal["done", "failed", "skipped"]


@dataclass
class SlideRun:
    """Everything a slide needs besides the slide itself (built once per batch)."""

    config: RunConfig
    model: ModelInfo
    cluster: RunCluster
    config_checksum: str
    max_in_flight: int
    on_tile: Callable[[Any], None] | None = None
    # The run's own start-up, seconds: "model" (load and check in the driver), "cluster"
    # (workers up). Charged to the first slide the run processes (see process_slide).
    startup: dict[str, float] = field(default_factory=dict)
    startup_charged: bool = False
    # The workers' engine warm-up futures (schedule.warm_workers): their seconds, run on the
    # workers while the driver reads the first slide, are charged with the run's start-up.
    warmup: list[Any] = field(default_factory=list, repr=False)
    # The in-flight bound the slides in flight share (None: each slide its own max_in_flight).
    budget: TileBudget | None = None
    # Guards what slides running at once in the batch's threads share (the start-up charge).
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


@dataclass
class SlideOutcome:
    """One row of process_list.csv, plus where the outputs went and what to warn about."""

    path: str
    name: str
    status: Status
    reason: str = ""
    seconds: float = 0.0
    nuclei: int | None = None
    out_dir: str | None = None
    warnings: list[str] = field(default_factory=list)
    finished: str = ""


def partial_dir(out: Path, name: str) -> Path:
    """Where a slide's outputs are written before they are complete (hidden)."""
    return out / f".{name}.partial"


def _publish(partial: Path, final: Path) -> None:
    """Move a complete partial folder to its real name, replacing an older one."""
    if final.exists():
        old = final.with_name(f".{final.name}.old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
        os.replace(partial, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(partial, final)


def slide_warnings(tissue_mm2: float, tiles: int, nuclei: int, upsampled: bool, slide_mpp: float,
                   model_mpp: float) -> list[str]:
    """What a user must know before trusting a "done": no tissue, no nuclei, upsampled input."""
    warnings = []
    if tiles == 0 or tissue_mm2 <= 0:
        warnings.append("no tissue was found: the slide looks blank, so no tile was processed (is it the right file?)")
    elif nuclei == 0:
        warnings.append(f"no nucleus was found in {tissue_mm2:.3g} mm² of tissue (check the slide and the model)")
    if upsampled:
        warnings.append(
            f"level 0 is {slide_mpp:.3g} µm/px, coarser than the model's {model_mpp:.3g}: tiles were upsampled "
            f"{slide_mpp / model_mpp:.2g}x, which adds no detail (results are less reliable)"
        )
    return warnings


def engine_description(
    config: RunConfig, used: dict[str, int], windows: dict[str, int] | None = None
) -> dict[str, Any]:
    """What ran the network: the options asked for and, per "runtime precision", how many
    tiles each computed (a worker falls back to torch where OpenVINO cannot convert), and
    the network windows: computed, reused (read by a tile from the neighbour that computed
    them), total (meeting each tile's read region, so a shared window counts once per tile)
    and skipped (on glass)."""
    out: dict[str, Any] = {
        "runtime": config.runtime,
        "bf16": config.bf16,
        "window": config.window or DEFAULT_WINDOW,
        "tiles_by_engine": dict(used),
        "skip_glass": config.skip_glass,
    }
    if windows is not None:
        done = int(windows.get("computed", 0)) + int(windows.get("reused", 0))
        out["windows"] = {**windows, "skipped": int(windows.get("total", 0)) - done}
    from wsi_pipeline.engine.infer import bf16_native_note  # torch: loaded by prepare_model by now

    note = bf16_native_note(config.bf16, config.device, used)
    if note:
        out["note"] = note
    return out


def process_slide(
    job: SlideJob,
    run: SlideRun,
    folder: Path,
    checkpoint: TileCheckpoint | None = None,
    on_submitted: Callable[[], None] | None = None,
) -> tuple[int, dict[str, Any]]:
    """Process one slide into ``folder`` (which must exist and be empty but for the
    checkpoint); returns (nuclei, report dict). Raises what goes wrong; the caller records it.

    With ``checkpoint``, every tile result is saved there as it arrives, and the tiles it
    already holds are not computed again: their results are replayed into the stitcher in
    tile order (while the workers compute the others), which rebuilds the outputs from
    scratch exactly as an undisturbed run writes them.

    ``on_submitted()`` is called once every tile has been submitted to the cluster (the
    batch starts the next slide then; see :mod:`wsi_pipeline.batch.runner`)."""
    from tqdm import tqdm

    from wsi_pipeline.outputs.geojson import GeoJSONWriter
    from wsi_pipeline.outputs.parquet import NucleiParquet
    from wsi_pipeline.outputs.qc import NucleiQC, choose_crops, qc_warnings, read_crops
    from wsi_pipeline.outputs.report import NucleiDensity, per_class_counts, write_report
    from wsi_pipeline.outputs.zarr_store import NucleiZarr
    from wsi_pipeline.shares import plan_shares
    from wsi_pipeline.stitch import Stitcher
    from wsi_pipeline.worker import TileTask, tissue_extent

    config, model = run.config, run.model
    started = time.perf_counter()
    spec = SlideSpec(str(job.path), config.backend, config.mpp)
    with spec.open() as slide:
        width0, height0 = slide.width, slide.height
        mpp0 = (slide.mpp_x, slide.mpp_y)
        upsampled = slide.is_upsampled(model.mpp)
        thumbnail = slide.thumbnail(DEFAULT_MASK_MPP)
        tissue = tissue_mask(slide, DEFAULT_MASK_MPP, thumbnail=thumbnail)
    tissue_seconds = time.perf_counter() - started
    tiles: list[Tile] = tile_grid(width0, height0, mpp0, model.mpp, model.tile_size, model.margin, tissue)
    width_t, height_t = target_size(width0, height0, mpp0, model.mpp)

    suffix = ".geojson.gz" if config.geojson == "gz" else ".geojson"
    outputs = {"geojson": f"{job.name}{suffix}", "parquet": f"{job.name}.nuclei.parquet", "zarr": f"{job.name}.zarr"}
    about = {"slide": str(job.path), "name": job.name, "model": model.name}
    geojson = GeoJSONWriter(
        folder / outputs["geojson"], model.classes, model.mpp, slide_mpp=mpp0, attributes=about,
        compress=config.geojson == "gz",
    )
    table = NucleiParquet(folder / outputs["parquet"], model.classes, model.mpp, mpp0, attributes=about)
    store = NucleiZarr(
        folder / outputs["zarr"],
        (height_t, width_t),
        zarr_chunk(model.tile_size),
        model.classes,
        model.mpp,
        image=config.zarr_image,
        attributes={**about, "level0_mpp": list(mpp0)},
    )
    density = NucleiDensity(width0, height0, mpp0, len(model.classes) + 1)
    qc = NucleiQC(model.classes)
    stitcher = Stitcher(tiles, store, [geojson, table, store, density, qc], job.name, model.checksum)
    infer = inference_config(config, run.cluster.torch_threads, run.cluster.device, run.cluster.engine_streams)
    saved = checkpoint.bind(tiles) if checkpoint is not None else set()
    grid = model.grid
    todo = [tile for tile in tiles if tile.index not in saved]
    shares = plan_shares(todo, grid)
    tasks = (
        TileTask(
            spec, tile, str(model.path), model.mpp, infer, model.postproc,
            tissue.crop(*tissue_extent(tile, grid, model.mpp)) if config.skip_glass else None,
            shares.get(tile.index, ()),
        )
        for tile in todo
    )
    nuclei_seen = 0
    checkpoint_seconds = 0.0
    bar = tqdm(total=len(tiles), desc=job.name, unit="tile", disable=not config.progress, leave=True, file=sys.stderr)

    def stitch(result: Any) -> None:
        nonlocal nuclei_seen
        stitcher.add(result)
        nuclei_seen += len(result.nuclei)
        bar.update(1)
        bar.set_postfix(nuclei=nuclei_seen, refresh=False)

    def consume(result: Any) -> None:
        nonlocal checkpoint_seconds
        if checkpoint is not None:  # saved first: once it is on disk, a kill no longer costs this tile
            t0 = time.perf_counter()
            checkpoint.save(result)
            checkpoint_seconds += time.perf_counter() - t0
        stitch(result)
        if run.on_tile is not None:
            run.on_tile(result)

    tiles_started = time.perf_counter()
    try:
        stream_tiles(
            run.cluster.client,
            tasks,
            consume,
            max_in_flight=run.max_in_flight,
            held=lambda: stitcher.buffered,
            retries=config.retries,
            replay=checkpoint.replay(tiles) if saved and checkpoint is not None else (),
            consume_replayed=stitch,
            budget=run.budget,
            on_submitted=on_submitted,
            resources=run.cluster.resources,
        )
        stats = stitcher.finish()
    finally:
        bar.close()
    tiles_wall = time.perf_counter() - tiles_started
    closing = time.perf_counter()
    count, rows = geojson.close(), table.close()
    windows = choose_crops(
        density.counts.sum(axis=0), density.cell, tissue.mask, (tissue.downsample_x, tissue.downsample_y),
        (width0, height0), mpp0, model.mpp,
    )
    rereading = time.perf_counter()  # the slide again: the report's crops (and the Zarr's image)
    with spec.open() as slide:
        if config.zarr_image:  # the RGB the tiles were read from, core by core, chunk-aligned
            for tile in tiles:
                core = tile.core
                rgb = slide.read_region_at(core.x0 * tile.scale_x, core.y0 * tile.scale_y, core.width, core.height,
                                           model.mpp)
                store.write_image(core.x0, core.y0, rgb)
        crops = read_crops(slide, windows, model.mpp, folder / outputs["parquet"], model.classes)
    reread_seconds = time.perf_counter() - rereading
    store.close()
    close_seconds = time.perf_counter() - closing - reread_seconds
    if not count == rows == store.count == stats.nuclei:
        raise RuntimeError(
            f"{job.name}: the GeoJSON holds {count}, the table {rows} and the Zarr store {store.count} nuclei, "
            f"but the stitcher produced {stats.nuclei}"
        )
    seconds = {key: float(stats.seconds.get(key, 0.0)) for key in ("read", "infer", "postprocess", "stitch")}
    # Start-up: the workers' model load, runtime conversion and compilation during this
    # slide, plus the run's own start-up (driver model load, cluster) on its first slide.
    startup = {"workers": float(stats.seconds.get("setup", 0.0))}
    with run.lock:
        if not run.startup_charged:
            startup.update({k: float(v) for k, v in run.startup.items()})
            warmed = [f.result() for f in run.warmup if f.done() and f.status == "finished"]
            if warmed:
                startup["warmup"] = float(sum(w for w in warmed if w is not None))
            run.startup_charged = True
    seconds["startup"] = sum(startup.values())
    seconds.update(
        write=float(stats.seconds.get("write", 0.0)) + close_seconds, tissue=tissue_seconds, tiles_wall=tiles_wall,
        reread=reread_seconds, checkpoint=checkpoint_seconds,
    )
    grid_rows, grid_cols = grid_shape(width0, height0, mpp0, model.mpp, model.tile_size)
    quality = qc.summary()
    report = SlideReport(
        slide=str(job.path),
        name=job.name,
        width=width0,
        height=height0,
        slide_mpp=mpp0,
        mpp=model.mpp,
        tissue_mm2=tissue.area_mm2,
        tiles=len(tiles),
        tiles_grid=grid_rows * grid_cols,
        tile_size=model.tile_size,
        margin=model.margin,
        nuclei_per_class=per_class_counts(stats.per_type, model.classes),
        edge_touching=stats.edge_touching,
        seconds=seconds,
        wall_seconds=time.perf_counter() - started,
        model=model.describe(),
        config=resolved_config(config, model) | {"cluster": run.cluster.description, "slide_upsampled": upsampled},
        startup=startup,
        engine=engine_description(config, stats.engines, stats.windows),
        config_checksum=run.config_checksum,
        classes=model.classes,
        tile_seconds=list(stats.tile_seconds),
        outputs=outputs,
        warnings=slide_warnings(tissue.area_mm2, len(tiles), stats.nuclei, upsampled, max(mpp0), model.mpp)
        + qc_warnings(quality, stats.edge_touching, model.margin),
        qc=quality,
        crops=[crop.to_dict() for crop in crops],
        tiles_resumed=len(saved),
    )
    write_report(folder, report, thumbnail=thumbnail, tissue=tissue, density=density, crops=crops)
    return stats.nuclei, report.to_dict()


def failure_reason(exc: BaseException) -> str:
    """The process list's reason: the user's problem as the error says it, a lost worker
    with the likely cause, anything else marked as a bug."""
    from distributed import KilledWorker

    if isinstance(exc, WsiPipelineError):
        return str(exc)
    if isinstance(exc, KilledWorker):
        return (
            f"a tile's worker died repeatedly ({exc}); usually it ran out of memory. "
            "Fix: a smaller --tile-size, fewer --workers, or more memory per worker"
        )
    if isinstance(exc, OSError):
        return f"{type(exc).__name__}: {exc}"
    return f"{type(exc).__name__}: {exc} (a bug: please report it with the log)"


def _save_traceback(out: Path, name: str, exc: BaseException) -> Path:
    """Keep an unexpected error's traceback in ``OUT/logs/`` (the console gets one line)."""
    import traceback

    path = out / "logs" / f"{name}.traceback.txt"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(traceback.format_exception(exc)), encoding="utf-8")
    except OSError:
        log.exception("slide %s failed", name)
    return path


Action = Literal["run", "skip", "keep"]


def _check_existing(
    run: SlideRun, final: Path, identity: dict[str, Any]
) -> tuple[Action, str, dict[str, Any] | None]:
    """What to do with the slide given its output folder: run it (and why, if it was done
    before), skip it (verified), or keep another model's or settings' results and fail;
    with the folder's done marker."""
    if not final.exists():
        return "run", "", None
    marker = read_done_marker(final)
    if marker is None:  # names are chosen so that this is our own folder, left unfinished by an old version
        return "run", f"redone: {final} had no readable done marker", None
    if run.config.overwrite:
        return "run", "redone: --overwrite", marker
    other = other_results(marker, run.model.checksum, run.config_checksum)
    if other is not None:
        return "keep", (f"{final} holds this slide's results with {other}; they are kept. "
                        "Fix: pass --overwrite to replace them, or another --out"), marker
    problem = skip_problem(final, marker, identity)
    if problem is None:
        return "skip", "already done with the same slide, model and settings; outputs verified", marker
    return "run", f"redone: {problem}", marker


def _open_partial(partial: Path, checkpoint: TileCheckpoint) -> str:
    """Prepare the slide's partial folder: resume the checkpoint an interrupted run left
    there when it belongs to this slide, model and settings, else start afresh. Returns
    what to tell the user ("" when there is nothing to say)."""
    note = ""
    if partial.exists():  # the lock says no other run owns it
        if has_checkpoint(partial):
            problem = checkpoint.mismatch()
            if problem is None:
                kept = checkpoint.resume()
                return f"resumed: {kept} tile(s) completed by an interrupted run are reused" if kept else ""
            note = f"discarded: the partial results in {partial} are not reused: {problem}"
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    checkpoint.start()
    return note


def run_slide_job(
    job: SlideJob,
    run: SlideRun,
    out: Path,
    on_start: Callable[[SlideJob, str], None] | None = None,
    on_submitted: Callable[[], None] | None = None,
) -> SlideOutcome:
    """One slide with the batch rules: skip if verifiably done, write into a partial folder
    (resuming an interrupted run's completed tiles), publish it when complete, record any
    failure. ``on_start(job, why)`` is called before a slide is processed, with ``why`` the
    lines the user should see first (why a slide done before is redone, that completed
    tiles are resumed or why they are discarded; "" when there is nothing to say).
    ``on_submitted()`` is called when the slide's last tile has been submitted (not for a
    slide skipped or failed before its tiles: the caller learns of those by their end).

    An interruption (:class:`KeyboardInterrupt`, the CLI's SIGTERM) keeps the partial
    folder with its completed tiles; so does an unexpected failure (a lost worker, a full
    disk, a bug), whose rerun then resumes. A user error of the slide (an unreadable file)
    removes it: the same file fails the same way, and a repaired one is another file.
    """
    final = out / job.name
    outcome = SlideOutcome(str(job.path), job.name, "failed")
    if job.problem is not None:
        outcome.reason = job.problem
        return outcome
    started = time.perf_counter()
    partial = partial_dir(out, job.name)
    checkpoint: TileCheckpoint | None = None
    try:
        identity = slide_identity(job.path)
        action, why, marker = _check_existing(run, final, identity)
        if action == "keep":
            outcome.reason = why
            return outcome
        if action == "skip" and marker is not None:
            outcome.status, outcome.reason = "skipped", why
            outcome.nuclei, outcome.out_dir = marker.get("nuclei"), str(final)
            outcome.seconds = time.perf_counter() - started
            return outcome
        checkpoint = TileCheckpoint(partial, {"identity": identity, "model_checksum": run.model.checksum,
                                              "config_checksum": run.config_checksum})
        notes = [note for note in (why, _open_partial(partial, checkpoint)) if note]
        if on_start is not None:
            on_start(job, "\n".join(notes))
        nuclei, report = process_slide(job, run, partial, checkpoint, on_submitted)
        checkpoint.remove()  # not an output: the manifest and the published folder never hold it
        write_done_marker(partial, identity, run.model.name, run.model.checksum, run.config_checksum, nuclei,
                          report["seconds"]["wall"])
        _publish(partial, final)
    except Exception as exc:
        outcome.reason = failure_reason(exc)
        if not isinstance(exc, WsiPipelineError | OSError):
            outcome.reason += f"; traceback in {_save_traceback(out, job.name, exc)}"
        if checkpoint is not None and checkpoint.indices and not isinstance(exc, WsiPipelineError):
            outcome.reason += (f"; its {len(checkpoint.indices)} completed tile(s) are kept in {partial}, "
                               "and a rerun resumes from them")
        else:
            shutil.rmtree(partial, ignore_errors=True)
        outcome.seconds = time.perf_counter() - started
        return outcome
    except BaseException:
        if checkpoint is None or not checkpoint.indices:
            shutil.rmtree(partial, ignore_errors=True)  # nothing worth resuming
        raise
    outcome.status, outcome.nuclei, outcome.out_dir = "done", nuclei, str(final)
    resumed = int(report["tiles"].get("resumed", 0))
    notes = [why] if why else []
    if resumed:
        notes.append(f"resumed: {resumed} of {report['tiles']['processed']} tiles from an interrupted run")
    outcome.reason, outcome.warnings = "; ".join(notes), list(report.get("warnings", []))
    outcome.seconds = time.perf_counter() - started
    return outcome
