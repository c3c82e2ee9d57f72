"""Fault injection for batch runs: real subprocesses, real signals, real files.

Every case is something a lab engineer does by accident or a cluster does on purpose: two
runs into one out folder, two slides with one file name, a deleted output, SIGTERM and
SIGKILL of the driver, an out folder that cannot be written, a tile corrupted inside the
file, a blank slide, a GPU option without a GPU. Each must end with a clear message, the
documented exit code and no lost or mixed-up results. The driver runs as
``python -m wsi_pipeline run`` with a LocalCluster of one worker, a tiny random HoVer-Net
(plumbing, not accuracy, is under test) and 164 px tiles.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
from _helpers import assert_same_results, content, one_line_error, plumbing_model

from wsi_pipeline.batch import DONE_MARKER, LOCK_NAME, PROCESS_LIST
from wsi_pipeline.batch.lock import OWNER_NAME
from wsi_pipeline.slide import open_slide
from wsi_pipeline.slide.pyramid import write_pyramid

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "sample_slides" / "CMU-1-Small-Region-pyramid.tif"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
ENV.pop("DASK_SCHEDULER_ADDRESS", None)
RUN_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A small slide (9 tiles), a larger one (~40 tiles, for killing mid-slide), a blank one,
    one with a corrupt tile in the middle of level 0, and the tiny model."""
    folder = tmp_path_factory.mktemp("fault_assets")
    with open_slide(SAMPLE) as source:
        write_pyramid(source, folder / "small.tif", region=(1000, 1000, 492, 492))
        write_pyramid(source, folder / "large.tif", region=(600, 600, 1100, 1100))
    white = np.full((600, 600, 3), 255, np.uint8)
    tifffile.imwrite(folder / "blank.tif", white, tile=(256, 256), photometric="rgb",
                     resolution=(1e4 / 0.25, 1e4 / 0.25), resolutionunit="CENTIMETER")
    data = bytearray((folder / "large.tif").read_bytes())
    with tifffile.TiffFile(folder / "large.tif") as tif:
        page = tif.pages[0]
        middle = len(page.dataoffsets) // 2
        offset, count = page.dataoffsets[middle], page.databytecounts[middle]
    data[offset : offset + count] = np.random.default_rng(0).integers(0, 256, count, dtype=np.uint8).tobytes()
    (folder / "corrupt.tif").write_bytes(bytes(data))
    model = plumbing_model(folder / "tiny.safetensors", folder / "small.tif")
    return {"model": model, "small": folder / "small.tif", "large": folder / "large.tif",
            "blank": folder / "blank.tif", "corrupt": folder / "corrupt.tif"}


def command(assets: dict[str, Path], *inputs: Path | str, out: Path, extra: tuple[str, ...] = ()) -> list[str]:
    return [sys.executable, "-m", "wsi_pipeline", "run", *map(str, inputs), "--out", str(out),
            "--model", str(assets["model"]), "--tile-size", "164", "--margin", "0", "--workers", "1",
            "--no-progress", *extra]


def run(args: list[str], timeout: float = RUN_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, env=ENV, timeout=timeout, cwd=REPO)


def start(args: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=REPO,
                            start_new_session=True)


def finish(process: subprocess.Popen[str], timeout: float = RUN_TIMEOUT_S) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


def kill_group(process: subprocess.Popen[str]) -> None:
    """Stop what a killed driver left (its LocalCluster's worker processes)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


def wait_for(condition, timeout: float = 120.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.1)


def statuses(stdout: str) -> list[str]:
    """The status word of each per-slide line the CLI prints."""
    return [line.split()[0] for line in stdout.splitlines() if line.split()[:1] in (["done"], ["skipped"], ["failed"])]


def process_rows(out: Path) -> dict[str, dict[str, str]]:
    with (out / PROCESS_LIST).open(newline="") as f:
        return {row["name"]: row for row in csv.DictReader(f)}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, assets: dict[str, Path]) -> Path:
    """An undisturbed run over the large and the small slide, one at a time: what every
    interrupted run must reproduce."""
    out = tmp_path_factory.mktemp("reference") / "out"
    result = run(command(assets, assets["large"], assets["small"], out=out, extra=("--slides-in-flight", "1")))
    assert result.returncode == 0, result.stderr
    return out


def test_a_second_run_on_the_same_out_stops_or_waits(tmp_path: Path, assets: dict[str, Path],
                                                     reference: Path) -> None:
    out = tmp_path / "out"
    first = start(command(assets, assets["large"], out=out))
    try:
        wait_for(lambda: (out / OWNER_NAME).is_file(), what="the first run to take the lock")
        second = run(command(assets, assets["large"], out=out))
        assert second.returncode == 2
        line = one_line_error(second.stderr)
        assert str(out) in line and "in use by another wsi-pipeline run" in line and f"pid {first.pid}" in line
        assert "--lock-wait" in line
        waiting = start(command(assets, assets["large"], out=out, extra=("--lock-wait", "-1")))
        code, printed, err = finish(first)
        assert code == 0, err
        code, printed, err = finish(waiting)
        assert code == 0, err
        assert "skipped large" in printed  # it waited, then found the slide done
    finally:
        kill_group(first)
    assert_same_results(out / "large", reference / "large", "large")
    assert not any(p.name.endswith(".partial") for p in out.iterdir())


def test_slides_with_one_stem_never_share_results(tmp_path: Path, assets: dict[str, Path]) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    shutil.copy(assets["blank"], tmp_path / "a" / "s.tif")
    shutil.copy(assets["small"], tmp_path / "b" / "s.tif")
    out = tmp_path / "out"
    assert run(command(assets, tmp_path / "a" / "s.tif", out=out)).returncode == 0
    second = run(command(assets, tmp_path / "b" / "s.tif", out=out))
    assert second.returncode == 0, second.stderr
    assert statuses(second.stdout) == ["done"]
    folders = sorted(p.name for p in out.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert len(folders) == 2 and folders[0] == "s" and folders[1].startswith("s-")
    owners = {json.loads((out / f / DONE_MARKER).read_text())["identity"]["path"]: f for f in folders}
    a, b = (str((tmp_path / sub / "s.tif").resolve()) for sub in ("a", "b"))
    assert owners == {a: "s", b: folders[1]}
    # inputs in either order, together: both found done under the same names
    for order in ((tmp_path / "a", tmp_path / "b"), (tmp_path / "b", tmp_path / "a")):
        again = run(command(assets, *order, out=out))
        assert again.returncode == 0 and statuses(again.stdout) == ["skipped", "skipped"], again.stdout
    assert sorted(process_rows(out)) == folders  # the process list keeps both, across runs
    # the slide file replaced by another one with the same name: its identity changed, so it is redone
    shutil.copy(assets["small"], tmp_path / "a" / "s.tif")
    redone = run(command(assets, tmp_path / "a" / "s.tif", out=out))
    assert redone.returncode == 0 and "redo    s: the slide file's" in redone.stdout
    assert process_rows(out)["s"]["status"] == "done"


def test_a_changed_or_deleted_output_is_redone(tmp_path: Path, assets: dict[str, Path]) -> None:
    out = tmp_path / "out"
    assert run(command(assets, assets["small"], out=out)).returncode == 0
    geojson = out / "small" / "small.geojson.gz"
    expected = content(out / "small", "small")
    geojson.unlink()
    again = run(command(assets, assets["small"], out=out))
    assert again.returncode == 0 and "redo    small: its outputs changed: small.geojson.gz is missing" in again.stdout
    assert geojson.is_file()
    assert content(out / "small", "small")["features"] == expected["features"]
    chunk = next(p for p in sorted((out / "small" / "small.zarr").rglob("*")) if p.is_file() and "c" in p.parts)
    chunk.write_bytes(chunk.read_bytes() + b"x")
    third = run(command(assets, assets["small"], out=out))
    assert third.returncode == 0 and "changed size" in third.stdout
    fourth = run(command(assets, assets["small"], out=out))
    assert fourth.returncode == 0 and "skipped small" in fourth.stdout


def saved_tiles(out: Path, name: str) -> int:
    """Tile results the run has checkpointed so far in its partial folder."""
    return len(list((out / f".{name}.partial" / ".tiles").glob("tile-*.npz")))


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_a_killed_driver_then_a_rerun_resumes_and_gives_identical_outputs(
    how: str, tmp_path: Path, assets: dict[str, Path], reference: Path
) -> None:
    """Killed at about half of the slide's tiles: the rerun resumes from the checkpointed
    tiles, computes only the others and writes the outputs of an undisturbed run."""
    out = tmp_path / "out"
    total = json.loads((reference / "large" / "report.json").read_text())["tiles"]["processed"]
    driver = start(command(assets, assets["large"], out=out))
    try:
        wait_for(lambda: saved_tiles(out, "large") >= total // 2, what="half of the tiles")
        if how == "SIGTERM":
            driver.send_signal(signal.SIGTERM)
            code, _, err = finish(driver, timeout=120)
            assert code == 143, err
            assert "interrupted by SIGTERM" in err and "Traceback" not in err
            row = process_rows(out)["large"]
            assert row["status"] == "failed" and "interrupted (SIGTERM)" in row["reason"]
            assert "completed tile(s) are kept, and a rerun resumes from them" in row["reason"]
        else:
            driver.send_signal(signal.SIGKILL)
            driver.wait(timeout=60)
    finally:
        kill_group(driver)
    kept = saved_tiles(out, "large")
    assert total // 2 <= kept < total  # the partial folder holds the completed tiles
    assert not (out / "large").exists()  # nothing half-written under the real name
    rerun = run(command(assets, assets["large"], out=out))
    assert rerun.returncode == 0, rerun.stderr
    assert f"resume  large: {kept} tile(s) completed by an interrupted run are reused" in rerun.stdout
    assert not (out / ".large.partial").exists()
    assert_same_results(out / "large", reference / "large", "large")
    report = json.loads((out / "large" / "report.json").read_text())
    assert report["tiles"]["resumed"] == kept and report["tiles"]["processed"] == total
    row = process_rows(out)["large"]
    assert row["status"] == "done" and row["reason"] == f"resumed: {kept} of {total} tiles from an interrupted run"
    undisturbed = float(process_rows(reference)["large"]["seconds"])
    print(f"\nresume after {how} at {kept}/{total} tiles: slide {float(row['seconds']):.1f} s "
          f"vs {undisturbed:.1f} s undisturbed")


def test_sigterm_with_two_slides_in_flight_stops_both_and_the_rerun_completes_them(
    tmp_path: Path, assets: dict[str, Path], reference: Path
) -> None:
    """SIGTERM once the second slide has started while the first finishes: the run ends
    with 143, each slide is either published complete or kept partial with its tiles, and
    the rerun gives the outputs of an undisturbed one-at-a-time run."""
    out = tmp_path / "out"
    driver = start(command(assets, assets["large"], assets["small"], out=out))
    try:
        wait_for(lambda: saved_tiles(out, "small") >= 1, what="the second slide's first tile")
        overlapped = (out / ".large.partial").is_dir() or not (out / "large").exists()
        driver.send_signal(signal.SIGTERM)
        code, printed, err = finish(driver, timeout=120)
    finally:
        kill_group(driver)
    assert code == 143, err
    assert "interrupted by SIGTERM" in err and "Traceback" not in err
    rows = process_rows(out)
    assert rows["small"]["status"] == "failed" and "interrupted (SIGTERM)" in rows["small"]["reason"]
    assert "a rerun resumes from them" in rows["small"]["reason"] and saved_tiles(out, "small") >= 1
    assert not (out / "small").exists()
    if rows["large"]["status"] == "done":  # it was writing its outputs: finished, and published whole
        assert not (out / ".large.partial").exists()
        assert_same_results(out / "large", reference / "large", "large")
    else:
        assert "interrupted (SIGTERM)" in rows["large"]["reason"] and not (out / "large").exists()
    rerun = run(command(assets, assets["large"], assets["small"], out=out))
    assert rerun.returncode == 0, rerun.stderr
    assert "resume  small:" in rerun.stdout
    for name in ("large", "small"):
        assert_same_results(out / name, reference / name, name)
        assert process_rows(out)[name]["status"] in ("done", "skipped")
    assert not any(p.name.endswith(".partial") for p in out.iterdir())
    print(f"\nSIGTERM with two slides in flight: the first slide {rows['large']['status']}, "
          f"overlap seen from outside: {overlapped}")


@pytest.mark.parametrize("where", ["under_a_file", "proc", "read_only_mount"])
def test_an_unwritable_out_is_refused_in_one_line(where: str, tmp_path: Path, assets: dict[str, Path]) -> None:
    if where == "under_a_file":
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "out"
    elif where == "proc":
        out = Path("/proc/wsi-pipeline-out")
    else:
        mount = tmp_path / "ro"
        mount.mkdir()
        made = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mount)], capture_output=True)
        if made.returncode != 0:
            pytest.skip(f"cannot mount a read-only tmpfs here ({made.stderr.decode().strip()}); needs root")
        out = mount / "out"
    try:
        result = run(command(assets, assets["small"], out=out))
    finally:
        if where == "read_only_mount":
            subprocess.run(["umount", str(tmp_path / "ro")], check=False)
    assert result.returncode == 2
    line = one_line_error(result.stderr)
    assert str(out) in line and "Fix:" in line and "--out" in line


def test_a_corrupt_tile_fails_the_slide_once_without_tracebacks(tmp_path: Path, assets: dict[str, Path]) -> None:
    out = tmp_path / "out"
    result = run(command(assets, assets["corrupt"], assets["small"], out=out, extra=("--retries", "3")))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and "Compute Failed" not in result.stderr, result.stderr
    rows = process_rows(out)
    assert rows["corrupt"]["status"] == "failed" and "corrupt.tif" in rows["corrupt"]["reason"]
    assert "could not be read" in rows["corrupt"]["reason"] and "Fix:" in rows["corrupt"]["reason"]
    assert rows["small"]["status"] == "done"  # the batch went on
    assert not (out / "corrupt").exists() and not (out / ".corrupt.partial").exists()


def test_a_blank_slide_is_done_with_a_warning(tmp_path: Path, assets: dict[str, Path]) -> None:
    out = tmp_path / "out"
    result = run(command(assets, assets["blank"], out=out))
    assert result.returncode == 0
    assert "warning blank: no tissue was found" in result.stderr
    report = json.loads((out / "blank" / "report.json").read_text())
    assert report["nuclei"]["total"] == 0 and any("no tissue" in w for w in report["warnings"])
    assert "no tissue was found" in (out / "blank" / "report.html").read_text()
    batch = json.loads((out / "batch_report.json").read_text())
    assert any("no tissue" in w for w in batch["rows"][0]["warnings"])


def test_cuda_without_a_gpu_is_refused_before_any_work(tmp_path: Path, assets: dict[str, Path]) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    out = tmp_path / "out"
    result = run(command(assets, assets["small"], out=out, extra=("--device", "cuda")), timeout=120)
    assert result.returncode == 2
    line = one_line_error(result.stderr)
    assert "cuda" in line and "no CUDA GPU" in line and "Fix:" in line
    assert not out.exists()  # refused before the out folder or a cluster was made
    evaluate = subprocess.run([sys.executable, "-m", "wsi_pipeline", "evaluate", str(tmp_path), "--device", "cuda",
                               "--model", str(assets["model"])], capture_output=True, text=True, env=ENV, timeout=120)
    assert evaluate.returncode == 2 and "no CUDA GPU" in one_line_error(evaluate.stderr)


def test_a_rerun_skips_and_the_lock_never_blocks(tmp_path: Path, assets: dict[str, Path]) -> None:
    slide = tmp_path / "Mixed-Case.tif"  # names keep their spelling (CMU-1-Small-Region, not cmu-1-...)
    shutil.copy(assets["small"], slide)
    out = tmp_path / "out"
    assert run(command(assets, slide, out=out)).returncode == 0
    assert (out / LOCK_NAME).exists() and not (out / OWNER_NAME).exists()
    again = run(command(assets, slide, out=out))
    assert again.returncode == 0 and statuses(again.stdout) == ["skipped"], again.stdout
    assert sorted(p.name for p in out.iterdir() if p.is_dir() and not p.name.startswith(".")) == ["Mixed-Case"]
