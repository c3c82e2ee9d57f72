"""Global nuclei from per-tile results: each nucleus once, whole, with a stable id.

The workers have already settled ownership (a nucleus belongs to the tile whose core
holds its centroid, :mod:`wsi_pipeline.worker`), so no nucleus arrives twice and there
is nothing to de-duplicate here. What is left:

* **Deterministic ids.** Results arrive in completion order, which depends on the
  workers. They are applied in tile order instead (a reorder buffer holds the ones
  that arrive early), so the nuclei of tile k get the ids following those of tile
  k - 1, in the tile's own order: ids 1..N are the same for any worker count or
  schedule. The UUID is derived from the slide, the model and the id.
* **Whole nuclei in the label image.** A tile writes its core (a full overwrite of
  that region, chunk-friendly) plus the parts of its nuclei that stick out into a
  neighbour's core. Those *spill* pieces only fill pixels still empty, and only once
  the neighbour's core has been written (else the neighbour's overwrite would erase
  them); pieces for a region no tile processes (no tissue) are merged at once.

Memory: the stitcher holds the results that arrived ahead of their turn and the spill
pieces waiting for a neighbour (thin strips), never a slide-sized array.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Protocol

import numpy as np

from wsi_pipeline.nuclei import Nucleus, TileResult
from wsi_pipeline.tiling import Tile

__all__ = [
    "NUCLEUS_NAMESPACE",
    "LabelSink",
    "NucleusSink",
    "StitchStats",
    "Stitcher",
    "nucleus_uuid",
]

# Namespace of the nucleus UUIDs (uuid5): fixed forever, so a rerun gives the same ids.
NUCLEUS_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://github.com/wsi-pipeline/nucleus")


def nucleus_uuid(slide_name: str, model_checksum: str, nucleus_id: int) -> str:
    """The nucleus' UUID: the same slide, model and id always give the same one."""
    return str(uuid.uuid5(NUCLEUS_NAMESPACE, f"{slide_name}:{model_checksum}:{nucleus_id}"))


class LabelSink(Protocol):
    """Where the slide's instance labels go (the OME-Zarr store): target pixels."""

    def write_core(self, u0: int, v0: int, labels: np.ndarray) -> None:
        """Overwrite the region at (u0, v0) with ``labels`` (a tile core)."""
        ...

    def merge(self, u0: int, v0: int, labels: np.ndarray) -> None:
        """Set the pixels where ``labels > 0`` and the stored value is 0."""
        ...


class NucleusSink(Protocol):
    """Where nucleus records go (GeoJSON writer, Zarr table)."""

    def add(self, nucleus: Nucleus) -> None:
        """Take one stitched nucleus: ``label`` is its global id, ``uuid`` set."""
        ...


@dataclass
class StitchStats:
    """Totals of one slide.

    ``per_type``: nucleus count per type id. ``seconds``: summed tile stages (read,
    infer, postprocess: worker time, which overlaps between workers) plus the
    stitcher's own (stitch: remapping and bookkeeping; write: time inside the sinks).
    ``tile_seconds``: each tile's read + infer + postprocess, in tile order.
    ``workers``: tiles done per worker.
    """

    nuclei: int = 0
    per_type: dict[int, int] = field(default_factory=dict)
    edge_touching: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    tiles: int = 0
    tile_seconds: list[float] = field(default_factory=list)
    workers: dict[str, int] = field(default_factory=dict)
    engines: dict[str, int] = field(default_factory=dict)
    windows: dict[str, int] = field(default_factory=lambda: {"computed": 0, "total": 0, "reused": 0})

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["per_type"] = {str(k): v for k, v in sorted(self.per_type.items())}
        return out


class Stitcher:
    """Turns :class:`TileResult` objects, in any order, into global nuclei and labels.

    ``tiles``: the slide's tiles (the grid :func:`wsi_pipeline.tiling.tile_grid` made,
    in its order); ids follow this order. ``labels``: the label image, or None to skip
    it. ``sinks``: receive every nucleus in id order, as a :class:`~wsi_pipeline.nuclei.Nucleus`
    whose ``label`` is its global id (its value in the label image) and ``uuid`` its
    feature id.
    """

    def __init__(
        self,
        tiles: Sequence[Tile],
        labels: LabelSink | None,
        sinks: Sequence[NucleusSink],
        slide_name: str,
        model_checksum: str,
    ) -> None:
        self._tiles = list(tiles)
        self._labels = labels
        self._sinks = list(sinks)
        self._slide_name = slide_name
        self._model_checksum = model_checksum
        self._position = {t.index: pos for pos, t in enumerate(self._tiles)}
        if len(self._position) != len(self._tiles):
            raise ValueError("tiles must have distinct indices")
        self._cells = {(t.row, t.col): pos for pos, t in enumerate(self._tiles)}
        self._step = _grid_step(self._tiles)
        self._next = 0  # position of the next tile to apply
        self._early: dict[int, TileResult] = {}  # position -> result waiting for its turn
        self._pending: dict[int, list[tuple[int, int, np.ndarray]]] = {}  # position -> spill pieces
        self._next_id = 1
        self._stats = StitchStats(
            seconds={"setup": 0.0, "read": 0.0, "infer": 0.0, "postprocess": 0.0, "stitch": 0.0, "write": 0.0}
        )

    @property
    def buffered(self) -> int:
        """Results received but not yet applied (waiting for an earlier tile)."""
        return len(self._early)

    @property
    def done(self) -> int:
        """Tiles applied so far."""
        return self._next

    def add(self, result: TileResult) -> None:
        """Take one tile's result; applies it and any results it unblocks."""
        pos = self._position.get(result.index)
        if pos is None:
            raise ValueError(f"result for tile {result.index}, which is not one of this slide's tiles")
        if pos < self._next or pos in self._early:
            raise ValueError(f"a second result for tile {result.index}")
        tile = self._tiles[pos]
        if result.core_labels.shape != (tile.core.height, tile.core.width):
            raise ValueError(
                f"tile {result.index}: core labels {result.core_labels.shape} for a "
                f"{tile.core.height}x{tile.core.width} core"
            )
        self._early[pos] = result
        while self._next in self._early:
            self._apply(self._next, self._early.pop(self._next))
            self._next += 1

    def finish(self) -> StitchStats:
        """Check that every tile was applied and return the totals."""
        if self._next < len(self._tiles):
            missing = [t.index for t in self._tiles[self._next :] if self._position[t.index] not in self._early]
            raise RuntimeError(
                f"stitching {self._slide_name}: no result for {len(missing)} tile(s) "
                f"(first: {missing[:5]}); {len(self._early)} result(s) wait behind them"
            )
        return self._stats

    # ------------------------------------------------------------------ internals
    def _apply(self, pos: int, result: TileResult) -> None:
        started = time.perf_counter()
        write = 0.0
        tile = self._tiles[pos]
        offset = self._next_id - 1  # tile-local value k becomes global id offset + k
        count = len(result.nuclei)
        if offset + count >= np.iinfo(np.int32).max:
            raise OverflowError("more nuclei than an int32 label image can hold")

        if self._labels is not None:
            core = _to_global(result.core_labels, offset)
            t0 = time.perf_counter()
            self._labels.write_core(tile.core.x0, tile.core.y0, core)
            for u0, v0, piece in self._pending.pop(pos, ()):
                self._labels.merge(u0, v0, piece)
            write += time.perf_counter() - t0
            for u0, v0, patch in result.spill:
                for cu, cv, piece, target in self._split(u0, v0, _to_global(patch, offset)):
                    if target is not None and target > pos:
                        self._pending.setdefault(target, []).append((cu, cv, piece))
                    else:  # that core is written already, or no tile will ever write it
                        t0 = time.perf_counter()
                        self._labels.merge(cu, cv, piece)
                        write += time.perf_counter() - t0

        stats = self._stats
        for k, nucleus in enumerate(result.nuclei, start=1):
            nucleus_id = offset + k
            record = replace(
                nucleus, label=nucleus_id, uuid=nucleus_uuid(self._slide_name, self._model_checksum, nucleus_id)
            )
            t0 = time.perf_counter()
            for sink in self._sinks:
                sink.add(record)
            write += time.perf_counter() - t0
            stats.per_type[nucleus.type] = stats.per_type.get(nucleus.type, 0) + 1
        self._next_id += count

        stats.nuclei += count
        stats.tiles += 1
        stats.edge_touching += result.edge_touching
        stats.workers[result.worker] = stats.workers.get(result.worker, 0) + 1
        if result.engine:
            stats.engines[result.engine] = stats.engines.get(result.engine, 0) + 1
        stats.windows["computed"] += int(result.windows[0])
        stats.windows["total"] += int(result.windows[1])
        stats.windows["reused"] += int(result.windows[2])  # checkpoints of old runs are padded on load
        for stage in ("setup", "read", "infer", "postprocess"):
            stats.seconds[stage] += float(result.seconds.get(stage, 0.0))
        stats.tile_seconds.append(sum(float(result.seconds.get(s, 0.0)) for s in ("read", "infer", "postprocess")))
        stats.seconds["write"] += write
        stats.seconds["stitch"] += time.perf_counter() - started - write

    def _split(self, u0: int, v0: int, patch: np.ndarray) -> list[tuple[int, int, np.ndarray, int | None]]:
        """Cut a spill patch along the core grid: (u0, v0, piece, target tile position or None)."""
        height, width = patch.shape
        step = self._step
        pieces = []
        for row in range(v0 // step, (v0 + height - 1) // step + 1):
            for col in range(u0 // step, (u0 + width - 1) // step + 1):
                y0, y1 = max(row * step, v0), min((row + 1) * step, v0 + height)
                x0, x1 = max(col * step, u0), min((col + 1) * step, u0 + width)
                piece = patch[y0 - v0 : y1 - v0, x0 - u0 : x1 - u0]
                if piece.any():
                    pieces.append((x0, y0, piece, self._cells.get((row, col))))
        return pieces


def _to_global(labels: np.ndarray, offset: int) -> np.ndarray:
    """Tile-local values 1..n -> global ids offset+1..offset+n; 0 stays 0."""
    labels = np.asarray(labels, dtype=np.int32)
    return np.where(labels > 0, labels + np.int32(offset), np.int32(0)).astype(np.int32, copy=False)


def _grid_step(tiles: Sequence[Tile]) -> int:
    """The grid's core size, recovered from the tiles (core.x0 = col * step)."""
    for tile in tiles:
        if tile.col:
            return tile.core.x0 // tile.col
        if tile.row:
            return tile.core.y0 // tile.row
    # Only tile (0, 0), or none: the slide fits in one core, any step covers it.
    return max((max(t.core.width, t.core.height) for t in tiles), default=1)
