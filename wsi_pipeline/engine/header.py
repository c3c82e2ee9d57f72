"""Our checkpoint format's header, read without torch: metadata, tensor shapes, the model it describes.

A ``NAME.safetensors`` file written by :func:`~wsi_pipeline.engine.weights.save_model` holds a JSON
document in its header (architecture, channel spec, classes, µm/px, post-processing, lineage,
recorded parameter and MAC counts) and lists every tensor's name and shape before its bytes.
That is everything a process needs to plan windows and margins and to find the model's converted
OpenVINO graph in the cache, so the run's driver and its OpenVINO workers can do without
importing torch (seconds at every start; docs/engine.md, "Start-up"). Loading the weights into
a network stays in :mod:`~wsi_pipeline.engine.weights`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any

from wsi_pipeline.config import file_checksum
from wsi_pipeline.engine.geometry import MODES, NetGeometry
from wsi_pipeline.engine.postproc import PostprocConfig
from wsi_pipeline.errors import ModelError

__all__ = [
    "CHECKPOINT_SUFFIXES",
    "DEFAULT_MPP",
    "FORMATS_HINT",
    "FORMAT_VERSION",
    "META_KEY",
    "ModelFile",
    "complete_meta",
    "describe_file",
    "is_safetensors",
    "parse_meta",
    "read_metadata",
]

FORMAT_VERSION = 1
DEFAULT_MPP = 0.25
"""µm/px assumed for legacy checkpoints: the public HoVer-Net models were trained at 40x."""

META_KEY = "wsi_pipeline"
CHECKPOINT_SUFFIXES = {".safetensors", ".tar", ".pth", ".pt", ".ckpt", ".bin"}
FORMATS_HINT = (
    "give a HoVer-Net checkpoint: a .safetensors file saved by wsi_pipeline, the official release "
    "(a torch.save of {'desc': state_dict}) or a TIAToolbox hovernet state dict (.pth)"
)
# State-dict entries that are buffers, not parameters (BatchNorm statistics, the upsampling constant).
_BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked", "unpool_mat")


def is_safetensors(path: Path) -> bool:
    """A safetensors file starts with an 8-byte little-endian header length, then a JSON object."""
    with path.open("rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return False
    header_len = int.from_bytes(head[:8], "little")
    return 0 < header_len <= path.stat().st_size - 8 and head[8:9] == b"{"


def parse_meta(path: Path, header: dict[str, str]) -> dict[str, Any] | None:
    """Our JSON document from a safetensors header (``None`` when the file has none), checked:
    valid JSON, an object, a format version this release reads."""
    if META_KEY not in header:
        return None
    try:
        meta = json.loads(header[META_KEY])
    except json.JSONDecodeError as exc:
        raise ModelError(path, f"its metadata is not valid JSON ({exc})", "re-save it with save_model") from None
    if not isinstance(meta, dict):
        raise ModelError(path, "its metadata is not a JSON object", "re-save it with save_model")
    version = meta.get("format_version", FORMAT_VERSION)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ModelError(
            path,
            f"checkpoint format version {version!r} is newer than this wsi_pipeline reads ({FORMAT_VERSION})",
            "upgrade wsi_pipeline",
        )
    meta["format"] = "wsi_pipeline"
    return meta


def _open_header(path: Path) -> tuple[dict[str, str], dict[str, tuple[int, ...]]]:
    """(header metadata, tensor shapes) of a safetensors file; no tensor is read."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            header = f.metadata() or {}
            shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelError(path, f"cannot read this safetensors file ({exc})", "re-download or re-save it") from None
    return header, shapes


def read_metadata(path: str | PathLike[str]) -> dict[str, Any]:
    """Our JSON metadata of a safetensors checkpoint without reading its tensors.

    Listing shipped models must stay instant, so only the header is parsed;
    legacy formats (no metadata) give ``{}``.
    """
    path = Path(path)
    if not path.is_file() or not is_safetensors(path):
        return {}
    header, _ = _open_header(path)
    try:
        meta = json.loads(header.get(META_KEY, "{}"))
    except json.JSONDecodeError as exc:
        raise ModelError(path, f"its metadata is not valid JSON ({exc})", "re-save it with save_model") from None
    return meta if isinstance(meta, dict) else {}


def complete_meta(
    meta: dict[str, Any], *, mode: str, num_types: int | None, spec: dict[str, Any], path: Path
) -> dict[str, Any]:
    """A checkpoint's metadata with defaults for what legacy formats lack (name, classes, µm/px,
    lineage, metrics) and the architecture as the weights say it (mode, types, spec, path)."""
    from wsi_pipeline.classes import default_classes

    name = path.name[: -len(".safetensors")] if path.name.endswith(".safetensors") else path.stem
    out = {"name": name, "classes": default_classes(num_types), "mpp": DEFAULT_MPP, "lineage": [], "metrics": {},
           **meta}
    out.update({"mode": mode, "num_types": num_types, "spec": spec, "path": str(path)})
    return out


@dataclass(frozen=True)
class ModelFile:
    """A checkpoint of ours described from its header alone: what planning a run and running
    a cached conversion need, with the attributes of a loaded ``HoVerNet`` that the engine
    reads (``input_size``, ``output_size``, ``num_types``, ``output_size_for``, ``meta``,
    ``postproc``). :meth:`load` gives the network itself (this imports torch).

    ``checksum`` is the SHA-256 of the file's bytes: it keys the model's converted OpenVINO
    graph (:mod:`~wsi_pipeline.engine.ir_cache`), so a cache entry can only ever belong to
    these exact bytes.
    """

    path: Path
    checksum: str
    geometry: NetGeometry
    params: int
    macs: int
    meta: dict[str, Any] = field(repr=False)
    postproc: PostprocConfig = field(default_factory=PostprocConfig)

    @property
    def mode(self) -> str:
        return self.geometry.mode

    @property
    def num_types(self) -> int | None:
        return self.geometry.num_types

    @property
    def input_size(self) -> int:
        return self.geometry.input_size

    @property
    def output_size(self) -> int:
        return self.geometry.output_size

    def output_size_for(self, input_size: int) -> int:
        return self.geometry.output_size_for(input_size)

    def load(self, device: str = "cpu") -> Any:
        """The network, loaded and checked by :func:`~wsi_pipeline.engine.weights.load_model`."""
        from wsi_pipeline.engine.weights import load_model

        return load_model(self.path, device=device)


def describe_file(path: str | PathLike[str]) -> ModelFile | None:
    """The model a checkpoint of ours describes, from its header; ``None`` for any file this
    cannot vouch for without loading its weights (a legacy pickle, a bare state dict, metadata
    without the architecture or recorded counts, recorded widths or counts that its tensors
    contradict): callers then load it with torch, which checks everything.

    A file whose metadata is unreadable or too new is refused (:class:`ModelError`), as loading
    it would be.
    """
    path = Path(path)
    if not path.is_file() or not is_safetensors(path):
        return None
    header, shapes = _open_header(path)
    meta = parse_meta(path, header)
    if meta is None:
        return None
    mode, num_types, spec = meta.get("mode"), meta.get("num_types"), meta.get("spec")
    widths = spec.get("widths") if isinstance(spec, dict) else None
    if mode not in MODES or not isinstance(widths, dict) or spec.get("mode") != mode:
        return None
    head = shapes.get("decoder.tp.u0.conv.weight")
    if (None if head is None else int(head[0])) != num_types:
        return None
    # Every conv the spec names has that many output channels in the file, and the file has no
    # conv (4-D kernel, the output heads aside) the spec does not name.
    convs = {k[: -len(".weight")] for k, s in shapes.items() if k.endswith(".weight") and len(s) == 4}
    convs -= {k for k in convs if k.endswith(".u0.conv")}
    if convs != set(widths) or any(shapes[f"{n}.weight"][0] != w for n, w in widths.items()):
        return None
    params = sum(math.prod(s) for k, s in shapes.items() if not k.endswith(_BUFFER_SUFFIXES))
    try:
        recorded_params, macs = int(meta["params"]), int(meta["macs"])
    except (KeyError, TypeError, ValueError):
        return None
    if recorded_params != params or macs <= 0:
        return None
    postproc = PostprocConfig.from_meta(meta.get("postproc"), str(path))
    return ModelFile(
        path=path,
        checksum=file_checksum(path),
        geometry=NetGeometry(mode, num_types),
        params=params,
        macs=macs,
        meta=complete_meta(meta, mode=mode, num_types=num_types, spec=spec, path=path),
        postproc=postproc,
    )
