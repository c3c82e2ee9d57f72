"""`wsi-pipeline run` end to end on a real LocalCluster: outputs read back, and a lost worker.

The slide is a 492 px crop of the pyramid sample; the model a tiny random HoVer-Net whose
NP bias is set so it finds nuclei there (plumbing, not accuracy, is under test). Format
details of each output are A's tests (tests/test_outputs_*.py); here the outputs of one
real run must agree with each other and with the reports.
"""

from __future__ import annotations

import csv
import gzip
import json
import os
import signal
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr
from _helpers import plumbing_model

from wsi_pipeline.batch import DONE_MARKER, run_batch
from wsi_pipeline.cli import main
from wsi_pipeline.config import RunConfig
from wsi_pipeline.slide import open_slide
from wsi_pipeline.slide.pyramid import write_pyramid

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "sample_slides" / "CMU-1-Small-Region-pyramid.tif"


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("run_assets")
    with open_slide(SAMPLE) as source:
        write_pyramid(source, folder / "crop.tif", region=(1000, 1000, 492, 492))
    return {"model": plumbing_model(folder / "tiny.safetensors", folder / "crop.tif"), "slide": folder / "crop.tif"}


def geojson_features(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return json.load(f)["features"]


def test_cli_run_on_a_local_cluster(tmp_path: Path, assets: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    out, dask_report = tmp_path / "out", tmp_path / "dask-report.html"
    argv = ["run", str(assets["slide"]), "--out", str(out), "--model", str(assets["model"])]
    argv += ["--tile-size", "328", "--margin", "0", "--workers", "1", "--threads-per-worker", "2"]
    argv += ["--geojson", "plain", "--dask-report", str(dask_report), "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    folder = out / "crop"
    assert f"{folder}/report.html" in printed and f"{out / 'process_list.csv'}" in printed
    assert "1 worker(s) x 2 thread(s), 1 torch thread(s)" in printed

    report = json.loads((folder / "report.json").read_text())
    total = report["nuclei"]["total"]
    assert total > 0 and report["tiles"]["processed"] == 4 and report["tiles"]["margin"] == 0
    assert set(report["tiles"]["seconds"]) >= {"count", "mean", "max"} and report["tiles"]["seconds"]["count"] == 4
    # Start-up is its own stage: the driver's model load, the cluster, the workers' engine
    # warm-up (model load, runtime conversion/compilation, submitted as soon as the cluster is
    # up) and what the tiles still spent on it, all charged to this (the run's first) slide.
    startup = report["startup"]
    assert set(startup) == {"model", "cluster", "workers", "warmup"} and all(v > 0 for v in startup.values())
    assert report["seconds"]["startup"] == pytest.approx(sum(startup.values()))
    engine = report["engine"]
    assert engine["runtime"] == "auto" and engine["window"] == 768
    assert sum(engine["tiles_by_engine"].values()) == 4
    windows = engine["windows"]  # glass skipping: counted, never more computed than cover the tiles
    assert engine["skip_glass"] is True and 0 < windows["computed"] <= windows["total"]
    assert windows["skipped"] == windows["total"] - windows["computed"] - windows["reused"] >= 0
    assert set(engine["tiles_by_engine"]) <= {"openvino f32", "openvino bf16", "torch f32", "torch bf16"}

    features = geojson_features(folder / "crop.geojson")
    store = zarr.open_group(folder / "crop.zarr", mode="r")
    table_ids = pd.read_parquet(folder / "crop.nuclei.parquet", columns=["label_id"])["label_id"].to_numpy()
    label_ids = np.unique(np.asarray(store["nuclei/0"][:]))
    label_ids = label_ids[label_ids > 0]
    assert len(features) == len(table_ids) == len(label_ids) == total
    assert sorted(f["properties"]["label_id"] for f in features) == sorted(table_ids.tolist()) == label_ids.tolist()
    assert label_ids.tolist() == list(range(1, total + 1))  # global ids 1..N
    # The default store is labels only: its root is the NGFF labels group viewers open.
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    assert {n.metadata.get("name") for n in Reader(parse_url(str(folder / "crop.zarr")))() if n.data} == {
        "nuclei", "nuclei_class"}
    assert len({f["id"] for f in features}) == total  # one UUID per nucleus

    with (out / "process_list.csv").open(newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert (row["status"], int(row["nuclei"]), row["reason"]) == ("done", total, "")
    assert json.loads((folder / DONE_MARKER).read_text())["nuclei"] == total
    assert dask_report.read_text().lstrip().lower().startswith("<!doctype html")
    visible = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    assert visible == ["batch_report.json", "crop", "process_list.csv"]


def test_without_a_default_model_the_run_says_what_to_do(
    tmp_path: Path, assets: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setenv("WSI_PIPELINE_MODELS", str(tmp_path / "no-models"))
    (tmp_path / "no-models").mkdir()
    assert main(["run", str(assets["slide"]), "--out", str(tmp_path / "out")]) == 2
    assert "no default model is set" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def nuclei_table(folder: Path) -> dict[str, np.ndarray]:
    rows = pd.read_parquet(folder / f"{folder.name}.nuclei.parquet")
    return {name: rows[name].to_numpy() for name in ("label_id", "centroid_x", "centroid_y", "class_id", "area_um2")}


@pytest.mark.slow
def test_a_worker_killed_mid_slide_costs_only_its_tiles(tmp_path: Path, assets: dict[str, Path]) -> None:
    """Kill the worker process that delivered the first tile while others are in flight:
    Dask reruns its tiles elsewhere and the nuclei equal an undisturbed run's."""
    settings = {"model": str(assets["model"]), "tile_size": 164, "workers": 2, "threads_per_worker": 1}
    config = RunConfig(progress=False, **settings)  # default margin: every tile reads the whole crop
    calm = run_batch([assets["slide"]], tmp_path / "calm", config)
    assert calm.exit_code == 0

    killed: list[int] = []

    def kill_first_worker(result) -> None:
        if not killed:
            pid = int(result.worker.rsplit(":", 1)[1])
            assert pid != os.getpid()
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    hurt = run_batch([assets["slide"]], tmp_path / "hurt", config, on_tile=kill_first_worker)
    assert killed and hurt.exit_code == 0
    report = json.loads((tmp_path / "hurt" / "crop" / "report.json").read_text())
    assert report["tiles"]["processed"] == 9
    a, b = nuclei_table(tmp_path / "calm" / "crop"), nuclei_table(tmp_path / "hurt" / "crop")
    assert len(a["label_id"]) == calm.outcomes[0].nuclei > 0
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    calm_labels = zarr.open_group(tmp_path / "calm" / "crop" / "crop.zarr", mode="r")["nuclei/0"][:]
    hurt_labels = zarr.open_group(tmp_path / "hurt" / "crop" / "crop.zarr", mode="r")["nuclei/0"][:]
    np.testing.assert_array_equal(calm_labels, hurt_labels)


def test_windows_on_glass_are_skipped_and_nuclei_near_tissue_do_not_change(tmp_path: Path) -> None:
    """A real crop, half glass, as one 1200 px tile of 164 px windows: the default run leaves
    out the windows far from tissue (the report counts them) and every nucleus lying within
    12 µm of the tissue is exactly what a run computing every window finds."""
    import shapely
    from scipy import ndimage as ndi

    from wsi_pipeline.slide import tissue_mask

    slide = tmp_path / "half-glass.tif"
    with open_slide(SAMPLE) as source:
        write_pyramid(source, slide, region=(1900, 600, 1200, 1200))
    model = plumbing_model(tmp_path / "tiny.safetensors", slide)
    base = ["run", str(slide), "--model", str(model), "--tile-size", "1200", "--margin", "0", "--window", "256"]
    base += ["--workers", "1", "--threads-per-worker", "1", "--geojson", "plain", "--no-progress"]
    assert main([*base, "--out", str(tmp_path / "skip")]) == 0
    assert main([*base, "--out", str(tmp_path / "all"), "--no-skip-glass"]) == 0

    skip = json.loads((tmp_path / "skip" / "half-glass" / "report.json").read_text())["engine"]
    every = json.loads((tmp_path / "all" / "half-glass" / "report.json").read_text())["engine"]
    assert every["skip_glass"] is False and every["windows"]["skipped"] == 0
    assert skip["windows"]["total"] == every["windows"]["total"] > skip["windows"]["computed"] > 0

    with open_slide(slide) as opened:
        tissue = tissue_mask(opened)
    # Level-0 px (0.25 µm) from the nearest tissue, at the mask's resolution (conservative by one mask pixel).
    far = ndi.distance_transform_edt(~tissue.mask) * tissue.downsample_x - tissue.downsample_x

    def near_tissue(folder: str) -> set[bytes]:
        found = set()
        for feature in geojson_features(tmp_path / folder / "half-glass" / "half-glass.geojson"):
            shape = shapely.geometry.shape(feature["geometry"])
            xy = np.asarray(shape.exterior.coords)
            rows = np.minimum((xy[:, 1] / tissue.downsample_y).astype(int), tissue.mask.shape[0] - 1)
            cols = np.minimum((xy[:, 0] / tissue.downsample_x).astype(int), tissue.mask.shape[1] - 1)
            if (far[rows, cols] <= 12 / 0.25).all():  # the random model's blobs can be any size
                found.add(shapely.normalize(shape).wkb)
        return found

    near_skip, near_all = near_tissue("skip"), near_tissue("all")
    assert near_all and near_skip == near_all
