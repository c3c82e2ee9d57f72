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

Default layout, by runtime (``benchmarks/worker_layout.py``, 2-core machine, the shipped
default model, 1648 px tiles, two interleaved rounds each; ``benchmarks/results/worker_layout.json``):

* OpenVINO (the CPU default): **one worker process, one task thread per core, and an
  OpenVINO stream per core** (each window on one core; with one stream each inference
  spans every core and a post-processing thread beside it stalls it; end to end a stream
  per core took 0.88-0.90x one stream's wall time, ``docs/engine.md``). The process
  layout, tiles/s, rounds 1 / 2:

      layout (workers x threads, engine threads)   OpenVINO bf16
      1 x 2, engine 2                               0.413 / 0.368
      1 x 1, engine 2                               0.289 / 0.343
      2 x 1, engine 1                               0.270 / 0.275

  OpenVINO keeps both cores busy within one inference, and the second task thread
  post-processes one tile while the other infers (the engine releases the GIL); one
  process also means one model conversion, one set of compiled shapes and one model in
  memory instead of one per core.
* torch: one single-threaded worker process per core. Measured earlier with a small
  HoVer-Net (6 tiles of 328 px, load average ~7), tiles/s: 2 x 1 0.164 / 0.305, 1 x 2
  0.281 / 0.250, 1 x 1 with torch 2 threads 0.069 / 0.093: torch's intra-op threads
  wait for each other on a busy machine, and processes keep a crash to its own tiles.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
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
# The Dask resource a tile's inference needs with --device cuda: each GPU worker has one.
GPU_RESOURCE = "GPU"


def uses_gpu(config: RunConfig) -> bool:
    """Whether the run's tiles infer on GPUs (``--device cuda`` or ``cuda:N``)."""
    return config.device.split(":")[0] == "cuda"


@dataclass(frozen=True)
class Layout:
    """Dask workers (processes) and threads in each; ``torch_threads`` is the intra-op
    thread count each task sets, so threads x torch_threads never oversubscribes cores;
    ``engine_streams`` the OpenVINO windows a worker computes at once on those threads."""

    workers: int
    threads_per_worker: int
    torch_threads: int = 1
    engine_streams: int = 1

    @property
    def total_threads(self) -> int:
        return self.workers * self.threads_per_worker


def machine_cpus() -> int:
    """Cores this process may use (the affinity mask, which containers and batch systems set)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def uses_openvino(config: RunConfig) -> bool:
    """Whether the workers will run the network with OpenVINO (the CPU default where installed)."""
    from wsi_pipeline.engine.runtime import openvino_available

    on_cpu = config.device == "cpu"
    return on_cpu and (config.runtime == "openvino" or (config.runtime == "auto" and openvino_available()))


def local_layout(config: RunConfig, cpus: int | None = None) -> Layout:
    """The LocalCluster layout for ``config`` on a machine with ``cpus`` cores.

    Without a choice from the user: with OpenVINO one worker process with a task thread
    per core and an OpenVINO stream per core (``--engine-streams 1``: each inference on
    every core instead); with torch one worker process per core,
    one thread each (see the module docstring for the measurements). Given only
    ``--workers``, the cores are split between them; given only ``--threads-per-worker``,
    as many workers as fit. torch gets the cores left to each task.
    """
    cpus = machine_cpus() if cpus is None else cpus
    workers, threads = config.workers, config.threads_per_worker
    if workers is None and threads is None and uses_openvino(config):
        return Layout(1, cpus, cpus, cpus)  # see the module docstring: one process, a stream per core
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
    Python unless told otherwise, and the dashboard takes a free port. With ``--device
    cuda`` a job holds one worker (one GPU per job) with the Dask resource ``GPU=1`` and
    the job's cores as threads.
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
    # With GPUs: one worker per job (a job asks for its GPU with --gres=gpu:1), its cores as threads.
    processes = (options.processes or _jobqueue_default(name, "processes")
                 or (1 if uses_gpu(config) else max(1, cores // threads)))
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
    if uses_gpu(config):  # each worker runs one tile's inference at a time on its GPU
        extra = list(_jobqueue_default(name, "worker-extra-args") or [])
        arguments["worker_extra_args"] = [*extra, "--resources", f"{GPU_RESOURCE}=1"]
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


def _dashboard_address(wanted: bool = True) -> str | None:
    """A free port for Dask's dashboard where it is wanted and bokeh is installed, else None.

    Jobqueue clusters keep theirs (a long batch on shared nodes is watched there); a local
    cluster starts one only with ``--dashboard``: bokeh's import and server added about a
    second to each run's cluster start on 2 cores, a tenth of a small slide's run.
    """
    if not wanted:
        return None
    try:
        import bokeh  # noqa: F401
    except ImportError:
        return None
    return ":0"


@dataclass
class RunCluster:
    """The client of a run, the torch threads its tasks should use, and a description.

    ``device``: the torch device the tasks run on when it differs from ``--device`` (a
    local GPU worker sees only its own GPU, as ``cuda``). ``resources``: the Dask resources
    a tile's inference needs (``{"GPU": 1}`` with ``--device cuda``, see :func:`stream_tiles`).
    """

    client: Client
    torch_threads: int
    description: str
    dashboard: str | None = None
    device: str | None = None
    resources: dict[str, float] | None = None
    engine_streams: int = 1


def visible_gpus(device: str, count: int, environ: dict[str, str] | None = None) -> list[str]:
    """The GPUs a run on this machine uses, as ``CUDA_VISIBLE_DEVICES`` names them: all that
    torch sees for ``cuda``, the N-th of them for ``cuda:N``. ``count`` is torch's
    ``cuda.device_count()`` (it already honours ``CUDA_VISIBLE_DEVICES``)."""
    environ = dict(os.environ) if environ is None else environ
    listed = environ.get("CUDA_VISIBLE_DEVICES")
    names = [x.strip() for x in listed.split(",") if x.strip()] if listed is not None else []
    names = (names or [str(i) for i in range(count)])[:count]
    _, _, index = device.partition(":")
    if not index:
        return names
    if int(index) >= len(names):
        raise ConfigError(
            None,
            f"--device {device} asks for GPU {index}, but torch sees {len(names)} GPU(s)",
            f"use --device cuda (every GPU) or cuda:0..cuda:{max(0, len(names) - 1)}",
        )
    return [names[int(index)]]


@dataclass(frozen=True)
class GpuLayout:
    """A local GPU cluster: one Dask worker per GPU (``gpus[i]`` is what worker i sees as
    its only GPU), each with the Dask resource ``GPU=1``, so a worker runs one tile's
    inference at a time, and ``threads_per_worker`` threads for the rest of the tiles'
    work (reads, post-processing), which runs on the CPU beside the inference."""

    gpus: tuple[str, ...]
    threads_per_worker: int

    @property
    def workers(self) -> int:
        return len(self.gpus)


def gpu_layout(config: RunConfig, gpus: list[str], cpus: int | None = None) -> GpuLayout:
    """The local layout for ``--device cuda``: one worker per GPU (``--workers N`` puts N
    workers on the GPUs in turn), the machine's cores shared out as their threads
    (``--threads-per-worker`` overrides)."""
    if not gpus:
        raise ConfigError(None, "--device cuda, but torch sees no GPU", "use --device cpu")
    cpus = machine_cpus() if cpus is None else cpus
    workers = config.workers or len(gpus)
    threads = config.threads_per_worker or max(1, cpus // workers)
    return GpuLayout(tuple(gpus[i % len(gpus)] for i in range(workers)), threads)


def gpu_worker_specs(layout: GpuLayout, memory_limit: int | None = None) -> dict[str, dict[str, Any]]:
    """The :class:`distributed.SpecCluster` worker specs of ``layout``: Nanny processes
    with ``resources={"GPU": 1}`` and ``CUDA_VISIBLE_DEVICES`` set to the worker's GPU
    (set before the worker process starts, so CUDA there never sees the others)."""
    from distributed import Nanny
    from distributed.system import MEMORY_LIMIT

    memory = memory_limit or MEMORY_LIMIT // layout.workers
    return {
        f"gpu-{i}": {
            "cls": Nanny,
            "options": {
                "nthreads": layout.threads_per_worker,
                "resources": {GPU_RESOURCE: 1},
                "env": {"CUDA_VISIBLE_DEVICES": gpu},
                "host": "127.0.0.1",
                "memory_limit": memory,
                "silence_logs": logging.ERROR,
            },
        }
        for i, gpu in enumerate(layout.gpus)
    }


def start_gpu_cluster(layout: GpuLayout, dashboard: bool = False) -> Any:
    """A local cluster of ``layout`` (one worker per GPU, see :func:`gpu_worker_specs`)."""
    from distributed import Scheduler, SpecCluster

    scheduler = {"cls": Scheduler, "options": {"host": "127.0.0.1", "dashboard_address": _dashboard_address(dashboard)}}
    return SpecCluster(workers=gpu_worker_specs(layout), scheduler=scheduler, silence_logs=logging.ERROR)


def _scheduler_resources(client: Client, config: RunConfig) -> dict[str, float] | None:
    """With ``--device cuda`` on a cluster we did not start: ``{"GPU": 1}`` when its workers
    advertise a GPU resource (``dask worker --resources GPU=1``), else None with a warning
    (every thread of a worker may then run an inference on its GPU at once)."""
    if not uses_gpu(config):
        return None
    workers = client.scheduler_info(n_workers=-1).get("workers", {})
    if any(GPU_RESOURCE in (info.get("resources") or {}) for info in workers.values()):
        return {GPU_RESOURCE: 1}
    log.warning(
        "--device cuda: the workers of %s advertise no %s resource, so inference is not limited to one tile "
        "per GPU; start them with `dask worker ADDRESS --resources %s=1` (one worker per GPU)",
        config.scheduler, GPU_RESOURCE, GPU_RESOURCE,
    )
    return None


@contextlib.contextmanager
def open_client(config: RunConfig, gpus: list[str] | None = None) -> Iterator[RunCluster]:
    """The Dask cluster of a run: an existing scheduler, a jobqueue cluster or a LocalCluster.

    Closes what it started (never an existing scheduler or its workers) when the block
    ends. Tasks on clusters we did not size use one torch thread per Dask thread, Dask's
    own model of one core per thread.

    With ``--device cuda`` the local cluster has one worker per GPU (:func:`gpu_layout`;
    ``gpus`` overrides the GPUs torch sees, for tests) and the run's tiles need the Dask
    resource ``GPU=1`` for their inference; jobqueue workers are given that resource
    (one worker per job, :func:`jobqueue_arguments`); an existing scheduler's workers are
    used with it when they advertise it.
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
            resources = _scheduler_resources(client, config)
            yield RunCluster(client, 1, f"scheduler {config.scheduler}", client.dashboard_link, resources=resources,
                             engine_streams=config.engine_streams or 1)
        finally:
            client.close()
        return
    device, resources = None, ({GPU_RESOURCE: 1} if uses_gpu(config) else None)
    streams = config.engine_streams or 1
    if config.cluster != "local":
        cluster, description = _start_jobqueue(config)
        torch_threads = 1
    elif uses_gpu(config):
        if gpus is None:
            import torch

            gpus = visible_gpus(config.device, torch.cuda.device_count())
        gpu = gpu_layout(config, gpus)
        cluster = start_gpu_cluster(gpu, config.dashboard)
        torch_threads, device = 1, "cuda"  # each worker sees its own GPU only, as cuda:0
        description = (
            f"local GPU cluster: {gpu.workers} worker(s) on GPU(s) {', '.join(gpu.gpus)} (Dask resource "
            f"{GPU_RESOURCE}=1 each: one tile's inference at a time) x {gpu.threads_per_worker} thread(s) for "
            "reads and post-processing"
        )
    else:
        layout = local_layout(config)
        cluster = LocalCluster(
            n_workers=layout.workers,
            threads_per_worker=layout.threads_per_worker,
            processes=True,
            host="127.0.0.1",
            dashboard_address=_dashboard_address(config.dashboard),
            silence_logs=logging.ERROR,
        )
        torch_threads, streams = layout.torch_threads, config.engine_streams or layout.engine_streams
        description = (
            f"local cluster: {layout.workers} worker(s) x {layout.threads_per_worker} thread(s), "
            f"{layout.torch_threads} torch thread(s) per task"
            + (f" shared by {streams} OpenVINO streams" if streams > 1 and uses_openvino(config) else "")
        )
    try:
        client = Client(cluster)
        try:
            if config.cluster != "local":
                _wait_for_jobqueue(client, cluster, config.cluster)
            served = _dashboard_address(config.dashboard or config.cluster != "local")  # jobqueue: always
            dashboard = client.dashboard_link if served else None
            yield RunCluster(client, torch_threads, description, dashboard, device=device, resources=resources,
                             engine_streams=streams)
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


def _warm(model_path: str, infer: Any) -> float | None:
    """:func:`wsi_pipeline.worker.warm_engine` on a worker; any failure is left to the first
    tile, which meets the same problem and reports it properly."""
    from wsi_pipeline.worker import warm_engine

    try:
        return warm_engine(model_path, infer)
    except Exception as exc:  # noqa: BLE001 - the tiles report it
        log.debug("engine warm-up failed on this worker: %s", exc)
        return None


def warm_workers(cluster: RunCluster, model_path: str, infer: Any) -> list[Any]:
    """Start every connected worker's model load and compilation now, in the background.

    Submitted before the driver reads the first slide's thumbnail and tissue, so on a small
    slide the start-up overlaps the driver's own work instead of delaying the first tiles.
    Returns the futures (keep them until the first slide is done: a released future's task
    may be cancelled). Workers that join later warm up on their first tile as before.
    """
    client = cluster.client
    try:
        workers = list(client.scheduler_info(n_workers=-1).get("workers", {}))
    except Exception:  # noqa: BLE001 - an old scheduler API or a busy scheduler: skip the warm-up
        return []
    return [
        client.submit(_warm, model_path, infer, key=f"warm-engine-{uuid.uuid4().hex[:8]}", workers=[address],
                      allow_other_workers=False, pure=False, resources=cluster.resources)
        for address in workers
    ]


def infer_tile(task: TileTask) -> Any:
    """A tile's first step on a GPU worker, the one that holds the ``GPU`` resource
    (:func:`wsi_pipeline.worker.infer_tile`; submitted through :func:`run_guarded`)."""
    from wsi_pipeline.worker import infer_tile as infer

    return infer(task)


def finish_tile(task: TileTask, inferred: Any) -> TileResult | TaskFailure:
    """A tile's second step, on any thread of the worker (no GPU needed): the same code
    as a one-step tile (:func:`wsi_pipeline.worker.finish_tile`), so results are identical."""
    from wsi_pipeline.worker import finish_tile as finish

    if isinstance(inferred, TaskFailure):
        return inferred
    try:
        return finish(task, inferred)
    except WsiPipelineError as exc:
        return TaskFailure(exc)


class Stopped(KeyboardInterrupt):
    """A stream was stopped from outside (the run is being interrupted: SIGTERM, Ctrl-C, or
    another slide's interruption). A ``KeyboardInterrupt``, so ``except Exception`` lets it
    through and the slide is treated as interrupted, not failed."""


class TileBudget:
    """The in-flight bound shared by the streams of the slides in flight, and their stop.

    Each stream counts its tiles submitted-or-held (:func:`stream_tiles`); a stream may
    submit while the sum over all streams is below ``limit`` (or, with nothing in flight,
    when no other stream counts anything: then nothing else would free a slot), so the
    total never exceeds the bound. A stream waits on :attr:`changed`, which is
    notified when any of its tasks completes and when any stream frees a slot, so slots a
    finishing slide gives back go at once to the next one. :meth:`stop` ends every stream
    at its next step with :class:`Stopped`.
    """

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {limit}")
        self.limit = int(limit)
        self.changed = threading.Condition()
        self._users: dict[int, Callable[[], int]] = {}
        self._ids = itertools.count()
        self.stop_reason: BaseException | None = None

    def join(self, used: Callable[[], int]) -> int:
        """Register a stream's own count; returns the token to :meth:`leave` with."""
        with self.changed:
            token = next(self._ids)
            self._users[token] = used
            return token

    def leave(self, token: int) -> None:
        with self.changed:
            self._users.pop(token, None)
            self.changed.notify_all()

    def used(self) -> int:
        """Tiles submitted-or-held by every stream now."""
        return sum(count() for count in list(self._users.values()))

    def notify(self) -> None:
        with self.changed:
            self.changed.notify_all()

    def stop(self, reason: BaseException) -> None:
        """Stop every stream (now and later ones) at its next step."""
        with self.changed:
            self.stop_reason = reason
            self.changed.notify_all()

    def check(self) -> None:
        if self.stop_reason is not None:
            raise Stopped(f"stopped: {self.stop_reason!r}")


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
    budget: TileBudget | None = None,
    on_submitted: Callable[[], None] | None = None,
    resources: dict[str, float] | None = None,
) -> None:
    """Run ``fn`` (default :func:`~wsi_pipeline.worker.process_tile`) on every task and
    hand each result to ``consume`` as it completes.

    At most ``max_in_flight`` tiles are submitted-or-held at once, where ``held()`` is the
    number of results the consumer still buffers (the stitcher's reorder buffer): memory
    stays bounded however large the slide. A stream with nothing in flight may always
    submit one task unless another stream's tasks hold the bound, so a consumer holding
    many results cannot stall the stream. Tasks are submitted in order,
    so the earliest missing tile is always the oldest in flight. On any error the
    remaining tasks are cancelled and the error propagates; a user error (a corrupt tile)
    is not retried (:func:`run_guarded`).

    ``budget``: a bound shared with the streams of other slides running at once (in other
    threads, on the same client); ``max_in_flight`` is then ignored, and the stream stops
    with :class:`Stopped` when the budget is stopped. ``on_submitted()`` is called once,
    when the last task has been submitted (the batch then starts the next slide, whose
    tiles fill the workers while this slide's last ones finish).

    ``replay``: results computed before (the tiles a resumed slide's checkpoint holds),
    handed to ``consume_replayed`` (default ``consume``) in their order once the first
    tasks are submitted, so the workers compute while the driver replays; results that
    complete meanwhile are collected between two replayed ones.

    ``resources`` (``{"GPU": 1}`` with ``--device cuda``): with the default ``fn`` each tile
    becomes two tasks, :func:`infer_tile` needing the resources (one inference at a time
    per GPU worker) and :func:`finish_tile` needing none, so post-processing runs on the
    worker's other threads while the GPU infers the next tile; with a given ``fn`` that
    one task needs them. The bound counts tiles either way.
    """
    split = resources is not None and fn is None
    if fn is None:
        from wsi_pipeline.worker import process_tile as fn
    if budget is None:
        budget = TileBudget(max_in_flight)
    name = getattr(fn, "__name__", "task").replace("_", "-")
    run_id = uuid.uuid4().hex[:12]
    todo = enumerate(tasks)
    # One task looked up ahead, so the stream knows it has submitted its last task when it
    # does (not at its next attempt, which the bound may hold back until the slide's end).
    upcoming = next(todo, None)
    live: set[Any] = set()
    ready: collections.deque[Any] = collections.deque()  # completed futures, in completion order
    told = False

    def completed(future: Any) -> None:  # runs in the client's thread: only hand over
        with budget.changed:
            ready.append(future)
            budget.changed.notify_all()

    def may_submit() -> bool:
        if upcoming is None:
            return False
        used = budget.used()
        # Over the bound only when nothing else could ever free a slot: no task of ours in
        # flight and every counted tile our own held result (a consumer holding many
        # results must not stall its stream; another stream's tasks will free slots).
        return used < budget.limit or (not live and used == held())

    def submit_more() -> None:
        nonlocal upcoming, told
        while may_submit():
            assert upcoming is not None
            item, upcoming = upcoming, next(todo, None)
            if split:
                maps = client.submit(run_guarded, infer_tile, item[1], key=f"infer-tile-{run_id}-{item[0]}",
                                     resources=resources, retries=retries, pure=False)
                future = client.submit(finish_tile, item[1], maps, key=f"finish-tile-{run_id}-{item[0]}",
                                       retries=retries, pure=False)
                maps.release()  # the scheduler keeps the maps until their post-processing has run
            else:
                future = client.submit(run_guarded, fn, item[1], key=f"{name}-{run_id}-{item[0]}",
                                       resources=resources, retries=retries, pure=False)
            live.add(future)
            future.add_done_callback(completed)
        if upcoming is None and not told:
            told = True
            if on_submitted is not None:
                on_submitted()

    def collect_ready() -> None:
        while ready:
            budget.check()
            future = ready.popleft()
            live.discard(future)
            result = future.result()
            future.release()
            if isinstance(result, TaskFailure):
                raise result.error
            consume(result)
            budget.notify()  # a slot is free (for this stream or another slide's)
            submit_more()

    def wait() -> None:
        """Until one of our tasks completes, the budget has room for us, or a stop."""
        with budget.changed:
            while not ready and not may_submit() and budget.stop_reason is None:
                budget.changed.wait(timeout=5.0)
        budget.check()

    token = budget.join(lambda: len(live) + held())
    try:
        budget.check()
        submit_more()
        for result in replay:
            budget.check()
            (consume_replayed or consume)(result)
            budget.notify()
            collect_ready()
            submit_more()
        while live or upcoming is not None:
            wait()
            collect_ready()
            submit_more()
    finally:
        budget.leave(token)
        if live:
            client.cancel(list(live))
