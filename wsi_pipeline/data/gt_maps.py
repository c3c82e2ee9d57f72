"""An engine without a network: NP/HV/TP maps made from ground-truth labels.

Given a labelled region (an instance map, optionally a type map, at the inference
resolution), it serves the maps a perfect HoVer-Net would predict for any window of
it: NP = 1 on nuclei, HV = the training targets' distance maps computed on the window
itself (a nucleus cut by the window gets the HV of its visible part, as a model
looking only at the window would), TP = one-hot classes.

What it is for: checks that must not depend on how good a model is. Pushed through
the post-processing it gives the recipe's upper bound (DESIGN.md: PQ ~0.9 on CoNSeP);
pushed through the tiled pipeline (``process_tile(task, maps_fn=GroundTruthMaps(...))``)
it tells whether tiling and stitching change the result, on real nucleus shapes and
densities, in seconds instead of a model's minutes.

It lives with the datasets, beside the training targets whose HV convention it serves
(:func:`wsi_pipeline.data.targets.hv_map`): the engine only defines the :class:`Maps` it
produces and never depends on the data layer. Not imported by ``wsi_pipeline.data``
itself, because :class:`Maps` comes with the engine (and torch).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from wsi_pipeline.data.targets import hv_map
from wsi_pipeline.engine.infer import Maps

__all__ = ["GroundTruthMaps"]


class GroundTruthMaps:
    """Maps for windows of a labelled region whose pixel (0, 0) is target pixel (0, 0).

    ``inst_map``: (H, W) instance labels, 0 = background. ``type_map``: (H, W) class
    per pixel (0 = background), with ``num_types`` channels including background; the
    maps then carry a TP probability, else ``tp_prob`` is None (a model without a type
    branch). Windows reaching outside the region read as background.
    """

    def __init__(self, inst_map: np.ndarray, type_map: np.ndarray | None = None, num_types: int | None = None) -> None:
        self.inst_map = np.asarray(inst_map)
        if self.inst_map.ndim != 2:
            raise ValueError(f"inst_map must be (H, W), got shape {self.inst_map.shape}")
        if (type_map is None) != (num_types is None):
            raise ValueError("give both type_map and num_types, or neither")
        self.type_map = None if type_map is None else np.asarray(type_map)
        if self.type_map is not None and self.type_map.shape != self.inst_map.shape:
            raise ValueError(f"type_map {self.type_map.shape} does not match inst_map {self.inst_map.shape}")
        if num_types is not None and self.type_map is not None and int(self.type_map.max()) >= num_types:
            raise ValueError(f"type_map holds class {int(self.type_map.max())} but num_types is {num_types}")
        self.num_types = num_types

    def window(self, x0: int, y0: int, x1: int, y1: int) -> Maps:
        """Maps of the window ``[x0, x1) x [y0, y1)`` (target pixels)."""
        inst = _crop(self.inst_map, x0, y0, x1, y1)
        tp_prob = None
        if self.type_map is not None and self.num_types is not None:
            types = _crop(self.type_map, x0, y0, x1, y1)
            tp_prob = np.stack([(types == c) for c in range(self.num_types)]).astype(np.float32)
        return Maps(np_prob=(inst > 0).astype(np.float32), hv=hv_map(inst), tp_prob=tp_prob)

    def __call__(self, rgb: np.ndarray, task: Any) -> Maps:
        """The worker's ``maps_fn`` form: maps of the task's read region (``rgb`` unused)."""
        read = task.tile.read
        return self.window(read.x0, read.y0, read.x1, read.y1)


def _crop(array: np.ndarray, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    """``array[y0:y1, x0:x1]`` with zeros where the window leaves the array."""
    out = np.zeros((y1 - y0, x1 - x0), dtype=array.dtype)
    h, w = array.shape
    cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    if cx1 > cx0 and cy1 > cy0:
        out[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0] = array[cy0:cy1, cx0:cx1]
    return out
