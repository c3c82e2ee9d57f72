"""``wsi-pipeline run INPUT... --out DIR``: segment and classify the nuclei of every slide.

INPUT is slide files, folders (searched recursively) or CSV files with a ``path``
column. Every option can also be set in a YAML file (``--config``); the command line
wins over the file. Per slide the outputs land in ``DIR/<stem>/`` (GeoJSON for QuPath,
GeoParquet table, OME-Zarr labels for napari, report.json/html); ``DIR/process_list.csv`` and
``DIR/batch_report.json`` summarise the batch. Rerunning skips the slides already done
with the same model and settings. Exit code: 0 when every slide is done or skipped,
1 when any failed, 2 for a problem of the whole run (bad option, model, input).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
from collections.abc import Iterator
from typing import Any

from wsi_pipeline.config import SCHEDULER_ENV, load_run_config, option_names
from wsi_pipeline.errors import Interrupted
from wsi_pipeline.slide.opener import BACKENDS


def _bf16(text: str) -> bool | str:
    value = text.strip().lower()
    if value in ("auto",):
        return "auto"
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected auto, true or false, got {text!r}")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "run",
        help="segment and classify nuclei in slides (Dask-scheduled tiles -> GeoJSON, OME-Zarr, reports)",
        description="Segment and classify the nuclei of every slide. INPUT: slide files, folders (searched "
        "recursively) or CSV files with a 'path' column. Options can also come from a YAML file (--config); "
        "the command line wins. Outputs per slide in DIR/<stem>/ (GeoJSON, GeoParquet, OME-Zarr, report.json/html), "
        "plus DIR/process_list.csv and DIR/batch_report.json. A rerun skips slides done with the same model "
        "and settings. Exit code 0 if every slide is done or skipped, 1 if any failed, 2 for a bad option, "
        "model or input.",
    )
    # Every option defaults to None ("not given") so a --config file can supply it.
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="slide files, folders of slides, or CSV files")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")
    parser.add_argument("--config", metavar="YAML", default=None, help="YAML file of options (keys as below)")
    model = parser.add_argument_group("model and tiles")
    model.add_argument(
        "--model", metavar="NAME|PATH", help="shipped model name or checkpoint (default: the shipped default)"
    )
    model.add_argument("--tile-size", type=int, metavar="PX", help="tile core side in px at the model's µm/px (1648)")
    model.add_argument("--margin", type=int, metavar="PX", help="context around each tile in px (default: derived)")
    model.add_argument("--batch-size", type=int, metavar="N", help="windows per forward pass (4)")
    model.add_argument("--device", metavar="DEV", help="torch device: cpu, cuda or cuda:N (cpu)")
    model.add_argument("--bf16", type=_bf16, metavar="auto|true|false",
                       help="bf16 arithmetic (auto: where native, f32 elsewhere)")
    model.add_argument(
        "--runtime", choices=("auto", "torch", "openvino"),
        help="inference runtime (auto: OpenVINO on the CPU where installed, else torch)",
    )
    model.add_argument(
        "--window", type=int, metavar="PX", help="network input side for whole-tile inference (768; a multiple of 8)"
    )
    model.add_argument(
        "--no-skip-glass", dest="skip_glass", action="store_false", default=None,
        help="compute every network window of a tile, glass included (default: windows farther than 25 µm "
        "from the detected tissue are left out)",
    )
    model.add_argument("--mpp", type=float, metavar="UM", help="slide level-0 µm/px, overriding its metadata")
    model.add_argument("--target-mpp", type=float, metavar="UM", help="inference µm/px (default: the model's)")
    model.add_argument(
        "--backend", choices=BACKENDS,
        help="slide reader (auto; image: plain PNG/JPEG/TIFF, needs --mpp)",
    )
    dask = parser.add_argument_group("scheduling (Dask)")
    dask.add_argument("--workers", type=int, metavar="N", help="local workers (default: one per core)")
    dask.add_argument("--threads-per-worker", type=int, metavar="N", help="threads per local worker (1)")
    dask.add_argument(
        "--engine-streams", type=int, metavar="N",
        help="OpenVINO windows computed at once per worker, each on a share of its cores (default on a local "
        "cluster: one per core; 1: each window on every core)",
    )
    dask.add_argument(
        "--scheduler",
        metavar="ADDR",
        help=f"use an existing Dask scheduler, e.g. tcp://host:8786 (or ${SCHEDULER_ENV})",
    )
    dask.add_argument(
        "--cluster", choices=("local", "slurm", "pbs"), help="cluster to start (local; needs dask-jobqueue)"
    )
    dask.add_argument(
        "--max-in-flight", type=int, metavar="N",
        help="tiles in flight at once, all slides together (2 x worker threads)",
    )
    dask.add_argument(
        "--slides-in-flight", type=int, choices=(1, 2), metavar="1|2",
        help="2 (default): the next slide's tiles start while the previous slide's last ones finish; 1: one at a time",
    )
    dask.add_argument("--retries", type=int, metavar="N", help="retries of a failed tile (2)")
    dask.add_argument("--dask-report", metavar="FILE", help="write Dask's performance report (HTML)")
    dask.add_argument(
        "--dashboard", action="store_true", default=None,
        help="serve Dask's dashboard from the local cluster and log its address (off: it costs each run ~1 s)",
    )
    out = parser.add_argument_group("outputs")
    out.add_argument("--overwrite", action="store_true", default=None, help="redo slides that are already done")
    out.add_argument("--geojson", choices=("plain", "gz"), help="GeoJSON file: gz (default) or plain")
    out.add_argument(
        "--zarr-image", action="store_true", default=None,
        help="also store the RGB slide at the inference µm/px in the OME-Zarr, beside the labels (for napari)",
    )
    out.add_argument(
        "--lock-wait", type=float, metavar="S",
        help="wait up to S seconds for another run on the same --out to finish (0: stop at once; -1: forever)",
    )
    out.add_argument("--no-progress", dest="progress", action="store_false", default=None, help="no progress bars")
    parser.set_defaults(func=run)


@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM (what SLURM, PBS and Kubernetes send before killing a job) into
    :class:`~wsi_pipeline.errors.Interrupted`, so the run cleans up as for Ctrl-C: partial
    folder removed, process list written, cluster closed, exit code 143."""
    def handler(signum: int, frame: Any) -> None:
        # Closing the cluster mid-task makes Dask log closed-connection tracebacks (heartbeats
        # to workers being stopped): expected during this shutdown, so not shown.
        logging.getLogger("distributed").setLevel(logging.CRITICAL + 1)
        raise Interrupted(signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _given(args: argparse.Namespace) -> dict[str, Any]:
    """The RunConfig options given on the command line (every option has a flag of its name)."""
    return {name: getattr(args, name) for name in option_names() if getattr(args, name, None) is not None}


def run(args: argparse.Namespace) -> int:
    from wsi_pipeline.batch import SlideJob, SlideOutcome, run_batch

    config = load_run_config(args.config, _given(args))
    if not getattr(args, "debug", False):
        # Dask logs every worker start and stop at INFO; the progress bars say what matters.
        # (After importing distributed: its import sets its own logger levels.)
        import distributed  # noqa: F401

        logging.getLogger("distributed").setLevel(logging.WARNING)

    def report(outcome: SlideOutcome) -> None:
        nuclei = "" if outcome.nuclei is None else f"{outcome.nuclei} nuclei, "
        where = f" -> {outcome.out_dir}" if outcome.out_dir else ""
        reason = f": {outcome.reason}" if outcome.reason else ""
        print(f"{outcome.status:7s} {outcome.name} ({nuclei}{outcome.seconds:.1f} s){where}{reason}", flush=True)
        for warning in outcome.warnings:
            print(f"warning {outcome.name}: {warning}", file=sys.stderr, flush=True)

    def starting(job: SlideJob, why: str) -> None:
        # Earlier outputs not reused (redone: ...), an interrupted run's tiles reused
        # (resumed: ...) or not (discarded: ...).
        for line in why.splitlines():
            word, _, text = line.partition(": ")
            label = {"redone": "redo", "resumed": "resume", "discarded": "discard"}.get(word, word)
            print(f"{label:7s} {job.name}: {text}", flush=True)

    with stop_on_sigterm():
        summary = run_batch(args.inputs, args.out, config, on_slide=report, on_start=starting)
    counts = summary.counts()
    print(
        f"{len(summary.outcomes)} slide(s): {counts['done']} done, {counts['skipped']} skipped, "
        f"{counts['failed']} failed in {summary.seconds:.1f} s ({summary.cluster})"
    )
    print(f"outputs: {summary.out}/<slide>/ (GeoJSON, GeoParquet, OME-Zarr, report.json, report.html)")
    for outcome in summary.outcomes:
        if outcome.out_dir:
            print(f"  {outcome.name}: {outcome.out_dir}/report.html")
    print(f"process list: {summary.process_list}")
    print(f"batch report: {summary.batch_report}")
    if config.dask_report is not None:
        print(f"Dask performance report: {config.dask_report}")
    if summary.exit_code:
        print(f"{counts['failed']} slide(s) failed: see the reasons in {summary.process_list}", file=sys.stderr)
    return summary.exit_code
