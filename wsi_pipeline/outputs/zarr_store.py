"""Nuclei as an OME-Zarr (zarr v3, OME-NGFF 0.5): label images plus a nuclei table.

Layout of ``<stem>.zarr``::

    zarr.json                   ome.version "0.5"; "wsi_pipeline": mpp, classes, paths
    labels/zarr.json            ome.labels ["nuclei", "nuclei_class"]
    labels/nuclei/0, 1, ...     int32 instance labels (value = nucleus id), multiscale
    labels/nuclei_class/0, ...  uint8 class labels (value = class id), multiscale
    tables/nuclei/label_id      int32 (N,)   = the nucleus' value in labels/nuclei
                 /centroid      float64 (N, 2) level-0 x, y
                 /bbox          float64 (N, 4) level-0 x0, y0, x1, y1
                 /type          int16 (N,)    class id (0: none)
                 /type_prob     float32 (N,)
                 /area          float32 (N,)  µm²

Why two label images. NGFF's ``image-label`` colours are per label *value*
(``colors: [{"label-value", "rgba"}]``); for an instance image that means one entry per
nucleus, i.e. megabytes of JSON held in memory and parsed by every viewer on a slide of
500k nuclei. So ``labels/nuclei`` only declares its background transparent (viewers
give instances their own colours, as usual for instance masks), and the class colours
live where the spec can say them compactly: ``labels/nuclei_class``, a label image
whose values are class ids, with one ``colors`` and one ``properties`` entry
(``{"label-value", "class"}``) per class. Nuclei the type head left unclassified get
:data:`UNTYPED_VALUE` there. The class image is derived from the instance image and the
table in :meth:`NucleiZarr.close`, so the stitcher only writes instance labels.

The root has no image of its own (the slide stays in its original file), hence no
``source`` in ``image-label``; everything is at the inference µm/px, whose
``coordinateTransformations`` give micrometres (``scale`` = µm/px per level). Level
``n + 1`` takes every second pixel of level ``n`` (label values must never be
averaged); with NGFF's pixel-centre convention that is exactly the pixel at
``2 * index``, so no ``translation`` is needed.

Memory stays flat as slides grow: label tiles go straight to their chunks, table rows
are buffered ``table_chunk`` at a time, and the pyramid is built chunk by chunk from
the set of chunks actually written. The one O(N) buffer is the id -> class lookup of
``close()``: one byte per nucleus.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from wsi_pipeline.errors import DataError
from wsi_pipeline.nuclei import Nucleus

NGFF_VERSION = "0.5"
LABELS = "nuclei"
CLASS_LABELS = "nuclei_class"
TABLE = "tables/nuclei"
UNTYPED_VALUE = 255  # value in labels/nuclei_class of a nucleus without a class
TRANSPARENT = [0, 0, 0, 0]

_COLUMNS: dict[str, tuple[np.dtype[Any], tuple[int, ...], str]] = {
    "label_id": (np.dtype(np.int32), (), "value of the nucleus in labels/nuclei"),
    "centroid": (np.dtype(np.float64), (2,), "level-0 pixels: x, y"),
    "bbox": (np.dtype(np.float64), (4,), "level-0 pixels: x0, y0, x1, y1 (half-open)"),
    "type": (np.dtype(np.int16), (), "class id (0: no class); see wsi_pipeline.classes in the root zarr.json"),
    "type_prob": (np.dtype(np.float32), (), "probability of the class"),
    "area": (np.dtype(np.float32), (), "µm²"),
}


def pyramid_levels(shape: tuple[int, int], chunk: int) -> int:
    """Levels so the smallest one fits in a single chunk (a whole-slide overview)."""
    levels, longest = 1, max(shape)
    while longest > chunk:
        longest = math.ceil(longest / 2)
        levels += 1
    return levels


class NucleiZarr:
    """Writes the OME-Zarr of one slide: the stitcher's ``LabelSink`` and a ``NucleusSink``.

    Args:
        path: the ``<stem>.zarr`` folder to create (it must not exist).
        shape: (height, width) of the slide in pixels at the inference µm/px.
        chunk: chunk side in pixels; the tile core size or a divisor of it makes every
            core write chunk-aligned (no read-modify-write).
        classes: the model's foreground classes ``[{"id", "name", "color"}]``, ids 1..K.
        mpp: the inference µm/px (level 0's pixel size).
        levels: pyramid levels (default: until one chunk holds the whole slide).
        table_chunk: table rows per chunk and per write.
        attributes: extra JSON-ready metadata for the root's ``wsi_pipeline`` key
            (slide name, level-0 scale...).
    """

    def __init__(
        self,
        path: Path,
        shape: tuple[int, int],
        chunk: int,
        classes: list[dict[str, Any]],
        mpp: float,
        *,
        levels: int | None = None,
        table_chunk: int = 65536,
        attributes: dict[str, Any] | None = None,
    ) -> None:
        height, width = (int(v) for v in shape)
        if height <= 0 or width <= 0:
            raise ValueError(f"label shape must be positive, got {shape}")
        if chunk <= 0 or table_chunk <= 0:
            raise ValueError(f"chunk sizes must be positive, got {chunk} and {table_chunk}")
        if mpp <= 0:
            raise ValueError(f"mpp must be positive, got {mpp}")
        if any(not 1 <= int(c["id"]) < UNTYPED_VALUE for c in classes):
            raise ValueError(f"class ids must be in 1..{UNTYPED_VALUE - 1}, got {[c['id'] for c in classes]}")
        self.path = Path(path)
        if self.path.exists():
            raise DataError(self.path, "the output Zarr already exists", "delete it, or rerun with --overwrite")
        self.shape = (height, width)
        self.chunk = int(chunk)
        self.mpp = float(mpp)
        self.classes = [
            {"id": int(c["id"]), "name": str(c["name"]), "color": [int(v) for v in c["color"]]} for c in classes
        ]
        self.levels = pyramid_levels(self.shape, self.chunk) if levels is None else int(levels)
        if self.levels < 1:
            raise ValueError(f"levels must be >= 1, got {levels}")
        self._written: set[tuple[int, int]] = set()  # level-0 chunks holding labels
        self._count = 0
        self._max_id = 0
        self._closed = False

        self.root = zarr.open_group(self.path, mode="w-", zarr_format=3)
        self.root.attrs.update(
            {
                "ome": {"version": NGFF_VERSION},
                "wsi_pipeline": {
                    **(attributes or {}),
                    "mpp": self.mpp,
                    "classes": self.classes,
                    "labels": f"labels/{LABELS}",
                    "class_labels": f"labels/{CLASS_LABELS}",
                    "table": TABLE,
                    "untyped_class_value": UNTYPED_VALUE,
                },
            }
        )
        labels = self.root.create_group("labels")
        labels.attrs.update({"ome": {"version": NGFF_VERSION, "labels": [LABELS, CLASS_LABELS]}})
        self._instance = self._label_image(labels, LABELS, np.int32, self._instance_label_meta())
        self._class = self._label_image(labels, CLASS_LABELS, np.uint8, self._class_label_meta())
        self._table = _TableWriter(self.root.create_group(TABLE), table_chunk)

    # -- LabelSink ---------------------------------------------------------------------

    def write_core(self, u0: int, v0: int, labels: np.ndarray) -> None:
        """Write a tile core's labels (global ids) at target pixel (u0, v0), replacing
        what is there."""
        box = self._clip(u0, v0, labels)
        if box is None:
            return
        y0, y1, x0, x1, patch = box
        self._instance[0][y0:y1, x0:x1] = patch.astype(np.int32, copy=False)
        self._mark(y0, y1, x0, x1)

    def merge(self, u0: int, v0: int, labels: np.ndarray) -> None:
        """Add labels at target pixel (u0, v0) only where the image is still background:
        pieces of nuclei that spill out of the core that owns them never overwrite a
        neighbour's nucleus."""
        box = self._clip(u0, v0, labels)
        if box is None:
            return
        y0, y1, x0, x1, patch = box
        if not patch.any():
            return
        current = self._instance[0][y0:y1, x0:x1]
        free = (patch > 0) & (current == 0)
        if not free.any():
            return
        current[free] = patch[free]
        self._instance[0][y0:y1, x0:x1] = current
        self._mark(y0, y1, x0, x1)

    # -- NucleusSink -------------------------------------------------------------------

    def add(self, nucleus: Nucleus) -> None:
        """Append one nucleus to the table (buffered)."""
        if self._closed:
            raise RuntimeError(f"{self.path}: add() after close()")
        self._table.add(nucleus)
        self._count += 1
        self._max_id = max(self._max_id, int(nucleus.label))

    @property
    def count(self) -> int:
        """Nuclei added to the table."""
        return self._count

    def close(self) -> None:
        """Flush the table, derive the class image and build the lower levels."""
        if self._closed:
            return
        self._table.flush()
        self._table.group.attrs.update({"count": self._count})
        lookup = self._class_lookup()
        chunks = sorted(self._written)
        for ci, cj in chunks:
            rows, cols = self._chunk_slices(0, ci, cj)
            self._class[0][rows, cols] = _classes_of(self._instance[0][rows, cols], lookup)
        for level in range(1, self.levels):
            chunks = sorted({(ci // 2, cj // 2) for ci, cj in chunks})
            for ci, cj in chunks:
                rows, cols = self._chunk_slices(level, ci, cj)
                src_rows = slice(2 * rows.start, 2 * rows.stop, 2)
                src_cols = slice(2 * cols.start, 2 * cols.stop, 2)
                data = self._instance[level - 1][src_rows, src_cols]
                self._instance[level][rows, cols] = data
                self._class[level][rows, cols] = _classes_of(data, lookup)
        self._closed = True

    def __enter__(self) -> NucleiZarr:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ---------------------------------------------------------------------

    def level_shape(self, level: int) -> tuple[int, int]:
        """(height, width) of a pyramid level."""
        factor = 2**level
        return math.ceil(self.shape[0] / factor), math.ceil(self.shape[1] / factor)

    def _label_image(self, parent: zarr.Group, name: str, dtype: type, image_label: dict[str, Any]) -> list[zarr.Array]:
        group = parent.create_group(name)
        datasets = []
        arrays = []
        for level in range(self.levels):
            shape = self.level_shape(level)
            chunks = (min(self.chunk, shape[0]), min(self.chunk, shape[1]))
            arrays.append(
                group.create_array(
                    str(level),
                    shape=shape,
                    chunks=chunks,
                    dtype=dtype,
                    fill_value=0,
                    dimension_names=["y", "x"],
                )
            )
            pixel = self.mpp * 2**level
            scale = {"type": "scale", "scale": [pixel, pixel]}
            datasets.append({"path": str(level), "coordinateTransformations": [scale]})
        group.attrs.update(
            {
                "ome": {
                    "version": NGFF_VERSION,
                    "multiscales": [
                        {
                            "name": name,
                            "axes": [
                                {"name": "y", "type": "space", "unit": "micrometer"},
                                {"name": "x", "type": "space", "unit": "micrometer"},
                            ],
                            "datasets": datasets,
                            "type": "nearest",
                            "metadata": {"description": "each level takes every 2nd pixel of the one above"},
                        }
                    ],
                    "image-label": image_label,
                }
            }
        )
        return arrays

    def _instance_label_meta(self) -> dict[str, Any]:
        return {"colors": [{"label-value": 0, "rgba": TRANSPARENT}]}

    def _class_label_meta(self) -> dict[str, Any]:
        colors = [{"label-value": 0, "rgba": TRANSPARENT}]
        properties: list[dict[str, Any]] = [{"label-value": 0, "class": "background"}]
        for cls in self.classes:
            colors.append({"label-value": cls["id"], "rgba": [*cls["color"], 255]})
            properties.append({"label-value": cls["id"], "class": cls["name"]})
        colors.append({"label-value": UNTYPED_VALUE, "rgba": [160, 160, 160, 255]})
        properties.append({"label-value": UNTYPED_VALUE, "class": "nucleus"})
        return {"colors": colors, "properties": properties}

    def _clip(self, u0: int, v0: int, labels: np.ndarray) -> tuple[int, int, int, int, np.ndarray] | None:
        """The part of a patch inside level 0, as (y0, y1, x0, x1, patch)."""
        if labels.ndim != 2:
            raise ValueError(f"labels must be 2-D, got shape {labels.shape}")
        height, width = self.shape
        y0, x0 = max(int(v0), 0), max(int(u0), 0)
        y1, x1 = min(int(v0) + labels.shape[0], height), min(int(u0) + labels.shape[1], width)
        if y1 <= y0 or x1 <= x0:
            return None
        return y0, y1, x0, x1, labels[y0 - int(v0) : y1 - int(v0), x0 - int(u0) : x1 - int(u0)]

    def _mark(self, y0: int, y1: int, x0: int, x1: int) -> None:
        c = self.chunk
        for ci in range(y0 // c, (y1 - 1) // c + 1):
            for cj in range(x0 // c, (x1 - 1) // c + 1):
                self._written.add((ci, cj))

    def _chunk_slices(self, level: int, ci: int, cj: int) -> tuple[slice, slice]:
        height, width = self.level_shape(level)
        c = self.chunk
        return slice(ci * c, min((ci + 1) * c, height)), slice(cj * c, min((cj + 1) * c, width))

    def _class_lookup(self) -> np.ndarray:
        """label id -> class-image value, read back from the table in chunks."""
        lookup = np.zeros(self._max_id + 1, dtype=np.uint8)
        ids, types = self._table.group["label_id"], self._table.group["type"]
        step = self._table.chunk
        for start in range(0, ids.shape[0], step):
            stop = min(start + step, ids.shape[0])
            chunk_types = np.asarray(types[start:stop])
            lookup[np.asarray(ids[start:stop])] = np.where(chunk_types > 0, chunk_types, UNTYPED_VALUE)
        return lookup


def _classes_of(labels: np.ndarray, lookup: np.ndarray) -> np.ndarray:
    """Class-image values of instance labels; ids missing from the table map to 0."""
    if labels.size == 0 or int(labels.max()) < lookup.size:
        return lookup[labels]
    inside = labels < lookup.size
    return np.where(inside, lookup[np.where(inside, labels, 0)], 0).astype(np.uint8)


class _TableWriter:
    """Columns of the nuclei table, appended ``chunk`` rows at a time."""

    def __init__(self, group: zarr.Group, chunk: int) -> None:
        self.group = group
        self.chunk = chunk
        self._arrays = {}
        self._buffers = {}
        for name, (dtype, tail, description) in _COLUMNS.items():
            self._arrays[name] = group.create_array(
                name, shape=(0, *tail), chunks=(chunk, *tail), dtype=dtype, fill_value=0
            )
            self._arrays[name].attrs["description"] = description
            self._buffers[name] = np.zeros((chunk, *tail), dtype=dtype)
        columns = {name: spec[2] for name, spec in _COLUMNS.items()}
        group.attrs.update({"columns": columns, "label_image": f"labels/{LABELS}"})
        self._rows = 0

    def add(self, nucleus: Nucleus) -> None:
        row = self._rows
        b = self._buffers
        b["label_id"][row] = nucleus.label
        b["centroid"][row] = nucleus.centroid
        b["bbox"][row] = nucleus.bbox
        b["type"][row] = nucleus.type
        b["type_prob"][row] = nucleus.type_prob
        b["area"][row] = nucleus.area_um2
        self._rows += 1
        if self._rows == self.chunk:
            self.flush()

    def flush(self) -> None:
        if not self._rows:
            return
        for name, array in self._arrays.items():
            array.append(self._buffers[name][: self._rows])
        self._rows = 0
