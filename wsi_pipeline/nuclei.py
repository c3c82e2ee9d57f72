"""The nucleus record, defined once and torch-free, and what a tile sends to the stitcher.

A nucleus is produced by the post-processing (in the pixel grid of the maps it came
from), moved into slide-global level-0 coordinates by the worker, given its global
identity by the stitcher, and consumed by the writers. One type serves all four, so no
stage copies another's fields one by one, and a writer can be tested with records built
straight from post-processing output. It lives here, beside nothing but numpy, so the
stitcher and the writers import without the engine (and torch).

Coordinates follow the pixel-edge convention: pixel (row r, col c) covers x in
[c, c+1], y in [r, r+1]; polygons, centroids and bboxes are (x, y).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

__all__ = ["Nucleus", "TileResult"]


@dataclass
class Nucleus:
    """One nucleus.

    ``label`` is the nucleus' value in the label image it belongs to: the
    post-processing's instance map (1..N in label order), a tile's ``core_labels``
    (its position among the tile's owned nuclei, 1-based), and after stitching the
    slide's label image (global ids 1..N, consecutive, deterministic), which is also
    the ``label_id`` of the writers. ``uuid`` is set by the stitcher: the GeoJSON
    feature id.

    ``polygon`` is an open ring (N, 2) of (x, y) vertices (first point not repeated,
    the writers close it), a valid simple polygon: float32 in the map's pixels as
    traced, float64 once placed in the slide (:meth:`placed`). ``area_px`` counts
    pixels at the inference resolution; ``area_um2`` is the same area in µm², known
    once the nucleus is placed at a resolution. ``type`` is the majority class of its
    pixels (:func:`wsi_pipeline.classes.majority_types`) and ``type_prob`` the
    fraction of pixels of that class (the official definition); without a type
    branch ``type`` is 0, ``type_prob`` the mean NP probability and ``class_probs``
    empty, else ``class_probs`` holds every channel's mean probability, background
    at index 0.
    """

    label: int
    polygon: np.ndarray = field(repr=False)
    centroid: tuple[float, float]
    bbox: tuple[float, float, float, float]
    area_px: int
    type: int
    type_prob: float
    class_probs: np.ndarray = field(repr=False)
    area_um2: float | None = None
    uuid: str | None = None

    def placed(self, x0: float, y0: float, scale_x: float, scale_y: float, mpp: float, label: int) -> Nucleus:
        """This nucleus in level-0 pixels, found in a map whose pixel (0, 0) is target
        pixel ``(x0, y0)`` of a grid with ``scale_x``/``scale_y`` level-0 pixels per
        target pixel, at ``mpp`` µm per target pixel; ``label`` is its new value.

        Exact under the pixel-edge convention: map coordinate x is level-0
        ``(x0 + x) * scale_x``. The arrays are new (float64 polygon, float32 class
        probabilities), so the tile's working arrays can be freed.
        """
        cx, cy = self.centroid
        bx0, by0, bx1, by1 = self.bbox
        return replace(
            self,
            label=int(label),
            polygon=np.column_stack(
                (
                    (x0 + self.polygon[:, 0].astype(np.float64)) * scale_x,
                    (y0 + self.polygon[:, 1].astype(np.float64)) * scale_y,
                )
            ),
            centroid=((x0 + cx) * scale_x, (y0 + cy) * scale_y),
            bbox=((x0 + bx0) * scale_x, (y0 + by0) * scale_y, (x0 + bx1) * scale_x, (y0 + by1) * scale_y),
            area_px=int(self.area_px),
            area_um2=float(self.area_px) * (mpp * mpp),
            type=int(self.type),
            type_prob=float(self.type_prob),
            class_probs=np.asarray(self.class_probs, dtype=np.float32),
        )


@dataclass
class TileResult:
    """What a tile sends back to the stitcher (small next to the tile's working memory).

    ``nuclei``: only the owned ones, placed in level-0 pixels, in a deterministic order
    (the post-processing's label order, which depends only on the read image).
    ``core_labels``: int32 (core.height, core.width) at the inference resolution, value
    ``i + 1`` (= ``nuclei[i].label``) where ``nuclei[i]`` covers the pixel, 0 elsewhere.
    ``spill``: ``(u0, v0, patch)`` pieces of owned nuclei outside the core, top-left
    corner in slide-global target pixels, same values. ``seconds``: {"setup", "read",
    "infer", "postprocess"}; the last includes ownership and the geometry conversions.
    ``engine``: how the maps were computed, e.g. ``"openvino bf16"`` (reports count them).
    ``windows``: (computed, total, reused) network windows meeting the read region: computed
    here, all of them, and those a neighbouring tile computed (the rest lay on glass).
    """

    index: int
    nuclei: list[Nucleus]
    core_labels: np.ndarray
    spill: list[tuple[int, int, np.ndarray]]
    edge_touching: int
    seconds: dict[str, float]
    worker: str
    engine: str = ""
    windows: tuple[int, ...] = (0, 0, 0)
