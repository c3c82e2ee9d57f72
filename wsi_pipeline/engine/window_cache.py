"""Network windows computed once per process and handed to every tile that needs them.

Tiles overlap by their margins, so a window of the slide-wide grid
(:class:`~wsi_pipeline.engine.infer.WindowGrid`) near a tile border is needed by two or
four tiles. The first tile to need it computes it and leaves here the part the others will
read (the driver says which part and how many readers, :mod:`wsi_pipeline.shares`); each
reader takes its copy and counts itself off, and the last one frees it. A tile that needs a
window another thread of the process is computing waits for it rather than computing it
twice.

Memory: what a tile leaves is only the strips its neighbours read (a few MB per window),
and it is freed by its last reader, so the cache holds about one row of tile borders. A
reader that never comes (its tile ran in another worker process, or was already in a
resumed slide's checkpoint) would keep an entry forever; :data:`MAX_BYTES` bounds that,
dropping the least recently stored entries first. A dropped entry only costs its readers
a recomputation: every copy of a window is the same computation, so results never depend
on what was cached.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass

import numpy as np

__all__ = ["MAX_BYTES", "CachedWindow", "WindowCache", "shared_cache"]

# Bound on the bytes a process keeps for readers still to come (see the module doc).
MAX_BYTES = 1 << 30


@dataclass
class CachedWindow:
    """Maps of part of a window: ``box`` (x0, y0, x1, y1) in slide px at the inference
    µm/px, the arrays that region's NP probability (h, w), HV (2, h, w) and type
    probabilities (C, h, w) or ``None``; ``readers``: tiles still to read it."""

    box: tuple[int, int, int, int]
    np_prob: np.ndarray
    hv: np.ndarray
    tp_prob: np.ndarray | None
    readers: int

    @property
    def nbytes(self) -> int:
        return int(self.np_prob.nbytes + self.hv.nbytes + (0 if self.tp_prob is None else self.tp_prob.nbytes))

    def covers(self, box: tuple[int, int, int, int]) -> bool:
        x0, y0, x1, y1 = self.box
        return x0 <= box[0] and y0 <= box[1] and box[2] <= x1 and box[3] <= y1


class WindowCache:
    """Thread-safe store of shared windows, with claims so that a window is computed once.

    :meth:`acquire` gives one of three answers: the entry (a hit, counted as one read), an
    event (another thread claimed it and is computing it: wait, then acquire again), or
    ``None`` (a miss: the caller now holds the claim and must :meth:`publish` or
    :meth:`abandon` it, whatever happens).
    """

    def __init__(self, max_bytes: int = MAX_BYTES) -> None:
        self.max_bytes = int(max_bytes)
        self._lock = threading.Lock()
        self._entries: OrderedDict[Hashable, CachedWindow] = OrderedDict()
        self._claims: dict[Hashable, threading.Event] = {}
        self.bytes = 0
        self.stats = {"hits": 0, "misses": 0, "stored": 0, "freed": 0, "dropped": 0}

    def acquire(self, key: Hashable) -> CachedWindow | threading.Event | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self.stats["hits"] += 1
                entry.readers -= 1
                if entry.readers <= 0:
                    self._remove(key)
                    self.stats["freed"] += 1
                return entry
            claim = self._claims.get(key)
            if claim is not None:
                return claim
            self._claims[key] = threading.Event()
            self.stats["misses"] += 1
            return None

    def publish(self, key: Hashable, entry: CachedWindow | None) -> None:
        """End the claim on ``key``, leaving ``entry`` for its readers (``None``: nothing to leave)."""
        with self._lock:
            if entry is not None and entry.readers > 0:
                old = self._entries.pop(key, None)
                if old is not None:
                    self.bytes -= old.nbytes
                self._entries[key] = entry
                self.bytes += entry.nbytes
                self.stats["stored"] += 1
                while self.bytes > self.max_bytes and self._entries:
                    oldest = next(iter(self._entries))
                    self._remove(oldest)
                    self.stats["dropped"] += 1
            claim = self._claims.pop(key, None)
        if claim is not None:
            claim.set()

    def abandon(self, key: Hashable) -> None:
        """End a claim without an entry (the computation failed): waiters compute it themselves."""
        self.publish(key, None)

    def _remove(self, key: Hashable) -> None:
        entry = self._entries.pop(key)
        self.bytes -= entry.nbytes

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.bytes = 0
            for key in list(self.stats):
                self.stats[key] = 0


_SHARED = WindowCache()


def shared_cache() -> WindowCache:
    """This process' cache (a Dask worker's task threads share it)."""
    return _SHARED
