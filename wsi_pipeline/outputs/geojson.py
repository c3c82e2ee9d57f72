"""Nuclei as a QuPath-ready GeoJSON FeatureCollection, streamed to disk.

A slide holds hundreds of thousands of nuclei, so the collection is never built as one
JSON tree: the header is written first, then the Features of every ``batch`` nuclei
as they arrive from the stitcher (a bounded queue, so shapely's checks run vectorised),
then the closing brackets in :meth:`GeoJSONWriter.close`. Until then the file is
incomplete, which is why the run writes it into a temporary folder.

What QuPath (0.4+) needs, and what every Feature therefore carries:

- ``id``: the nucleus' UUID as a string (QuPath keeps it as the object's ID);
- ``geometry``: a closed, valid Polygon in level-0 pixels (x right, y down), rounded to
  ``decimals`` places. Rounding can fold a thin contour onto itself, so each ring is
  checked with shapely and repaired (largest polygon of ``make_valid``) when needed;
- ``properties.objectType = "detection"``: nuclei are detections, not annotations,
  so QuPath draws hundreds of thousands of them fast;
- ``properties.classification = {"name", "color": [r, g, b]}``: QuPath refuses a
  classification without a colour;
- ``properties.measurements``: a name -> number map (QuPath's own format since 0.4):
  ``Area µm^2`` (QuPath's name for it), ``Label id``, and for classified nuclei
  ``Class vote fraction`` and ``Class mean probability``
  (:mod:`wsi_pipeline.outputs.fields` says how they differ), then one ``Prob <class>``
  per channel of the model's type head.

``properties.label_id`` repeats the nucleus' value in the OME-Zarr label image (and in
the GeoParquet table's ``label_id``), to link the outputs.

The collection's own ``properties`` (QuPath ignores them; scripts need them) say what
the numbers mean: the coordinate frame, the slide's level-0 µm/px in x and y (what turns
coordinates into µm: an area in px² times ``level0_mpp_x * level0_mpp_y`` is µm²), the
inference µm/px (the resolution the nuclei were found at, which is *not* the scale of the
coordinates), and the classes, including the untyped one.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import IO, Any

import numpy as np
import shapely
from shapely.geometry import MultiPolygon, Polygon
from shapely.validation import make_valid

from wsi_pipeline.nuclei import Nucleus
from wsi_pipeline.outputs.fields import (
    UNTYPED_DESCRIPTION,
    class_mean_probability,
    class_table,
    class_vote_fraction,
    probability_names,
)

AREA_KEY = "Area µm^2"
VOTE_KEY = "Class vote fraction"
MEAN_PROB_KEY = "Class mean probability"
LABEL_KEY = "Label id"
FRAME = (
    "level-0 pixels of the slide: x to the right, y down, (0, 0) the top-left corner of the top-left pixel; "
    "multiply x by level0_mpp_x and y by level0_mpp_y for micrometres"
)


def prob_key(name: str) -> str:
    """Measurement name of one class' probability."""
    return f"Prob {name}"


class GeoJSONWriter:
    """Streams one Feature per nucleus into ``path`` (gzip when ``compress``).

    Implements the stitcher's ``NucleusSink``: call :meth:`add` per nucleus, then
    :meth:`close`, which completes the file and returns the number of Features.

    Args:
        path: output file, conventionally ``<stem>.geojson.gz`` or ``<stem>.geojson``.
        classes: the model's foreground classes ``[{"id", "name", "color"}]``, ids 1..K.
        mpp: the inference µm/px (stated in the header; areas come with each nucleus
            already in µm²).
        slide_mpp: the slide's level-0 µm/px (x, y): the scale of the coordinates,
            stated in the header. None only for collections not tied to a slide.
        attributes: more JSON-ready facts for the header's ``properties`` (slide name...).
        compress: gzip the stream (the run's default, ``--geojson gz``) or write plain
            JSON (``--geojson plain``) for tools that cannot read gzip.
        decimals: rounding of coordinates and measurements.
        compresslevel: gzip level; 6 is ~3x faster than 9 for a few % more bytes.
        batch: nuclei queued before they are written together: validity checks run
            vectorised over a batch (~4x faster than one by one), memory stays bounded.
    """

    def __init__(
        self,
        path: Path,
        classes: list[dict[str, Any]],
        mpp: float,
        *,
        slide_mpp: tuple[float, float] | None = None,
        attributes: dict[str, Any] | None = None,
        compress: bool = True,
        decimals: int = 2,
        compresslevel: int = 6,
        batch: int = 256,
    ) -> None:
        if decimals < 0:
            raise ValueError(f"decimals must be >= 0, got {decimals}")
        self.path = Path(path)
        self.mpp = float(mpp)
        self.decimals = decimals
        self._classifications = class_table(classes)
        self._prob_names = probability_names(classes)
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        self._batch = batch
        self._pending: list[Nucleus] = []
        self._count = 0
        self._written = 0
        self._repaired = 0
        self._closed = False
        self._file: IO[str]
        if compress:
            # The stream stays open across add() calls until close(): no context manager.
            self._file = gzip.open(self.path, "wt", encoding="utf-8", compresslevel=compresslevel)  # noqa: SIM115
        else:
            self._file = self.path.open("w", encoding="utf-8")
        header = {"type": "FeatureCollection", "properties": self._header(slide_mpp, attributes or {})}
        # The header is the collection without its features: everything up to the array.
        self._file.write(json.dumps(header, separators=(",", ":"), ensure_ascii=False)[:-1] + ',"features":[\n')

    @property
    def count(self) -> int:
        """Nuclei added so far (all of them are in the file once closed)."""
        return self._count

    @property
    def repaired(self) -> int:
        """Polygons that needed repair after rounding (reported, normally 0)."""
        return self._repaired

    def add(self, nucleus: Nucleus) -> None:
        """Queue one nucleus; every ``batch`` nuclei are written out as Features."""
        if self._closed:
            raise RuntimeError(f"{self.path}: add() after close()")
        self._classification(int(nucleus.type))  # fail on this nucleus, not on a later flush
        self._pending.append(nucleus)
        self._count += 1
        if len(self._pending) >= self._batch:
            self._flush()

    def feature(self, nucleus: Nucleus, rings: list[list[list[float]]] | None = None) -> dict[str, Any]:
        """The Feature for one nucleus (a small dict; the collection is never held).

        ``rings`` are its GeoJSON rings when already computed (batched), else they are
        derived here."""
        if rings is None:
            rings, repaired = polygon_rings(nucleus.polygon, nucleus.bbox, self.decimals)
            self._repaired += repaired
        measurements: dict[str, float] = {
            AREA_KEY: round(float(nucleus.area_um2), self.decimals),
            LABEL_KEY: int(nucleus.label),
        }
        votes, mean = class_vote_fraction(nucleus), class_mean_probability(nucleus)
        if votes is not None:
            measurements[VOTE_KEY] = round(votes, 4)
        if mean is not None:
            measurements[MEAN_PROB_KEY] = round(mean, 4)
        probs = np.asarray(nucleus.class_probs, dtype=np.float64).ravel()
        if probs.size:
            names = self._prob_names  # a checkpoint whose class list is short: type_<index> for the rest
            names = names + [f"type_{i}" for i in range(len(names), probs.size)]
            for name, value in zip(names, probs.tolist(), strict=False):
                measurements[prob_key(name)] = round(value, 4)
        return {
            "type": "Feature",
            "id": str(nucleus.uuid),
            "geometry": {"type": "Polygon", "coordinates": rings},
            "properties": {
                "objectType": "detection",
                "classification": self._classification(int(nucleus.type)),
                "measurements": measurements,
                "label_id": int(nucleus.label),
            },
        }

    def _header(self, slide_mpp: tuple[float, float] | None, attributes: dict[str, Any]) -> dict[str, Any]:
        """The collection's ``properties``: what a script needs to read the Features right."""
        header: dict[str, Any] = dict(attributes)
        header["coordinates"] = FRAME
        if slide_mpp is not None:
            header["level0_mpp_x"], header["level0_mpp_y"] = float(slide_mpp[0]), float(slide_mpp[1])
        header["inference_mpp"] = self.mpp
        header["inference_mpp_note"] = (
            "the µm/px the model ran at (areas were measured there); coordinates are level-0 pixels, not this"
        )
        header["classes"] = [{"id": type_id, **cls} for type_id, cls in sorted(self._classifications.items())]
        header["classes"][0]["description"] = UNTYPED_DESCRIPTION  # id 0, the untyped class
        header["measurements"] = {
            AREA_KEY: "area in µm² (pixels at the inference µm/px times its pixel area)",
            LABEL_KEY: "the nucleus' value in the OME-Zarr label image and label_id in the GeoParquet table",
            VOTE_KEY: "share of the nucleus' pixels whose most probable class is its class (absent when untyped)",
            MEAN_PROB_KEY: "type head's probability of its class averaged over its pixels (absent when untyped)",
            prob_key("<class>"): "type head's probability of that class averaged over the nucleus' pixels",
        }
        return header

    def close(self) -> int:
        """Finish the collection; returns the number of Features. Idempotent."""
        if not self._closed:
            self._flush()
            self._file.write("\n]}\n")
            self._file.close()
            self._closed = True
        return self._count

    def __enter__(self) -> GeoJSONWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _flush(self) -> None:
        """Write the queued nuclei: rings checked for all of them at once, then one
        write of their Features."""
        if not self._pending:
            return
        batch, self._pending = self._pending, []
        rings, repaired = batch_polygon_rings([n.polygon for n in batch], [n.bbox for n in batch], self.decimals)
        self._repaired += repaired
        text = ",\n".join(
            json.dumps(self.feature(n, r), separators=(",", ":"), ensure_ascii=False)
            for n, r in zip(batch, rings, strict=True)
        )
        self._file.write((",\n" if self._written else "") + text)
        self._written += len(batch)

    def _classification(self, type_id: int) -> dict[str, Any]:
        try:
            return self._classifications[type_id]
        except KeyError:
            known = sorted(self._classifications)
            raise ValueError(
                f"{self.path}: nucleus of type {type_id} but the model's classes are {known}; "
                "the checkpoint's class list does not match its type head"
            ) from None


def batch_polygon_rings(
    polygons: list[np.ndarray], bboxes: list[tuple[float, float, float, float]], decimals: int = 2
) -> tuple[list[list[list[list[float]]]], int]:
    """:func:`polygon_rings` of many contours: rounding, clean-up and validity checks
    vectorised over all of them; only the rare invalid ones take the per-polygon path."""
    arrays = [np.asarray(p, dtype=np.float64).reshape(-1, 2) for p in polygons]
    lengths = np.array([len(a) for a in arrays], dtype=np.int64)
    if lengths.sum() == 0:
        return [polygon_rings(a, b, decimals)[0] for a, b in zip(arrays, bboxes, strict=True)], len(arrays)
    coords = np.round(np.concatenate(arrays), decimals)
    ring = np.repeat(np.arange(len(arrays)), lengths)
    # Drop consecutive repeats within a ring, then a last point equal to the ring's first.
    keep = np.ones(len(coords), dtype=bool)
    keep[1:] = np.any(coords[1:] != coords[:-1], axis=1) | (ring[1:] != ring[:-1])
    coords, ring = coords[keep], ring[keep]
    counts = np.bincount(ring, minlength=len(arrays))
    ends = np.cumsum(counts)
    starts = ends - counts
    closing = (counts > 1) & np.all(
        coords[np.maximum(ends - 1, 0)] == coords[np.minimum(starts, len(coords) - 1)], axis=1
    )
    keep = np.ones(len(coords), dtype=bool)
    keep[(ends - 1)[closing]] = False
    coords, ring = coords[keep], ring[keep]
    counts = np.bincount(ring, minlength=len(arrays))
    ends = np.cumsum(counts)
    starts = ends - counts
    usable = counts >= 3
    valid = np.zeros(len(arrays), dtype=bool)
    if usable.any():
        take = usable[ring]
        # shapely wants ring indices 0..k-1 without gaps: number the usable rings.
        compact = np.cumsum(usable) - 1
        shapes = shapely.polygons(shapely.linearrings(coords[take], indices=compact[ring[take]]))
        index = np.flatnonzero(usable)
        valid[index] = shapely.is_valid(shapes) & (shapely.area(shapes) > 0)
    points = coords.tolist()
    rings: list[list[list[list[float]]]] = []
    repaired = 0
    for i, (start, end) in enumerate(zip(starts.tolist(), ends.tolist(), strict=True)):
        if valid[i]:
            rings.append([points[start:end] + [points[start]]])
        else:
            fixed, was_repaired = polygon_rings(arrays[i], bboxes[i], decimals)
            rings.append(fixed)
            repaired += was_repaired
    return rings, repaired


def polygon_rings(
    polygon: np.ndarray, bbox: tuple[float, float, float, float], decimals: int = 2
) -> tuple[list[list[list[float]]], int]:
    """GeoJSON rings of a nucleus contour: closed, rounded, valid.

    Returns (rings, repaired) where repaired is 1 when the rounded contour was not a
    valid polygon and had to be fixed. A contour that holds no area at all (a 1-pixel
    sliver) becomes its bounding box, so every nucleus keeps exactly one Feature and
    the Feature count equals the label count.
    """
    ring = _clean_ring(np.round(np.asarray(polygon, dtype=np.float64).reshape(-1, 2), decimals))
    if len(ring) >= 3:
        shape = Polygon(ring)
        if shape.is_valid and shape.area > 0:
            return [_closed(ring)], 0
        fixed = _largest_polygon(make_valid(shape))
        if fixed is not None:
            rings = _rounded_rings(fixed, decimals)
            if rings is not None:
                return rings, 1
            hull = shapely.convex_hull(fixed)
            if isinstance(hull, Polygon):
                rings = _rounded_rings(hull, decimals)
                if rings is not None:
                    return rings, 1
    return [_closed(_box_ring(bbox, decimals))], 1


def _clean_ring(ring: np.ndarray) -> np.ndarray:
    """Drop the closing point and consecutive repeats (rounding creates them)."""
    if len(ring) == 0:
        return ring
    keep = np.ones(len(ring), dtype=bool)
    keep[1:] = np.any(ring[1:] != ring[:-1], axis=1)
    ring = ring[keep]
    while len(ring) > 1 and np.array_equal(ring[0], ring[-1]):
        ring = ring[:-1]
    return ring


def _closed(ring: np.ndarray) -> list[list[float]]:
    coords = ring.tolist()
    coords.append(coords[0])
    return coords


def _largest_polygon(geometry: Any) -> Polygon | None:
    """The largest-area polygon in a (multi)geometry, or None if it holds no area."""
    if isinstance(geometry, Polygon):
        parts = [geometry]
    elif isinstance(geometry, MultiPolygon) or hasattr(geometry, "geoms"):
        parts = [g for g in shapely.get_parts(geometry) if isinstance(g, Polygon)]
    else:
        parts = []
    parts = [p for p in parts if p.area > 0]
    return max(parts, key=lambda p: p.area) if parts else None


def _rounded_rings(shape: Polygon, decimals: int) -> list[list[list[float]]] | None:
    """Rounded rings of a polygon if they are still valid after rounding, else None."""
    exterior = _clean_ring(np.round(np.asarray(shape.exterior.coords), decimals))
    holes = [_clean_ring(np.round(np.asarray(h.coords), decimals)) for h in shape.interiors]
    holes = [h for h in holes if len(h) >= 3]
    if len(exterior) < 3:
        return None
    rounded = Polygon(exterior, holes)
    if not (rounded.is_valid and rounded.area > 0):
        return None
    return [_closed(exterior)] + [_closed(h) for h in holes]


def _box_ring(bbox: tuple[float, float, float, float], decimals: int) -> np.ndarray:
    """The bounding box as a ring, at least one rounding step wide."""
    x0, y0, x1, y1 = (round(float(v), decimals) for v in bbox)
    step = 10.0**-decimals
    x1, y1 = max(x1, x0 + step), max(y1, y0 + step)
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=np.float64)
