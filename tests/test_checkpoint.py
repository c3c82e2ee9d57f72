"""Per-tile checkpoints (resume inside a slide): exact round trip, replay equals a fresh
stitch, and a checkpoint is only ever resumed by the slide, model and settings it belongs to.

The tile results are real: a small pyramid cut from the sample slide, processed tile by
tile by the worker with a tiny random HoVer-Net (whose NP bias makes it find nuclei), in
this process; the label sink is the array double of tests/_helpers.py.
"""

from __future__ import annotations

import os
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
from _helpers import ArrayLabels, plumbing_model

from wsi_pipeline.batch.checkpoint import CHECKPOINT_DIR, TileCheckpoint, has_checkpoint, saved_tiles
from wsi_pipeline.batch.marker import slide_identity
from wsi_pipeline.nuclei import TileResult
from wsi_pipeline.slide import open_slide
from wsi_pipeline.slide.base import SlideSpec
from wsi_pipeline.slide.pyramid import write_pyramid
from wsi_pipeline.stitch import Stitcher
from wsi_pipeline.tiling import target_size, tile_grid
from wsi_pipeline.worker import TileTask, clear_caches, process_tile

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "sample_slides" / "CMU-1-Small-Region-pyramid.tif"


class Collect:
    """A nucleus sink keeping every record, to compare two stitches."""

    def __init__(self) -> None:
        self.nuclei: list = []

    def add(self, nucleus) -> None:
        self.nuclei.append(nucleus)


@pytest.fixture(scope="module")
def tiles_and_results(tmp_path_factory: pytest.TempPathFactory):
    """A 492 px slide, its 9 tiles of 164 px (margin 24) and their real worker results."""
    import torch

    folder = tmp_path_factory.mktemp("checkpoint_assets")
    with open_slide(SAMPLE) as source:
        write_pyramid(source, folder / "s.tif", region=(1000, 1000, 492, 492))
    model = plumbing_model(folder / "tiny.safetensors", folder / "s.tif")
    spec = SlideSpec(str(folder / "s.tif"))
    with spec.open() as slide:
        size = (slide.width, slide.height, (slide.mpp_x, slide.mpp_y))
    tiles = tile_grid(size[0], size[1], size[2], 0.25, 164, 24)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = [process_tile(TileTask(spec, tile, str(model), 0.25)) for tile in tiles]
    finally:
        torch.set_num_threads(threads)
        clear_caches()
    shape = target_size(size[0], size[1], size[2], 0.25)[::-1]
    return folder / "s.tif", tiles, results, shape


def assert_same_result(a: TileResult, b: TileResult) -> None:
    assert (a.index, a.edge_touching, a.seconds, a.worker, a.engine) == (
        b.index, b.edge_touching, b.seconds, b.worker, b.engine)
    np.testing.assert_array_equal(a.core_labels, b.core_labels)
    assert a.core_labels.dtype == b.core_labels.dtype
    assert len(a.spill) == len(b.spill)
    for (u0, v0, p), (u1, v1, q) in zip(a.spill, b.spill, strict=True):
        assert (u0, v0) == (u1, v1) and p.dtype == q.dtype
        np.testing.assert_array_equal(p, q)
    assert len(a.nuclei) == len(b.nuclei)
    for x, y in zip(a.nuclei, b.nuclei, strict=True):
        for f in fields(x):
            left, right = getattr(x, f.name), getattr(y, f.name)
            if isinstance(left, np.ndarray):
                assert left.dtype == right.dtype, f.name
                np.testing.assert_array_equal(left, right)
            else:
                assert left == right and type(left) is type(right), f.name


def key(path: Path, **changes: str) -> dict:
    return {"identity": slide_identity(path), "model_checksum": "m" * 64, "config_checksum": "c" * 64} | changes


def test_a_saved_tile_result_reads_back_exactly(tmp_path: Path, tiles_and_results) -> None:
    slide, tiles, results, _ = tiles_and_results
    assert sum(len(r.nuclei) for r in results) > 0 and any(r.spill for r in results)
    empty = TileResult(index=99, nuclei=[], core_labels=np.zeros((4, 4), np.int32), spill=[], edge_touching=0,
                       seconds={}, worker="w")
    checkpoint = TileCheckpoint(tmp_path / ".s.partial", key(slide))
    checkpoint.start()
    for result in [*results, empty]:
        checkpoint.save(result)
    for result in [*results, empty]:
        assert_same_result(checkpoint.load(result.index), result)
    assert saved_tiles(tmp_path / ".s.partial") == len(results) + 1


def test_replayed_results_stitch_like_fresh_ones(tmp_path: Path, tiles_and_results) -> None:
    slide, tiles, results, shape = tiles_and_results

    def stitch(feed) -> tuple[ArrayLabels, Collect]:
        labels, sink = ArrayLabels(shape), Collect()
        stitcher = Stitcher(tiles, labels, [sink], "s", "m" * 64)
        for result in feed:
            stitcher.add(result)
        stitcher.finish()
        return labels, sink

    checkpoint = TileCheckpoint(tmp_path / ".s.partial", key(slide))
    checkpoint.start()
    assert checkpoint.bind(tiles) == set()
    for result in results[::2] + results[5:6]:  # a killed run's files: a prefix of sorts, with gaps
        checkpoint.save(result)
    again = TileCheckpoint(tmp_path / ".s.partial", key(slide))
    assert again.mismatch() is None and again.resume() == 6
    saved = again.bind(tiles)
    fresh_labels, fresh = stitch(reversed(results))  # completion order does not matter
    mixed_labels, mixed = stitch(list(again.replay(tiles)) + [r for r in results if r.index not in saved])
    np.testing.assert_array_equal(fresh_labels.array, mixed_labels.array)
    assert [(n.label, n.uuid, n.centroid, n.area_um2) for n in fresh.nuclei] == [
        (n.label, n.uuid, n.centroid, n.area_um2) for n in mixed.nuclei]
    for x, y in zip(fresh.nuclei, mixed.nuclei, strict=True):
        np.testing.assert_array_equal(x.polygon, y.polygon)


def test_a_checkpoint_resumes_only_for_its_slide_model_and_settings(tmp_path: Path, tiles_and_results) -> None:
    slide, tiles, results, _ = tiles_and_results
    partial = tmp_path / ".s.partial"
    first = TileCheckpoint(partial, key(slide))
    first.start()
    first.bind(tiles)
    first.save(results[0])
    (partial / "s.geojson.gz").write_bytes(b"half written")
    assert has_checkpoint(partial)
    assert TileCheckpoint(partial, key(slide, model_checksum="x" * 64)).mismatch() == "it was made with another model"
    assert TileCheckpoint(partial, key(slide, config_checksum="x")).mismatch() == "it was made with other settings"
    other = tmp_path / "other.tif"
    other.write_bytes(slide.read_bytes())
    assert "another slide file" in TileCheckpoint(partial, key(other)).mismatch()
    moved = key(slide)
    os.utime(slide, ns=(slide.stat().st_atime_ns, slide.stat().st_mtime_ns + 10**9))
    try:
        assert TileCheckpoint(partial, key(slide)).mismatch() == "the slide file's modification time changed since"
    finally:
        os.utime(slide, ns=(slide.stat().st_atime_ns, moved["identity"]["mtime_ns"]))
    same = TileCheckpoint(partial, key(slide))
    assert same.mismatch() is None
    assert same.resume() == 1 and sorted(p.name for p in partial.iterdir()) == [CHECKPOINT_DIR]  # outputs cleared


def test_damaged_or_half_written_tile_files_are_recomputed(tmp_path: Path, tiles_and_results) -> None:
    slide, tiles, results, _ = tiles_and_results
    partial = tmp_path / ".s.partial"
    checkpoint = TileCheckpoint(partial, key(slide))
    checkpoint.start()
    for result in results[:3]:
        checkpoint.save(result)
    folder = partial / CHECKPOINT_DIR
    a, b, c = (folder / f"tile-{r.index:06d}.npz" for r in results[:3])
    data = b.read_bytes()
    b.write_bytes(data[: len(data) // 2])  # cut short (a lost node's unwritten page cache)
    (folder / f".{c.name}.123.tmp").write_bytes(data)  # a write the kill interrupted
    again = TileCheckpoint(partial, key(slide))
    assert again.resume() == 2 and again.bind(tiles) == {results[0].index, results[2].index}
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint.json", a.name, c.name]
