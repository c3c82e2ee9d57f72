"""The batch: every slide of the inputs into one out folder, safe to interrupt and rerun.

The order of events is what makes it safe. The out folder is created (or refused with a
clear message when it cannot be written) and locked (:mod:`wsi_pipeline.batch.lock`) before
anything in it is read or changed; partial folders left by a killed run are removed under
the lock; output names are chosen from the inputs *and* the folders already there
(:func:`~wsi_pipeline.batch.inputs.assign_names`); slides then run with up to two in
flight (:func:`run_slides`: the next starts while the previous one's last tiles finish),
each through :func:`~wsi_pipeline.batch.one_slide.run_slide_job`, and after each the
process list and the batch report are rewritten atomically. Both keep every slide this out folder has seen,
across runs: a rerun on part of the slides updates their rows and keeps the others.

An interruption (Ctrl-C, or the SIGTERM a scheduler sends, turned into
:class:`~wsi_pipeline.errors.Interrupted` by the CLI) keeps the slide's partial folder with
the tiles completed so far (:mod:`wsi_pipeline.batch.checkpoint`), records the slide as
interrupted and still writes both lists before the run ends; the rerun resumes the slide.
Partial folders a SIGKILL left behind are resumed the same way; those that cannot be
(no checkpoint) are removed under the lock.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import queue
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from wsi_pipeline.atomic import write_text_atomic
from wsi_pipeline.batch.checkpoint import has_checkpoint, saved_tiles
from wsi_pipeline.batch.inputs import SlideJob, gather_inputs, name_jobs
from wsi_pipeline.batch.lock import out_folder_lock
from wsi_pipeline.batch.marker import marker_owner, read_done_marker
from wsi_pipeline.batch.one_slide import SlideOutcome, SlideRun, partial_dir, run_slide_job
from wsi_pipeline.batch.plan import inference_config, prepare_model, settings_checksum
from wsi_pipeline.config import RunConfig
from wsi_pipeline.errors import ConfigError, Interrupted
from wsi_pipeline.outputs import import_deferred
from wsi_pipeline.outputs.report import write_batch_report
from wsi_pipeline.schedule import TileBudget, cluster_threads, open_client, performance_report, warm_workers

log = logging.getLogger(__name__)

PROCESS_LIST = "process_list.csv"
PROCESS_LIST_COLUMNS = ("path", "status", "reason", "seconds", "nuclei", "name", "out_dir", "finished", "warnings")
WARNING_SEPARATOR = " | "


@dataclass
class BatchSummary:
    """What a batch did: one outcome per slide of this run, where the lists are, the exit code."""

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


def prepare_out(out: Path) -> Path:
    """Create ``out`` (and its parents) and check it can be written, or say why not."""
    if out.exists() and not out.is_dir():
        raise ConfigError(out, "exists and is not a folder", "choose another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".wsi-pipeline.probe.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        what = exc.strerror or type(exc).__name__
        where = f" ({exc.filename})" if exc.filename and str(exc.filename) != str(out) else ""
        raise ConfigError(
            out, f"cannot be created or written: {what}{where}", "choose a folder you can write for --out"
        ) from None
    return out


def existing_owners(out: Path) -> dict[str, str]:
    """Output folders already in ``out`` -> the resolved slide path of their done marker
    ("" for a folder without one). Hidden entries (partials, logs) are not outputs."""
    owners: dict[str, str] = {}
    for entry in sorted(out.iterdir()):
        if entry.is_dir() and not entry.name.startswith(".") and entry.name != "logs":
            owners[entry.name] = marker_owner(read_done_marker(entry))
    return owners


def remove_stale_partials(out: Path) -> list[Path]:
    """Delete what killed runs left that cannot be resumed (we hold the lock): half-replaced
    ``.old`` folders and partial folders without a checkpoint. Partial folders with one are
    kept: the slide's run decides whether they belong to it (same slide file, model and
    settings) and resumes or discards them."""
    removed = []
    for entry in out.iterdir():
        if not (entry.is_dir() and entry.name.startswith(".")):
            continue
        if entry.name.endswith(".old") or (entry.name.endswith(".partial") and not has_checkpoint(entry)):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def _row(outcome: SlideOutcome) -> dict[str, Any]:
    return {
        "path": outcome.path,
        "status": outcome.status,
        "reason": outcome.reason,
        "seconds": f"{outcome.seconds:.2f}",
        "nuclei": "" if outcome.nuclei is None else outcome.nuclei,
        "name": outcome.name,
        "out_dir": outcome.out_dir or "",
        "finished": outcome.finished,
        "warnings": WARNING_SEPARATOR.join(outcome.warnings),
    }


def read_process_list(out: Path) -> list[dict[str, str]]:
    """The rows of an existing process list (empty when there is none or it is unreadable)."""
    try:
        text = (out / PROCESS_LIST).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return []
    return [dict(row) for row in csv.DictReader(io.StringIO(text)) if row.get("path")]


def _row_key(row: dict[str, Any]) -> str:
    return str(row.get("name") or row.get("path") or "")


def merge_rows(previous: Sequence[dict[str, Any]], outcomes: Sequence[SlideOutcome]) -> list[dict[str, Any]]:
    """Earlier runs' rows with this run's outcomes replacing the same slides' (by output name)."""
    merged = {_row_key(row): {k: row.get(k, "") for k in PROCESS_LIST_COLUMNS} for row in previous}
    for outcome in outcomes:
        merged[outcome.name] = _row(outcome)
    return list(merged.values())


def write_process_list(out: Path, rows: Sequence[dict[str, Any]]) -> Path:
    """Rewrite ``OUT/process_list.csv`` atomically (it is rewritten after every slide)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=PROCESS_LIST_COLUMNS, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return write_text_atomic(out / PROCESS_LIST, buffer.getvalue())


def _report_row(row: dict[str, Any]) -> dict[str, Any]:
    """A process-list row as the batch report has it: numbers as numbers."""
    nuclei = str(row.get("nuclei", "")).strip()
    seconds = str(row.get("seconds", "")).strip()
    return {
        **row,
        "seconds": float(seconds) if seconds else 0.0,
        "nuclei": int(nuclei) if nuclei.lstrip("-").isdigit() else None,
        "out_dir": row.get("out_dir") or None,
        "warnings": [w for w in str(row.get("warnings") or "").split(WARNING_SEPARATOR) if w],
    }


def interrupted_outcome(job: SlideJob, exc: BaseException, out: Path) -> SlideOutcome:
    """The process-list row of a slide an interruption stopped: what stopped it and what
    a rerun will reuse."""
    why = exc.describe() if isinstance(exc, Interrupted) else type(exc).__name__
    kept = saved_tiles(partial_dir(out, job.name))
    then = (f"its {kept} completed tile(s) are kept, and a rerun resumes from them" if kept
            else "rerun to process it")
    return SlideOutcome(str(job.path), job.name, "failed", f"interrupted ({why}) before it finished; {then}",
                        finished=datetime.now(UTC).isoformat(timespec="seconds"))


@dataclass
class _InFlight:
    """A slide being processed in its own thread."""

    job: SlideJob
    thread: threading.Thread
    submitted: bool = False  # all its tiles are submitted: the next slide may start


EVENT_WAIT_S = 1.0


def run_slides(
    jobs: Sequence[SlideJob],
    run: SlideRun,
    out: Path,
    slides_in_flight: int,
    record: Callable[[SlideOutcome], None],
    on_start: Callable[[SlideJob, str], None] | None = None,
) -> None:
    """Run the slides with up to ``slides_in_flight`` at once; ``record(outcome)`` in this
    (the main) thread as each ends.

    Each slide runs :func:`~wsi_pipeline.batch.one_slide.run_slide_job` in a thread of its
    own (its stitcher, writers, partial folder), all on the run's one Dask client. The
    next slide starts once every slide in flight has submitted its last tile, so its
    tissue detection and first tiles fill the time the previous slide spends on its last
    tiles, its outputs and its report, when workers would otherwise idle; the in-flight
    bound (``run.budget``) is shared, so the workers' queue and the driver's memory stay
    as bounded as with one slide. A slide is still published only when complete.

    Only this thread records outcomes (process list, batch report, ``on_slide``), so they
    are written one at a time; ``on_start`` calls from the slide threads are serialised
    with a lock. An interruption in this thread (the CLI's SIGTERM handler raises
    :class:`~wsi_pipeline.errors.Interrupted` here; Ctrl-C) or in a slide thread stops the
    streams of every slide (:meth:`~wsi_pipeline.schedule.TileBudget.stop`), waits for the
    threads to end (a slide already writing its outputs finishes and is recorded done),
    records the stopped slides as interrupted, each keeping its completed tiles for the
    rerun, and re-raises.
    """
    if run.budget is None:
        run.budget = TileBudget(run.max_in_flight)
    events: queue.SimpleQueue[tuple[str, int, Any]] = queue.SimpleQueue()
    running: dict[int, _InFlight] = {}
    pending = iter(enumerate(jobs))
    said = threading.Lock()

    def starting(job: SlideJob, why: str) -> None:
        if on_start is not None:
            with said:
                on_start(job, why)

    def work(key: int, job: SlideJob) -> None:
        try:
            outcome = run_slide_job(job, run, out, on_start=starting,
                                    on_submitted=lambda: events.put(("submitted", key, None)))
        except BaseException as exc:  # an interruption: handed to the main thread
            events.put(("raised", key, exc))
        else:
            events.put(("done", key, outcome))

    def start_more() -> None:
        while len(running) < slides_in_flight and all(entry.submitted for entry in running.values()):
            item = next(pending, None)
            if item is None:
                return
            key, job = item
            thread = threading.Thread(target=work, args=(key, job), name=f"slide {job.name}", daemon=True)
            running[key] = _InFlight(job, thread)
            thread.start()

    def next_event() -> tuple[str, int, Any]:
        while True:  # a timeout, so that signals reach this thread's handler promptly
            try:
                return events.get(timeout=EVENT_WAIT_S)
            except queue.Empty:
                continue

    stopped: SlideJob | None = None
    try:
        start_more()
        while running:
            kind, key, value = next_event()
            if kind == "submitted":
                running[key].submitted = True
            else:
                entry = running.pop(key)
                entry.thread.join()
                if kind == "raised":
                    stopped = entry.job
                    raise value
                record(value)
            start_more()
    except BaseException as exc:
        run.budget.stop(exc)
        if stopped is not None:
            record(interrupted_outcome(stopped, exc, out))
        while running:
            kind, key, value = next_event()
            if kind == "submitted":
                continue
            entry = running.pop(key)
            entry.thread.join()
            record(value if kind == "done" else interrupted_outcome(entry.job, exc, out))
        raise


def run_batch(
    inputs: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    config: RunConfig,
    *,
    on_slide: Callable[[SlideOutcome], None] | None = None,
    on_tile: Callable[[Any], None] | None = None,
    on_start: Callable[[SlideJob, str], None] | None = None,
) -> BatchSummary:
    """Process every slide of ``inputs`` into ``out``; never raises for one bad slide.

    ``on_slide`` is called after each slide (the CLI prints a line); ``on_tile`` after each
    tile result reaches the stitcher; ``on_start(job, why)`` before a slide is processed.
    Raises only for problems of the whole batch (bad inputs, model, options, out folder,
    cluster) and for interruptions.
    """
    started = time.perf_counter()
    out = Path(out)
    entries = gather_inputs(inputs)  # bad inputs are refused before anything is created
    model_started = time.perf_counter()
    model = prepare_model(config)
    model_seconds = time.perf_counter() - model_started
    prepare_out(out)
    outcomes: list[SlideOutcome] = []
    with out_folder_lock(out, config.lock_wait):
        for stale in remove_stale_partials(out):
            log.info("removed %s, left by an interrupted run", stale)
        jobs = name_jobs(entries, existing_owners(out))  # names depend on what the folder holds
        previous = read_process_list(out)
        run_checksum = settings_checksum(config, model)
        process_list = out / PROCESS_LIST

        def write_lists() -> Path:
            rows = merge_rows(previous, outcomes)
            write_process_list(out, rows)
            this_run = {"started": run_started, "slides": [o.name for o in outcomes]}
            return write_batch_report(out, [_report_row(row) for row in rows], last_run=this_run)

        run_started = datetime.now(UTC).isoformat(timespec="seconds")
        cluster_started = time.perf_counter()
        with open_client(config) as cluster, performance_report(config.dask_report):
            threads = cluster_threads(cluster.client)
            startup = {"model": model_seconds, "cluster": time.perf_counter() - cluster_started}
            infer = inference_config(config, cluster.torch_threads, cluster.device, cluster.engine_streams)
            warming = warm_workers(cluster, str(model.path), infer)
            import_deferred()  # the writers' and the report's libraries, while the workers warm up
            max_in_flight = config.max_in_flight or 2 * threads
            run = SlideRun(
                config=config,
                model=model,
                cluster=cluster,
                config_checksum=run_checksum,
                max_in_flight=max_in_flight,
                on_tile=on_tile,
                startup=startup,
                budget=TileBudget(max_in_flight),
                warmup=warming,
            )
            log.info("%s (%d thread(s)); dashboard: %s", cluster.description, threads, cluster.dashboard or "off")

            def record(outcome: SlideOutcome) -> None:
                outcome.finished = datetime.now(UTC).isoformat(timespec="seconds")
                outcomes.append(outcome)
                write_lists()
                if on_slide is not None:
                    on_slide(outcome)

            try:
                run_slides(jobs, run, out, config.slides_in_flight, record, on_start)
            finally:
                batch_report = write_lists()
                del warming
            description = cluster.description
    return BatchSummary(
        out=out,
        outcomes=outcomes,
        process_list=process_list,
        batch_report=batch_report,
        cluster=description,
        seconds=time.perf_counter() - started,
    )
