"""Tiled and whole-image runs of the real pipeline agree (issue 10's target: PQ >= 0.995
between them, no nucleus twice).

A real 40x H&E tile (MoNuSeg, 1000 x 1000 px at 0.25 µm/px) becomes a pyramidal TIFF; the
CLI runs it with the shipped default model and the default runtime (OpenVINO where
installed) once with 512 px tiles (4 tiles, windows cut per tile) and once as one tile.
Whole-tile windows put every window on the slide-wide stride grid, so the two label
images should differ only where a window edge or rounding tips a boundary pixel.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from _helpers import content
from PIL import Image

from wsi_pipeline.cli import main
from wsi_pipeline.metrics import pq
from wsi_pipeline.slide._image import ArraySlide
from wsi_pipeline.slide.pyramid import write_pyramid


@pytest.fixture(scope="module")
def he_slide(tmp_path_factory: pytest.TempPathFactory, monuseg_train: Path) -> Path:
    image = np.asarray(Image.open(sorted((monuseg_train / "images").glob("*.tif"))[0]).convert("RGB"))
    path = tmp_path_factory.mktemp("tiled") / "he.tif"
    write_pyramid(ArraySlide(image, mpp=0.25), path)
    return path


def _run(slide: Path, out: Path, tile_size: int) -> dict:
    argv = ["run", str(slide), "--out", str(out), "--tile-size", str(tile_size), "--workers", "1",
            "--threads-per-worker", "1", "--bf16", "false", "--no-progress"]
    assert main(argv) == 0
    return json.loads((out / "he" / "report.json").read_text())


def test_tiled_and_whole_runs_agree(he_slide: Path, tmp_path: Path) -> None:
    tiled_report = _run(he_slide, tmp_path / "tiled", 512)
    whole_report = _run(he_slide, tmp_path / "whole", 1024)
    assert tiled_report["tiles"]["processed"] == 4 and whole_report["tiles"]["processed"] == 1
    tiled, whole = content(tmp_path / "tiled" / "he", "he"), content(tmp_path / "whole" / "he", "he")
    quality, _, _ = pq(whole["labels"], tiled["labels"])
    print(f"tiled vs whole: PQ {quality:.4f}, nuclei {tiled_report['nuclei']['total']} vs "
          f"{whole_report['nuclei']['total']}, engine {tiled_report['engine']['tiles_by_engine']}")
    assert quality >= 0.995
    # No nucleus twice: one feature per label, labels consecutive, no two centroids together.
    ids = [f["properties"]["id"] if "id" in f["properties"] else f["id"] for f in tiled["features"]]
    assert len(ids) == len(set(ids)) == int(tiled["labels"].max())
    centroids = np.array([np.mean(np.asarray(f["geometry"]["coordinates"][0]), axis=0) for f in tiled["features"]])
    gaps = np.linalg.norm(centroids[:, None] - centroids[None], axis=2) + np.eye(len(centroids)) * 1e9
    assert gaps.min() > 2.0
