"""The GeoParquet nuclei table: real CoNSeP nuclei written like the run does, read back by
geopandas, pandas and DuckDB, and compared with the GeoJSON as GDAL reads it."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import duckdb
import geopandas
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pyogrio
import pytest
import shapely
from test_outputs_geojson import CROPS, MPP, SLIDE_MPP, consep_nuclei

from wsi_pipeline.classes import CONSEP_CLASSES
from wsi_pipeline.nuclei import Nucleus
from wsi_pipeline.outputs.geojson import AREA_KEY, GeoJSONWriter
from wsi_pipeline.outputs.parquet import NucleiParquet, nuclei_in_box


@pytest.fixture(scope="module")
def nuclei(consep_train: Path) -> list[Nucleus]:
    first, _ = consep_nuclei(consep_train, CROPS[0])
    second, _ = consep_nuclei(consep_train, CROPS[1], first_id=len(first) + 1, offset=(256.0, 0.0))
    out = first + second
    # Two untyped nuclei, as a type head that leaves some at background produces.
    for i in (3, 40):
        out[i] = replace(out[i], type=0)
    return out


def _write_table(path: Path, nuclei: list[Nucleus], batch: int = 64) -> int:
    with NucleiParquet(path, CONSEP_CLASSES, MPP, SLIDE_MPP, batch=batch, attributes={"name": "mosaic"}) as table:
        for n in nuclei:
            table.add(n)
    return table.count


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory, nuclei: list[Nucleus]) -> tuple[Path, Path]:
    """The same nuclei as a GeoParquet table and as a GeoJSON."""
    folder = tmp_path_factory.mktemp("parquet")
    _write_table(folder / "s.nuclei.parquet", nuclei)
    geojson = GeoJSONWriter(folder / "s.geojson.gz", CONSEP_CLASSES, MPP, slide_mpp=SLIDE_MPP)
    for n in nuclei:
        geojson.add(n)
    geojson.close()
    return folder / "s.nuclei.parquet", folder / "s.geojson.gz"


def test_geopandas_reads_the_rows_the_geojson_holds(written, nuclei: list[Nucleus]) -> None:
    table_path, geojson_path = written
    rows = geopandas.read_parquet(table_path)
    assert isinstance(rows, geopandas.GeoDataFrame) and rows.crs is None  # pixels: no geographic CRS
    assert rows.geometry.name == "geometry" and set(rows.geom_type) == {"Polygon"} and rows.is_valid.all()
    meta, _, geometry, fields = pyogrio.raw.read(f"/vsigzip/{geojson_path}")
    features = dict(zip(meta["fields"], fields, strict=True))
    assert len(rows) == len(features["id"]) == len(nuclei) > 100
    assert rows["id"].tolist() == list(features["id"])  # the GeoJSON Feature ids, in the same order
    assert rows["label_id"].tolist() == list(features["label_id"]) == [n.label for n in nuclei]
    # The same polygons (level-0 px), and areas in µm² within 1% of the GeoJSON's.
    geojson_shapes = shapely.from_wkb(geometry)
    assert np.allclose(rows.area.to_numpy(), shapely.area(geojson_shapes), rtol=1e-9)
    with_areas = pyogrio.read_dataframe(f"/vsigzip/{geojson_path}", columns=["measurements"])
    areas = [json.loads(m)[AREA_KEY] if isinstance(m, str) else m[AREA_KEY] for m in with_areas["measurements"]]
    assert np.allclose(rows["area_um2"].to_numpy(), areas, rtol=0.01, atol=0.005)  # the GeoJSON rounds to 0.01
    # Centroids in µm are the level-0 ones times the slide's µm/px.
    assert np.allclose(rows["centroid_x_um"], rows["centroid_x"] * SLIDE_MPP[0])
    assert np.allclose(rows["centroid_y_um"], rows["centroid_y"] * SLIDE_MPP[1])


def test_confidences_and_class_probabilities_have_their_own_columns(written, nuclei: list[Nucleus]) -> None:
    rows = pd.read_parquet(written[0])  # plain pandas: the geometry is WKB bytes
    assert isinstance(rows["geometry"].iloc[0], bytes)
    names = ["background"] + [c["name"] for c in CONSEP_CLASSES]
    columns = [f"prob_{n.replace('-', '_')}" for n in names]
    assert columns == [c for c in rows.columns if c.startswith("prob_")]
    probs = rows[columns].to_numpy()
    assert np.allclose(probs, [n.class_probs for n in nuclei], atol=1e-6)
    typed = rows["class_id"].to_numpy() > 0
    assert rows.loc[~typed, "class"].eq("nucleus").all() and (~typed).sum() == 2
    assert rows.loc[~typed, ["class_vote_fraction", "class_mean_probability"]].isna().all().all()
    expected_votes = np.array([n.type_prob for n in nuclei])[typed]
    assert np.allclose(rows.loc[typed, "class_vote_fraction"], expected_votes, atol=1e-6)
    own = probs[np.arange(len(rows)), rows["class_id"].to_numpy()][typed]
    assert np.allclose(rows.loc[typed, "class_mean_probability"], own, atol=1e-6)


def test_duckdb_queries_the_table(written, nuclei: list[Nucleus]) -> None:
    counted = dict(duckdb.sql(f"SELECT class, count(*) FROM '{written[0]}' GROUP BY class").fetchall())
    names = {0: "nucleus"} | {c["id"]: c["name"] for c in CONSEP_CLASSES}
    expected: dict[str, int] = {}
    for n in nuclei:
        expected[names[n.type]] = expected.get(names[n.type], 0) + 1
    assert counted == expected
    ((total_area,),) = duckdb.sql(f"SELECT sum(area_um2) FROM '{written[0]}'").fetchall()
    assert total_area == pytest.approx(sum(n.area_um2 for n in nuclei))


def test_geo_metadata_is_geoparquet_1_1_in_pixels(written) -> None:
    metadata = pq.read_schema(written[0]).metadata
    geo = json.loads(metadata[b"geo"])
    assert geo["version"] == "1.1.0" and geo["primary_column"] == "geometry"
    column = geo["columns"]["geometry"]
    assert column["encoding"] == "WKB" and column["geometry_types"] == ["Polygon"]
    assert "crs" in column and column["crs"] is None  # explicit: absent would mean CRS84 (lon/lat)
    assert column["covering"]["bbox"]["xmin"] == ["bbox", "xmin"]
    # The covering column bounds each polygon (what lets a reader skip row groups).
    rows = geopandas.read_parquet(written[0], columns=["bbox", "geometry"])
    bounds = rows.geometry.bounds
    boxes = pd.DataFrame(rows["bbox"].tolist())
    assert np.allclose(boxes[["xmin", "ymin", "xmax", "ymax"]].to_numpy(), bounds.to_numpy())
    assert json.loads(pq.ParquetFile(written[0]).metadata.metadata[b"geo"]) == geo  # footer and schema agree
    info = json.loads(metadata[b"wsi_pipeline"])
    assert (info["level0_mpp_x"], info["level0_mpp_y"]) == SLIDE_MPP and info["inference_mpp"] == MPP
    assert info["name"] == "mosaic" and "level-0 pixels" in info["coordinates"]
    assert info["classes"][0]["name"] == "nucleus" and "description" in info["classes"][0]


def test_rows_reach_the_disk_in_row_groups_as_they_arrive(tmp_path: Path, nuclei: list[Nucleus]) -> None:
    """Streaming: one row group per batch, written when the batch fills, not at close."""
    path = tmp_path / "s.nuclei.parquet"
    table = NucleiParquet(path, CONSEP_CLASSES, MPP, SLIDE_MPP, batch=50)
    sizes = []
    for i, n in enumerate(nuclei[:160], start=1):
        table.add(n)
        if i % 50 == 0:
            sizes.append(path.stat().st_size)
    assert sizes == sorted(sizes) and sizes[-1] > sizes[0] > 0
    assert table.close() == 160
    layout = pq.ParquetFile(path).metadata
    assert [layout.row_group(i).num_rows for i in range(layout.num_row_groups)] == [50, 50, 50, 10]


def test_nuclei_in_box_reads_only_the_rows_there(written) -> None:
    rows = geopandas.read_parquet(written[0])
    box = (100.0, 50.0, 260.0, 180.0)
    found = nuclei_in_box(written[0], box).to_pydict()["label_id"]
    expected = rows.cx[box[0] : box[2], box[1] : box[3]]["label_id"].tolist()
    assert sorted(found) == sorted(expected) and 0 < len(found) < len(rows)


def test_an_empty_table_is_valid(tmp_path: Path) -> None:
    path = tmp_path / "e.nuclei.parquet"
    assert NucleiParquet(path, CONSEP_CLASSES, MPP, SLIDE_MPP).close() == 0
    rows = geopandas.read_parquet(path)
    assert len(rows) == 0 and "class_mean_probability" in rows.columns


def test_a_model_without_a_type_head_has_no_probability_columns(tmp_path: Path, nuclei: list[Nucleus]) -> None:
    path = tmp_path / "n.nuclei.parquet"
    table = NucleiParquet(path, [], MPP, SLIDE_MPP)
    plain = replace(nuclei[0], type=0, class_probs=np.zeros(0, dtype=np.float32))
    table.add(plain)
    with pytest.raises(ValueError, match="class probabilities"):
        table.add(replace(nuclei[1], type=0))  # five probabilities for a table of none
    table.close()
    rows = pd.read_parquet(path)
    assert not [c for c in rows.columns if c.startswith("prob_")]
    assert math.isnan(rows["class_vote_fraction"].iloc[0])
