"""Test doubles shared by several test modules (importable because pytest puts tests/ on sys.path)."""

from __future__ import annotations

import numpy as np


class ArrayLabels:
    """The ``LabelSink`` protocol on a numpy array, implementing its two documented rules:
    ``write_core`` overwrites, ``merge`` fills only empty pixels.

    Tests compare real sinks (the Zarr store) against it and feed it to the stitcher
    where a plain in-memory label image is all they need.
    """

    def __init__(self, shape: tuple[int, int]) -> None:
        self.array = np.zeros(shape, dtype=np.int32)

    def write_core(self, u0: int, v0: int, labels: np.ndarray) -> None:
        self.array[v0 : v0 + labels.shape[0], u0 : u0 + labels.shape[1]] = labels

    def merge(self, u0: int, v0: int, labels: np.ndarray) -> None:
        region = self.array[v0 : v0 + labels.shape[0], u0 : u0 + labels.shape[1]]
        fill = (labels > 0) & (region == 0)
        region[fill] = labels[fill]
