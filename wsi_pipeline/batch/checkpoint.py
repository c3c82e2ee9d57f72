"""Resume inside a slide: the tiles a killed run completed, kept in its partial folder.

A slide of a few thousand tiles takes hours; a run killed at 90% (SIGKILL, the SIGTERM a
batch system sends at the time limit, a lost node) should not start it again. What is
kept is each tile's result as the worker returned it (:class:`~wsi_pipeline.nuclei.TileResult`:
owned nuclei, core labels, spill pieces), one file per tile in ``PARTIAL/.tiles/``, not a
snapshot of the stitcher and the writers: a gzip stream, Parquet row groups and Zarr
chunks cannot be frozen cheaply at a tile boundary, while tile results are independent of
each other and of the order they arrived in. Replaying them in tile order into a fresh
stitcher rebuilds the writers' state from scratch, so the outputs are the same as an
undisturbed run's (same ids, UUIDs, polygons, labels) and the expensive part, the
workers' reads and inference, is not repeated.

Files, written atomically (:mod:`wsi_pipeline.atomic`: a kill leaves a whole file or
none):

- ``checkpoint.json``: what the results belong to: the slide's identity (resolved path,
  size, mtime, fingerprint), the model checksum, the settings checksum, the tile grid
  and the wsi_pipeline version. A partial folder is resumed only when all of them match
  the run; otherwise it is discarded, and the run says why.
- ``tile-NNNNNN.npz``: one tile's result as plain arrays (``allow_pickle=False``: loading
  a checkpoint never runs code). Small: the labels of one core compress to a few
  hundred KB at most, and the folder is deleted when the slide is published.
"""

from __future__ import annotations

import json
import shutil
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from wsi_pipeline import __version__
from wsi_pipeline.atomic import atomic_path, write_json_atomic
from wsi_pipeline.config import checksum
from wsi_pipeline.nuclei import Nucleus, TileResult
from wsi_pipeline.tiling import Tile

CHECKPOINT_DIR = ".tiles"
STATE_FILE = "checkpoint.json"
FORMAT = 1

__all__ = ["CHECKPOINT_DIR", "TileCheckpoint", "decode_result", "encode_result", "saved_tiles"]


def _tile_file(index: int) -> str:
    return f"tile-{index:06d}.npz"


def encode_result(result: TileResult) -> dict[str, np.ndarray]:
    """A tile result as named arrays (what ``np.savez`` stores), every value exact."""
    nuclei = result.nuclei
    n = len(nuclei)
    meta = {
        "index": int(result.index),
        "edge_touching": int(result.edge_touching),
        "seconds": {k: float(v) for k, v in result.seconds.items()},
        "worker": result.worker,
        "engine": result.engine,
        "windows": list(result.windows),
        "nuclei": n,
        "spill": len(result.spill),
        "uuids": [nucleus.uuid for nucleus in nuclei],
    }
    polygons = [np.asarray(nucleus.polygon) for nucleus in nuclei]
    arrays: dict[str, np.ndarray] = {
        "meta": np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8),
        "core_labels": np.asarray(result.core_labels),
        "label": np.array([nucleus.label for nucleus in nuclei], dtype=np.int64),
        "polygon_offsets": np.cumsum([0] + [len(p) for p in polygons], dtype=np.int64),
        "polygons": np.concatenate(polygons) if polygons else np.zeros((0, 2), np.float64),
        "centroid": np.array([nucleus.centroid for nucleus in nuclei], dtype=np.float64).reshape(n, 2),
        "bbox": np.array([nucleus.bbox for nucleus in nuclei], dtype=np.float64).reshape(n, 4),
        "area_px": np.array([nucleus.area_px for nucleus in nuclei], dtype=np.int64),
        "type": np.array([nucleus.type for nucleus in nuclei], dtype=np.int64),
        "type_prob": np.array([nucleus.type_prob for nucleus in nuclei], dtype=np.float64),
        "area_um2": np.array([np.nan if x.area_um2 is None else x.area_um2 for x in nuclei], dtype=np.float64),
        "area_um2_known": np.array([x.area_um2 is not None for x in nuclei], dtype=bool),
        "class_probs": (np.stack([np.asarray(x.class_probs) for x in nuclei]) if n else np.zeros((0, 0), np.float32)),
        "spill_origin": np.array([(u0, v0) for u0, v0, _ in result.spill], dtype=np.int64).reshape(-1, 2),
    }
    for k, (_, _, patch) in enumerate(result.spill):
        arrays[f"spill_{k}"] = np.asarray(patch)
    return arrays


def decode_result(arrays: Any) -> TileResult:
    """The :class:`TileResult` that :func:`encode_result` stored (``arrays``: an ``NpzFile``
    or a mapping of the same names)."""
    meta = json.loads(bytes(arrays["meta"]).decode("utf-8"))
    offsets = arrays["polygon_offsets"]
    polygons = arrays["polygons"]
    centroid, bbox = arrays["centroid"], arrays["bbox"]
    area_um2, known = arrays["area_um2"], arrays["area_um2_known"]
    class_probs = arrays["class_probs"]
    labels, area_px, types, type_prob = arrays["label"], arrays["area_px"], arrays["type"], arrays["type_prob"]
    nuclei = [
        Nucleus(
            label=int(labels[i]),
            polygon=polygons[offsets[i] : offsets[i + 1]].copy(),
            centroid=(float(centroid[i, 0]), float(centroid[i, 1])),
            bbox=(float(bbox[i, 0]), float(bbox[i, 1]), float(bbox[i, 2]), float(bbox[i, 3])),
            area_px=int(area_px[i]),
            type=int(types[i]),
            type_prob=float(type_prob[i]),
            class_probs=class_probs[i].copy(),
            area_um2=float(area_um2[i]) if known[i] else None,
            uuid=meta["uuids"][i],
        )
        for i in range(int(meta["nuclei"]))
    ]
    origin = arrays["spill_origin"]
    spill = [(int(origin[k, 0]), int(origin[k, 1]), arrays[f"spill_{k}"]) for k in range(int(meta["spill"]))]
    return TileResult(
        index=int(meta["index"]),
        nuclei=nuclei,
        core_labels=arrays["core_labels"],
        spill=spill,
        edge_touching=int(meta["edge_touching"]),
        seconds=dict(meta["seconds"]),
        worker=str(meta["worker"]),
        engine=str(meta["engine"]),
        windows=tuple(int(n) for n in meta.get("windows", ())) + (0, 0, 0)[len(meta.get("windows", ())):],
    )


def grid_checksum(tiles: Sequence[Tile]) -> str:
    """Checksum of the tile grid (indices, cores, read regions, scales)."""
    return checksum([tile.to_dict() for tile in tiles])


def saved_tiles(partial: Path) -> int:
    """How many tile results a partial folder holds (0 when it has no checkpoint)."""
    folder = partial / CHECKPOINT_DIR
    if not (folder / STATE_FILE).is_file():
        return 0
    return sum(1 for _ in folder.glob("tile-*.npz"))


def has_checkpoint(partial: Path) -> bool:
    """Whether a partial folder holds a checkpoint (a slide a later run may resume)."""
    return (partial / CHECKPOINT_DIR / STATE_FILE).is_file()


class TileCheckpoint:
    """The saved tile results of one slide in its partial folder.

    ``key``: what the results belong to (slide identity, model and settings checksums);
    :meth:`open` keeps the folder's results only when its key matches.
    """

    def __init__(self, partial: Path, key: dict[str, Any]) -> None:
        self.partial = partial
        self.folder = partial / CHECKPOINT_DIR
        self.key = {"format": FORMAT, "version": __version__, **key}
        self.indices: set[int] = set()  # tiles with a saved result

    # ---------------------------------------------------------------- opening
    def mismatch(self) -> str | None:
        """Why the partial folder's checkpoint cannot be resumed by this run (None: it can)."""
        try:
            state = json.loads((self.folder / STATE_FILE).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return "it holds no readable checkpoint"
        if not isinstance(state, dict):
            return "it holds no readable checkpoint"
        if state.get("format") != FORMAT or state.get("version") != self.key["version"]:
            return f"it was made by another version of wsi_pipeline ({state.get('version')})"
        old, new = state.get("identity") or {}, self.key["identity"]
        if old.get("path") != new["path"]:
            return f"it belongs to another slide file ({old.get('path')})"
        for field, what in (("size", "size"), ("mtime_ns", "modification time"), ("fingerprint", "content")):
            if old.get(field) != new[field]:
                return f"the slide file's {what} changed since"
        if state.get("model_checksum") != self.key["model_checksum"]:
            return "it was made with another model"
        if state.get("config_checksum") != self.key["config_checksum"]:
            return "it was made with other settings"
        return None

    def resume(self) -> int:
        """Keep the saved tile results and clear everything else of the partial folder
        (half-written outputs: the replay writes them again from the start); returns how
        many tiles are kept. Files that do not read back whole are dropped (recomputed)."""
        for entry in self.partial.iterdir():
            if entry.name == CHECKPOINT_DIR:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        self.indices = set()
        for path in sorted(self.folder.iterdir()):
            if path.name == STATE_FILE:
                continue
            index = _readable_tile(path)
            if index is None:
                path.unlink()  # a temporary file of a killed write, or a damaged one
            else:
                self.indices.add(index)
        return len(self.indices)

    def start(self) -> None:
        """A fresh checkpoint in an empty partial folder."""
        self.folder.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.folder / STATE_FILE, self.key)
        self.indices = set()

    def bind(self, tiles: Sequence[Tile]) -> set[int]:
        """Check the saved results against this run's tile grid; returns the indices of
        the tiles that need no computing. A different grid (it cannot happen with the same
        slide, settings and version, but costs nothing to check) drops them all."""
        grid = grid_checksum(tiles)
        state = json.loads((self.folder / STATE_FILE).read_text(encoding="utf-8"))
        if state.get("grid") not in (None, grid):
            for index in self.indices:
                (self.folder / _tile_file(index)).unlink(missing_ok=True)
            self.indices = set()
        if state.get("grid") != grid:
            write_json_atomic(self.folder / STATE_FILE, {**state, "grid": grid})
        known = {tile.index for tile in tiles}
        self.indices &= known
        return set(self.indices)

    # ---------------------------------------------------------------- tiles
    def save(self, result: TileResult) -> None:
        """Keep one tile's result (atomically: a kill leaves the whole file or none)."""
        path = self.folder / _tile_file(result.index)
        with atomic_path(path) as tmp, tmp.open("wb") as f:
            np.savez_compressed(f, **encode_result(result))
        self.indices.add(result.index)

    def load(self, index: int) -> TileResult:
        """The saved result of tile ``index``."""
        with np.load(self.folder / _tile_file(index), allow_pickle=False) as arrays:
            return decode_result({name: arrays[name] for name in arrays.files})

    def replay(self, tiles: Sequence[Tile]) -> Iterator[TileResult]:
        """The saved results in tile order, read one at a time (memory stays flat)."""
        for tile in tiles:
            if tile.index in self.indices:
                yield self.load(tile.index)

    def remove(self) -> None:
        """Delete the saved results (the slide is complete: they are not outputs)."""
        shutil.rmtree(self.folder, ignore_errors=True)


def _readable_tile(path: Path) -> int | None:
    """The tile index of a saved result that reads back whole (every member's CRC), else None."""
    if not (path.name.startswith("tile-") and path.suffix == ".npz"):
        return None
    try:
        with zipfile.ZipFile(path) as archive:
            if archive.testzip() is not None:
                return None
        with np.load(path, allow_pickle=False) as arrays:
            meta = json.loads(bytes(arrays["meta"]).decode("utf-8"))
    except (OSError, EOFError, zipfile.BadZipFile, ValueError, KeyError):
        return None
    index = meta.get("index") if isinstance(meta, dict) else None
    return int(index) if isinstance(index, int) and _tile_file(index) == path.name else None
