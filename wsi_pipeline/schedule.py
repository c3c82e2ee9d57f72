"""Dask: which cluster runs the tiles, and how tiles stream through it.

The cluster is a ``distributed.LocalCluster`` sized to the machine unless the user names
an existing scheduler (``--scheduler`` / ``DASK_SCHEDULER_ADDRESS``) or asks dask-jobqueue
for a SLURM/PBS one. Tasks carry a :class:`~wsi_pipeline.worker.TileTask` (slide path,
tile coordinates, model path, settings), never a slide handle or a model: handles hold
native resources that do not pickle, and a model per task would be shipped thousands of
times. Each worker process opens slides itself and loads the model once
(:func:`wsi_pipeline.worker.process_tile` keeps a per-process cache).

:func:`stream_tiles` keeps at most ``max_in_flight`` tiles between submission and the
stitcher (counting the results the stitcher still holds), so memory does not grow with
the slide; results are handed over as they complete (``as_completed``), and a task whose
worker dies is recomputed elsewhere (Dask reschedules it; ``retries`` also reruns one that
raised), so a lost worker costs only its tiles.

Default layout: one single-threaded worker process per core. Measured with
``benchmarks/worker_layout.py`` on the 2-core development machine (6 tiles of 328 px, a
small HoVer-Net, two interleaved rounds, the machine shared with a training job, load
average ~7; :data:`LAYOUT_MEASUREMENT`), tiles/s:

    layout (workers x threads, torch threads)   round 1   round 2
    2 x 1, torch 1                               0.164     0.305
    1 x 2, torch 1                               0.281     0.250
    1 x 1, torch 2                               0.069     0.093

Spreading one task over the cores with torch's intra-op threads lost clearly (2-4x):
on a busy machine its threads wait for each other. Processes and threads tied within
the noise; processes are the default because a worker that crashes or is killed for
memory then loses only its own tiles, and post-processing never waits for another
task's GIL, at the cost of one model per process (~450 MB RSS per worker here).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wsi_pipeline.config import RunConfig
from wsi_pipeline.errors import ConfigError, WsiPipelineError

if TYPE_CHECKING:
    from distributed import Client

    from wsi_pipeline.nuclei import TileResult
    from wsi_pipeline.worker import TileTask

log = logging.getLogger(__name__)

# The measurement behind the default layout (`python benchmarks/worker_layout.py --repeat 2`).
LAYOUT_MEASUREMENT = "benchmarks/results/worker_layout.json"
WORKER_WAIT_S = 120.0


@dataclass(frozen=True)
class Layout:
    """Dask workers (processes) and threads in each; ``torch_threads`` is the intra-op
    thread count each task sets, so threads x torch_threads never oversubscribes cores."""

    workers: int
    threads_per_worker: int
    torch_threads: int = 1

    @property
    def total_threads(self) -> int:
        return self.workers * self.threads_per_worker


def machine_cpus() -> int:
    """Cores this process may use (the affinity mask, which containers and batch systems set)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def local_layout(config: RunConfig, cpus: int | None = None) -> Layout:
    """The LocalCluster layout for ``config`` on a machine with ``cpus`` cores.

    Without a choice from the user: one worker process per core, one thread each (see
    the module docstring for the measurement). Given only
    ``--workers``, the cores are split between them; given only ``--threads-per-worker``,
    as many workers as fit. torch gets the cores left to each task.
    """
    cpus = machine_cpus() if cpus is None else cpus
    workers, threads = config.workers, config.threads_per_worker
    if workers is None and threads is None:
        workers, threads = cpus, 1
    elif workers is None:
        assert threads is not None
        workers = max(1, cpus // threads)
    elif threads is None:
        threads = max(1, cpus // workers)
    torch_threads = max(1, cpus // (workers * threads))
    return Layout(workers, threads, torch_threads)


JOBQUEUE_POLL_S = 60.0  # how often the wait for the first SLURM/PBS worker says what it waits for
JOBQUEUE_CHECK_S = 2.0  # how often it checks that the jobs were submitted


def _jobqueue_default(cluster: str, key: str) -> Any:
    """dask-jobqueue's own setting ``jobqueue.<cluster>.<key>`` (``~/.config/dask/jobqueue.yaml``)."""
    import dask

    return dask.config.get(f"jobqueue.{cluster}.{key}", None)


def jobqueue_arguments(config: RunConfig) -> dict[str, Any]:
    """The SLURMCluster/PBSCluster arguments of a run.

    Each key comes from ``cluster_options`` (the run YAML), else from dask-jobqueue's
    configuration, else from its default; ``cores`` may also come from
    ``--threads-per-worker`` (one worker of that many threads per job). Without a choice a
    job holds one single-threaded worker per core, the local layout. Workers run this
    Python unless told otherwise, and the dashboard takes a free port.
    """
    name, options = config.cluster, config.cluster_options
    cores = options.cores or _jobqueue_default(name, "cores") or config.threads_per_worker
    memory = options.memory or _jobqueue_default(name, "memory")
    missing = [key for key, value in (("cores", cores), ("memory", memory)) if value is None]
    if missing:
        raise ConfigError(
            None,
            f"--cluster {name} needs the {' and '.join(missing)} of each job, which no setting gives",
            f"add cluster_options: {{cores: 4, memory: 16GB}} (your queue's values) to the --config YAML, or set "
            f"{' and '.join(f'jobqueue.{name}.{key}' for key in missing)} in ~/.config/dask/jobqueue.yaml "
            "(docs/cluster.md)",
        )
    cores = int(cores)
    threads = config.threads_per_worker or 1
    processes = options.processes or _jobqueue_default(name, "processes") or max(1, cores // threads)
    if processes > cores:
        raise ConfigError(
            None,
            f"cluster_options asks for {processes} worker processes in jobs of {cores} core(s)",
            "give processes at most cores (each worker needs a core)",
        )
    arguments: dict[str, Any] = {
        "cores": cores,
        "memory": memory,
        "processes": int(processes),
        "python": options.python or _jobqueue_default(name, "python") or sys.executable,
        "scheduler_options": {
            "dashboard_address": _dashboard_address(),
            **(_jobqueue_default(name, "scheduler-options") or {}),
        },
    }
    for key in ("queue", "account", "walltime", "job_extra_directives", "job_script_prologue", "interface",
                "log_directory", "local_directory"):
        value = getattr(options, key)
        if value is not None:
            arguments[key] = list(value) if isinstance(value, tuple) else value
    return arguments


def _check_job_script(cluster: Any, name: str) -> None:
    """Ask SLURM whether it would run the worker job (``sbatch --test-only``), so a wrong
    partition, account or size fails the run at once with SLURM's own words rather than
    leaving it waiting for a worker that never comes. PBS has no such check."""
    if name != "slurm":
        return
    with tempfile.TemporaryDirectory(prefix="wsi-jobqueue-") as folder:
        script = Path(folder) / "worker.sh"
        script.write_text(cluster.job_script(), encoding="utf-8")
        try:
            result = subprocess.run(["sbatch", "--test-only", str(script)], capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.warning("could not check the worker job with sbatch --test-only (%s)", exc)
            return
    if result.returncode != 0:
        said = (result.stderr.strip() or result.stdout.strip() or f"exit code {result.returncode}").splitlines()[-1]
        raise ConfigError(
            None,
            f"SLURM refuses the Dask worker job ({said})",
            "fix cluster_options (queue, account, cores, memory, walltime, job_extra_directives) in the --config "
            "YAML or jobqueue.slurm in ~/.config/dask/jobqueue.yaml; `sinfo` lists the partitions and their limits",
        )


def _start_jobqueue(config: RunConfig) -> tuple[Any, str]:
    """A SLURM or PBS cluster from dask-jobqueue and its description.

    Scaled to ``--workers`` workers (whole jobs; default one job), or adaptive between
    ``cluster_options.adaptive_minimum`` and ``adaptive_maximum`` workers.
    """
    try:
        import dask_jobqueue
    except ImportError:
        raise ConfigError(
            None,
            f"--cluster {config.cluster} needs the dask-jobqueue package, which is not installed",
            "pip install dask-jobqueue (and describe your queue in cluster_options, docs/cluster.md), "
            "or use --scheduler ADDR with a cluster you started yourself",
        ) from None
    cls = {"slurm": dask_jobqueue.SLURMCluster, "pbs": dask_jobqueue.PBSCluster}[config.cluster]
    submit = cls.job_cls.submit_command.split()[0]
    if shutil.which(submit) is None:
        raise ConfigError(
            None,
            f"--cluster {config.cluster} submits its workers with {submit}, which is not on this machine's PATH",
            f"run on a {config.cluster.upper()} login node, or use --scheduler ADDR with a cluster you started",
        )
    options = config.cluster_options
    minimum = maximum = None
    if options.adaptive:
        minimum = options.adaptive_minimum or 1
        maximum = options.adaptive_maximum or config.workers
        if maximum is None:
            raise ConfigError(
                None,
                "adaptive scaling (cluster_options.adaptive_minimum) needs a maximum number of workers",
                "add adaptive_maximum to cluster_options (or give --workers)",
            )
        if maximum < minimum:
            raise ConfigError(None, f"adaptive_minimum ({minimum}) is above the maximum ({maximum})",
                              "give adaptive_maximum at least adaptive_minimum")
        if config.workers is not None and options.adaptive_maximum is not None:
            log.warning("--workers is ignored with adaptive scaling (cluster_options.adaptive_minimum/maximum)")
    arguments = jobqueue_arguments(config)
    try:
        cluster = cls(**arguments)
    except ValueError as exc:  # a setting dask-jobqueue refuses
        raise ConfigError(
            None,
            f"dask-jobqueue could not set up the {config.cluster} cluster ({exc})".replace("\n", " "),
            f"fix cluster_options in the --config YAML or jobqueue.{config.cluster} in ~/.config/dask/jobqueue.yaml",
        ) from None
    try:
        _check_job_script(cluster, config.cluster)
        if maximum is not None:
            cluster.adapt(minimum=minimum, maximum=maximum)
            scaling = f"adaptive, {minimum}-{maximum} workers"
        elif config.workers is not None:
            cluster.scale(n=config.workers)
            scaling = f"{config.workers} worker(s)"
        else:
            cluster.scale(jobs=1)
            scaling = "1 job"
    except BaseException:
        cluster.close()
        raise
    threads = arguments["cores"] // arguments["processes"]
    queue = f", queue {options.queue}" if options.queue else ""
    description = (
        f"{config.cluster} cluster via dask-jobqueue: {scaling}; jobs of {arguments['cores']} core(s), "
        f"{arguments['memory']}, {arguments['processes']} worker(s) x {threads} thread(s){queue}"
    )
    return cluster, description


def _wait_for_jobqueue(client: Client, cluster: Any, name: str) -> None:
    """Wait for the first SLURM/PBS worker, however long the queue holds its job (hours are
    normal on a busy cluster), saying every :data:`JOBQUEUE_POLL_S` what it waits for. Jobs
    that could not even be submitted end the wait with an error within seconds
    (dask-jobqueue only logs the submit command's failure)."""
    from distributed.core import Status

    started = last_said = time.monotonic()
    while True:
        try:
            client.wait_for_workers(1, timeout=JOBQUEUE_CHECK_S)
            return
        except TimeoutError:
            pass
        # A job dask-jobqueue tried to start holds the batch system's id once submitted.
        jobs = list(cluster.workers.values())
        submitted = [str(job.job_id) for job in jobs if getattr(job, "job_id", None)]
        if jobs and not submitted:
            for job in jobs:  # never started: what closing the cluster expects of such a job
                job.status = Status.failed
            raise ConfigError(
                None,
                f"no {name} worker job could be submitted (the submit command's error is above)",
                f"check cluster_options in the --config YAML against `{'sinfo' if name == 'slurm' else 'qstat -Q'}`",
            )
        if time.monotonic() - last_said >= JOBQUEUE_POLL_S:
            last_said = time.monotonic()
            log.warning(
                "no %s worker yet after %.0f s: waiting for job(s) %s to start (`%s` shows them)",
                name, last_said - started, ", ".join(submitted) or "(being submitted)",
                "squeue --me" if name == "slurm" else "qstat -u $USER",
            )


def _connect_timeout() -> float:
    """Seconds to wait for a scheduler: Dask's own setting (distributed.comm.timeouts.connect)."""
    import dask
    from dask.utils import parse_timedelta

    return float(parse_timedelta(dask.config.get("distributed.comm.timeouts.connect"), default="s"))


def _dashboard_address() -> str | None:
    try:
        import bokeh  # noqa: F401
    except ImportError:
        return None
    return ":0"


@dataclass
class RunCluster:
    """The client of a run, the torch threads its tasks should use, and a description."""

    client: Client
    torch_threads: int
    description: str
    dashboard: str | None = None


@contextlib.contextmanager
def open_client(config: RunConfig) -> Iterator[RunCluster]:
    """The Dask cluster of a run: an existing scheduler, a jobqueue cluster or a LocalCluster.

    Closes what it started (never an existing scheduler or its workers) when the block
    ends. Tasks on clusters we did not size use one torch thread per Dask thread, Dask's
    own model of one core per thread.
    """
    from distributed import Client, LocalCluster

    if config.scheduler is not None:
        if config.workers is not None or config.threads_per_worker is not None:
            log.warning("--workers/--threads-per-worker are ignored with --scheduler: the cluster is sized already")
        try:
            client = Client(config.scheduler, timeout=_connect_timeout())
        except OSError as exc:
            raise ConfigError(
                None,
                f"cannot reach the Dask scheduler at {config.scheduler} ({exc})",
                "check the address (tcp://HOST:PORT, as `dask scheduler` prints it) and that it is running, "
                "or leave out --scheduler (and DASK_SCHEDULER_ADDRESS) to use a local cluster",
            ) from None
        try:
            client.wait_for_workers(1, timeout=WORKER_WAIT_S)
        except TimeoutError:
            client.close()
            raise ConfigError(
                None,
                f"the Dask scheduler at {config.scheduler} has no workers after {WORKER_WAIT_S:.0f} s",
                "start workers with `dask worker ADDRESS`",
            ) from None
        try:
            yield RunCluster(client, 1, f"scheduler {config.scheduler}", client.dashboard_link)
        finally:
            client.close()
        return
    if config.cluster != "local":
        cluster, description = _start_jobqueue(config)
        torch_threads = 1
    else:
        layout = local_layout(config)
        cluster = LocalCluster(
            n_workers=layout.workers,
            threads_per_worker=layout.threads_per_worker,
            processes=True,
            host="127.0.0.1",
            dashboard_address=_dashboard_address(),
            silence_logs=logging.ERROR,
        )
        torch_threads = layout.torch_threads
        description = (
            f"local cluster: {layout.workers} worker(s) x {layout.threads_per_worker} thread(s), "
            f"{layout.torch_threads} torch thread(s) per task"
        )
    try:
        client = Client(cluster)
        try:
            if config.cluster != "local":
                _wait_for_jobqueue(client, cluster, config.cluster)
            dashboard = client.dashboard_link if _dashboard_address() else None
            yield RunCluster(client, torch_threads, description, dashboard)
        finally:
            client.close()
    finally:
        cluster.close()


def cluster_threads(client: Client) -> int:
    """Total worker threads the scheduler knows of now (at least 1)."""
    workers = client.scheduler_info(n_workers=-1).get("workers", {})
    return max(1, sum(int(info.get("nthreads", 1)) for info in workers.values()))


@contextlib.contextmanager
def performance_report(path: Path | None) -> Iterator[None]:
    """Dask's performance report (HTML) of everything inside the block, when ``path`` is set."""
    if path is None:
        yield
        return
    try:
        import bokeh  # noqa: F401
    except ImportError:
        raise ConfigError(
            path, "--dask-report needs the bokeh package, which is not installed", "pip install bokeh"
        ) from None
    from distributed import performance_report as dask_report

    path.parent.mkdir(parents=True, exist_ok=True)
    with dask_report(filename=str(path)):
        yield


@dataclass(frozen=True)
class TaskFailure:
    """A task's user-level error (a corrupt tile, an unreadable slide), returned as a value.

    Raised on a worker, such an error would be retried ``retries`` times (it cannot succeed:
    the bytes on disk do not change) and logged with a traceback by every worker that tried.
    Returned, it reaches the driver once and is raised there as the error it is.
    """

    error: WsiPipelineError


def run_guarded(fn: Callable[[Any], Any], task: Any) -> Any:
    """Run ``fn(task)`` on a worker, returning user errors as :class:`TaskFailure`; anything
    else (a bug, memory, a lost file system) still raises, so Dask retries it."""
    try:
        return fn(task)
    except WsiPipelineError as exc:
        return TaskFailure(exc)


def stream_tiles(
    client: Client,
    tasks: Iterable[TileTask],
    consume: Callable[[TileResult], None],
    *,
    max_in_flight: int,
    held: Callable[[], int] = lambda: 0,
    retries: int = 2,
    fn: Callable[[Any], Any] | None = None,
    replay: Iterable[Any] = (),
    consume_replayed: Callable[[Any], None] | None = None,
) -> None:
    """Run ``fn`` (default :func:`~wsi_pipeline.worker.process_tile`) on every task and
    hand each result to ``consume`` as it completes.

    ``replay``: results computed before (the tiles a resumed slide's checkpoint holds),
    handed to ``consume_replayed`` (default ``consume``) in their order once the first
    tasks are submitted, so the workers compute while the driver replays; results that
    complete meanwhile are collected between two replayed ones.

    At most ``max_in_flight`` tiles are submitted-or-held at once, where ``held()`` is the
    number of results the consumer still buffers (the stitcher's reorder buffer): memory
    stays bounded however large the slide. At least one task is always in flight, so a
    consumer holding many results cannot stall the stream. Tasks are submitted in order,
    so the earliest missing tile is always the oldest in flight. On any error the
    remaining tasks are cancelled and the error propagates; a user error (a corrupt tile)
    is not retried (:func:`run_guarded`).
    """
    from distributed import as_completed

    if fn is None:
        from wsi_pipeline.worker import process_tile as fn
    if max_in_flight < 1:
        raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
    name = getattr(fn, "__name__", "task").replace("_", "-")
    run_id = uuid.uuid4().hex[:12]
    todo = enumerate(tasks)
    running = as_completed()
    live: set[Any] = set()
    exhausted = False

    def submit_more() -> None:
        nonlocal exhausted
        while not exhausted and (not live or len(live) + held() < max_in_flight):
            item = next(todo, None)
            if item is None:
                exhausted = True
                return
            future = client.submit(
                run_guarded, fn, item[1], key=f"{name}-{run_id}-{item[0]}", retries=retries, pure=False
            )
            live.add(future)
            running.add(future)

    def collect(future: Any) -> None:
        live.discard(future)
        result = future.result()
        future.release()
        if isinstance(result, TaskFailure):
            raise result.error
        consume(result)
        submit_more()

    try:
        submit_more()
        for result in replay:
            (consume_replayed or consume)(result)
            while running.has_ready():
                collect(next(running))
            submit_more()
        while live:
            collect(next(running))
    finally:
        if live:
            client.cancel(list(live))
