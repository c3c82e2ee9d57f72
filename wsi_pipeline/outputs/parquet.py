"""Nuclei as a GeoParquet table: one row per nucleus, for pandas, geopandas and SQL engines.

The GeoJSON is for QuPath; a table is what an analysis script wants: read one column of
500 000 nuclei without parsing 500 000 JSON objects, filter by class or by region, join
with other tables. ``<stem>.nuclei.parquet`` is GeoParquet 1.1, so geopandas reads it as
a GeoDataFrame, while pandas, pyarrow, DuckDB or Spark read the plain columns (the
geometry is then WKB bytes).

One row per nucleus, in id order (= tile order, so row groups cover compact regions):

============================  =================================================================
``id``                        the GeoJSON Feature id (UUID)
``label_id``                  the nucleus' value in the OME-Zarr label image (GeoJSON ``label_id``)
``class_id``, ``class``       class id (0 = untyped, :data:`~wsi_pipeline.outputs.fields.UNTYPED_NAME`)
``area_um2``, ``area_px``     area in µm², and in pixels at the inference µm/px
``centroid_x``, ``centroid_y``  level-0 pixels (x right, y down)
``centroid_x_um``, ...        the same in µm from the slide's top-left corner
``class_vote_fraction``       share of its pixels voting for its class (null when untyped)
``class_mean_probability``    mean probability of its class over its pixels (null when untyped)
``prob_<class>``              mean probability of each type-head channel (background first)
``bbox``                      {xmin, ymin, xmax, ymax} of the polygon (GeoParquet 1.1 covering)
``geometry``                  WKB Polygon in level-0 pixels: the GeoJSON's polygon exactly
============================  =================================================================

Pixel coordinates have no geographic CRS: the ``geo`` metadata says ``"crs": null``
(GeoParquet's "unknown"), never the CRS84 default a missing ``crs`` would mean. The
file's ``wsi_pipeline`` metadata repeats the frame, the level-0 and inference µm/px and
the classes.

Written streaming: nuclei are buffered ``batch`` at a time and each batch becomes one
row group, so memory does not grow with the slide, and a reader can skip row groups by
their ``bbox`` statistics (:func:`nuclei_in_box`). The ``geo`` metadata is fixed when
the file is opened, so it leaves out the optional overall ``bbox`` (known only at the
end; the covering column's statistics give it): metadata added at close would reach the
file footer but not the Arrow schema stored with it, and readers differ in which one
they look at. The GeoParquet metadata is written here rather than by geopandas because
geopandas writes whole DataFrames only; its reader checks what is written (tests read
the file back with geopandas, pandas and DuckDB).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import shapely

from wsi_pipeline.nuclei import Nucleus
from wsi_pipeline.outputs.fields import (
    UNTYPED_DESCRIPTION,
    class_mean_probability,
    class_table,
    class_vote_fraction,
    column_name,
    probability_names,
)
from wsi_pipeline.outputs.geojson import FRAME, batch_polygon_rings

GEOPARQUET_VERSION = "1.1.0"
GEOMETRY = "geometry"
BBOX = "bbox"
_BBOX_TYPE = pa.struct([(name, pa.float64()) for name in ("xmin", "ymin", "xmax", "ymax")])

_DESCRIPTIONS = {
    "id": "GeoJSON Feature id (UUID)",
    "label_id": "value of the nucleus in the OME-Zarr label image",
    "class_id": "class id; 0 = untyped ('nucleus')",
    "class": "class name",
    "area_um2": "area in µm²",
    "area_px": "area in pixels at the inference µm/px",
    "centroid_x": "centroid x in level-0 pixels",
    "centroid_y": "centroid y in level-0 pixels",
    "centroid_x_um": "centroid x in µm from the slide's left edge",
    "centroid_y_um": "centroid y in µm from the slide's top edge",
    "class_vote_fraction": "share of the nucleus' pixels whose most probable class is its class; null when untyped",
    "class_mean_probability": "probability of its class averaged over its pixels; null when untyped",
    BBOX: "bounding box of the polygon in level-0 pixels (GeoParquet covering)",
    GEOMETRY: "WKB polygon in level-0 pixels",
}


class NucleiParquet:
    """Streams one row per nucleus into a GeoParquet file (a stitcher ``NucleusSink``).

    Args:
        path: the ``<stem>.nuclei.parquet`` file to create.
        classes: the model's foreground classes ``[{"id", "name", "color"}]``, ids 1..K;
            with classes the table has ``K + 1`` probability columns, without (a model
            without a type head) none.
        mpp: the inference µm/px.
        slide_mpp: the slide's level-0 µm/px (x, y), for the µm centroids.
        decimals: rounding of the polygon vertices, the GeoJSON's (the same rings).
        batch: rows per row group.
        attributes: more JSON-ready facts for the file's ``wsi_pipeline`` metadata.
    """

    def __init__(
        self,
        path: Path,
        classes: Sequence[dict[str, Any]],
        mpp: float,
        slide_mpp: tuple[float, float],
        *,
        decimals: int = 2,
        batch: int = 8192,
        attributes: dict[str, Any] | None = None,
    ) -> None:
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        self.path = Path(path)
        self.mpp = float(mpp)
        self.slide_mpp = (float(slide_mpp[0]), float(slide_mpp[1]))
        self.decimals = decimals
        self._classes = class_table(classes)
        self._names = {type_id: cls["name"] for type_id, cls in self._classes.items()}
        self._channels = probability_names(classes) if classes else []
        prob_columns = [f"prob_{column_name(name)}" for name in self._channels]
        if len(set(prob_columns)) != len(prob_columns):
            raise ValueError(f"class names {self._channels} give clashing column names {prob_columns}")
        self._prob_columns = prob_columns
        self.schema = self._schema(attributes or {})
        self._batch = batch
        self._pending: list[Nucleus] = []
        self._count = 0
        self._closed = False
        self._writer = pq.ParquetWriter(self.path, self.schema, compression="zstd")

    @property
    def count(self) -> int:
        """Nuclei added so far (all of them are in the file once closed)."""
        return self._count

    def add(self, nucleus: Nucleus) -> None:
        """Queue one nucleus; every ``batch`` nuclei are written as one row group."""
        if self._closed:
            raise RuntimeError(f"{self.path}: add() after close()")
        if int(nucleus.type) not in self._classes:
            raise ValueError(f"{self.path}: nucleus of type {nucleus.type} but the classes are {sorted(self._classes)}")
        probs = np.asarray(nucleus.class_probs).ravel()
        if probs.size != len(self._channels):
            raise ValueError(
                f"{self.path}: nucleus {nucleus.label} has {probs.size} class probabilities, "
                f"the table {len(self._channels)} ({', '.join(self._channels) or 'none'})"
            )
        self._pending.append(nucleus)
        self._count += 1
        if len(self._pending) >= self._batch:
            self._flush()

    def close(self) -> int:
        """Write the last row group and the footer; returns the number of rows. Idempotent."""
        if not self._closed:
            self._flush()
            self._writer.close()
            self._closed = True
        return self._count

    def __enter__(self) -> NucleiParquet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ---------------------------------------------------------------------

    def _schema(self, attributes: dict[str, Any]) -> pa.Schema:
        def field(name: str, kind: pa.DataType, nullable: bool = False) -> pa.Field:
            description = _DESCRIPTIONS.get(name, "")
            return pa.field(name, kind, nullable=nullable, metadata={"description": description})

        fields = [
            field("id", pa.string()),
            field("label_id", pa.int32()),
            field("class_id", pa.int16()),
            field("class", pa.string()),
            field("area_um2", pa.float64()),
            field("area_px", pa.int64()),
            field("centroid_x", pa.float64()),
            field("centroid_y", pa.float64()),
            field("centroid_x_um", pa.float64()),
            field("centroid_y_um", pa.float64()),
            field("class_vote_fraction", pa.float32(), nullable=True),
            field("class_mean_probability", pa.float32(), nullable=True),
        ]
        for name, column in zip(self._channels, self._prob_columns, strict=True):
            fields.append(
                pa.field(column, pa.float32(), nullable=False, metadata={"description": f"mean probability of {name}"})
            )
        fields += [field(BBOX, _BBOX_TYPE), field(GEOMETRY, pa.binary())]
        info = {
            **attributes,
            "coordinates": FRAME,
            "level0_mpp_x": self.slide_mpp[0],
            "level0_mpp_y": self.slide_mpp[1],
            "inference_mpp": self.mpp,
            "classes": [
                {"id": type_id, **cls, **({"description": UNTYPED_DESCRIPTION} if type_id == 0 else {})}
                for type_id, cls in sorted(self._classes.items())
            ],
            "probability_columns": dict(zip(self._prob_columns, self._channels, strict=True)),
        }
        geo = {
            "version": GEOPARQUET_VERSION,
            "primary_column": GEOMETRY,
            "columns": {
                GEOMETRY: {
                    "encoding": "WKB",
                    "geometry_types": ["Polygon"],
                    "crs": None,  # pixel coordinates: an unknown CRS, not the default CRS84
                    "edges": "planar",
                    "covering": {BBOX: {key: [BBOX, key] for key in ("xmin", "ymin", "xmax", "ymax")}},
                }
            },
        }
        metadata = {"geo": json.dumps(geo), "wsi_pipeline": json.dumps(info, ensure_ascii=False)}
        return pa.schema(fields, metadata=metadata)

    def _flush(self) -> None:
        if not self._pending:
            return
        batch, self._pending = self._pending, []
        rings, _ = batch_polygon_rings([n.polygon for n in batch], [n.bbox for n in batch], self.decimals)
        geometries = _polygons(rings)
        bounds = shapely.bounds(geometries)
        centroids = np.array([n.centroid for n in batch], dtype=np.float64).reshape(-1, 2)
        types = np.array([int(n.type) for n in batch], dtype=np.int16)
        columns: dict[str, Any] = {
            "id": [str(n.uuid) for n in batch],
            "label_id": np.array([int(n.label) for n in batch], dtype=np.int32),
            "class_id": types,
            "class": [self._names[int(t)] for t in types],
            "area_um2": np.array([float(n.area_um2) for n in batch], dtype=np.float64),
            "area_px": np.array([int(n.area_px) for n in batch], dtype=np.int64),
            "centroid_x": centroids[:, 0],
            "centroid_y": centroids[:, 1],
            "centroid_x_um": centroids[:, 0] * self.slide_mpp[0],
            "centroid_y_um": centroids[:, 1] * self.slide_mpp[1],
            "class_vote_fraction": pa.array([class_vote_fraction(n) for n in batch], type=pa.float32()),
            "class_mean_probability": pa.array([class_mean_probability(n) for n in batch], type=pa.float32()),
        }
        if self._prob_columns:
            probs = np.stack([np.asarray(n.class_probs, dtype=np.float32).ravel() for n in batch])
            for index, column in enumerate(self._prob_columns):
                columns[column] = probs[:, index]
        columns[BBOX] = pa.StructArray.from_arrays(
            [pa.array(bounds[:, i]) for i in range(4)], fields=list(_BBOX_TYPE)
        )
        columns[GEOMETRY] = pa.array(shapely.to_wkb(geometries), type=pa.binary())
        self._writer.write_table(pa.table(columns, schema=self.schema))


def _polygons(rings: list[list[list[list[float]]]]) -> np.ndarray:
    """Shapely polygons of GeoJSON rings; the common hole-free ones built in one call."""
    geometries = np.empty(len(rings), dtype=object)
    simple = [i for i, r in enumerate(rings) if len(r) == 1]
    if simple:
        coords = [np.asarray(rings[i][0], dtype=np.float64) for i in simple]
        lengths = np.array([len(c) for c in coords])
        shells = shapely.linearrings(np.concatenate(coords), indices=np.repeat(np.arange(len(coords)), lengths))
        geometries[simple] = shapely.polygons(shells)
    for i, r in enumerate(rings):
        if len(r) != 1:
            geometries[i] = shapely.Polygon(r[0], r[1:])
    return geometries


def nuclei_in_box(
    path: Path, box: tuple[float, float, float, float], columns: Sequence[str] = ("label_id", "class_id", GEOMETRY)
) -> pa.Table:
    """The rows whose polygon's bounding box meets the level-0 box (x0, y0, x1, y1).

    Reads through pyarrow's dataset scanner with a filter on the ``bbox`` covering
    column, so row groups whose statistics lie outside the box are skipped and only the
    matching rows are kept: the report draws the nuclei of a few crops of a slide of any
    size this way, never holding all its polygons.
    """
    import pyarrow.dataset as ds

    x0, y0, x1, y1 = (float(v) for v in box)
    bbox = ds.field(BBOX, "xmin"), ds.field(BBOX, "ymin"), ds.field(BBOX, "xmax"), ds.field(BBOX, "ymax")
    where = (bbox[2] >= x0) & (bbox[0] <= x1) & (bbox[3] >= y0) & (bbox[1] <= y1)
    return ds.dataset(str(path), format="parquet").to_table(columns=list(columns), filter=where)
