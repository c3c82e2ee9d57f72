"""Nuclei as an OME-Zarr (zarr v3, OME-NGFF 0.5) that napari and ome-zarr-py open as a whole.

Two layouts, both a valid NGFF node at the root (ome-zarr-models validates the store
when it is closed), so ``napari slide.zarr`` or ``Reader(parse_url("slide.zarr"))``
finds everything without knowing our paths:

Labels only (the default; the slide stays in its own file)::

    zarr.json               ome: {version "0.5", labels ["nuclei", "nuclei_class"]}; wsi_pipeline: ...
    nuclei/0, 1, ...        int32 instance labels (value = nucleus id), multiscale
    nuclei_class/0, ...     uint8 class labels (value = class id), multiscale

With the image (``--zarr-image``): the RGB slide at the inference µm/px is the root
image, and the labels sit in its ``labels`` group, as NGFF places the labels of an
image::

    zarr.json               ome: {version, multiscales, omero}; wsi_pipeline: ...
    0, 1, ...               uint8 (c, y, x) RGB, multiscale, white where no tile was read
    labels/zarr.json        ome: {labels ["nuclei", "nuclei_class"]}
    labels/nuclei/...       as above, image-label.source.image = "../../"
    labels/nuclei_class/...

The root's ``wsi_pipeline`` attributes name the label paths of the layout at hand
(:data:`LABELS`/:data:`CLASS_LABELS` under ``labels/`` or not).

**Visible labels.** napari colours a label image from ``image-label.colors`` when the
key is there and draws every value *missing* from it transparent. An instance image
cannot list one colour per nucleus (500 000 entries of JSON), so ``nuclei`` has no
``colors`` at all: viewers then give each instance its own cycling colour. The class
colours live where the spec can say them compactly: ``nuclei_class``, whose values are
class ids, with one ``colors`` and one ``properties`` entry (``{"label-value",
"class"}``) for *every* value it holds (background transparent; untyped nuclei
:data:`UNTYPED_VALUE`, grey). The class image is derived from the instance image in
:meth:`NucleiZarr.close`, so the stitcher only writes instance labels.

**Geometry.** Everything is at the inference µm/px; ``coordinateTransformations`` give
micrometres (``scale`` = µm/px per level). Label level ``n + 1`` takes every second
pixel of level ``n`` (label values must never be averaged); with NGFF's pixel-centre
convention that is exactly the pixel at ``2 * index``, so no ``translation``. Image
levels average 2 x 2 pixels, whose centre lies half a pixel of the finer level further:
level ``k`` carries the translation ``(2**k - 1) / 2 * mpp``. Image and labels have the
same number of levels, as NGFF requires of the labels of an image.

The per-nucleus table is the GeoParquet file beside the store
(:mod:`wsi_pipeline.outputs.parquet`): NGFF 0.5 defines no tables, and a layout no
reader knows is no help.

Memory stays flat as slides grow: label tiles go straight to their chunks, the pyramids
are built chunk by chunk from the chunks actually written, and the one O(N) buffer is
the id -> class lookup: one byte per nucleus.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from wsi_pipeline.errors import DataError
from wsi_pipeline.nuclei import Nucleus
from wsi_pipeline.outputs.fields import UNTYPED_COLOR, UNTYPED_NAME

NGFF_VERSION = "0.5"
LABELS = "nuclei"
CLASS_LABELS = "nuclei_class"
LABELS_GROUP = "labels"
UNTYPED_VALUE = 255  # value in the class image of a nucleus without a class
TRANSPARENT = (0, 0, 0, 0)
IMAGE_FILL = 255  # white, like glass, where no tile was read
_RGB = (("R", "FF0000"), ("G", "00FF00"), ("B", "0000FF"))


def pyramid_levels(shape: tuple[int, int], chunk: int) -> int:
    """Levels so the smallest one fits in a single chunk (a whole-slide overview)."""
    levels, longest = 1, max(shape)
    while longest > chunk:
        longest = math.ceil(longest / 2)
        levels += 1
    return levels


def label_paths(image: bool) -> tuple[str, str]:
    """Paths of the instance and class label images in a store with or without the image."""
    prefix = f"{LABELS_GROUP}/" if image else ""
    return prefix + LABELS, prefix + CLASS_LABELS


class NucleiZarr:
    """Writes the OME-Zarr of one slide: the stitcher's ``LabelSink`` and a ``NucleusSink``.

    Args:
        path: the ``<stem>.zarr`` folder to create (it must not exist).
        shape: (height, width) of the slide in pixels at the inference µm/px.
        chunk: chunk side in pixels; the tile core size or a divisor of it makes every
            core write chunk-aligned (no read-modify-write).
        classes: the model's foreground classes ``[{"id", "name", "color"}]``, ids 1..K.
        mpp: the inference µm/px (level 0's pixel size).
        image: also hold the RGB image (filled by :meth:`write_image`) as the root image.
        levels: pyramid levels (default: until one chunk holds the whole slide).
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
        image: bool = False,
        levels: int | None = None,
        attributes: dict[str, Any] | None = None,
    ) -> None:
        height, width = (int(v) for v in shape)
        if height <= 0 or width <= 0:
            raise ValueError(f"label shape must be positive, got {shape}")
        if chunk <= 0:
            raise ValueError(f"chunk size must be positive, got {chunk}")
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
        self.has_image = bool(image)
        self.classes = [
            {"id": int(c["id"]), "name": str(c["name"]), "color": [int(v) for v in c["color"]]} for c in classes
        ]
        self.levels = pyramid_levels(self.shape, self.chunk) if levels is None else int(levels)
        if self.levels < 1:
            raise ValueError(f"levels must be >= 1, got {levels}")
        self.labels_path, self.class_labels_path = label_paths(self.has_image)
        self._written: set[tuple[int, int]] = set()  # level-0 chunks holding labels
        self._image_written: set[tuple[int, int]] = set()  # level-0 chunks holding pixels
        self._types = np.zeros(1024, dtype=np.uint8)  # label id -> class-image value
        self._count = 0
        self._max_id = 0
        self._closed = False

        self.root = zarr.open_group(self.path, mode="w-", zarr_format=3)
        extra = {
            **(attributes or {}),
            "mpp": self.mpp,
            "classes": self.classes,
            "labels": self.labels_path,
            "class_labels": self.class_labels_path,
            "layout": "image with labels/" if self.has_image else "labels only",
            "untyped_class_value": UNTYPED_VALUE,
            "table": "the <stem>.nuclei.parquet file beside this store (GeoParquet), one row per label value",
        }
        if self.has_image:
            self._image = self._multiscale(self.root, np.uint8, ("c", "y", "x"), IMAGE_FILL)
            self.root.attrs.update({"ome": self._image_attrs(), "wsi_pipeline": extra})
            holder = self.root.create_group(LABELS_GROUP)
        else:
            holder = self.root
        holder.attrs.update({"ome": _dump(_labels_attrs())})
        if not self.has_image:
            holder.attrs.update({"wsi_pipeline": extra})
        self._instance = self._label_image(holder, LABELS, np.int32, self._instance_label_meta())
        self._class = self._label_image(holder, CLASS_LABELS, np.uint8, self._class_label_meta())

    # -- LabelSink ---------------------------------------------------------------------

    def write_core(self, u0: int, v0: int, labels: np.ndarray) -> None:
        """Write a tile core's labels (global ids) at target pixel (u0, v0), replacing
        what is there."""
        box = self._clip(u0, v0, labels)
        if box is None:
            return
        y0, y1, x0, x1, patch = box
        self._instance[0][y0:y1, x0:x1] = patch.astype(np.int32, copy=False)
        self._mark(self._written, y0, y1, x0, x1)

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
        self._mark(self._written, y0, y1, x0, x1)

    # -- NucleusSink -------------------------------------------------------------------

    def add(self, nucleus: Nucleus) -> None:
        """Note one nucleus' class for the class image (one byte per nucleus)."""
        if self._closed:
            raise RuntimeError(f"{self.path}: add() after close()")
        label = int(nucleus.label)
        if label >= self._types.size:
            self._types = np.concatenate([self._types, np.zeros(max(label + 1, self._types.size), dtype=np.uint8)])
        self._types[label] = int(nucleus.type) if int(nucleus.type) > 0 else UNTYPED_VALUE
        self._count += 1
        self._max_id = max(self._max_id, label)

    @property
    def count(self) -> int:
        """Nuclei added."""
        return self._count

    # -- the image ---------------------------------------------------------------------

    def write_image(self, u0: int, v0: int, rgb: np.ndarray) -> None:
        """Write RGB pixels (height, width, 3) at target pixel (u0, v0) of the image."""
        if not self.has_image:
            raise RuntimeError(f"{self.path} was created without an image (image=False)")
        rgb = np.asarray(rgb)
        if rgb.ndim != 3 or rgb.shape[2] != 3:
            raise ValueError(f"expected an RGB image (height, width, 3), got shape {rgb.shape}")
        box = self._clip(u0, v0, rgb[..., 0])
        if box is None:
            return
        y0, y1, x0, x1, _ = box
        patch = rgb[y0 - int(v0) : y1 - int(v0), x0 - int(u0) : x1 - int(u0)]
        self._image[0][:, y0:y1, x0:x1] = np.moveaxis(patch.astype(np.uint8, copy=False), 2, 0)
        self._mark(self._image_written, y0, y1, x0, x1)

    # -- closing -----------------------------------------------------------------------

    def close(self) -> None:
        """Derive the class image, build the lower levels, and validate the store with
        ome-zarr-models (a store that fails is a bug, reported here, not in a viewer)."""
        if self._closed:
            return
        lookup = self._types[: self._max_id + 1]
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
        if self.has_image:
            self._image_pyramid()
        self._closed = True
        self.validate()

    def validate(self) -> None:
        """Check the whole store against NGFF 0.5 with ome-zarr-models (raises if invalid)."""
        from ome_zarr_models.v05.image import Image
        from ome_zarr_models.v05.labels import Labels

        root = zarr.open_group(self.path, mode="r", zarr_format=3)
        (Image if self.has_image else Labels).from_zarr(root)

    def __enter__(self) -> NucleiZarr:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ---------------------------------------------------------------------

    def level_shape(self, level: int) -> tuple[int, int]:
        """(height, width) of a pyramid level."""
        factor = 2**level
        return math.ceil(self.shape[0] / factor), math.ceil(self.shape[1] / factor)

    def _image_pyramid(self) -> None:
        """Level k = 2 x 2 means of level k - 1, chunk by chunk over the chunks read."""
        chunks = sorted(self._image_written)
        for level in range(1, self.levels):
            chunks = sorted({(ci // 2, cj // 2) for ci, cj in chunks})
            source = self._image[level - 1]
            for ci, cj in chunks:
                rows, cols = self._chunk_slices(level, ci, cj)
                block = source[:, 2 * rows.start : 2 * rows.stop, 2 * cols.start : 2 * cols.stop]
                self._image[level][:, rows, cols] = _mean2x2(block, rows.stop - rows.start, cols.stop - cols.start)

    def _multiscale(
        self, group: zarr.Group, dtype: type, axes: tuple[str, ...], fill: int
    ) -> list[zarr.Array]:
        arrays = []
        for level in range(self.levels):
            shape = self.level_shape(level)
            chunks = (min(self.chunk, shape[0]), min(self.chunk, shape[1]))
            if len(axes) == 3:
                shape, chunks = (3, *shape), (3, *chunks)
            arrays.append(
                group.create_array(
                    str(level), shape=shape, chunks=chunks, dtype=dtype, fill_value=fill, dimension_names=list(axes)
                )
            )
        return arrays

    def _multiscale_meta(self, name: str, channel: bool) -> Any:
        from ome_zarr_models.v05.axes import Axis
        from ome_zarr_models.v05.multiscales import Dataset, Multiscale

        axes = [Axis(name="y", type="space", unit="micrometer"), Axis(name="x", type="space", unit="micrometer")]
        if channel:
            axes.insert(0, Axis(name="c", type="channel"))
        datasets = []
        for level in range(self.levels):
            pixel = self.mpp * 2**level
            scale = [pixel, pixel]
            shift = [(2**level - 1) / 2 * self.mpp] * 2 if channel and level else None
            if channel:
                scale = [1.0, *scale]
                shift = [0.0, *shift] if shift else None
            datasets.append(Dataset.build(path=str(level), scale=scale, translation=shift))
        how = "2x2 mean of the level above" if channel else "every 2nd pixel of the level above"
        return Multiscale(
            axes=axes,
            datasets=tuple(datasets),
            name=name,
            type="mean" if channel else "nearest",
            metadata={"description": f"each level is the {how}"},
        )

    def _image_attrs(self) -> dict[str, Any]:
        from ome_zarr_models.common.omero import Channel, Omero, Window
        from ome_zarr_models.v05.image import ImageAttrs

        window = Window(min=0, max=255, start=0, end=255)
        omero = Omero(
            channels=[Channel(color=color, window=window, label=label, active=True) for label, color in _RGB],
            rdefs={"model": "color"},
        )
        attrs = ImageAttrs(version=NGFF_VERSION, multiscales=[self._multiscale_meta("image", True)], omero=omero)
        return _dump(attrs)

    def _label_image(
        self, parent: zarr.Group, name: str, dtype: type, image_label: Any
    ) -> list[zarr.Array]:
        from ome_zarr_models.v05.image_label import ImageLabelAttrs

        group = parent.create_group(name)
        arrays = self._multiscale(group, dtype, ("y", "x"), 0)
        attrs = ImageLabelAttrs(
            version=NGFF_VERSION, multiscales=[self._multiscale_meta(name, False)], **{"image-label": image_label}
        )
        group.attrs.update({"ome": _dump(attrs)})
        return arrays

    def _source(self) -> Any:
        from ome_zarr_models.v05.image_label_types import Source

        return Source(image="../../") if self.has_image else None

    def _instance_label_meta(self) -> Any:
        """No ``colors``: a viewer then gives each nucleus a colour of its own (a list
        naming only some values would hide all the others)."""
        from ome_zarr_models.v05.image_label_types import Label

        return Label(version=NGFF_VERSION, source=self._source())

    def _class_label_meta(self) -> Any:
        """One colour and one name for every value the class image can hold."""
        from ome_zarr_models.v05.image_label_types import Color, Label, Property

        entries = [(0, TRANSPARENT, "background")]
        entries += [(c["id"], (*c["color"], 255), c["name"]) for c in self.classes]
        entries.append((UNTYPED_VALUE, (*UNTYPED_COLOR, 255), UNTYPED_NAME))
        return Label(
            version=NGFF_VERSION,
            source=self._source(),
            colors=tuple(Color(label_value=value, rgba=tuple(rgba)) for value, rgba, _ in entries),
            properties=tuple(Property(label_value=value, **{"class": name}) for value, _, name in entries),
        )

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

    def _mark(self, written: set[tuple[int, int]], y0: int, y1: int, x0: int, x1: int) -> None:
        c = self.chunk
        for ci in range(y0 // c, (y1 - 1) // c + 1):
            for cj in range(x0 // c, (x1 - 1) // c + 1):
                written.add((ci, cj))

    def _chunk_slices(self, level: int, ci: int, cj: int) -> tuple[slice, slice]:
        height, width = self.level_shape(level)
        c = self.chunk
        return slice(ci * c, min((ci + 1) * c, height)), slice(cj * c, min((cj + 1) * c, width))


def _dump(model: Any) -> dict[str, Any]:
    """An ome-zarr-models model as the JSON attributes it stands for."""
    return model.model_dump(mode="json", by_alias=True, exclude_none=True)


def _labels_attrs() -> Any:
    from ome_zarr_models.v05.labels import LabelsAttrs

    return LabelsAttrs(version=NGFF_VERSION, labels=[LABELS, CLASS_LABELS])


def _mean2x2(block: np.ndarray, height: int, width: int) -> np.ndarray:
    """(c, 2h, 2w) -> (c, h, w) means of 2 x 2 pixels; a missing last row or column (odd
    sizes at the slide's edge) repeats its neighbour."""
    channels, rows, cols = block.shape
    pad = ((0, 0), (0, 2 * height - rows), (0, 2 * width - cols))
    if any(p[1] for p in pad):
        block = np.pad(block, pad, mode="edge")
    means = block.reshape(channels, height, 2, width, 2).astype(np.uint16).sum(axis=(2, 4))
    return ((means + 2) // 4).astype(np.uint8)


def _classes_of(labels: np.ndarray, lookup: np.ndarray) -> np.ndarray:
    """Class-image values of instance labels; ids not added map to 0."""
    if labels.size == 0 or int(labels.max()) < lookup.size:
        return lookup[labels]
    inside = labels < lookup.size
    return np.where(inside, lookup[np.where(inside, labels, 0)], 0).astype(np.uint8)
