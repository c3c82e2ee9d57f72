"""Batch behaviour of `wsi-pipeline run`: inputs, skip when done, failures recorded, resume.

Every run goes to a real ``dask scheduler`` + ``dask worker`` started as subprocesses on
127.0.0.1 for the module (``--scheduler`` / ``DASK_SCHEDULER_ADDRESS``), with a small
randomly initialised HoVer-Net and a 492 px crop of the pyramid sample slide (about the
smallest the tissue detector keeps), with 164 px tiles and no margin so each tile is one
patch: the batch logic, not the model, is under test here.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from _helpers import assert_same_results, plumbing_model

from wsi_pipeline.batch import (
    DONE_MARKER,
    LOCK_NAME,
    PROCESS_LIST,
    collect_jobs,
    default_tile_size,
    partial_dir,
    run_batch,
    zarr_chunk,
)
from wsi_pipeline.batch.checkpoint import saved_tiles
from wsi_pipeline.cli import main
from wsi_pipeline.config import SCHEDULER_ENV, RunConfig
from wsi_pipeline.errors import ConfigError, SlideError
from wsi_pipeline.slide import open_slide
from wsi_pipeline.slide.pyramid import write_pyramid

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "sample_slides" / "CMU-1-Small-Region-pyramid.tif"
DASK = Path(sys.executable).with_name("dask")
START_TIMEOUT_S = 60


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 492 x 492 px slide at 0.25 µm/px (epithelium of the sample) and a model for it."""
    folder = tmp_path_factory.mktemp("batch_assets")
    with open_slide(SAMPLE) as source:
        write_pyramid(source, folder / "good.tif", region=(1000, 1000, 492, 492))
    return {"model": plumbing_model(folder / "tiny.safetensors", folder / "good.tif"), "slide": folder / "good.tif"}


def stop(process: subprocess.Popen) -> None:
    """Stop a process we started, with the children of its session (the worker's nanny
    runs the worker in a child process)."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=15)


@pytest.fixture(scope="module")
def scheduler(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``dask scheduler`` + one single-threaded ``dask worker`` on 127.0.0.1, as
    subprocesses (the commands a user runs on a cluster); stopped after the module."""
    if not DASK.is_file():
        pytest.skip(f"the dask command is not installed beside {sys.executable}")
    folder = tmp_path_factory.mktemp("dask")
    scheduler_file = folder / "scheduler.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    common = {"cwd": folder, "env": env, "start_new_session": True, "stdout": subprocess.DEVNULL}
    processes = [
        subprocess.Popen(
            [str(DASK), "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard"]
            + ["--scheduler-file", str(scheduler_file)],
            stderr=(folder / "scheduler.log").open("w"),
            **common,
        )
    ]
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not scheduler_file.is_file() or not scheduler_file.read_text().strip():
            if processes[0].poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"dask scheduler did not start: {(folder / 'scheduler.log').read_text()[-2000:]}")
            time.sleep(0.2)
        address = json.loads(scheduler_file.read_text())["address"]
        processes.append(
            subprocess.Popen(
                [str(DASK), "worker", address, "--nthreads", "1", "--nworkers", "1", "--no-dashboard"]
                + ["--host", "127.0.0.1", "--memory-limit", "0", "--death-timeout", "60"],
                stderr=(folder / "worker.log").open("w"),
                **common,
            )
        )
        yield address
    finally:
        for process in reversed(processes):
            stop(process)


def config(assets: dict[str, Path], scheduler: str, **options) -> RunConfig:
    settings = {"model": str(assets["model"]), "tile_size": 164, "margin": 0, "scheduler": scheduler, "progress": False}
    return RunConfig(**(settings | options))


def slide_folder(tmp_path: Path, assets: dict[str, Path]) -> Path:
    """A folder with a good slide and a corrupt one (the good file cut in half)."""
    folder = tmp_path / "slides"
    folder.mkdir()
    shutil.copy(assets["slide"], folder / "good.tif")
    data = assets["slide"].read_bytes()
    (folder / "bad.tif").write_bytes(data[: len(data) // 2])
    return folder


def rows(out: Path) -> dict[str, dict[str, str]]:
    with (out / PROCESS_LIST).open(newline="") as f:
        return {Path(row["path"]).name: row for row in csv.DictReader(f)}


def hidden(out: Path) -> list[str]:
    """Hidden entries besides the out-folder lock (which stays, unlocked, between runs)."""
    return sorted(p.name for p in out.iterdir() if p.name.startswith(".") and p.name != LOCK_NAME)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory: pytest.TempPathFactory, assets: dict[str, Path], scheduler: str):
    """One batch over a folder holding a good and a corrupt slide; tests copy its output."""
    folder = slide_folder(tmp_path_factory.mktemp("first_run"), assets)
    out = folder.parent / "out"
    return folder, out, run_batch([folder], out, config(assets, scheduler)), assets["model"]


def copy_of(first_run, tmp_path: Path) -> tuple[Path, Path]:
    """The first run's slide folder and a copy of its out folder (a slide's path is part of
    its identity, so the slides stay where they were)."""
    folder, out, _, _ = first_run
    shutil.copytree(out, tmp_path / "out")
    return folder, tmp_path / "out"


def test_bad_slide_fails_with_a_reason_and_the_batch_goes_on(first_run) -> None:
    _, out, summary, _ = first_run
    assert summary.exit_code == 1
    by_name = {o.name: o for o in summary.outcomes}
    assert by_name["good"].status == "done" and by_name["good"].nuclei > 0
    assert by_name["bad"].status == "failed"
    assert "bad.tif" in by_name["bad"].reason and "Fix:" in by_name["bad"].reason
    listed = rows(out)
    assert list(listed["bad.tif"])[:5] == ["path", "status", "reason", "seconds", "nuclei"]
    assert listed["good.tif"]["status"] == "done" and int(listed["good.tif"]["nuclei"]) == by_name["good"].nuclei
    assert listed["bad.tif"]["status"] == "failed" and listed["bad.tif"]["reason"] == by_name["bad"].reason
    assert (out / "good" / "good.geojson.gz").is_file() and (out / "good" / "report.json").is_file()
    assert not (out / "bad").exists() and hidden(out) == []
    batch = json.loads((out / "batch_report.json").read_text())
    assert (batch["done"], batch["failed"], batch["skipped"], batch["ok"]) == (1, 1, 0, False)


def test_rerun_skips_the_done_slide(first_run, tmp_path: Path, assets: dict[str, Path], scheduler: str) -> None:
    folder, out = copy_of(first_run, tmp_path)
    nuclei = {o.name: o.nuclei for o in first_run[2].outcomes}["good"]
    marker = (out / "good" / DONE_MARKER).read_text()
    again = run_batch([folder], out, config(assets, scheduler, workers=3))  # scheduling options do not matter
    by_name = {o.name: o for o in again.outcomes}
    assert by_name["good"].status == "skipped" and by_name["good"].nuclei == nuclei
    assert by_name["bad"].status == "failed" and again.exit_code == 1
    assert (out / "good" / DONE_MARKER).read_text() == marker  # not redone
    assert rows(out)["good.tif"]["status"] == "skipped"
    assert run_batch([folder / "good.tif"], out, config(assets, scheduler)).exit_code == 0  # all done or skipped


def test_other_settings_keep_the_outputs_until_overwrite(
    first_run, tmp_path: Path, assets: dict[str, Path], scheduler: str
) -> None:
    folder, out = copy_of(first_run, tmp_path)
    changed = run_batch([folder / "good.tif"], out, config(assets, scheduler, tile_size=328))
    assert changed.exit_code == 1
    assert "other settings" in changed.outcomes[0].reason and "--overwrite" in changed.outcomes[0].reason
    before = json.loads((out / "good" / DONE_MARKER).read_text())
    # A run killed outright leaves its hidden partial folder behind: the next run replaces it.
    stale = partial_dir(out, "good")
    (stale / "good.zarr").mkdir(parents=True)
    redone = run_batch([folder / "good.tif"], out, config(assets, scheduler, tile_size=328, overwrite=True))
    assert redone.exit_code == 0 and redone.outcomes[0].status == "done"
    after = json.loads((out / "good" / DONE_MARKER).read_text())
    assert after["config_checksum"] != before["config_checksum"]
    assert after["model_checksum"] == before["model_checksum"]
    report = json.loads((out / "good" / "report.json").read_text())
    assert report["tiles"]["tile_size"] == 328 and report["tiles"]["processed"] == 4
    assert hidden(out) == []


class Interrupt(KeyboardInterrupt):
    pass


def test_an_interrupted_slide_leaves_nothing_visible(tmp_path: Path, assets: dict[str, Path], scheduler: str) -> None:
    out = tmp_path / "out"

    def stop(_result) -> None:
        raise Interrupt

    with pytest.raises(Interrupt):
        run_batch([assets["slide"]], out, config(assets, scheduler), on_tile=stop)
    visible = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    assert visible == ["batch_report.json", "process_list.csv"]
    assert hidden(out) == [".good.partial"]  # the tile it completed, for the rerun to resume
    listed = rows(out)[assets["slide"].name]
    assert listed["status"] == "failed" and "interrupted" in listed["reason"]
    assert "its 1 completed tile(s) are kept, and a rerun resumes from them" in listed["reason"]


def interrupted_after(out: Path, slide: Path, tiles: int, settings: RunConfig) -> None:
    """Run the batch and interrupt it (as Ctrl-C would) once ``tiles`` tiles are stitched."""
    seen: list[int] = []

    def stop(result) -> None:
        seen.append(result.index)
        if len(seen) == tiles:
            raise Interrupt

    with pytest.raises(Interrupt):
        run_batch([slide], out, settings, on_tile=stop)
    assert saved_tiles(partial_dir(out, slide.stem)) == tiles


def test_an_interrupted_slide_resumes_from_its_completed_tiles(
    first_run, tmp_path: Path, assets: dict[str, Path], scheduler: str
) -> None:
    slide, out = first_run[0] / "good.tif", tmp_path / "out"
    interrupted_after(out, slide, 4, config(assets, scheduler))
    said: list[str] = []
    again = run_batch([slide], out, config(assets, scheduler), on_start=lambda job, why: said.append(why))
    assert said == ["resumed: 4 tile(s) completed by an interrupted run are reused"]
    outcome = again.outcomes[0]
    assert outcome.status == "done" and outcome.reason == "resumed: 4 of 9 tiles from an interrupted run"
    assert_same_results(out / "good", first_run[1] / "good", "good")  # same ids, polygons, labels
    report = json.loads((out / "good" / "report.json").read_text())
    assert report["tiles"]["resumed"] == 4 and report["tiles"]["processed"] == 9
    assert hidden(out) == [] and not (out / "good" / ".tiles").exists()  # the checkpoint goes with publishing
    assert rows(out)["good.tif"]["status"] == "done"


def test_partial_results_of_a_changed_slide_are_discarded_saying_so(
    first_run, tmp_path: Path, assets: dict[str, Path], scheduler: str
) -> None:
    slide, out = tmp_path / "good.tif", tmp_path / "out"
    shutil.copy(first_run[0] / "good.tif", slide)
    interrupted_after(out, slide, 2, config(assets, scheduler))
    os.utime(slide, ns=(slide.stat().st_atime_ns, slide.stat().st_mtime_ns + 10**9))  # re-scanned, say
    said: list[str] = []
    again = run_batch([slide], out, config(assets, scheduler), on_start=lambda job, why: said.append(why))
    assert said == [f"discarded: the partial results in {partial_dir(out, 'good')} are not reused: "
                    "the slide file's modification time changed since"]
    assert again.outcomes[0].status == "done" and again.outcomes[0].reason == ""
    assert json.loads((out / "good" / "report.json").read_text())["tiles"]["resumed"] == 0
    assert_same_results(out / "good", first_run[1] / "good", "good")


@pytest.mark.parametrize("in_flight", [2, 1])
def test_the_next_slide_starts_while_the_previous_one_finishes(
    first_run, tmp_path: Path, assets: dict[str, Path], scheduler: str, in_flight: int
) -> None:
    """Two slides in flight: the second slide's tiles reach its stitcher before the first
    slide is recorded done (its last tiles, outputs and report overlap with them); with
    --slides-in-flight 1 they never do. Outputs are the same either way."""
    folder = tmp_path / "slides"
    folder.mkdir()
    for name in ("a", "b"):
        shutil.copy(first_run[0] / "good.tif", folder / f"{name}.tif")
    events: list[tuple[str, str]] = []
    lock = threading.Lock()

    def tile(_result) -> None:  # called in the slide's own thread
        with lock:
            events.append(("tile", threading.current_thread().name.removeprefix("slide ")))

    def slide(outcome) -> None:
        with lock:
            events.append(("done", outcome.name))

    out = tmp_path / "out"
    summary = run_batch([folder], out, config(assets, scheduler, slides_in_flight=in_flight), on_tile=tile,
                        on_slide=slide)
    assert [o.status for o in summary.outcomes] == ["done", "done"]
    first_b_tile, a_done = events.index(("tile", "b")), events.index(("done", "a"))
    assert (first_b_tile < a_done) == (in_flight == 2), events
    assert events.count(("tile", "a")) == events.count(("tile", "b")) == 9
    assert hidden(out) == [] and sorted(rows(out)) == ["a.tif", "b.tif"]
    assert all(row["status"] == "done" for row in rows(out).values())
    nuclei = {o.name: o.nuclei for o in first_run[2].outcomes}["good"]
    assert [o.nuclei for o in summary.outcomes] == [nuclei, nuclei]  # the same pixels as "good"


def test_csv_rows_relative_to_the_csv_and_missing_files(tmp_path: Path, assets: dict[str, Path]) -> None:
    folder = tmp_path / "cohort"
    (folder / "slides").mkdir(parents=True)
    shutil.copy(assets["slide"], folder / "slides" / "good.tif")
    (folder / "notes.txt").write_text("x")
    listing = folder / "cohort.csv"
    listing.write_text("case,Path\nA,slides/good.tif\nB,slides/missing.svs\nC,notes.txt\n,\n")
    jobs = collect_jobs([listing])
    assert [(j.path, j.name) for j in jobs] == [
        (folder / "slides" / "good.tif", "good"),
        (folder / "slides" / "missing.svs", "missing"),
        (folder / "notes.txt", "notes"),
    ]
    assert jobs[0].problem is None
    assert (
        jobs[1].problem is not None and "cohort.csv line 3" in jobs[1].problem and "does not exist" in jobs[1].problem
    )
    assert jobs[2].problem is not None and "unsupported extension '.txt'" in jobs[2].problem


def test_collect_jobs_names_and_errors(tmp_path: Path, assets: dict[str, Path]) -> None:
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        shutil.copy(assets["slide"], tmp_path / sub / "x.tif")
    jobs = collect_jobs([tmp_path / "a", tmp_path / "b", tmp_path / "a" / "x.tif"])  # the last one is a duplicate
    assert [j.path.parent.name for j in jobs] == ["a", "b"]
    assert jobs[0].name != jobs[1].name and all(j.name.startswith("x-") for j in jobs)  # same stem: both tagged
    assert [j.name for j in collect_jobs([tmp_path / "b", tmp_path / "a"])] == [jobs[1].name, jobs[0].name]
    (tmp_path / "list.csv").write_text("slide\nx.tif\n")
    with pytest.raises(ConfigError, match=r"list.csv: has no 'path' column \(columns: 'slide'\)"):
        collect_jobs([tmp_path / "list.csv"])
    with pytest.raises(SlideError, match="nothing.svs: does not exist"):
        collect_jobs([tmp_path / "nothing.svs"])


def test_derived_tile_and_chunk_sizes() -> None:
    from wsi_pipeline.batch.plan import DEFAULT_TILE_PX

    assert default_tile_size() % 8 == 0 and abs(default_tile_size() - DEFAULT_TILE_PX) < 8  # on the stride grid
    assert zarr_chunk(1312) == 656 and zarr_chunk(164) == 164 and zarr_chunk(2048) == 1024


def test_cli_with_scheduler_option_or_environment(
    first_run, tmp_path: Path, scheduler: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    _, out = copy_of(first_run, tmp_path)
    argv = ["run", str(first_run[0] / "good.tif"), "--out", str(out), "--model", str(first_run[3])]
    argv += ["--tile-size", "164", "--margin", "0", "--no-progress", "--overwrite"]
    assert main([*argv, "--scheduler", scheduler]) == 0
    assert f"scheduler {scheduler}" in capsys.readouterr().out
    report = json.loads((out / "good" / "report.json").read_text())
    assert report["nuclei"]["total"] > 0 and report["tiles"]["processed"] == 9
    assert report["config"]["cluster"] == f"scheduler {scheduler}"

    monkeypatch.setenv(SCHEDULER_ENV, scheduler)
    assert main(argv[:-1]) == 0  # without --overwrite: done already, so skipped
    printed = capsys.readouterr().out
    assert "skipped good" in printed and f"scheduler {scheduler}" in printed
