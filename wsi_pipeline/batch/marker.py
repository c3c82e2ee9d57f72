"""The done marker: what makes a slide's outputs trustworthy enough to skip it.

A slide folder is published with ``.done.json`` as its last file. The marker records

- the slide's **identity**: resolved path, size, modification time and a content
  fingerprint (SHA-256 of the size and of 1 MiB read at the start, the middle and the end:
  a replaced or re-scanned file with the same name is caught without reading gigabytes);
- the **model** (file checksum) and the **settings** (checksum of every option that changes
  the outputs);
- a **manifest** of every output file: relative path, size and SHA-256.

A rerun skips a slide only when all three still hold (:func:`skip_problem`); otherwise it
says which one changed and redoes the slide. Checking the manifest costs one read of the
outputs (the GeoJSON and the Zarr chunks), far less than the inference it saves.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from wsi_pipeline.atomic import write_json_atomic
from wsi_pipeline.config import file_checksum

DONE_MARKER = ".done.json"
# Bumped when the outputs' layout or the marker changes, so older outputs are not taken as done.
OUTPUT_FORMAT = 3
FINGERPRINT_BLOCK = 1 << 20


def fingerprint(path: Path, block: int = FINGERPRINT_BLOCK) -> str:
    """SHA-256 of the file size and three blocks (start, middle, end)."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with path.open("rb") as f:
        for offset in sorted({0, max(0, size // 2 - block // 2), max(0, size - block)}):
            f.seek(offset)
            digest.update(f.read(block))
    return digest.hexdigest()


def slide_identity(path: Path) -> dict[str, Any]:
    """What identifies a slide file: resolved path, size, mtime (ns) and fingerprint."""
    resolved = path.resolve()
    stat = resolved.stat()
    return {
        "path": str(resolved),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "fingerprint": fingerprint(resolved),
    }


def _output_files(folder: Path) -> Iterator[Path]:
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            path = Path(root) / name
            if path.parent == folder and name == DONE_MARKER:
                continue
            yield path


def output_manifest(folder: Path) -> dict[str, dict[str, Any]]:
    """Every file under ``folder`` (the marker aside): relative path -> size and SHA-256."""
    return {
        path.relative_to(folder).as_posix(): {"size": path.stat().st_size, "sha256": file_checksum(path)}
        for path in _output_files(folder)
    }


def write_done_marker(
    folder: Path, identity: dict[str, Any], model: str, model_checksum: str, config_checksum: str, nuclei: int,
    seconds: float,
) -> dict[str, Any]:
    """Write the marker into a complete (still partial) slide folder; returns it."""
    marker = {
        "format": OUTPUT_FORMAT,
        "slide": identity["path"],
        "identity": identity,
        "model": model,
        "model_checksum": model_checksum,
        "config_checksum": config_checksum,
        "nuclei": nuclei,
        "seconds": seconds,
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        "outputs": output_manifest(folder),
    }
    write_json_atomic(folder / DONE_MARKER, marker)
    return marker


def read_done_marker(folder: Path) -> dict[str, Any] | None:
    """The ``.done.json`` of a finished slide folder, or None when absent or unreadable."""
    try:
        data = json.loads((folder / DONE_MARKER).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def marker_owner(marker: dict[str, Any] | None) -> str:
    """The resolved slide path a marker belongs to ("" when there is none)."""
    if not marker:
        return ""
    identity = marker.get("identity")
    if isinstance(identity, dict) and isinstance(identity.get("path"), str):
        return identity["path"]
    slide = marker.get("slide")
    return str(Path(slide).resolve()) if isinstance(slide, str) and slide else ""


def changed_outputs(folder: Path, manifest: dict[str, Any]) -> list[str]:
    """The outputs that are missing or differ from the manifest, and any file it does not list."""
    problems = []
    for rel, entry in sorted(manifest.items()):
        path = folder / rel
        if not path.is_file():
            problems.append(f"{rel} is missing")
        elif path.stat().st_size != entry.get("size"):
            problems.append(f"{rel} changed size")
        elif file_checksum(path) != entry.get("sha256"):
            problems.append(f"{rel} changed content")
    listed = set(manifest)
    problems.extend(f"{p.relative_to(folder).as_posix()} was added" for p in _output_files(folder)
                    if p.relative_to(folder).as_posix() not in listed)
    return problems


def other_results(marker: dict[str, Any], model_checksum: str, config_checksum: str) -> str | None:
    """What differs when a folder holds results of another model or other settings, else None."""
    if marker.get("model_checksum") != model_checksum:
        return "another model"
    if marker.get("config_checksum") != config_checksum:
        return "other settings"
    return None


def skip_problem(folder: Path, marker: dict[str, Any], identity: dict[str, Any]) -> str | None:
    """None when ``folder`` holds this slide's complete, unchanged outputs; otherwise why it
    must be redone (shown to the user and kept in the process list).

    Results of another model or other settings are not a reason to redo: they are someone's
    results, and :func:`other_results` lets the caller keep them.
    """
    if marker.get("format") != OUTPUT_FORMAT or not isinstance(marker.get("outputs"), dict):
        return "its outputs are from an older version of wsi_pipeline"
    old = marker.get("identity") or {}
    for key, what in (("path", "path"), ("size", "size"), ("mtime_ns", "modification time"),
                      ("fingerprint", "content")):
        if old.get(key) != identity[key]:
            return f"the slide file's {what} changed since it was done"
    changed = changed_outputs(folder, marker["outputs"])
    if changed:
        more = f" (and {len(changed) - 3} more)" if len(changed) > 3 else ""
        return "its outputs changed: " + "; ".join(changed[:3]) + more
    return None
