"""The slide commands: inspect, make-sample, survey, and their errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import pytest

from wsi_pipeline.cli import main

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "sample_slides"
SVS = SAMPLES / "CMU-1-Small-Region.svs"


@pytest.mark.parametrize("backend", ["auto", "openslide", "tiffslide"])
def test_inspect_reports_the_aperio_slide(backend: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(SVS), "--backend", backend]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["width"], info["height"]) == (2220, 2967)
    assert info["mpp_x"] == pytest.approx(0.499) and info["mpp_y"] == pytest.approx(0.499)
    assert info["levels"] == [{"width": 2220, "height": 2967, "downsample": 1.0}]
    assert info["objective_power"] == 20 and info["vendor"] == "aperio"
    assert info["path"] == str(SVS) and info["backend"] in ("openslide", "tiffslide")


def test_inspect_without_mpp_shows_null(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "crop.png"
    cv2.imwrite(str(path), (255 * cv2.getGaussianKernel(32, 5) @ cv2.getGaussianKernel(32, 5).T).astype("uint8"))
    assert main(["inspect", str(path)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["mpp_x"] is None and info["width"] == 32


def test_make_sample_synthetic_opens_alike_in_both_readers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "synthetic.tif"
    assert main(["make-sample", str(out), "--size", "1100", "900"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["readers_agree"] and summary["mpp"] == 0.25
    assert len(summary["levels"]) >= 3
    for backend in ("openslide", "tiffslide"):
        assert main(["inspect", str(out), "--backend", backend]) == 0
        info = json.loads(capsys.readouterr().out)
        assert [[lv["width"], lv["height"]] for lv in info["levels"]] == summary["levels"]
        assert info["mpp_x"] == pytest.approx(0.25)


def test_make_sample_from_the_aperio_slide(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "crop.tif"
    argv = ["make-sample", str(out), "--from", str(SVS), "--region", "500", "500", "600", "400", "--mpp", "0.25"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["levels"][0] == [1198, 798]  # 600 x 400 px at 0.499 -> 0.25 µm/px
    assert len(summary["levels"]) == 4


def test_survey_the_sample_slides(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert main(["survey", str(SAMPLES), "--out", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and all("tissue" in line and "tiles" in line for line in lines)
    svs_dir = out / "CMU-1-Small-Region"
    inspect_json = json.loads((svs_dir / "inspect.json").read_text())
    assert inspect_json["width"] == 2220
    tiles = json.loads((svs_dir / "tiles.json").read_text())
    assert tiles["upsampled"] is True and tiles["tiles"] == len(tiles["tile_list"]) > 0
    assert 0.4 < tiles["tissue_mm2"] < 0.9
    # the grid `run` would use with the default model: 1648 px cores at 0.25 µm/px, its derived margin
    from wsi_pipeline.batch import prepare_model
    from wsi_pipeline.config import RunConfig

    planned = prepare_model(RunConfig())
    assert (tiles["tile_px"], tiles["margin_px"], tiles["target_mpp"]) == (planned.tile_size, planned.margin, 0.25)
    # 2967 x 2220 px at 0.499 µm/px = 5934 x 4440 px at 0.25: ceil(/1648) = 4 rows, 3 cols
    assert tiles["grid"] == {"rows": 4, "cols": 3}
    overlay = cv2.imread(str(svs_dir / "tissue.png"))
    assert overlay.shape == (186, 139, 3)
    pyramid = json.loads((out / "CMU-1-Small-Region-pyramid" / "tiles.json").read_text())
    assert pyramid["upsampled"] is False and pyramid["read_level"] == 0


def test_survey_reports_a_bad_slide_and_goes_on(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    slides = tmp_path / "slides"
    slides.mkdir()
    (slides / "a-broken.svs").write_bytes(SVS.read_bytes()[:5000])
    (slides / "b-good.svs").write_bytes(SVS.read_bytes())
    assert main(["survey", str(slides), "--out", str(tmp_path / "out"), "--tile-size", "1024"]) == 2
    captured = capsys.readouterr()
    assert "a-broken.svs: is truncated" in captured.err and "1 of 2 slides failed" in captured.err
    assert "b-good.svs" in captured.out
    assert (tmp_path / "out" / "b-good" / "tiles.json").is_file()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["inspect", "does-not-exist.svs"], "does not exist"),
        (["inspect", "sample_slides"], "is a folder"),
        (["inspect", "sample_slides/PROVENANCE.md"], "unsupported extension"),
        (["make-sample", "out.png"], "is not a .tif/.tiff name"),
        (["survey", "sample_slides", "--out", "x", "--target-mpp", "0"], "must be positive"),
    ],
)
def test_user_errors_exit_2_with_a_message(
    argv: list[str], message: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(REPO)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_no_traceback_from_the_real_entry_point(tmp_path: Path) -> None:
    empty = tmp_path / "empty.svs"
    empty.touch()
    result = subprocess.run(
        [sys.executable, "-m", "wsi_pipeline", "inspect", str(empty)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    assert "is empty (0 bytes)" in result.stderr and "Traceback" not in result.stderr
