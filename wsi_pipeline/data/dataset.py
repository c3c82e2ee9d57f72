"""The in-memory form every dataset format loads into: samples and their dataset.

Every loader (folder, CoNSeP .mat, PanNuke, MoNuSeg XML) produces the same
:class:`LabelledDataset`, so training, evaluation and splitting never care where the
data came from. Checks shared by all loaders live here too (:func:`check_sample`), so a
label map of the wrong size is rejected with the same message whatever the format.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, overload

import numpy as np

from wsi_pipeline.classes import majority_types
from wsi_pipeline.data.images import read_rgb
from wsi_pipeline.errors import DataError

log = logging.getLogger(__name__)

DEFAULT_MPP = 0.25  # CoNSeP, PanNuke and MoNuSeg are 40x scans at ~0.25 µm/px

_CONSEP_NAME = re.compile(r"^(train|test)_(\d+)(?:_\d+)?$")


def source_of(name: str) -> str:
    """The source tile a sample was cut from, the unit to hold out when splitting.

    CoNSeP crops ``train_TILE_CROP`` (and whole tiles ``train_TILE``) map to
    ``consep:train_TILE``: crops of one tile overlap, so they must land on the same side
    of a split. Any other name (a MoNuSeg tile, a PanNuke image) is its own source.
    """
    match = _CONSEP_NAME.match(name)
    if match:
        return f"consep:{match.group(1)}_{match.group(2)}"
    return name


@dataclass
class Sample:
    """One annotated image.

    ``inst_map`` holds 0 for background and 1..N for nuclei; ``type_map`` (same size) holds
    the class id (see :mod:`wsi_pipeline.classes`) or is None for datasets without classes.
    """

    name: str
    source: str
    image: np.ndarray  # (H, W, 3) uint8 RGB
    inst_map: np.ndarray  # (H, W) int32
    type_map: np.ndarray | None  # (H, W) uint8, or None


class LazySamples(Sequence[Sample]):
    """A read-only sequence that builds each :class:`Sample` only when indexed.

    Used for sets too big to hold decoded (a PanNuke fold is ~2,600 images). Names, sources
    and shapes are known up front, so splitting and planning crops never decode an image.
    """

    def __init__(
        self,
        names: Sequence[str],
        sources: Sequence[str],
        shapes: Sequence[tuple[int, int]],
        build: Callable[[int], Sample],
    ) -> None:
        if not len(names) == len(sources) == len(shapes):
            raise ValueError("names, sources and shapes must have the same length")
        self.names = list(names)
        self.sources = list(sources)
        self.shapes = [(int(h), int(w)) for h, w in shapes]
        self._build = build
        self._index = list(range(len(self.names)))

    def __len__(self) -> int:
        return len(self._index)

    @overload
    def __getitem__(self, i: int) -> Sample: ...
    @overload
    def __getitem__(self, i: slice) -> LazySamples: ...
    def __getitem__(self, i: int | slice) -> Sample | LazySamples:
        if isinstance(i, slice):
            return self.subset(range(len(self))[i])
        return self._build(self._index[i])

    def __iter__(self) -> Iterator[Sample]:
        for k in range(len(self)):
            yield self[k]

    def subset(self, positions: Sequence[int]) -> LazySamples:
        """The samples at ``positions`` (indices into this sequence), still lazy."""
        out = LazySamples.__new__(LazySamples)
        out._build = self._build
        out._index = [self._index[p] for p in positions]
        out.names = [self.names[p] for p in positions]
        out.sources = [self.sources[p] for p in positions]
        out.shapes = [self.shapes[p] for p in positions]
        return out


def sample_sources(samples: Sequence[Sample]) -> list[str]:
    """Source ids of ``samples`` without decoding lazy ones."""
    if isinstance(samples, LazySamples):
        return list(samples.sources)
    return [s.source for s in samples]


def sample_shapes(samples: Sequence[Sample]) -> list[tuple[int, int]]:
    """(H, W) of each sample without decoding lazy ones."""
    if isinstance(samples, LazySamples):
        return list(samples.shapes)
    return [(int(s.inst_map.shape[0]), int(s.inst_map.shape[1])) for s in samples]


@dataclass
class LabelledDataset:
    """A loaded dataset: samples plus what travels with them.

    ``classes`` lists foreground classes only ([{id, name, color}], ids 1..K matching the
    type maps; background 0 is not listed); it is empty when ``has_types`` is False, in
    which case a model trains NP/HV only and the TP loss is masked. ``empty`` names the
    samples whose label map holds no nucleus (kept as all-background, but reported).
    """

    samples: Sequence[Sample]
    classes: list[dict[str, Any]]
    has_types: bool
    format: str
    mpp: float = DEFAULT_MPP
    root: Path | None = None
    empty: list[str] = field(default_factory=list)

    @property
    def num_types(self) -> int:
        """Type channels a model needs for this dataset: classes plus background."""
        return len(self.classes) + 1 if self.has_types else 0

    def __len__(self) -> int:
        return len(self.samples)


def as_label_array(arr: Any, path: Path, key: str) -> np.ndarray:
    """A 2-D non-negative integer label map (integer dtype), or DataError naming the file and key."""
    a = np.asarray(arr)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim != 2:
        raise DataError(path, f"{key} has shape {a.shape}, expected a 2-D (H, W) map")
    if a.dtype.kind == "f":
        if not np.all(np.isfinite(a)) or not np.all(a == np.round(a)):
            raise DataError(path, f"{key} holds non-integer values", f"store {key} as an integer array")
        a = a.astype(np.int64)  # MATLAB files often store labels as doubles
    elif a.dtype.kind not in "iub":
        raise DataError(path, f"{key} has dtype {a.dtype}, expected integers")
    if a.size and a.min() < 0:
        raise DataError(path, f"{key} holds negative values", "use 0 for background and 1..N for nuclei")
    return a


def check_sample(
    path: Path, image: np.ndarray, inst_map: np.ndarray, type_map: np.ndarray | None, num_classes: int | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Validate one image/label pair and return it in canonical dtypes.

    The checks are the ones that would otherwise surface far away as a shape error inside
    the training loop: maps of another size than their image, type ids beyond the classes.
    """
    if image.ndim != 3 or image.shape[2] != 3:
        raise DataError(path, f"image has shape {image.shape}, expected (H, W, 3) RGB")
    if inst_map.shape != image.shape[:2]:
        raise DataError(
            path,
            f"inst_map is {inst_map.shape[1]}x{inst_map.shape[0]} but its image is "
            f"{image.shape[1]}x{image.shape[0]} (width x height)",
            "labels must be drawn at the image's own resolution",
        )
    if inst_map.size and int(inst_map.max()) > np.iinfo(np.int32).max:
        raise DataError(path, "inst_map ids exceed int32")
    inst = inst_map.astype(np.int32, copy=False)
    types = None
    if type_map is not None:
        if type_map.shape != image.shape[:2]:
            raise DataError(
                path,
                f"type_map has shape {type_map.shape}, its image {image.shape[:2]}",
                "type_map must have the image's size",
            )
        top = int(type_map.max()) if type_map.size else 0
        if num_classes is not None and top > num_classes:
            raise DataError(
                path,
                f"type_map holds class id {top} but the dataset has {num_classes} classes",
                "list every class in dataset.json or fix the type map",
            )
        if top > 255:
            raise DataError(path, f"type_map holds class id {top}; at most 255 classes are supported")
        types = type_map.astype(np.uint8, copy=False)
    return np.ascontiguousarray(image, dtype=np.uint8), inst, types


def report_empty(samples: Sequence[Sample], root: Path | str) -> list[str]:
    """Names of samples without any nucleus, logged once so they are never a surprise."""
    empty = [s.name for s in samples if not np.any(s.inst_map)]
    if empty:
        shown = ", ".join(empty[:10]) + (" ..." if len(empty) > 10 else "")
        log.warning("%s: %d sample(s) have empty label maps (kept as all-background): %s", root, len(empty), shown)
    return empty


LabelRecord = tuple[str, Path, Path, np.ndarray, np.ndarray | None]
"""(name, image path, label path, inst_map, type_map or None) of one pair whose labels are read."""


def highest_type(records: Sequence[LabelRecord]) -> int:
    """Largest class id in the type maps of ``records`` (0 when none holds a class)."""
    return max((int(r[4].max()) for r in records if r[4] is not None and r[4].size), default=0)


def assemble_dataset(
    root: Path,
    records: Sequence[LabelRecord],
    classes: list[dict[str, Any]],
    has_types: bool,
    fmt: str,
    mpp: float,
) -> LabelledDataset:
    """Decode each record's image, check it against its labels and wrap them all as a dataset.

    The loaders that read every label file first (they pick the classes from the whole
    set, so a mix of typed and untyped files is refused before any image is decoded)
    share this second half, so their samples are checked and reported identically.
    """
    samples = []
    for name, image_path, label_path, inst, types in records:
        image = read_rgb(image_path)
        image, inst, types = check_sample(label_path, image, inst, types, len(classes) if has_types else None)
        samples.append(Sample(name=name, source=source_of(name), image=image, inst_map=inst, type_map=types))
    return LabelledDataset(
        samples=samples,
        classes=list(classes),
        has_types=has_types,
        format=fmt,
        mpp=mpp,
        root=root,
        empty=report_empty(samples, root),
    )


def instance_types(inst_map: np.ndarray, type_map: np.ndarray) -> dict[int, int]:
    """Class of each instance present in ``inst_map``, by the project's one majority rule.

    :func:`wsi_pipeline.classes.majority_types`: the most frequent non-background type
    of its pixels, background only when none is typed, so the class counts that drive
    the dev split and the balanced sampler are those the metrics score.
    """
    ids = np.asarray(inst_map).ravel()
    if not (ids > 0).any():
        return {}
    majority, votes = majority_types(ids, type_map)
    return {int(i): int(majority[i]) for i in np.flatnonzero(votes)}  # a present id has >= 1 vote
