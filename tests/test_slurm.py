"""``wsi-pipeline run --cluster slurm`` against a real SLURM cluster, and the job settings.

The ``slurm``-marked tests start a single-node cluster on localhost (``slurmctld``,
``slurmd`` and ``munged`` as root, :mod:`slurm_cluster`), run the real CLI with its workers
in ``sbatch`` jobs from dask-jobqueue, and check that the results equal a local run's and
that SLURM ran the jobs (``squeue`` while the run works; the job-completion log, what
``sacct`` reports where accounting is set up, afterwards). Where the machine cannot run the
daemons (not root, ``slurm-wlm``/``munge`` not installed) they skip saying why; ``.ci/run``
installs the packages. ``pytest -m slurm`` runs exactly them.

The unmarked tests check how ``cluster_options`` and dask-jobqueue's own configuration
become the SLURMCluster/PBSCluster arguments, without a cluster.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import dask
import pytest
import yaml
from _helpers import assert_same_results, one_line_error, plumbing_model
from slurm_cluster import SlurmCluster, SlurmUnavailableError, local_slurm

from wsi_pipeline.config import ClusterOptions, RunConfig, load_run_config
from wsi_pipeline.errors import ConfigError
from wsi_pipeline.schedule import jobqueue_arguments
from wsi_pipeline.slide import open_slide
from wsi_pipeline.slide.pyramid import write_pyramid

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "sample_slides" / "CMU-1-Small-Region-pyramid.tif"
RUN_TIMEOUT_S = 300
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
ENV.pop("DASK_SCHEDULER_ADDRESS", None)


@pytest.fixture(scope="session")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """A running one-node SLURM cluster (stopped, with its jobs, when the session ends)."""
    pytest.importorskip("dask_jobqueue", reason="--cluster slurm needs dask-jobqueue (pip install dask-jobqueue)")
    try:
        with local_slurm(tmp_path_factory.mktemp("slurm")) as cluster:
            yield cluster
    except SlurmUnavailableError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A small real pyramidal slide (9 tiles of 164 px) and the tiny plumbing model."""
    folder = tmp_path_factory.mktemp("slurm_assets")
    with open_slide(SAMPLE) as source:
        write_pyramid(source, folder / "small.tif", region=(1000, 1000, 492, 492))
    model = plumbing_model(folder / "tiny.safetensors", folder / "small.tif")
    return {"small": folder / "small.tif", "model": model}


def command(assets: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "wsi_pipeline", "run", str(assets["small"]), "--out", str(out),
            "--model", str(assets["model"]), "--tile-size", "164", "--margin", "0", "--no-progress", *extra]


def job_config(path: Path, **options: object) -> Path:
    """A run YAML whose cluster_options are ``options``."""
    path.write_text(yaml.safe_dump({"cluster_options": options}), encoding="utf-8")
    return path


def run_watching_squeue(args: list[str], cluster: SlurmCluster, cwd: Path) -> tuple[int, str, str, set[str]]:
    """Run the CLI; while it runs, note each job squeue shows as "NAME STATE"."""
    seen: set[str] = set()
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=cluster.env(ENV), cwd=cwd, start_new_session=True)
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while process.poll() is None:
            if time.monotonic() > deadline:
                pytest.fail(f"the run did not finish in {RUN_TIMEOUT_S} s")
            queue = cluster.run("squeue", "-h", "-o", "%j %T")
            seen.update(line.strip() for line in queue.stdout.splitlines() if line.strip())
            time.sleep(0.5)
        out, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return process.returncode, out, err, seen


def completed_jobs(cluster: SlurmCluster) -> list[dict[str, str]]:
    """The jobs SLURM finished (its job-completion log: what ``sacct`` reads with accounting)."""
    if not cluster.jobcomp.is_file():
        return []
    records = []
    for line in cluster.jobcomp.read_text().splitlines():
        fields = dict(part.split("=", 1) for part in line.split() if "=" in part)
        records.append(fields)
    return records


def most_at_once(jobs: list[dict[str, str]]) -> int:
    """The most jobs that ran at the same time, from their start and end in the completion log.
    A job that ends in the second another starts is not counted with it (SLURM logs whole seconds)."""
    events = []
    for job in jobs:
        events.append((datetime.fromisoformat(job["StartTime"]), 1))
        events.append((datetime.fromisoformat(job["EndTime"]), -1))
    running = most = 0
    for _, change in sorted(events):  # at equal times the end (-1) sorts before the start (+1)
        running += change
        most = max(most, running)
    return most


@pytest.fixture(scope="module")
def local_reference(tmp_path_factory: pytest.TempPathFactory, assets: dict[str, Path]) -> Path:
    """The small slide run on a LocalCluster of one worker: what every SLURM run must reproduce."""
    out = tmp_path_factory.mktemp("local") / "out"
    result = subprocess.run(command(assets, out, "--workers", "1"), capture_output=True, text=True, env=ENV,
                            cwd=out.parent, timeout=RUN_TIMEOUT_S)
    assert result.returncode == 0, result.stderr
    return out


def slurm_run(tmp_path: Path, slurm: SlurmCluster, assets: dict[str, Path], **options: object
              ) -> tuple[str, set[str], list[dict[str, str]]]:
    """Run the small slide with ``--cluster slurm`` and ``options`` as cluster_options; return
    the CLI's stdout, what squeue showed meanwhile and the jobs SLURM finished for it."""
    config = job_config(tmp_path / "cluster.yaml", queue=slurm.partition, cores=1, memory="2GB",
                        walltime="00:10:00", interface="lo", log_directory=str(tmp_path / "jobs"), **options)
    before = {record.get("JobId") for record in completed_jobs(slurm)}
    code, out, err, seen = run_watching_squeue(
        command(assets, tmp_path / "out", "--cluster", "slurm", "--config", str(config)), slurm, tmp_path
    )
    assert code == 0, err
    assert "1 done" in out, out
    # cluster.close() cancelled every worker job: none is left queued or running.
    assert slurm.run("squeue", "-h", "-t", "PD,R,CG", "-o", "%i").stdout.strip() == ""
    return out, seen, [record for record in completed_jobs(slurm) if record.get("JobId") not in before]


@pytest.mark.slurm
def test_a_slurm_run_equals_a_local_run_and_slurm_ran_the_worker(
    tmp_path: Path, slurm: SlurmCluster, assets: dict[str, Path], local_reference: Path
) -> None:
    out, seen, jobs = slurm_run(tmp_path, slurm, assets)
    assert "slurm cluster via dask-jobqueue: 1 job; jobs of 1 core(s), 2GB, 1 worker(s) x 1 thread(s)" in out, out
    assert_same_results(local_reference / "small", tmp_path / "out" / "small", "small")
    # SLURM ran the worker: squeue showed it running, its completion log has it, as asked.
    assert "dask-worker RUNNING" in seen, seen
    assert [job["Name"] for job in jobs] == ["dask-worker"], jobs
    assert jobs[0]["JobState"] in ("CANCELLED", "COMPLETED") and jobs[0]["Partition"] == slurm.partition, jobs
    assert "cpu=1,mem=2G" in jobs[0]["Tres"] and jobs[0]["TimeLimit"] == "10", jobs
    # The job's stdout/stderr went to log_directory, not into the folder the run started from.
    job_id = jobs[0]["JobId"]
    assert (tmp_path / "jobs" / f"dask-worker-{job_id}.out").is_file()
    assert (tmp_path / "jobs" / f"dask-worker-{job_id}.err").is_file()
    assert not list(tmp_path.glob("slurm-*.out"))


@pytest.mark.slurm
def test_adaptive_scaling_runs_jobs_between_minimum_and_maximum(
    tmp_path: Path, slurm: SlurmCluster, assets: dict[str, Path], local_reference: Path
) -> None:
    out, seen, jobs = slurm_run(tmp_path, slurm, assets, adaptive_minimum=1, adaptive_maximum=2)
    assert "slurm cluster via dask-jobqueue: adaptive, 1-2 workers" in out, out
    assert_same_results(local_reference / "small", tmp_path / "out" / "small", "small")
    # How many jobs adaptive scaling asks for depends on the tiles' durations, and over a run it
    # may end one and submit another: the bounds hold for the jobs running at once.
    assert "dask-worker RUNNING" in seen, seen
    assert jobs and {job["Name"] for job in jobs} == {"dask-worker"}, jobs
    assert 1 <= most_at_once(jobs) <= 2, jobs


@pytest.mark.slurm
def test_a_job_slurm_refuses_fails_the_run_at_once_in_one_line(
    tmp_path: Path, slurm: SlurmCluster, assets: dict[str, Path]
) -> None:
    """A partition that does not exist, or more memory than any node has: SLURM's reason,
    before any job is queued, instead of a run that waits for a worker forever."""
    for name, options in (("partition", {"queue": "nosuch"}), ("memory", {"memory": f"{slurm.memory_mb * 2}MB"})):
        config = job_config(tmp_path / f"{name}.yaml", **({"cores": 1, "memory": "1GB", "interface": "lo"} | options))
        result = subprocess.run(command(assets, tmp_path / name, "--cluster", "slurm", "--config", str(config)),
                                capture_output=True, text=True, env=slurm.env(ENV), cwd=tmp_path, timeout=120)
        assert result.returncode == 2, result.stderr
        line = one_line_error(result.stderr)
        assert "SLURM refuses the Dask worker job" in line and "Fix: fix cluster_options" in line, line
        expected = "Invalid partition" if name == "partition" else "node configuration is not available"
        assert expected in line, line
    assert slurm.run("squeue", "-h", "-t", "PD,R,CG", "-o", "%i").stdout.strip() == ""


@pytest.mark.slurm
def test_missing_job_size_is_one_line_naming_the_option_and_the_fix(
    tmp_path: Path, slurm: SlurmCluster, assets: dict[str, Path]
) -> None:
    config = job_config(tmp_path / "cluster.yaml", cores=1)
    result = subprocess.run(command(assets, tmp_path / "out", "--cluster", "slurm", "--config", str(config)),
                            capture_output=True, text=True, env=slurm.env(ENV), cwd=tmp_path, timeout=120)
    assert result.returncode == 2, result.stderr
    line = one_line_error(result.stderr)
    assert "--cluster slurm needs the memory of each job" in line, line
    assert "cluster_options: {cores: 4, memory: 16GB}" in line and "jobqueue.slurm.memory" in line, line


# How the options become dask-jobqueue arguments (no cluster needed).


def test_cluster_options_become_the_jobqueue_arguments() -> None:
    options = ClusterOptions(queue="gpu", account="lab", cores=4, memory="16GB", walltime="02:00:00",
                             job_extra_directives=["--gres=gpu:1"], interface="ib0", log_directory="logs")
    arguments = jobqueue_arguments(RunConfig(cluster="slurm", cluster_options=options))
    assert arguments["python"] == sys.executable
    assert arguments["processes"] == 4  # one single-threaded worker per core, as locally
    assert {key: arguments[key] for key in ("queue", "account", "cores", "memory", "walltime")} == {
        "queue": "gpu", "account": "lab", "cores": 4, "memory": "16GB", "walltime": "02:00:00"}
    assert arguments["job_extra_directives"] == ["--gres=gpu:1"] and arguments["interface"] == "ib0"
    threaded = jobqueue_arguments(RunConfig(cluster="slurm", threads_per_worker=2, cluster_options=options))
    assert threaded["processes"] == 2


def test_with_cuda_a_job_holds_one_worker_with_a_gpu_resource() -> None:
    """--device cuda on SLURM: one worker per job (its GPU from --gres) with GPU=1 and the
    job's cores as threads; the job script starts it so. No GPU is needed to check this."""
    dask_jobqueue = pytest.importorskip("dask_jobqueue")
    options = ClusterOptions(cores=8, memory="32GB", job_extra_directives=["--gres=gpu:1"], interface="lo")
    arguments = jobqueue_arguments(RunConfig(cluster="slurm", device="cuda", cluster_options=options))
    assert arguments["processes"] == 1 and arguments["worker_extra_args"] == ["--resources", "GPU=1"]
    cluster = dask_jobqueue.SLURMCluster(**arguments)
    try:
        script = cluster.job_script()
    finally:
        cluster.close()
    assert "#SBATCH --gres=gpu:1" in script and "--resources GPU=1" in script and "--nthreads 8" in script
    several = ClusterOptions(cores=8, memory="32GB", processes=2)
    assert jobqueue_arguments(RunConfig(cluster="slurm", device="cuda", cluster_options=several))["processes"] == 2
    assert "worker_extra_args" not in jobqueue_arguments(RunConfig(cluster="slurm", cluster_options=options))


def test_jobqueue_yaml_still_describes_the_queue() -> None:
    """Keys cluster_options leaves out come from dask-jobqueue's own config (jobqueue.yaml)."""
    with dask.config.set({"jobqueue.pbs.cores": 8, "jobqueue.pbs.memory": "32GB", "jobqueue.pbs.processes": 2,
                          "jobqueue.pbs.python": "/opt/env/bin/python"}):
        arguments = jobqueue_arguments(RunConfig(cluster="pbs"))
        assert (arguments["cores"], arguments["memory"], arguments["processes"]) == (8, "32GB", 2)
        assert arguments["python"] == "/opt/env/bin/python"
        mine = jobqueue_arguments(RunConfig(cluster="pbs", cluster_options=ClusterOptions(memory="4GB")))
        assert (mine["cores"], mine["memory"]) == (8, "4GB")


def test_the_pbs_path_writes_a_pbs_job_script() -> None:
    dask_jobqueue = pytest.importorskip("dask_jobqueue")
    options = ClusterOptions(queue="workq", cores=2, memory="4GB", walltime="01:00:00", interface="lo",
                             job_extra_directives=["-l place=scatter"])
    cluster = dask_jobqueue.PBSCluster(**jobqueue_arguments(RunConfig(cluster="pbs", cluster_options=options)))
    try:
        script = cluster.job_script()
    finally:
        cluster.close()
    assert "#PBS -q workq" in script and "walltime=01:00:00" in script and "#PBS -l place=scatter" in script
    assert f"{sys.executable} -m distributed.cli.dask_worker" in script and "--nworkers 2" in script


def test_bad_cluster_options_name_the_key(tmp_path: Path) -> None:
    for text, expected in (
        ("cluster_options: {cors: 2}", "unknown key 'cors': did you mean 'cores'?"),
        ("cluster_options: {cores: 0}", "key 'cores' = 0: Input should be greater than or equal to 1"),
        ("cluster_options: {memory: lots}", "key 'memory' = 'lots' is not an amount of memory"),
        ("cluster_options: {job_extra_directives: 3}", "key 'job_extra_directives' = 3: Input should be a list"),
        ("cluster_options: {adaptive_minimum: 3, adaptive_maximum: 2}", "adaptive_minimum (3) is above"),
    ):
        path = tmp_path / "run.yaml"
        path.write_text(text + "\n", encoding="utf-8")
        with pytest.raises(ConfigError, match="option 'cluster_options'") as caught:
            load_run_config(path, environ={})
        assert expected in str(caught.value) and str(path) in str(caught.value)
    path.write_text("cluster_options:\n  job-extra-directives: ['--gres=gpu:1']\n  adaptive-maximum: 4\n")
    options = load_run_config(path, environ={}).cluster_options
    assert options.job_extra_directives == ("--gres=gpu:1",) and options.adaptive and options.adaptive_maximum == 4


def test_a_job_that_cannot_be_submitted_ends_the_wait(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """PBS has no --test-only: a qsub that refuses the job (here a stand-in that always does)
    must end the wait for the first worker with an error, not leave the run waiting forever."""
    pytest.importorskip("dask_jobqueue")
    from wsi_pipeline import schedule

    qsub = tmp_path / "bin" / "qsub"
    qsub.parent.mkdir()
    qsub.write_text("#!/bin/sh\necho 'qsub: Unknown queue' >&2\nexit 1\n", encoding="utf-8")
    qsub.chmod(0o755)
    monkeypatch.setenv("PATH", f"{qsub.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(schedule, "JOBQUEUE_POLL_S", 0.5)  # and say that it waits, on the way
    config = RunConfig(cluster="pbs", cluster_options=ClusterOptions(cores=1, memory="1GB", interface="lo"))
    with pytest.raises(ConfigError, match="no pbs worker job could be submitted"), schedule.open_client(config):
        pass
