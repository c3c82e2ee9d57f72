"""The package as a user gets it: a wheel built from this tree, installed into a fresh
venv, run from a folder outside the repository on a crop of the sample slide with the
shipped default model; then every output read back with a second library, and the
report rendered in a real browser (headless Chromium).

The fresh venv gets its dependencies from the test's own environment (a ``.pth`` line to
its site-packages, since a clean torch install would be a 200 MB download), but
``wsi_pipeline`` itself only from the wheel: the test checks where it is imported from
and that the models are found inside it, not in the checkout.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "sample_slides" / "CMU-1-Small-Region.svs"
NAME = "crop"
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def _run(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{args[:3]} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Build the wheel, install it into a fresh venv, run the CLI there on a sample crop."""
    from wsi_pipeline.slide import open_slide
    from wsi_pipeline.slide.pyramid import write_pyramid

    work = tmp_path_factory.mktemp("installed")
    source = work / "source"  # only what a source distribution holds; no build files left in the repo
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    for name in ("wsi_pipeline", "models"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "WSI_PIPELINE_MODELS", "VIRTUAL_ENV")}
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    _run([*pip, "wheel", str(source), "--no-deps", "--no-build-isolation", "-w", str(work / "dist")], work, env)
    (wheel,) = (work / "dist").glob("wsi_pipeline-*.whl")

    venv = work / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], work, env)
    python = venv / "bin" / "python"
    _run([*pip, "--python", str(python), "install", "--no-deps", "--no-compile", str(wheel)], work, env)
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], work, env)
                .stdout.strip())
    (site / "zz_test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    with open_slide(SAMPLE) as slide:
        write_pyramid(slide, work / f"{NAME}.tif", region=(600, 900, 600, 600))
    cli = str(venv / "bin" / "wsi-pipeline")
    models = _run([cli, "models", "--json"], work, env)
    where = _run([str(python), "-c", "import wsi_pipeline; print(wsi_pipeline.__file__)"], work, env)
    run = _run(
        [cli, "run", f"{NAME}.tif", "--out", "out", "--workers", "1", "--threads-per-worker", "2", "--no-progress",
         "--zarr-image"],
        work, env, timeout=600,
    )
    return {"work": work, "wheel": wheel, "venv": venv, "models": models.stdout, "where": where.stdout.strip(),
            "run": run, "out": work / "out" / NAME}


def _default_model() -> str:
    return re.search(r"^default:\s*(\S+)", (REPO / "models" / "index.yaml").read_text(), re.M).group(1)


def test_the_wheel_carries_every_subpackage_and_the_models(installed) -> None:
    names = zipfile.ZipFile(installed["wheel"]).namelist()
    default = _default_model()
    assert "wsi_pipeline/models/index.yaml" in names
    assert f"wsi_pipeline/models/{default}.safetensors" in names and f"wsi_pipeline/models/{default}.md" in names
    # pyproject lists the packages by hand (models/ is mapped in): none may be missing.
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "wsi_pipeline").rglob("__init__.py")}
    assert listed == found | {"wsi_pipeline.models"}


def test_the_installed_package_finds_its_own_models(installed) -> None:
    venv = installed["venv"].resolve()
    assert Path(installed["where"]).resolve().is_relative_to(venv)  # the wheel's copy, not the checkout
    entries = json.loads(installed["models"])
    default = [e for e in entries if e["default"]]
    assert len(default) == 1 and default[0]["name"] == _default_model()
    for entry in entries:
        assert Path(entry["path"]).resolve().is_relative_to(venv), entry["path"]
        assert entry["params"] and entry["classes"]


def _features(out: Path) -> list[dict]:
    with gzip.open(out / f"{NAME}.geojson.gz", "rt", encoding="utf-8") as f:
        return json.load(f)


def test_the_run_wrote_every_output_and_the_report_warns_of_upsampling(installed) -> None:
    out = installed["out"]
    assert installed["run"].stdout.startswith("done    crop")
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        f"{NAME}.geojson.gz", f"{NAME}.nuclei.parquet", f"{NAME}.zarr", "report.html", "report.json"]
    report = json.loads((out / "report.json").read_text())
    assert report["nuclei"]["total"] > 100
    assert any("upsampled 2x" in w for w in report["warnings"])  # the 20x sample, a 40x model
    assert len(report["crops"]) == 6 and report["qc"]["nuclei"] == report["nuclei"]["total"]


def test_gdal_reads_the_geojson_with_its_scale(installed) -> None:
    import pyogrio

    out = installed["out"]
    path = f"/vsigzip/{out / f'{NAME}.geojson.gz'}"
    total = json.loads((out / "report.json").read_text())["nuclei"]["total"]
    assert pyogrio.read_info(path)["features"] == total
    header = _features(out)["properties"]
    assert header["level0_mpp_x"] == header["level0_mpp_y"] == pytest.approx(0.499)
    assert header["inference_mpp"] == pytest.approx(0.25)


def test_ome_zarr_py_and_ome_zarr_models_open_the_store_as_a_whole(installed) -> None:
    import zarr
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader
    from ome_zarr_models.v05.image import Image as NgffImage

    out = installed["out"]
    store = out / f"{NAME}.zarr"
    NgffImage.from_zarr(zarr.open_group(store, mode="r"))  # the root: an image with its labels
    nodes = {n.metadata.get("name"): n for n in Reader(parse_url(str(store)))() if n.data}
    assert set(nodes) == {"image", "nuclei", "nuclei_class"}
    image = np.asarray(nodes["image"].data[0])
    labels = np.asarray(nodes["nuclei"].data[0])
    assert image.shape == (3, *labels.shape) == (3, 1198, 1198)  # 600 px at 0.499 µm/px, at 0.25
    assert 100 < image.mean() < 250 and image.std() > 10  # the slide's pixels, not the white fill
    values = np.unique(labels)
    ids = sorted(f["properties"]["label_id"] for f in _features(out)["features"])
    assert values[values > 0].tolist() == ids


def test_geopandas_reads_the_table_the_geojson_describes(installed) -> None:
    import geopandas

    out = installed["out"]
    rows = geopandas.read_parquet(out / f"{NAME}.nuclei.parquet")
    features = _features(out)["features"]
    assert len(rows) == len(features) and rows["id"].tolist() == [f["id"] for f in features]
    areas = np.array([f["properties"]["measurements"]["Area µm^2"] for f in features])
    assert np.allclose(rows["area_um2"], areas, rtol=0.01, atol=0.005)
    assert rows["label_id"].tolist() == [f["properties"]["label_id"] for f in features]


# -- the report in a browser ---------------------------------------------------------


def _chromium() -> str:
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    pytest.skip("Chromium not found (apt-get install chromium; .ci/run installs it): the report is not rendered")


def _browse(page: Path, *args: str) -> subprocess.CompletedProcess:
    browser = _chromium()
    command = [browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               "--force-device-scale-factor=1", "--enable-logging=stderr", "--v=0", *args, page.as_uri()]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def _shot(page: Path, png: Path, size: str) -> np.ndarray:
    from PIL import Image

    done = _browse(page, f"--screenshot={png}", f"--window-size={size}")
    assert done.returncode == 0 and png.is_file(), done.stderr[-2000:]
    return np.asarray(Image.open(png).convert("RGB")).astype(np.int16)


def _class_pixels(shot: np.ndarray, color: list[int]) -> int:
    return int(np.all(np.abs(shot - np.array(color)) <= 2, axis=2).sum())


def test_the_report_renders_in_chromium_with_outlined_nuclei(installed, tmp_path: Path) -> None:
    out = installed["out"]
    page = out / "report.html"
    # The page as it is: no console message (errors, uncaught exceptions), its script ran.
    shot = _shot(page, tmp_path / "report.png", "1400,3000")
    assert shot.std() > 20
    done = _browse(page, "--dump-dom")
    console = [line for line in done.stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]
    assert console == [], console
    assert 'data-ready="1"' in done.stdout and "Nuclei on the slide" in done.stdout
    # The crops alone (a test stylesheet hides the rest of the page, whose plots use the
    # same colours): outlines in the class colours, which the raw tissue lacks.
    text = page.read_text(encoding="utf-8")
    isolate = "<style>body>:not(.crops){display:none}</style>"
    (tmp_path / "crops.html").write_text(text.replace("</head>", isolate + "</head>"), encoding="utf-8")
    hidden = text.replace("</head>", isolate + "</head>").replace("<body>", '<body class="no-outlines">', 1)
    (tmp_path / "raw.html").write_text(hidden, encoding="utf-8")
    outlined = _shot(tmp_path / "crops.html", tmp_path / "crops.png", "1400,1400")
    raw = _shot(tmp_path / "raw.html", tmp_path / "raw.png", "1400,1400")
    report = json.loads((out / "report.json").read_text())
    shown = {name for crop in report["crops"] for name, n in crop["per_class"].items() if n}
    colors = {c["name"]: c["color"] for c in report["classes"]}
    drawn = {name: _class_pixels(outlined, colors[name]) for name in shown if name in colors}
    assert len(drawn) >= 2, drawn
    for name, count in drawn.items():
        assert count > 100 and count > 10 * _class_pixels(raw, colors[name]), (name, count)
