"""The QuPath GeoJSON writer: real CoNSeP nuclei in, read back by GDAL and by json.

Nuclei come from CoNSeP ground-truth crops measured by the engine's own
``describe_nuclei`` (as the pipeline does for predicted maps), placed in a level-0 frame
with a fractional scale so coordinates need rounding, as on a real slide.
"""

from __future__ import annotations

import gzip
import json
import re
import uuid
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyogrio
import pytest
import shapely
from shapely.geometry import Polygon, shape
from skimage.segmentation import relabel_sequential

from wsi_pipeline.classes import CONSEP_CLASSES
from wsi_pipeline.engine.postproc import describe_nuclei
from wsi_pipeline.nuclei import Nucleus
from wsi_pipeline.outputs.geojson import (
    AREA_KEY,
    LABEL_KEY,
    MEAN_PROB_KEY,
    VOTE_KEY,
    GeoJSONWriter,
    batch_polygon_rings,
    polygon_rings,
)

MPP = 0.25
SLIDE_MPP = (0.2456, 0.2458)  # level-0 µm/px (x, y) of a 40x scanner
SCALE = 0.25 / 0.2456  # level-0 px per inference px, as on a 0.2456 µm/px scanner
CROPS = ("train_8_000", "train_23_008")  # every class; a crowded crop


def consep_nuclei(folder: Path, name: str, first_id: int = 1, offset: tuple[float, float] = (0.0, 0.0)):
    """Stitched-like records of one CoNSeP crop (ids from ``first_id``) and its label map."""
    data = np.load(folder / "labels" / f"{name}.npz")
    inst = relabel_sequential(data["inst_map"].astype(np.int32))[0]
    types = data["type_map"].astype(np.int64)
    tp = np.stack([types == c for c in range(len(CONSEP_CLASSES) + 1)]).astype(np.float32)
    nuclei = []
    for i, n in enumerate(describe_nuclei(inst, (inst > 0).astype(np.float32), tp)):
        nid = first_id + i
        placed = n.placed(offset[0], offset[1], SCALE, SCALE, MPP, label=nid)
        nuclei.append(replace(placed, uuid=str(uuid.uuid5(uuid.NAMESPACE_URL, f"{name}:{nid}"))))
    return nuclei, inst


def _nucleus(polygon, nid: int = 1, type_: int = 2) -> Nucleus:
    poly = np.asarray(polygon, dtype=np.float64)
    probs = np.full(len(CONSEP_CLASSES) + 1, 0.05, dtype=np.float32)
    probs[type_] = 0.8
    return Nucleus(
        polygon=poly,
        centroid=tuple(poly.mean(axis=0)),
        bbox=(*poly.min(axis=0), *poly.max(axis=0)),
        area_px=10,
        area_um2=0.6,
        type=type_,
        type_prob=0.8,
        class_probs=probs,
        label=nid,
        uuid=str(uuid.uuid5(uuid.NAMESPACE_URL, f"synthetic:{nid}")),
    )


@pytest.fixture(scope="module")
def nuclei(consep_train: Path) -> list[Nucleus]:
    first, _ = consep_nuclei(consep_train, CROPS[0])
    second, _ = consep_nuclei(consep_train, CROPS[1], first_id=len(first) + 1, offset=(256.0, 0.0))
    return first + second


def _write(path: Path, nuclei: list[Nucleus], compress: bool) -> int:
    writer = GeoJSONWriter(path, CONSEP_CLASSES, MPP, slide_mpp=SLIDE_MPP, compress=compress)
    for n in nuclei:
        writer.add(n)
    return writer.close()


def _load(path: Path) -> dict:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return json.load(f)


@pytest.mark.parametrize("compress", [True, False])
def test_gdal_reads_every_feature(tmp_path: Path, nuclei: list[Nucleus], compress: bool) -> None:
    path = tmp_path / ("s.geojson.gz" if compress else "s.geojson")
    assert _write(path, nuclei, compress) == len(nuclei) > 100
    gdal_path = f"/vsigzip/{path}" if compress else str(path)
    assert pyogrio.read_info(gdal_path)["features"] == len(nuclei)
    meta, _, geometry, fields = pyogrio.raw.read(gdal_path)
    assert meta["geometry_type"] == "Polygon"
    columns = dict(zip(meta["fields"], fields, strict=True))
    assert list(columns["id"]) == [n.uuid for n in nuclei]
    assert list(columns["label_id"]) == [n.label for n in nuclei]
    shapes = shapely.from_wkb(geometry)
    assert shapely.is_valid(shapes).all()
    # GDAL's polygons are the nuclei: same areas as the contours (level-0 px²) up to rounding.
    expected = np.array([Polygon(n.polygon).area for n in nuclei])
    assert np.allclose(shapely.area(shapes), expected, rtol=0.02, atol=0.05)


def test_features_follow_qupath_rules(tmp_path: Path, nuclei: list[Nucleus]) -> None:
    path = tmp_path / "s.geojson.gz"
    _write(path, nuclei, compress=True)
    collection = _load(path)
    assert collection["type"] == "FeatureCollection"
    features = collection["features"]
    assert len(features) == len(nuclei)
    colors = {c["name"]: list(c["color"]) for c in CONSEP_CLASSES}
    decimals = re.compile(r"^-?\d+(\.\d{1,2})?$")
    for feature, nucleus in zip(features, nuclei, strict=True):
        assert feature["type"] == "Feature"
        assert str(uuid.UUID(feature["id"])) == feature["id"] == nucleus.uuid
        props = feature["properties"]
        assert props["objectType"] == "detection"
        cls = props["classification"]
        assert set(cls) == {"name", "color"}
        assert cls["color"] == colors[cls["name"]]
        assert cls["name"] == CONSEP_CLASSES[nucleus.type - 1]["name"]
        geometry = feature["geometry"]
        assert geometry["type"] == "Polygon"
        ring = geometry["coordinates"][0]
        assert ring[0] == ring[-1] and len(ring) >= 4
        assert all(decimals.match(repr(v)) for point in ring for v in point)
        poly = shape(geometry)
        assert poly.is_valid and poly.area > 0
        measurements = props["measurements"]
        assert isinstance(measurements, dict)
        assert measurements[AREA_KEY] == pytest.approx(nucleus.area_um2, abs=0.01)
        # Two named confidences: the vote fraction (HoVer-Net's type_prob) and the mean
        # probability of the nucleus' class, which is the class' own "Prob" entry.
        assert measurements[VOTE_KEY] == pytest.approx(nucleus.type_prob, abs=1e-4)
        assert measurements[MEAN_PROB_KEY] == pytest.approx(nucleus.class_probs[nucleus.type], abs=1e-4)
        probs = [measurements[f"Prob {name}"] for name in ["background"] + [c["name"] for c in CONSEP_CLASSES]]
        assert np.allclose(probs, nucleus.class_probs, atol=1e-4)
        assert measurements[MEAN_PROB_KEY] == measurements[f"Prob {cls['name']}"]
        assert props["label_id"] == measurements[LABEL_KEY] == nucleus.label


def test_header_gives_the_coordinate_frame_and_both_resolutions(tmp_path: Path, nuclei: list[Nucleus]) -> None:
    """Coordinates are level-0 pixels: their µm/px is the slide's (x and y), not the
    model's. A script that takes its scale from the header gets areas right."""
    path = tmp_path / "s.geojson.gz"
    _write(path, nuclei, compress=True)
    header = _load(path)["properties"]
    assert (header["level0_mpp_x"], header["level0_mpp_y"]) == SLIDE_MPP
    assert header["inference_mpp"] == MPP and "mpp" not in header
    assert "level-0 pixels" in header["coordinates"] and "y down" in header["coordinates"]
    classes = {c["id"]: c for c in header["classes"]}
    assert classes[0]["name"] == "nucleus" and "did not classify" in classes[0]["description"]
    assert [classes[c["id"]]["name"] for c in CONSEP_CLASSES] == [c["name"] for c in CONSEP_CLASSES]
    assert {VOTE_KEY, MEAN_PROB_KEY, AREA_KEY} <= set(header["measurements"])
    # The header's scale turns a polygon's px² into the nucleus' µm² (within rounding).
    _, _, geometry, _ = pyogrio.raw.read(f"/vsigzip/{path}")
    scaled = shapely.area(shapely.from_wkb(geometry)) * header["level0_mpp_x"] * header["level0_mpp_y"]
    expected = np.array([n.area_um2 for n in nuclei])
    assert np.median(np.abs(scaled / expected - 1)) < 0.05


def test_plain_and_gzip_hold_the_same_collection(tmp_path: Path, nuclei: list[Nucleus]) -> None:
    _write(tmp_path / "a.geojson.gz", nuclei[:50], compress=True)
    _write(tmp_path / "a.geojson", nuclei[:50], compress=False)
    assert _load(tmp_path / "a.geojson.gz") == _load(tmp_path / "a.geojson")
    assert (tmp_path / "a.geojson.gz").stat().st_size < (tmp_path / "a.geojson").stat().st_size / 3


def test_features_reach_the_disk_before_close(tmp_path: Path, nuclei: list[Nucleus]) -> None:
    """Streaming: Features are written batch by batch, not collected for close()."""
    path = tmp_path / "s.geojson"
    writer = GeoJSONWriter(path, CONSEP_CLASSES, MPP, compress=False, batch=16)
    for n in nuclei:
        writer.add(n)
    written = path.stat().st_size
    writer.close()
    assert written > 0.8 * path.stat().st_size


def test_self_intersecting_contour_is_repaired(tmp_path: Path) -> None:
    bowtie = [[0, 0], [10, 10], [10, 0], [0, 10]]  # crosses itself at (5, 5)
    rings, repaired = polygon_rings(np.array(bowtie, float), (0, 0, 10, 10))
    poly = Polygon(rings[0], rings[1:])
    assert repaired == 1 and poly.is_valid and poly.area == pytest.approx(25.0)
    # A ring that only becomes invalid through rounding: two vertices 0.001 apart merge
    # and the ring folds onto itself.
    sliver = [[0, 0], [4, 0], [4, 2], [2.001, 2], [2.004, 0.0004], [1.999, 2], [0, 2]]
    assert Polygon(sliver).is_valid
    rings, repaired = polygon_rings(np.array(sliver), (0, 0, 4, 2))
    assert repaired == 1 and Polygon(rings[0], rings[1:]).is_valid
    # A contour with no area left keeps its Feature as the bounding box.
    rings, repaired = polygon_rings(np.array([[3.0, 3.0], [3.001, 3.0]]), (3.0, 3.0, 4.0, 4.0))
    assert repaired == 1 and Polygon(rings[0]).area == pytest.approx(1.0)

    path = tmp_path / "bad.geojson"
    writer = GeoJSONWriter(path, CONSEP_CLASSES, MPP, compress=False)
    writer.add(_nucleus(bowtie))
    assert writer.close() == 1 and writer.repaired == 1
    assert shape(_load(path)["features"][0]["geometry"]).is_valid


def test_batched_rings_equal_one_by_one(nuclei: list[Nucleus]) -> None:
    """The vectorised path the writer uses gives exactly the per-polygon answer."""
    square = np.array([[0, 0], [5, 0], [5, 5], [0, 5], [0, 0], [0, 0]], dtype=np.float64)  # closed, repeated
    odd = [
        np.array([[0, 0], [10, 10], [10, 0], [0, 10]], dtype=np.float64),  # bowtie
        square,
        np.array([[3.0, 3.0], [3.001, 3.0]]),  # no area
        np.zeros((0, 2)),
    ]
    polygons = [n.polygon for n in nuclei[:40]] + odd + [n.polygon for n in nuclei[40:80]]
    bboxes = [n.bbox for n in nuclei[:40]] + [(0, 0, 10, 10), (0, 0, 5, 5), (3, 3, 4, 4), (1, 1, 2, 2)]
    bboxes += [n.bbox for n in nuclei[40:80]]
    batched, repaired = batch_polygon_rings(polygons, bboxes)
    single = [polygon_rings(p, b) for p, b in zip(polygons, bboxes, strict=True)]
    assert batched == [rings for rings, _ in single]
    assert repaired == sum(r for _, r in single) == 3
    assert batched[41] == [[[0.0, 0.0], [5.0, 0.0], [5.0, 5.0], [0.0, 5.0], [0.0, 0.0]]]


def test_untyped_nuclei_and_models_without_type_head(tmp_path: Path) -> None:
    untyped = _nucleus([[0, 0], [4, 0], [4, 4], [0, 4]], type_=0)
    no_head = _nucleus([[10, 10], [14, 10], [14, 14]], nid=2, type_=0)
    no_head.class_probs = np.zeros(0, dtype=np.float32)
    path = tmp_path / "u.geojson"
    writer = GeoJSONWriter(path, [], MPP, compress=False)
    writer.add(untyped)
    with pytest.raises(ValueError, match="type 2"):  # a type the class list lacks
        writer.add(_nucleus([[0, 0], [4, 0], [4, 4]], nid=3, type_=2))
    writer.add(no_head)
    writer.close()
    first, second = _load(path)["features"]
    assert first["properties"]["classification"]["name"] == "nucleus"
    assert len(first["properties"]["classification"]["color"]) == 3
    # No vote fraction or class probability for a nucleus without a class (it would read
    # 1.0, "certain"), only the channels' own probabilities.
    assert VOTE_KEY not in first["properties"]["measurements"]
    assert MEAN_PROB_KEY not in first["properties"]["measurements"]
    assert "Prob background" in first["properties"]["measurements"]
    assert set(second["properties"]["measurements"]) == {AREA_KEY, "Label id"}


def test_an_empty_collection_is_valid(tmp_path: Path) -> None:
    path = tmp_path / "empty.geojson.gz"
    assert GeoJSONWriter(path, CONSEP_CLASSES, MPP).close() == 0
    assert _load(path)["features"] == []
