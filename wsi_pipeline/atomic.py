"""The one way this project writes a file that someone may read while it is written.

Reports, process lists, done markers, models and checkpoints are rewritten while a batch
runs and read by other processes (a rerun, a dashboard, the user). Each goes to a
temporary name in the same folder and is renamed over the target only when complete:
a rename within one filesystem is atomic, so a reader sees the old file or the new one,
never half of either, and a crash leaves the old file intact. The temporary name carries
the process id so two writers never share one.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, mode: int | None = 0o644) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it to ``path``.

    For writers that want a file name (tifffile, safetensors, torch.save). On an error the
    temporary file is removed and ``path`` is untouched. ``mode`` (default world-readable)
    is applied before the rename: some writers create owner-only files, and a shipped model
    or report must be readable by every user of a shared machine.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns the path."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def write_json_atomic(
    path: str | os.PathLike[str], data: Any, *, indent: int | None = 2, allow_nan: bool = False
) -> Path:
    """Write ``data`` as JSON (UTF-8, non-ASCII kept; NaN refused unless allowed) atomically."""
    text = json.dumps(data, indent=indent, ensure_ascii=False, allow_nan=allow_nan) + "\n"
    return write_text_atomic(path, text)
