"""Shipped models: names, the default, and where their files live.

Models ship as self-contained ``NAME.safetensors`` files (metadata in the header) with a
``NAME.md`` model card beside each; ``index.yaml`` names the default. In the repository
they live in ``models/``; that folder is the package data of ``wsi_pipeline.models``
(``[tool.setuptools.package-dir]`` in pyproject.toml), so a wheel or a plain
``pip install .`` installs them inside the package, and they are found with
``importlib.resources`` wherever the package is: site-packages, an editable checkout,
any working directory. ``WSI_PIPELINE_MODELS`` points elsewhere (a lab that keeps its
models on shared storage).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from wsi_pipeline.engine.header import CHECKPOINT_SUFFIXES, FORMATS_HINT, read_metadata
from wsi_pipeline.errors import ModelError

ENV_VAR = "WSI_PIPELINE_MODELS"
INDEX_NAME = "index.yaml"


PACKAGE = "wsi_pipeline.models"


def models_dir() -> Path:
    """The folder of shipped models: ``$WSI_PIPELINE_MODELS``, else the installed
    ``wsi_pipeline.models`` package data (the repository's ``models/`` in a checkout)."""
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env)
    from importlib.resources import files

    try:
        folder = files(PACKAGE)
    except ModuleNotFoundError:  # an install without its package data: say where we looked
        return Path(__file__).resolve().parents[1] / "models"
    if not isinstance(folder, Path):  # e.g. a zipped install: checkpoints must be real files
        raise ModelError(
            str(folder), "the shipped models are not files on disk", f"install unzipped, or set {ENV_VAR}"
        )
    return folder


@dataclass(frozen=True)
class ModelEntry:
    """One shipped model as `wsi-pipeline models --json` lists it."""

    name: str
    path: str
    params: int | None
    macs: int | None
    mpp: float | None
    classes: list[str]
    default: bool
    parent: str | None
    description: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _index(folder: Path) -> dict[str, Any]:
    path = folder / INDEX_NAME
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ModelError(path, f"not valid YAML ({exc})", "fix the file or delete it") from None
    if not isinstance(data, dict):
        raise ModelError(path, "expected a mapping with a 'default' key", "write e.g. 'default: NAME'")
    return data


def default_model_name(folder: Path | None = None) -> str:
    """The model `run` and `evaluate` use without ``--model``."""
    folder = folder or models_dir()
    name = _index(folder).get("default")
    if not name:
        available = [p.stem for p in sorted(folder.glob("*.safetensors"))]
        if len(available) == 1:
            return available[0]
        raise ModelError(
            folder / INDEX_NAME,
            "no default model is set"
            + (f" (shipped: {', '.join(available)})" if available else " and none is shipped"),
            "pass --model NAME|PATH, or train one with `wsi-pipeline train` and name it in models/index.yaml",
        )
    return str(name)


def resolve_model_name(name: str, folder: Path | None = None) -> Path:
    """The file of a shipped model; a clear error listing what exists otherwise."""
    folder = folder or models_dir()
    path = folder / f"{name}.safetensors"
    if path.is_file():
        return path
    available = [p.stem for p in sorted(folder.glob("*.safetensors"))]
    raise ModelError(
        name,
        f"no such model file, and no shipped model of that name in {folder}",
        f"pass a checkpoint path or one of: {', '.join(available) or '(none shipped)'}",
    )


def resolve_model(ref: str | os.PathLike[str] | None = None, folder: Path | None = None) -> Path:
    """The checkpoint file of a model reference: a path, a shipped model's name, or (None) the default.

    The one place that turns what a user typed after ``--model`` (or passed to
    ``load_model``) into a file, so `run`, `evaluate`, `train --init` and the Python API
    accept the same names and refuse the same mistakes with the same message.
    """
    if ref is None:
        ref = default_model_name(folder)
    text = os.fspath(ref)
    hint = FORMATS_HINT
    path = Path(text).expanduser()
    if path.is_file():
        return path.resolve()
    if path.is_dir():
        raise ModelError(path, "is a directory, not a checkpoint file", "pass a checkpoint file or a name; " + hint)
    if "/" in text or os.sep in text or path.suffix in CHECKPOINT_SUFFIXES:
        raise ModelError(path, "no such checkpoint file", "check the path, or pass a shipped model name; " + hint)
    return resolve_model_name(text, folder).resolve()


def list_models(folder: Path | None = None) -> list[ModelEntry]:
    """Every shipped model with what its metadata says, the default flagged."""
    folder = folder or models_dir()
    try:
        default = default_model_name(folder)
    except ModelError:
        default = None
    entries = []
    for path in sorted(folder.glob("*.safetensors")):
        meta = read_metadata(path)
        lineage = meta.get("lineage") or {}
        entries.append(
            ModelEntry(
                name=path.stem,
                path=str(path),
                params=meta.get("params"),
                macs=meta.get("macs"),
                mpp=meta.get("mpp"),
                classes=[c["name"] for c in meta.get("classes", [])],
                default=path.stem == default,
                parent=lineage.get("parent") if isinstance(lineage, dict) else None,
                description=meta.get("description", ""),
            )
        )
    return entries
