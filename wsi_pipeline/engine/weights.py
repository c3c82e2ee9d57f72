"""Checkpoint formats: read the public HoVer-Net weights, read and write our own.

Formats read (detected from the file's content, not its suffix):

* the official release (vqdang/hover_net): ``torch.save({"desc": state_dict, ...})``,
  keys possibly prefixed ``module.`` (saved from DataParallel), without BatchNorm
  ``num_batches_tracked`` (converted from TensorFlow);
* TIAToolbox: a bare ``torch.save(state_dict)``;
* ours: one self-contained ``NAME.safetensors`` whose header metadata holds a JSON
  document (architecture and channel spec, classes with colours, µm/px, training
  data, pruning lineage, metrics). A ``.safetensors`` file without that metadata
  is read as a bare state dict.

The legacy formats are pickles, so they are opened with
``torch.load(weights_only=True)`` only: a file that needs anything beyond
tensors and plain containers is refused rather than unpickled, since unpickling
can run arbitrary code.

Mode (decoder kernel size), number of types (``tp`` head) and every layer width
are read from the weights themselves, so one function loads full, pruned and
narrow models alike.
"""

from __future__ import annotations

import json
import pickle
import re
from collections.abc import Mapping
from os import PathLike
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from wsi_pipeline.atomic import atomic_path
from wsi_pipeline.engine.header import (
    CHECKPOINT_SUFFIXES,
    DEFAULT_MPP,
    FORMAT_VERSION,
    FORMATS_HINT,
    META_KEY,
    complete_meta,
    is_safetensors,
    parse_meta,
    read_metadata,
)
from wsi_pipeline.engine.model import ChannelSpec, HoVerNet
from wsi_pipeline.engine.postproc import PostprocConfig
from wsi_pipeline.errors import ModelError

__all__ = [
    "CHECKPOINT_SUFFIXES",
    "DEFAULT_MPP",
    "FORMATS_HINT",
    "FORMAT_VERSION",
    "load_model",
    "model_postproc",
    "read_metadata",
    "read_state_dict",
    "save_model",
]

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DataParallel, torch.compile


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------
def read_state_dict(path: str | PathLike[str]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The state dict of a checkpoint file (any supported format) and its metadata.

    Keys come back without ``module.``/``_orig_mod.`` prefixes. Metadata is our
    JSON document for our format and ``{}`` otherwise, plus ``"format"`` (one of
    ``wsi_pipeline``, ``safetensors``, ``official``, ``bare``).
    """
    path = Path(path)
    if not path.is_file():
        problem = "is a directory, not a checkpoint file" if path.is_dir() else "no such checkpoint file"
        raise ModelError(path, problem, FORMATS_HINT)
    if is_safetensors(path):
        state_dict, meta = _read_safetensors(path)
    else:
        state_dict, fmt = _read_torch_pickle(path)
        meta = {"format": fmt}
    return _strip_prefixes(state_dict), meta


def _read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            header = f.metadata() or {}
            state_dict = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelError(path, f"cannot read this safetensors file ({exc})", "re-download or re-save it") from None
    meta = parse_meta(path, header)
    if meta is None:
        return state_dict, {"format": "safetensors"}
    return state_dict, meta


# torch's wording for a pickle that names a Python object: "Unsupported global: GLOBAL x.y" (<= 2.5)
# and "Trying to load unsupported GLOBAL posix.system whose module posix is blocked" (2.6+).
_BLOCKED_GLOBAL = re.compile(r"unsupported (?:global: )?GLOBAL ([\w.]+)", re.IGNORECASE)


def load_torch_file(path: str | PathLike[str], fix: str = FORMATS_HINT) -> Any:
    """``torch.load(weights_only=True)`` with every failure as a :class:`ModelError`.

    The one place a pickle is opened (checkpoints, training state): a file that would need
    arbitrary Python objects is refused with the object's name, since unpickling it could
    run any code; anything unreadable is named as such with ``fix``.
    """
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = _BLOCKED_GLOBAL.search(str(exc))
        if found:
            raise ModelError(
                path,
                f"holds pickled Python objects besides tensors ({found.group(1)}); refusing to unpickle "
                "it, since that could run arbitrary code",
                "if you trust its source, load it in Python and re-save only the weights: "
                "torch.save(model.state_dict(), 'weights.pth')",
            ) from None
        raise ModelError(path, "is not a PyTorch checkpoint (it does not unpickle)", fix) from None
    except Exception as exc:  # torch.load signals a non-checkpoint with many exception types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ModelError(path, f"is not a PyTorch checkpoint ({type(exc).__name__}: {first})", fix) from None


def _read_torch_pickle(path: Path) -> tuple[dict[str, Tensor], str]:
    obj = load_torch_file(path)
    if isinstance(obj, Mapping) and "desc" in obj:
        obj, fmt = obj["desc"], "official"
    else:
        fmt = "bare"
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        found = (
            f"a mapping with keys {', '.join(map(str, list(obj)[:5]))}"
            if isinstance(obj, Mapping)
            else type(obj).__name__
        )
        raise ModelError(path, f"holds no state dict (found {found})", FORMATS_HINT)
    return {str(k): v for k, v in obj.items()}, fmt


def _strip_prefixes(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    out = dict(state_dict)
    for prefix in _WRAPPER_PREFIXES:
        if out and all(k.startswith(prefix) for k in out):
            out = {k[len(prefix) :]: v for k, v in out.items()}
    return out


# ---------------------------------------------------------------------------------------------
# Loading a model
# ---------------------------------------------------------------------------------------------
def _resolve(path_or_name: str | PathLike[str]) -> Path:
    # Imported here: the registry reads model metadata through this module.
    from wsi_pipeline.engine.registry import resolve_model

    return resolve_model(path_or_name)


def load_model(path_or_name: str | PathLike[str], device: str | torch.device = "cpu") -> HoVerNet:
    """Load a HoVer-Net from a checkpoint file or a shipped model name, in eval mode.

    Mode, number of types and every layer width come from the weights; the
    returned model's ``.meta`` dict holds the checkpoint's metadata completed
    with defaults for legacy formats (name, classes, mpp, spec, mode,
    num_types, lineage, metrics, format, path).
    """
    path = _resolve(path_or_name)
    state_dict, meta = read_state_dict(path)
    try:
        model = HoVerNet.from_state_dict(state_dict, copy=False)  # the tensors were just read: ours
        if "spec" in meta and ChannelSpec.from_dict(meta["spec"]) != model.spec:
            raise ModelError(
                None,
                "the channel spec in its metadata disagrees with its weights",
                "re-save it with save_model (which derives the spec from the weights)",
            )
    except ModelError as exc:
        raise ModelError(path, exc.problem, exc.fix) from None
    model.meta = complete_meta(meta, mode=model.mode, num_types=model.num_types, spec=model.spec.to_dict(), path=path)
    # Each model carries its own post-processing; a bad value is refused here, naming the file.
    model.postproc = PostprocConfig.from_meta(meta.get("postproc"), str(path))
    return model.to(device).eval()


def model_postproc(model: torch.nn.Module) -> PostprocConfig:
    """The post-processing a model was calibrated with (the defaults for one not loaded from a file)."""
    config = getattr(model, "postproc", None)
    return config if isinstance(config, PostprocConfig) else PostprocConfig()


# ---------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------
def save_model(model: torch.nn.Module, path: str | PathLike[str], meta: Mapping[str, Any]) -> Path:
    """Write ``model`` as one ``.safetensors`` file with ``meta`` as JSON in its header.

    ``.safetensors`` is appended to ``path`` when missing; the written path is
    returned. The architecture entries (mode, num_types, spec) are derived from
    the weights, not from ``model.spec``, so a model narrowed in place by a
    pruner is described correctly. The file is written under a temporary name
    and renamed, so a crash never leaves a half-written checkpoint.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        path = path.with_name(path.name + ".safetensors")
    state_dict = _strip_prefixes(model.state_dict())
    masked = [k for k in state_dict if k.endswith(("_orig", "_mask"))]
    if masked:
        raise ModelError(
            path,
            f"the model still carries pruning masks ({', '.join(masked[:3])}...)",
            "make the pruning permanent first: torch.nn.utils.prune.remove(module, 'weight') on each pruned module",
        )
    try:
        spec = ChannelSpec.from_state_dict(state_dict)
    except ModelError as exc:
        raise ModelError(path, f"cannot save: {exc.problem}", exc.fix) from None
    head = state_dict.get("decoder.tp.u0.conv.weight")
    num_types = None if head is None else int(head.shape[0])
    classes = meta.get("classes")
    if classes and num_types is not None and len(classes) != num_types - 1:
        raise ModelError(
            path,
            f"{len(classes)} classes given for a model with {num_types} type channels (background + classes)",
            f"give {num_types - 1} foreground classes (ids 1..{num_types - 1})",
        )
    document = {
        **meta,
        "format_version": FORMAT_VERSION,
        "architecture": "hovernet",
        "mode": spec.mode,
        "num_types": num_types,
        "spec": spec.to_dict(),
    }
    document.pop("format", None)
    document.pop("path", None)
    try:
        text = json.dumps(document)
    except (TypeError, ValueError) as exc:
        raise ModelError(
            path, f"metadata is not JSON-serialisable ({exc})", "pass plain dicts, lists, str and numbers"
        ) from None
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    with atomic_path(path) as tmp:  # world-readable: safetensors creates files owner-only
        save_file(tensors, str(tmp), metadata={META_KEY: text, "format": "pt"})
    return path
