"""One run per out folder at a time.

Two runs writing into one ``--out`` used to delete each other's partial folders and publish
half-written slides, both reporting success. The lock is an OS-level file lock
(``filelock``, ``flock`` on POSIX) on ``OUT/.wsi-pipeline.lock``: the kernel releases it
when the holding process dies, even by SIGKILL or a lost node, so a crash never leaves a
stale lock behind. Beside it, ``OUT/.wsi-pipeline.owner.json`` says who holds it, so the
second run can tell the user which process to wait for.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from filelock import FileLock, Timeout

from wsi_pipeline.atomic import write_json_atomic
from wsi_pipeline.errors import ConfigError

LOCK_NAME = ".wsi-pipeline.lock"
OWNER_NAME = ".wsi-pipeline.owner.json"


def _holder(out: Path) -> str:
    try:
        owner = json.loads((out / OWNER_NAME).read_text(encoding="utf-8"))
        return f"pid {owner['pid']} on {owner['host']}, started {owner['started']}: {owner['command']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


@contextlib.contextmanager
def out_folder_lock(out: Path, wait_seconds: float = 0.0) -> Iterator[None]:
    """Hold the out folder's lock for the block; wait up to ``wait_seconds`` (< 0: forever)
    for another run to finish, else stop with a message naming it."""
    lock = FileLock(str(out / LOCK_NAME), timeout=wait_seconds, mode=0o644)
    try:
        lock.acquire(poll_interval=0.5)
    except Timeout:
        waited = f" after waiting {wait_seconds:g} s" if wait_seconds > 0 else ""
        raise ConfigError(
            out,
            f"is in use by another wsi-pipeline run ({_holder(out)}){waited}",
            "let that run finish (or stop it), pass --lock-wait SECONDS to wait for it, or choose another --out",
        ) from None
    except OSError as exc:
        raise ConfigError(out, f"cannot be locked ({exc.strerror or exc})", "choose a writable local --out") from None
    try:
        owner = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.now(UTC).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv),
            "since": time.time(),
        }
        write_json_atomic(out / OWNER_NAME, owner)
        yield
    finally:
        with contextlib.suppress(OSError):
            (out / OWNER_NAME).unlink()
        lock.release()
