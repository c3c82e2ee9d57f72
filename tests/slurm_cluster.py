"""A real single-node SLURM cluster on localhost, for the tests (``tests/test_slurm.py``).

:func:`local_slurm` writes a munge key and a minimal ``slurm.conf`` into a folder, starts
``munged``, ``slurmctld`` and ``slurmd`` there (as root: slurmd launches jobs as their
user), waits until ``sinfo`` shows the node ``idle``, yields, and stops the daemons (by pid,
then waits for them), so nothing is left running. Nothing outside the folder is touched:
the daemons use their own munge socket, free TCP ports, spool and state folders, pid and
log files; clients (``sbatch``, ``squeue``, ``sacct``, dask-jobqueue) find the cluster
through ``SLURM_CONF``, which :meth:`SlurmCluster.env` sets.

The node has the machine's real CPUs (``slurmd -C``) and a little less memory than it has
(``RealMemory``), so what jobs ask for is checked as on a real cluster. Processes are
tracked by ``proctrack/linuxproc`` and ``task/none`` (no cgroups, which containers often
lack); ``sacct`` reads the job-completion log (``jobcomp/filetxt``, no slurmdbd needed).

Where the machine cannot run the daemons (not root, packages missing, a daemon that dies
or a node that never becomes idle) :class:`SlurmUnavailableError` says why; the fixture turns
it into a skip with that reason. Debian/Ubuntu: ``apt-get install slurm-wlm munge``
(``.ci/run`` does it). By hand: ``python tests/slurm_cluster.py DIR`` starts one and keeps
it until Ctrl-C, printing the ``SLURM_CONF`` to export.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sinfo", "sbatch", "squeue", "sacct", "scancel")
IDLE_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0
PARTITION = "debug"
MEMORY_MARGIN = 0.95  # RealMemory: slurmd drains a node that has less than it claims


class SlurmUnavailableError(RuntimeError):
    """This machine cannot run the test cluster; the message says why and how to fix it."""


@dataclass(frozen=True)
class SlurmCluster:
    """A running test cluster: its folder, config, node, partition and what the node has."""

    root: Path
    conf: Path
    node: str
    partition: str
    cpus: int
    memory_mb: int
    jobcomp: Path

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """``base`` (default ``os.environ``) with ``SLURM_CONF`` pointing at this cluster."""
        return {**(os.environ if base is None else base), "SLURM_CONF": str(self.conf)}

    def run(self, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        """A SLURM client command against this cluster (output captured, not checked)."""
        return subprocess.run(list(args), capture_output=True, text=True, env=self.env(), timeout=timeout)

    def node_state(self) -> str:
        result = self.run("sinfo", "-h", "-N", "-n", self.node, "-o", "%T")
        return result.stdout.strip() if result.returncode == 0 else ""


def missing_reason() -> str | None:
    """Why this machine cannot start the cluster at all, or None."""
    missing = [name for name in (*DAEMONS, *CLIENTS) if shutil.which(name) is None]
    if missing:
        return (f"SLURM test cluster: {', '.join(missing)} not found "
                "(Debian/Ubuntu: apt-get install slurm-wlm munge; .ci/run installs them when root)")
    if os.geteuid() != 0:
        return "SLURM test cluster: slurmd must run as root to launch jobs, and this is not root"
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def node_hardware() -> tuple[int, int]:
    """(CPUs, RealMemory in MiB) of this machine, as slurmd itself detects them (``slurmd -C``),
    with the memory a little below the total."""
    cpus, memory = os.cpu_count() or 1, 0
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        found = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, timeout=30).stdout
        if match := re.search(r"\bCPUs=(\d+)", found):
            cpus = int(match.group(1))
        if match := re.search(r"\bRealMemory=(\d+)", found):
            memory = int(match.group(1))
    if memory <= 0:
        with open("/proc/meminfo", encoding="ascii") as f:
            memory = next(int(line.split()[1]) // 1024 for line in f if line.startswith("MemTotal:"))
    return cpus, max(1, int(memory * MEMORY_MARGIN))


def write_config(root: Path) -> SlurmCluster:
    """The munge key and ``slurm.conf`` of a one-node cluster in ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o700)  # munged refuses keys and sockets in folders others may write
    for sub in ("state", "spool", "log", "munge"):
        (root / sub).mkdir(exist_ok=True)
        (root / sub).chmod(0o700)
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    node = socket.gethostname().split(".")[0] or "localhost"
    cpus, memory = node_hardware()
    jobcomp = root / "log" / "jobcomp.txt"
    conf = root / "slurm.conf"
    lines = {
        "ClusterName": "wsitest",
        "SlurmctldHost": f"{node}(127.0.0.1)",
        "SlurmctldPort": _free_port(),
        "SlurmdPort": _free_port(),
        "SlurmUser": "root",
        "SlurmdUser": "root",
        "AuthType": "auth/munge",
        "CredType": "cred/munge",
        "AuthInfo": f"socket={root / 'munge' / 'munge.socket'}",
        "StateSaveLocation": root / "state",
        "SlurmdSpoolDir": root / "spool",
        "SlurmctldPidFile": root / "slurmctld.pid",
        "SlurmdPidFile": root / "slurmd.pid",
        "SlurmctldLogFile": root / "log" / "slurmctld.log",
        "SlurmdLogFile": root / "log" / "slurmd.log",
        "SlurmctldDebug": "info",
        "SlurmdDebug": "info",
        "ProctrackType": "proctrack/linuxproc",
        "TaskPlugin": "task/none",
        "MpiDefault": "none",
        "SchedulerType": "sched/backfill",
        "SelectType": "select/cons_tres",
        "SelectTypeParameters": "CR_CPU_Memory",
        "ReturnToService": 2,
        "JobCompType": "jobcomp/filetxt",
        "JobCompLoc": jobcomp,
        "JobAcctGatherType": "jobacct_gather/none",
        "AccountingStorageType": "accounting_storage/none",
        "MinJobAge": 3600,  # finished jobs stay visible to squeue/scontrol for the test
        "SlurmdTimeout": 60,
        "InactiveLimit": 0,
    }
    text = "".join(f"{name}={value}\n" for name, value in lines.items())
    text += f"NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory} State=UNKNOWN\n"
    text += f"PartitionName={PARTITION} Nodes={node} Default=YES MaxTime=INFINITE State=UP\n"
    conf.write_text(text, encoding="utf-8")
    return SlurmCluster(root, conf, node, PARTITION, cpus, memory, jobcomp)


def _read_pid(path: Path, timeout: float = 10.0) -> int | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            return int(path.read_text().split()[0])
        time.sleep(0.1)
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):  # a zombie (our own child not yet reaped) is not alive
        if Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z":
            return False
    return True


def _stop(pid: int, timeout: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM ``pid``, wait for it to exit, SIGKILL it if it will not."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        while _alive(pid) and time.monotonic() < deadline + 5:
            time.sleep(0.1)


def _tail(path: Path, lines: int = 8) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@contextlib.contextmanager
def local_slurm(root: Path, idle_timeout: float = IDLE_TIMEOUT_S) -> Iterator[SlurmCluster]:
    """Start the cluster in ``root``, yield it once its node is idle, then stop it.

    Raises :class:`SlurmUnavailableError` (nothing left running) where the machine cannot run it.
    """
    if (reason := missing_reason()) is not None:
        raise SlurmUnavailableError(reason)
    cluster = write_config(root)
    munge = root / "munge"
    pids: list[int] = []
    env = cluster.env()
    try:
        # munged forks into the background; --force: it runs as root and in a private folder.
        started = subprocess.run(
            ["munged", "--force", f"--key-file={munge / 'munge.key'}", f"--socket={munge / 'munge.socket'}",
             f"--pid-file={munge / 'munged.pid'}", f"--log-file={munge / 'munged.log'}",
             f"--seed-file={munge / 'munged.seed'}"],
            capture_output=True, text=True, env=env, timeout=30,
        )
        if started.returncode != 0:
            raise SlurmUnavailableError(f"SLURM test cluster: munged did not start: {started.stderr.strip()}")
        if (pid := _read_pid(munge / "munged.pid")) is None:
            raise SlurmUnavailableError(f"SLURM test cluster: munged wrote no pid file ({_tail(munge / 'munged.log')})")
        pids.append(pid)
        for daemon, pid_file, log_file, extra in (
            ("slurmctld", "slurmctld.pid", "slurmctld.log", ["-i"]),
            ("slurmd", "slurmd.pid", "slurmd.log", ["-N", cluster.node]),
        ):
            # Both daemonise; their pid files name the processes to stop.
            started = subprocess.run([daemon, "-f", str(cluster.conf), *extra],
                                     capture_output=True, text=True, env=env, timeout=30)
            pid = _read_pid(root / pid_file)
            if pid is not None:
                pids.append(pid)
            if started.returncode != 0 or pid is None:
                raise SlurmUnavailableError(
                    f"SLURM test cluster: {daemon} did not start (exit {started.returncode}): "
                    f"{started.stderr.strip()} {_tail(root / 'log' / log_file)}"
                )
        deadline = time.monotonic() + idle_timeout
        state = ""
        while (state := cluster.node_state()) != "idle":
            dead = [pid for pid in pids if not _alive(pid)]
            if dead or time.monotonic() > deadline:
                why = "a daemon died" if dead else f"the node is '{state or 'unknown'}' after {idle_timeout:.0f} s"
                raise SlurmUnavailableError(
                    f"SLURM test cluster: {why}; slurmctld: {_tail(root / 'log' / 'slurmctld.log', 4)}; "
                    f"slurmd: {_tail(root / 'log' / 'slurmd.log', 4)}"
                )
            time.sleep(0.5)
        yield cluster
    finally:
        with contextlib.suppress(Exception):  # jobs still queued or running: cancel, let slurmd end them
            cluster.run("scancel", "--full", "-p", cluster.partition, timeout=10)
            deadline = time.monotonic() + STOP_TIMEOUT_S
            while cluster.run("squeue", "-h", "-o", "%i", timeout=10).stdout.strip():
                if time.monotonic() > deadline:
                    break
                time.sleep(0.2)
        for pid in reversed(pids):  # slurmd, slurmctld, then munged (they need it to shut down cleanly)
            _stop(pid)


def main(argv: list[str]) -> int:
    """Start a cluster in ``argv[0]`` and keep it until Ctrl-C."""
    if len(argv) != 1:
        print("usage: python tests/slurm_cluster.py DIR", file=sys.stderr)
        return 2
    try:
        with local_slurm(Path(argv[0]).resolve()) as cluster:
            print(f"export SLURM_CONF={cluster.conf}   # node {cluster.node}: {cluster.cpus} CPUs, "
                  f"{cluster.memory_mb} MiB; Ctrl-C stops it", flush=True)
            with contextlib.suppress(KeyboardInterrupt):
                signal.pause()
    except SlurmUnavailableError as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
