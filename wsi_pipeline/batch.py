"""A batch of slides: inputs -> per-slide jobs, status, resume, summary.

Inputs are slide files, folders (searched recursively by
:func:`~wsi_pipeline.slide.discover.find_slides`) and CSV files with a ``path`` column
(relative paths are relative to the CSV, so a CSV travels with its slides). Each slide
gets ``OUT/<stem>/`` (stems made distinct by
:func:`~wsi_pipeline.slide.discover.output_names`).

Resume rests on two rules. A slide's outputs are written into ``OUT/.<stem>.partial/``
and renamed to ``OUT/<stem>/`` only when complete, so an interrupted run never leaves a
half-written folder under the real name (a stale partial folder is simply deleted by the
next run). The last file written into it is ``.done.json`` with the model's and the
settings' checksums, so a rerun skips exactly the slides done with the same model and
settings (``--overwrite`` redoes them). A failing slide is recorded in
``process_list.csv`` with its reason and the batch goes on.

One slide end to end (:func:`process_slide`): open it, find the tissue on a thumbnail,
lay the tile grid at the model's µm/px, stream the tiles through Dask
(:func:`~wsi_pipeline.schedule.stream_tiles`) into the stitcher, whose sinks write the
GeoJSON and the OME-Zarr, then write the report.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from wsi_pipeline.config import RunConfig, checksum, file_checksum
from wsi_pipeline.engine.infer import InferenceConfig
from wsi_pipeline.engine.postproc import PostprocConfig
from wsi_pipeline.errors import ConfigError, ModelError, WsiPipelineError
from wsi_pipeline.outputs.report import write_batch_report
from wsi_pipeline.schedule import RunCluster, cluster_threads, open_client, performance_report, stream_tiles
from wsi_pipeline.slide import DEFAULT_MASK_MPP, SlideSpec, find_slides, output_names, tissue_mask
from wsi_pipeline.slide.opener import SUPPORTED_EXTENSIONS, slide_extension
from wsi_pipeline.tiling import Tile, grid_shape, target_size, tile_grid

log = logging.getLogger(__name__)

PROCESS_LIST = "process_list.csv"
DONE_MARKER = ".done.json"
PROCESS_LIST_COLUMNS = ("path", "status", "reason", "seconds", "nuclei")
# Bumped when the outputs' layout changes, so older outputs are not taken as done.
OUTPUT_FORMAT = 1
DEFAULT_TILE_PX = 1300
# Largest Zarr chunk side: chunks divide the tile core so core writes stay chunk-aligned.
MAX_ZARR_CHUNK = 1024
Status = Literal["done", "failed", "skipped"]


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SlideJob:
    """One slide to process: its path, its output name, and a problem found before
    processing (a CSV row naming a missing file), which makes it fail at once."""

    path: Path
    name: str
    problem: str | None = None


def _csv_paths(csv_path: Path) -> list[tuple[Path, str | None]]:
    """(path, problem) per row of a CSV's ``path`` column, relative to the CSV's folder."""
    try:
        text = csv_path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(csv_path, f"cannot be read as a UTF-8 CSV ({exc})", "save it as UTF-8 text") from None
    reader = csv.DictReader(text.splitlines())
    columns = {(name or "").strip().lower(): name for name in reader.fieldnames or []}
    if "path" not in columns:
        found = ", ".join(repr(c) for c in reader.fieldnames or []) or "none"
        raise ConfigError(
            csv_path,
            f"has no 'path' column (columns: {found})",
            "add a header row whose column 'path' names the slides",
        )
    rows: list[tuple[Path, str | None]] = []
    for line, row in enumerate(reader, start=2):
        value = (row.get(columns["path"]) or "").strip()
        if not value:
            continue
        path = Path(value).expanduser()
        if not path.is_absolute():
            path = csv_path.parent / path
        problem = None
        if not path.is_file():
            problem = f"{csv_path} line {line}: {path} " + ("is a folder" if path.is_dir() else "does not exist")
        elif slide_extension(path) not in SUPPORTED_EXTENSIONS:
            problem = f"{csv_path} line {line}: {path} has an unsupported extension {slide_extension(path)!r}"
        rows.append((path, problem))
    if not rows:
        raise ConfigError(csv_path, "lists no slides (its 'path' column is empty)", "add one slide path per row")
    return rows


def collect_jobs(inputs: Sequence[str | os.PathLike[str]]) -> list[SlideJob]:
    """The slides named by ``inputs`` (files, folders, CSVs), deduplicated, in input order.

    A missing or unsupported file named on the command line is an error (a typo is best
    caught before hours of work); one listed in a CSV becomes a failed job so the rest of
    the list still runs.
    """
    entries: list[tuple[Path, str | None]] = []
    for item in inputs:
        path = Path(item)
        if path.is_file() and path.suffix.lower() == ".csv":
            entries.extend(_csv_paths(path))
        else:
            entries.extend((slide, None) for slide in find_slides([path]))
    seen: set[Path] = set()
    unique: list[tuple[Path, str | None]] = []
    for path, problem in entries:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            unique.append((path, problem))
    names = output_names([path for path, _ in unique])
    return [SlideJob(path, names[path], problem) for path, problem in unique]


# ---------------------------------------------------------------------------------------------
# The model and the settings that decide whether a slide is done
# ---------------------------------------------------------------------------------------------
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
    meta: dict[str, Any] = field(repr=False)

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
        }


def resolve_model_path(model: str | None) -> Path:
    """The checkpoint file of ``--model`` (a path, or a shipped model's name; default: the registry's)."""
    from wsi_pipeline.engine.registry import default_model_name, resolve_model_name

    name = model if model is not None else default_model_name()
    path = Path(name).expanduser()
    if path.is_file():
        return path.resolve()
    if path.is_dir():
        raise ModelError(path, "is a folder, not a checkpoint file", "pass a .safetensors file or a shipped model name")
    if "/" in name or os.sep in name or path.suffix in (".safetensors", ".pth", ".pt", ".tar"):
        raise ModelError(path, "no such checkpoint file", "check the path, or pass a shipped model name")
    return resolve_model_name(name).resolve()


def default_tile_size(output_size: int) -> int:
    """The tile core side when ``--tile-size`` is not given: the multiple of the model's
    output patch nearest :data:`DEFAULT_TILE_PX` (1312 px for HoVer-Net fast).

    A multiple of the output size keeps the engine's patch grid aligned with the slide at
    no cost (the worker pads otherwise). Patches the two sample slides need with the
    164 px default margin, by tile size (656 / 984 / 1312 / 1968 / 2624 px): 2103 / 1830 /
    1685 / 1645 / 1689. Small tiles repeat the margin too often; from ~1300 px on the
    count is flat (larger tiles take in more glass), while memory per tile keeps growing
    and fewer, larger tiles leave workers idle at the end of a slide.
    """
    return max(1, round(DEFAULT_TILE_PX / output_size)) * output_size


def prepare_model(config: RunConfig) -> ModelInfo:
    """Load the model once in the driver: its metadata, size and MACs for the reports, the
    tile margin it needs (``--margin`` or the worker's derived default) and the tile size."""
    from wsi_pipeline.engine.macs import count_macs, count_params
    from wsi_pipeline.engine.weights import load_model
    from wsi_pipeline.worker import default_margin

    path = resolve_model_path(config.model)
    model = load_model(path)
    meta = dict(model.meta)
    mpp = float(config.target_mpp or meta.get("mpp") or 0.25)
    margin = config.margin if config.margin is not None else int(default_margin(model, PostprocConfig(), mpp=mpp))
    tile_size = config.tile_size or default_tile_size(int(model.output_size))
    return ModelInfo(
        path=path,
        name=str(meta.get("name", path.stem)),
        checksum=file_checksum(path),
        mpp=mpp,
        classes=list(meta.get("classes", [])),
        params=count_params(model),
        macs=count_macs(model),
        input_size=int(model.input_size),
        output_size=int(model.output_size),
        margin=margin,
        tile_size=tile_size,
        meta=meta,
    )


def resolved_config(config: RunConfig, model: ModelInfo) -> dict[str, Any]:
    """The run's options as JSON, with the derived values (model file, tile, margin, µm/px) filled in."""
    return {
        **config.model_dump(mode="json"),
        "model": str(model.path),
        "tile_size": model.tile_size,
        "margin": model.margin,
        "target_mpp": model.mpp,
    }


def settings_checksum(config: RunConfig, model: ModelInfo) -> str:
    """Checksum of every setting that changes a slide's outputs, with derived values filled in."""
    settings = config.result_settings()
    settings.update(
        margin=model.margin,
        tile_size=model.tile_size,
        target_mpp=model.mpp,
        postproc=asdict(PostprocConfig()),
        mask_mpp=DEFAULT_MASK_MPP,
        output_format=OUTPUT_FORMAT,
    )
    return checksum(settings)


# ---------------------------------------------------------------------------------------------
# Outcomes, process list, atomic folders
# ---------------------------------------------------------------------------------------------
@dataclass
class SlideOutcome:
    """One row of process_list.csv, plus where the outputs went."""

    path: str
    name: str
    status: Status
    reason: str = ""
    seconds: float = 0.0
    nuclei: int | None = None
    out_dir: str | None = None

    def summary(self) -> dict[str, Any]:
        """The batch report's row: numbers as numbers, plus the output folder."""
        return {
            "path": self.path,
            "status": self.status,
            "reason": self.reason,
            "seconds": round(self.seconds, 3),
            "nuclei": self.nuclei,
            "name": self.name,
            "out_dir": self.out_dir,
        }

    def row(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "status": self.status,
            "reason": self.reason,
            "seconds": f"{self.seconds:.2f}",
            "nuclei": "" if self.nuclei is None else self.nuclei,
        }


def _write_atomic(path: Path, text: str) -> None:
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)


def write_process_list(out: Path, outcomes: Sequence[SlideOutcome]) -> Path:
    """Rewrite ``OUT/process_list.csv`` (atomically: it is rewritten after every slide)."""
    lines: list[str] = []

    class _Sink:
        def write(self, text: str) -> None:
            lines.append(text)

    writer = csv.DictWriter(_Sink(), fieldnames=PROCESS_LIST_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for outcome in outcomes:
        writer.writerow(outcome.row())
    path = out / PROCESS_LIST
    _write_atomic(path, "".join(lines))
    return path


def read_done_marker(folder: Path) -> dict[str, Any] | None:
    """The ``.done.json`` of a finished slide folder, or None when absent or unreadable."""
    try:
        data = json.loads((folder / DONE_MARKER).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


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


# ---------------------------------------------------------------------------------------------
# One slide
# ---------------------------------------------------------------------------------------------
@dataclass
class SlideRun:
    """Everything a slide needs besides the slide itself (built once per batch)."""

    config: RunConfig
    model: ModelInfo
    cluster: RunCluster
    config_checksum: str
    max_in_flight: int
    on_tile: Callable[[Any], None] | None = None


def zarr_chunk(tile_size: int) -> int:
    """Chunk side of the label image: the tile size split into equal parts of at most
    :data:`MAX_ZARR_CHUNK`, so a core write covers whole chunks."""
    return math.ceil(tile_size / math.ceil(tile_size / MAX_ZARR_CHUNK))


def process_slide(job: SlideJob, run: SlideRun, folder: Path) -> tuple[int, dict[str, Any]]:
    """Process one slide into ``folder`` (which must exist and be empty); returns
    (nuclei, report dict). Raises what goes wrong; the caller records it."""
    from tqdm import tqdm

    from wsi_pipeline.outputs.geojson import GeoJSONWriter
    from wsi_pipeline.outputs.report import NucleiDensity, SlideReport, per_class_counts, write_report
    from wsi_pipeline.outputs.zarr_store import NucleiZarr
    from wsi_pipeline.stitch import Stitcher
    from wsi_pipeline.worker import TileTask

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
    if upsampled:
        log.warning(
            "%s: level 0 is %.3g µm/px, coarser than the model's %.3g: tiles are upsampled (no detail is added)",
            job.path,
            max(mpp0),
            model.mpp,
        )
    tiles: list[Tile] = tile_grid(width0, height0, mpp0, model.mpp, model.tile_size, model.margin, tissue)
    width_t, height_t = target_size(width0, height0, mpp0, model.mpp)

    suffix = ".geojson.gz" if config.geojson == "gz" else ".geojson"
    outputs = {"geojson": f"{job.name}{suffix}", "zarr": f"{job.name}.zarr"}
    geojson = GeoJSONWriter(folder / outputs["geojson"], model.classes, model.mpp, compress=config.geojson == "gz")
    store = NucleiZarr(
        folder / outputs["zarr"],
        (height_t, width_t),
        zarr_chunk(model.tile_size),
        model.classes,
        model.mpp,
        attributes={"slide": str(job.path), "name": job.name, "level0_mpp": list(mpp0)},
    )
    density = NucleiDensity(width0, height0, mpp0, len(model.classes) + 1)
    stitcher = Stitcher(tiles, store, [geojson, store, density], job.name, model.checksum)
    infer = InferenceConfig(
        device=config.device, threads=run.cluster.torch_threads, batch_size=config.batch_size, bf16=config.bf16
    )
    tasks = (TileTask(spec, tile, str(model.path), model.mpp, infer, PostprocConfig()) for tile in tiles)
    nuclei_seen = 0
    bar = tqdm(total=len(tiles), desc=job.name, unit="tile", disable=not config.progress, leave=True, file=sys.stderr)

    def consume(result: Any) -> None:
        nonlocal nuclei_seen
        stitcher.add(result)
        nuclei_seen += len(result.nuclei)
        bar.update(1)
        bar.set_postfix(nuclei=nuclei_seen, refresh=False)
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
        )
        stats = stitcher.finish()
    finally:
        bar.close()
    tiles_wall = time.perf_counter() - tiles_started
    closing = time.perf_counter()
    count = geojson.close()
    store.close()
    close_seconds = time.perf_counter() - closing
    if count != stats.nuclei or store.count != stats.nuclei:
        raise RuntimeError(
            f"{job.name}: the GeoJSON holds {count} and the Zarr table {store.count} nuclei, "
            f"but the stitcher produced {stats.nuclei}"
        )
    seconds = {key: float(stats.seconds.get(key, 0.0)) for key in ("read", "infer", "postprocess", "stitch")}
    seconds.update(
        write=float(stats.seconds.get("write", 0.0)) + close_seconds, tissue=tissue_seconds, tiles_wall=tiles_wall
    )
    rows, cols = grid_shape(width0, height0, mpp0, model.mpp, model.tile_size)
    report = SlideReport(
        slide=str(job.path),
        name=job.name,
        width=width0,
        height=height0,
        slide_mpp=mpp0,
        mpp=model.mpp,
        tissue_mm2=tissue.area_mm2,
        tiles=len(tiles),
        tiles_grid=rows * cols,
        tile_size=model.tile_size,
        margin=model.margin,
        nuclei_per_class=per_class_counts(stats.per_type, model.classes),
        edge_touching=stats.edge_touching,
        seconds=seconds,
        wall_seconds=time.perf_counter() - started,
        model=model.describe(),
        config=resolved_config(config, model) | {"cluster": run.cluster.description, "slide_upsampled": upsampled},
        config_checksum=run.config_checksum,
        classes=model.classes,
        tile_seconds=list(stats.tile_seconds),
        outputs=outputs,
    )
    write_report(folder, report, thumbnail=thumbnail, tissue=tissue, density=density)
    return stats.nuclei, report.to_dict()


# ---------------------------------------------------------------------------------------------
# The batch
# ---------------------------------------------------------------------------------------------
@dataclass
class BatchSummary:
    """What a batch did: one outcome per slide, where the lists are, the exit code."""

    out: Path
    outcomes: list[SlideOutcome]
    process_list: Path
    batch_report: Path
    cluster: str
    seconds: float

    @property
    def exit_code(self) -> int:
        """0 only if every slide is done or skipped; 1 if any failed."""
        return 0 if all(o.status in ("done", "skipped") for o in self.outcomes) else 1

    def counts(self) -> dict[str, int]:
        out = {"done": 0, "failed": 0, "skipped": 0}
        for outcome in self.outcomes:
            out[outcome.status] += 1
        return out


def _skip_reason(final: Path, run: SlideRun) -> tuple[bool, str | None, dict[str, Any] | None]:
    """(skip, problem, marker) for an existing output folder."""
    if not final.exists():
        return False, None, None
    marker = read_done_marker(final)
    same = (
        marker is not None
        and marker.get("model_checksum") == run.model.checksum
        and marker.get("config_checksum") == run.config_checksum
    )
    if run.config.overwrite:
        return False, None, marker
    if same:
        return True, None, marker
    what = "from a run with another model or settings" if marker else f"without {DONE_MARKER} (not made by this run)"
    return False, f"{final} exists {what}; it is kept. Fix: pass --overwrite to replace it, or another --out", marker


def _failure_reason(exc: BaseException) -> str:
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


def run_slide_job(job: SlideJob, run: SlideRun, out: Path) -> SlideOutcome:
    """One slide with the batch rules: skip if done, write into a partial folder, publish
    it when complete, record any failure."""
    final = out / job.name
    outcome = SlideOutcome(str(job.path), job.name, "failed")
    if job.problem is not None:
        outcome.reason = job.problem
        return outcome
    skip, problem, marker = _skip_reason(final, run)
    if skip:
        assert marker is not None
        outcome.status, outcome.reason = "skipped", "already done with the same model and settings"
        outcome.nuclei, outcome.out_dir = marker.get("nuclei"), str(final)
        return outcome
    if problem is not None:
        outcome.reason = problem
        return outcome
    partial = partial_dir(out, job.name)
    if partial.exists():
        shutil.rmtree(partial)  # left by an interrupted run
    partial.mkdir(parents=True)
    started = time.perf_counter()
    try:
        nuclei, report = process_slide(job, run, partial)
        marker = {
            "slide": str(job.path),
            "model": run.model.name,
            "model_checksum": run.model.checksum,
            "config_checksum": run.config_checksum,
            "nuclei": nuclei,
            "seconds": report["seconds"]["wall"],
            "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        _write_atomic(partial / DONE_MARKER, json.dumps(marker, indent=2) + "\n")
        _publish(partial, final)
    except Exception as exc:
        shutil.rmtree(partial, ignore_errors=True)
        if not isinstance(exc, WsiPipelineError | OSError):
            log.exception("slide %s failed", job.path)
        outcome.reason = _failure_reason(exc)
        outcome.seconds = time.perf_counter() - started
        return outcome
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    outcome.status, outcome.nuclei, outcome.out_dir = "done", nuclei, str(final)
    outcome.seconds = time.perf_counter() - started
    return outcome


@contextlib.contextmanager
def _batch_cluster(config: RunConfig) -> Iterator[RunCluster]:
    with open_client(config) as cluster, performance_report(config.dask_report):
        yield cluster


def run_batch(
    inputs: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    config: RunConfig,
    *,
    on_slide: Callable[[SlideOutcome], None] | None = None,
    on_tile: Callable[[Any], None] | None = None,
) -> BatchSummary:
    """Process every slide of ``inputs`` into ``out``; never raises for one bad slide.

    ``on_slide`` is called after each slide (the CLI prints a line); ``on_tile`` after each
    tile result reaches the stitcher. Raises only for problems of the whole batch (bad
    inputs, model, options or cluster).
    """
    started = time.perf_counter()
    out = Path(out)
    jobs = collect_jobs(inputs)
    model = prepare_model(config)
    if out.exists() and not out.is_dir():
        raise ConfigError(out, "exists and is not a folder", "choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    run_checksum = settings_checksum(config, model)
    outcomes: list[SlideOutcome] = []
    process_list = out / PROCESS_LIST
    with _batch_cluster(config) as cluster:
        threads = cluster_threads(cluster.client)
        run = SlideRun(
            config=config,
            model=model,
            cluster=cluster,
            config_checksum=run_checksum,
            max_in_flight=config.max_in_flight or 2 * threads,
            on_tile=on_tile,
        )
        log.info("%s (%d thread(s)); dashboard: %s", cluster.description, threads, cluster.dashboard or "off")
        try:
            for job in jobs:
                outcome = run_slide_job(job, run, out)
                outcomes.append(outcome)
                process_list = write_process_list(out, outcomes)
                if on_slide is not None:
                    on_slide(outcome)
        finally:
            process_list = write_process_list(out, outcomes)
            batch_report = write_batch_report(out, [o.summary() for o in outcomes])
        description = cluster.description
    return BatchSummary(
        out=out,
        outcomes=outcomes,
        process_list=process_list,
        batch_report=batch_report,
        cluster=description,
        seconds=time.perf_counter() - started,
    )


__all__ = [
    "DONE_MARKER",
    "PROCESS_LIST",
    "BatchSummary",
    "ModelInfo",
    "SlideJob",
    "SlideOutcome",
    "SlideRun",
    "collect_jobs",
    "prepare_model",
    "process_slide",
    "read_done_marker",
    "resolve_model_path",
    "run_batch",
    "run_slide_job",
    "settings_checksum",
    "write_process_list",
]
