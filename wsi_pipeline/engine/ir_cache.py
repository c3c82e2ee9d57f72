"""Where converted OpenVINO models are kept, and under which key: no torch, no OpenVINO import.

A process that finds its model's converted graph here never needs torch (the conversion is the
only step that traces the network), so the key must be computable from the checkpoint file
alone: the SHA-256 of its bytes (:attr:`~wsi_pipeline.engine.header.ModelFile.checksum`), or of
the weights for a model that exists only in memory (a pruning benchmark's candidate), together
with the OpenVINO version and :data:`EXPORT_REVISION`.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
from pathlib import Path

__all__ = ["CACHE_ENV", "EXPORT_REVISION", "cache_dir", "cached_graph", "graph_key", "openvino_available"]

CACHE_ENV = "WSI_PIPELINE_CACHE"
# Bump when the exported graph changes (inputs, outputs, pre/post-processing inside it):
# older cache entries then no longer match and are rebuilt.
EXPORT_REVISION = 2


def openvino_available() -> bool:
    """Whether the ``openvino`` package is installed here (found, not imported: a process
    that only plans a run, the driver, never loads the library)."""
    return importlib.util.find_spec("openvino") is not None


def cache_dir() -> Path:
    """Where converted models live: ``$WSI_PIPELINE_CACHE``, else the user's cache folder."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "wsi-pipeline"


def graph_folder() -> Path:
    """The converted graphs' folder (OpenVINO's compiled executables go to its ``compiled/``)."""
    return cache_dir() / "openvino"


def graph_key(checksum: str) -> str:
    """The cache key of a model's converted graph: its checksum, this OpenVINO, this export."""
    try:
        version = importlib.metadata.version("openvino")
    except importlib.metadata.PackageNotFoundError:
        version = "none"
    return hashlib.sha256(f"{checksum}:{version}:{EXPORT_REVISION}".encode()).hexdigest()[:32]


def cached_graph(checksum: str) -> Path | None:
    """The converted graph's ``.xml`` for this checksum when both its files are there (whether
    they are readable is only known on reading them; the runtime rebuilds a damaged entry)."""
    xml = graph_folder() / f"{graph_key(checksum)}.xml"
    return xml if xml.is_file() and xml.with_suffix(".bin").is_file() else None
