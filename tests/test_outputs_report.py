"""report.json / report.html / batch_report.json on a real slide (CMU-1-Small-Region).

The slide's own thumbnail and tissue mask feed the overview; nuclei are real CoNSeP
nuclei (measured by the engine's ``describe_nuclei``) stamped over the tissue, so the
density map has something to show where tissue is and nothing where it is not. The same
nuclei go through the GeoParquet writer and the QC sink, so the report's crops are drawn
from a real table. (tests/test_outputs_installed.py renders a real run's report in
Chromium.)
"""

from __future__ import annotations

import base64
import io
import json
import re
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wsi_pipeline.classes import CONSEP_CLASSES
from wsi_pipeline.engine.postproc import describe_nuclei
from wsi_pipeline.nuclei import Nucleus
from wsi_pipeline.outputs.parquet import NucleiParquet
from wsi_pipeline.outputs.qc import (
    FRAGMENT_UM2,
    NucleiQC,
    choose_crops,
    qc_warnings,
    read_crops,
)
from wsi_pipeline.outputs.report import (
    BATCH_REPORT_JSON,
    STAGES,
    NucleiDensity,
    SlideReport,
    per_class_counts,
    render_html,
    write_batch_report,
    write_report,
)
from wsi_pipeline.slide import open_slide, tissue_mask

# The keys the issue asks report.json for (slide size, µm/px, tissue mm², tiles, nuclei per
# class, seconds per stage, throughput, edge-touching count, model, versions, checksums).
REPORT_KEYS = {
    "slide",
    "mpp",
    "tissue_mm2",
    "tiles",
    "nuclei",
    "seconds",
    "throughput",
    "edge_touching",
    "model",
    "versions",
    "config",
    "config_checksum",
}


def _stamped(aperio_svs: Path, consep_train: Path):
    """The slide's thumbnail and tissue mask, and a CoNSeP crop's nuclei stamped over every
    tissue cell of a 64 µm grid (level-0 px), with ids 1..N."""
    with open_slide(aperio_svs) as slide:
        thumbnail = slide.thumbnail(8.0)
        tissue = tissue_mask(slide, 8.0, thumbnail=thumbnail)
        width, height = slide.dimensions
        slide_mpp = (slide.mpp_x, slide.mpp_y)
    data = np.load(consep_train / "labels" / "train_23_008.npz")
    inst, types = data["inst_map"].astype(np.int32), data["type_map"].astype(np.int64)
    tp = np.stack([types == c for c in range(5)]).astype(np.float32)
    crop = describe_nuclei(inst, (inst > 0).astype(np.float32), tp)
    scale = 0.25 / slide_mpp[0]  # CoNSeP px (0.25 µm) -> level-0 px
    step = 256 * scale
    nuclei = []
    for y in np.arange(0, height - step, step):
        for x in np.arange(0, width - step, step):
            r = int((y + step / 2) / tissue.downsample_y)
            c = int((x + step / 2) / tissue.downsample_x)
            if not tissue.mask[min(r, tissue.mask.shape[0] - 1), min(c, tissue.mask.shape[1] - 1)]:
                continue
            nuclei.extend(_nucleus(n, len(nuclei) + 1 + k, x, y, scale) for k, n in enumerate(crop))
    return thumbnail, tissue, width, height, slide_mpp, nuclei


@pytest.fixture(scope="module")
def slide_inputs(aperio_svs: Path, consep_train: Path):
    """Thumbnail, tissue mask, slide facts and a density grid filled with nuclei on tissue."""
    thumbnail, tissue, width, height, slide_mpp, nuclei = _stamped(aperio_svs, consep_train)
    density = NucleiDensity(width, height, slide_mpp, num_types=5, cells=64, cell_um=1.0)
    for n in nuclei:
        density.add(n)
    return thumbnail, tissue, width, height, slide_mpp, density


@pytest.fixture(scope="module")
def qc_inputs(tmp_path_factory: pytest.TempPathFactory, aperio_svs: Path, consep_train: Path):
    """The stamped nuclei through the run's sinks: density (default grid), QC, GeoParquet."""
    thumbnail, tissue, width, height, slide_mpp, nuclei = _stamped(aperio_svs, consep_train)
    density = NucleiDensity(width, height, slide_mpp, num_types=5)
    qc = NucleiQC(CONSEP_CLASSES)
    table = tmp_path_factory.mktemp("qc") / "s.nuclei.parquet"
    with NucleiParquet(table, CONSEP_CLASSES, 0.25, slide_mpp) as writer:
        for n in nuclei:
            for sink in (density, qc, writer):
                sink.add(n)
    return {"tissue": tissue, "density": density, "qc": qc, "table": table, "nuclei": nuclei,
            "size": (width, height), "slide_mpp": slide_mpp, "thumbnail": thumbnail}


def _nucleus(n, nid: int, x0: float, y0: float, scale: float) -> Nucleus:
    return Nucleus(
        label=nid,
        polygon=n.polygon.astype(np.float64) * scale + (x0, y0),
        centroid=(x0 + n.centroid[0] * scale, y0 + n.centroid[1] * scale),
        bbox=(x0 + n.bbox[0] * scale, y0 + n.bbox[1] * scale, x0 + n.bbox[2] * scale, y0 + n.bbox[3] * scale),
        area_px=n.area_px,
        area_um2=n.area_px * 0.0625,
        type=n.type,
        type_prob=n.type_prob,
        class_probs=n.class_probs,
        uuid=str(uuid.uuid5(uuid.NAMESPACE_URL, str(nid))),
    )


def _report(slide_inputs, aperio_svs: Path) -> SlideReport:
    _, tissue, width, height, slide_mpp, density = slide_inputs
    per_type = {t: int(density.counts[t].sum()) for t in range(5) if density.counts[t].sum()}
    rng = np.random.default_rng(0)
    return SlideReport(
        slide=str(aperio_svs),
        name="cmu_small_region",
        width=width,
        height=height,
        slide_mpp=slide_mpp,
        mpp=0.25,
        tissue_mm2=tissue.area_mm2,
        tiles=12,
        tiles_grid=20,
        tile_size=1024,
        margin=96,
        nuclei_per_class=per_class_counts(per_type, CONSEP_CLASSES),
        edge_touching=3,
        seconds={"read": 4.0, "infer": 60.0, "postprocess": 9.5, "stitch": 1.2, "write": 2.3},
        wall_seconds=40.0,
        model={"name": "tiny", "params": 2_370_000, "macs": 9_400_000_000, "checksum": "ab" * 32},
        config={"tile_size": 1024, "margin": 96, "geojson": "gz"},
        config_checksum="cd" * 32,
        classes=CONSEP_CLASSES,
        tile_seconds=rng.gamma(4.0, 1.5, size=12).tolist(),
    )


def test_report_json_has_the_issue_keys_and_consistent_figures(tmp_path: Path, slide_inputs, aperio_svs) -> None:
    thumbnail, tissue, *_, density = slide_inputs
    report = _report(slide_inputs, aperio_svs)
    json_path, html_path = write_report(tmp_path, report, thumbnail=thumbnail, tissue=tissue, density=density)
    data = json.loads(json_path.read_text(encoding="utf-8"))
    assert set(data) >= REPORT_KEYS
    assert data["slide"]["width"] == 2220 and data["slide"]["height"] == 2967
    assert set(STAGES) <= set(data["seconds"]) and data["seconds"]["wall"] == 40.0
    assert data["nuclei"]["total"] == density.total == sum(data["nuclei"]["per_class"].values()) > 0
    assert list(data["nuclei"]["per_class"])[:4] == [c["name"] for c in CONSEP_CLASSES]
    tp = data["throughput"]
    assert tp["tissue_mm2_per_s"] == pytest.approx(tissue.area_mm2 / 40.0)
    assert tp["tissue_mpx_per_s"] == pytest.approx(tissue.area_mm2 / 0.25**2 / 40.0)
    assert tp["nuclei_per_s"] == pytest.approx(density.total / 40.0)
    assert data["tiles"]["seconds"]["count"] == 12
    assert {"torch", "zarr", "numpy", "python"} <= set(data["versions"])
    assert data["model"]["params"] == 2_370_000 and data["config_checksum"] == "cd" * 32
    assert not list(tmp_path.glob(".*.tmp"))  # written via temp files, none left behind
    assert html_path.exists()


def test_report_html_is_self_contained_with_its_plots(tmp_path: Path, slide_inputs, aperio_svs) -> None:
    thumbnail, tissue, *_, density = slide_inputs
    report = _report(slide_inputs, aperio_svs)
    _, html_path = write_report(tmp_path, report, thumbnail=thumbnail, tissue=tissue, density=density)
    page = html_path.read_text(encoding="utf-8")
    assert not re.search(r"""(src|href)=["'](?!data:)""", page)  # nothing fetched from elsewhere
    images = dict(re.findall(r'alt="([^"]+)" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page))
    assert set(images) == {"Nuclei per class", "Nucleus size histogram", "Slide overview", "Time per stage",
                           "Tile times"}
    sizes = [Image.open(io.BytesIO(base64.b64decode(b))).size for b in images.values()]
    assert all(w > 300 and h > 150 for w, h in sizes)
    overview = np.asarray(Image.open(io.BytesIO(base64.b64decode(images["Slide overview"]))).convert("RGB"))
    assert overview.std() > 20  # the thumbnail and overlays are drawn, not a blank canvas
    for text in ("cmu_small_region", "epithelial", "Tissue throughput", "ab" * 32, "No crops"):
        assert text in page


def test_density_counts_where_nuclei_are(slide_inputs) -> None:
    _, tissue, width, height, slide_mpp, density = slide_inputs
    assert density.counts.shape[1:] == (64, round(64 * width / height))
    # Nuclei were stamped on tissue only: cells outside the (dilated) mask hold none.
    per_cell = density.counts.sum(axis=0)
    ys, xs = np.nonzero(per_cell)
    r = np.minimum(((ys + 0.5) * density.cell / tissue.downsample_y).astype(int), tissue.mask.shape[0] - 1)
    c = np.minimum(((xs + 0.5) * density.cell / tissue.downsample_x).astype(int), tissue.mask.shape[1] - 1)
    assert tissue.mask[r, c].mean() > 0.8
    assert density.per_mm2().sum() * density.cell_mm2 == pytest.approx(density.total)


def test_report_without_thumbnail_or_nuclei_still_renders(slide_inputs, aperio_svs) -> None:
    report = _report(slide_inputs, aperio_svs)
    report.nuclei_per_class = per_class_counts({}, CONSEP_CLASSES)
    report.tile_seconds = []
    report.wall_seconds = 0.0
    page = render_html(report)
    assert page.count("data:image/png;base64,") == 5
    assert report.to_dict()["throughput"]["nuclei_per_s"] is None


def test_per_class_counts_names_every_class() -> None:
    counts = per_class_counts({2: 5, 0: 1, 3: 7}, CONSEP_CLASSES)
    assert counts == {"other": 0, "inflammatory": 5, "epithelial": 7, "spindle-shaped": 0, "nucleus": 1}


def test_batch_report_totals(tmp_path: Path) -> None:
    rows = [
        {"path": "a.svs", "status": "done", "reason": "", "seconds": 12.5, "nuclei": 1000},
        {"path": "b.svs", "status": "failed", "reason": "cannot open", "seconds": 0.1, "nuclei": 0},
        {"path": "c.svs", "status": "skipped", "reason": "already done", "seconds": 0.0, "nuclei": 0},
    ]
    path = write_batch_report(tmp_path, rows)
    assert path.name == BATCH_REPORT_JSON
    data = json.loads(path.read_text(encoding="utf-8"))
    assert (data["slides"], data["done"], data["failed"], data["skipped"]) == (3, 1, 1, 1)
    assert data["nuclei"] == 1000 and data["seconds"] == pytest.approx(12.6)
    assert data["ok"] is False and data["rows"] == rows
    assert json.loads(write_batch_report(tmp_path, rows[::2]).read_text())["ok"] is True


def test_density_cells_are_large_enough_to_hold_many_nuclei() -> None:
    """A 0.8 mm wide slide at 0.25 µm/px gets 50 µm cells, not 256 cells of 3 µm."""
    density = NucleiDensity(3200, 2000, (0.25, 0.25), num_types=5)
    assert density.cell * 0.25 == pytest.approx(50.0)
    assert density.counts.shape[1:] == (10, 16)
    big = NucleiDensity(400_000, 200_000, (0.25, 0.25), num_types=5, cells=256)
    assert big.counts.shape[2] == 256


def test_qc_counts_classes_sizes_and_confidences(qc_inputs) -> None:
    nuclei, summary = qc_inputs["nuclei"], qc_inputs["qc"].summary()
    assert summary["nuclei"] == len(nuclei) == sum(summary["area_histogram"]["counts"])
    by_name = {row["name"]: row for row in summary["per_class"]}
    for cls in CONSEP_CLASSES:
        members = [n for n in nuclei if n.type == cls["id"]]
        row = by_name[cls["name"]]
        assert row["count"] == len(members)
        if members:
            assert row["mean_area_um2"] == pytest.approx(np.mean([n.area_um2 for n in members]))
            # One-hot ground-truth maps: every pixel is sure of its class.
            assert row["mean_class_probability"] == pytest.approx(1.0) and row["low_confidence"] == 0
            areas = [n.area_um2 for n in members]
            low, high = np.percentile(areas, 50, method="lower"), np.percentile(areas, 50, method="higher")
            assert low / 1.13 <= row["median_area_um2"] <= high * 1.13  # within a log bin (12% wide)
    assert summary["fragments"] == sum(n.area_um2 < FRAGMENT_UM2 for n in nuclei)
    assert by_name["nucleus"]["mean_class_probability"] is None  # untyped: no confidence to average
    assert json.loads(json.dumps(summary)) == summary


def test_qc_warnings_name_cut_nuclei_low_confidence_and_fragments() -> None:
    calm = {"nuclei": 1000, "classified": 900, "low_confidence_fraction": 0.05, "low_confidence_below": 0.5,
            "fragment_fraction": 0.16, "fragment_below_um2": 10.0}
    assert qc_warnings(calm, edge_touching=0, margin=96) == []
    worried = calm | {"low_confidence_fraction": 0.4, "fragment_fraction": 0.3}
    cut, unsure, fragments = qc_warnings(worried, edge_touching=25, margin=0)
    assert "25 nuclei (2.5%)" in cut and "--margin (now 0 px)" in cut
    assert "40% of the classified nuclei are low-confidence" in unsure
    assert "30% of the nuclei are smaller than 10 µm²" in fragments


def test_crops_are_spread_over_the_tissue_from_dense_to_sparse(qc_inputs) -> None:
    density, tissue = qc_inputs["density"], qc_inputs["tissue"]
    width, height = qc_inputs["size"]
    windows = choose_crops(
        density.counts.sum(0), density.cell, tissue.mask, (tissue.downsample_x, tissue.downsample_y),
        (width, height), qc_inputs["slide_mpp"], 0.25,
    )
    assert len(windows) == 6
    assert windows[0].kind == "densest" and windows[-1].kind == "sparsest"
    assert windows[0].density_per_mm2 >= windows[2].density_per_mm2 >= windows[-1].density_per_mm2
    for w in windows:
        assert (w.width_px, w.height_px) == (400, 400)
        assert w.x0 >= 0 and w.x0 + w.width <= width and w.y0 >= 0 and w.y0 + w.height <= height
        centre = (int((w.y0 + w.height / 2) / tissue.downsample_y), int((w.x0 + w.width / 2) / tissue.downsample_x))
        assert tissue.mask[centre]  # on tissue
    for i, a in enumerate(windows):  # no two crops show the same place
        for b in windows[i + 1 :]:
            assert abs(a.x0 - b.x0) >= a.width or abs(a.y0 - b.y0) >= a.height
    blank = np.zeros_like(tissue.mask)
    assert choose_crops(density.counts.sum(0) * 0, density.cell, blank, (1.0, 1.0), (width, height),
                        qc_inputs["slide_mpp"], 0.25) == []


def test_crops_show_every_nucleus_outline_in_its_class_colour(tmp_path: Path, qc_inputs, aperio_svs) -> None:
    density, tissue = qc_inputs["density"], qc_inputs["tissue"]
    windows = choose_crops(
        density.counts.sum(0), density.cell, tissue.mask, (tissue.downsample_x, tissue.downsample_y),
        qc_inputs["size"], qc_inputs["slide_mpp"], 0.25, count=3,
    )
    with open_slide(aperio_svs) as slide:
        crops = read_crops(slide, windows, 0.25, qc_inputs["table"], CONSEP_CLASSES)
    colors = {c["name"]: np.array(c["color"]) for c in CONSEP_CLASSES}
    for crop in crops:
        assert crop.image.shape == crop.outlined.shape == (400, 400, 3)
        assert crop.nuclei == sum(crop.per_class.values())
        changed = np.any(crop.image != crop.outlined, axis=2)
        for name in crop.per_class:
            if name in colors:  # drawn pixels of that exact colour
                assert np.all(crop.outlined[changed] == colors[name], axis=1).sum() > 20, name
        # The crop counts the nuclei whose centroid lies in it.
        x0, y0, x1, y1 = crop.window.box
        inside = [n for n in qc_inputs["nuclei"] if x0 <= n.centroid[0] < x1 and y0 <= n.centroid[1] < y1]
        assert len(inside) == crop.nuclei
    report = _report_for_crops(qc_inputs, aperio_svs)
    report.crops = [crop.to_dict() for crop in crops]
    _, html_path = write_report(tmp_path, report, thumbnail=qc_inputs["thumbnail"], tissue=tissue, density=density,
                                crops=crops)
    assert crops[0].nuclei > 0 and crops[0].nuclei >= crops[-1].nuclei
    page = html_path.read_text(encoding="utf-8")
    assert page.count('class="outlined"') == page.count('class="raw"') == 3
    assert "densest" in page and 'id="outlines"' in page and "data-ready" in page
    data = json.loads((tmp_path / "report.json").read_text())
    assert [c["kind"] for c in data["crops"]] == [w.kind for w in windows]
    assert data["qc"]["nuclei"] == len(qc_inputs["nuclei"])


def _report_for_crops(qc_inputs, aperio_svs: Path) -> SlideReport:
    width, height = qc_inputs["size"]
    summary = qc_inputs["qc"].summary()
    return SlideReport(
        slide=str(aperio_svs), name="cmu_small_region", width=width, height=height,
        slide_mpp=qc_inputs["slide_mpp"], mpp=0.25, tissue_mm2=qc_inputs["tissue"].area_mm2, tiles=12,
        tiles_grid=20, tile_size=1024, margin=96,
        nuclei_per_class={row["name"]: row["count"] for row in summary["per_class"]}, edge_touching=0,
        seconds={"read": 1.0}, wall_seconds=10.0, model={"name": "tiny"}, config={}, config_checksum="cd",
        classes=CONSEP_CLASSES, qc=summary,
    )
