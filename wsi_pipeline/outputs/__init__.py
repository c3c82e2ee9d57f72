"""Writers of a slide's outputs (GeoJSON, GeoParquet, OME-Zarr) and its reports."""

from __future__ import annotations

import importlib

# Libraries the writers and the report import only when they first need them (so that other
# commands start fast), which in a run is after the slide's last tile: about 1 s of imports
# on the critical path of every run's tail (pyplot 0.4-0.5 s, pyarrow.dataset 0.3 s, the
# OME-Zarr models 0.2 s, measured with py-spy on a sample slide).
DEFERRED_IMPORTS = (
    "matplotlib.pyplot",
    "PIL.PngImagePlugin",
    "pyarrow.dataset",
    "ome_zarr_models.common.omero",
    "ome_zarr_models.v05.axes",
    "ome_zarr_models.v05.image",
    "ome_zarr_models.v05.image_label",
    "ome_zarr_models.v05.image_label_types",
    "ome_zarr_models.v05.labels",
    "ome_zarr_models.v05.multiscales",
)


def import_deferred() -> None:
    """Import :data:`DEFERRED_IMPORTS` (matplotlib with its file-only Agg backend).

    A run calls it in the driver's main thread once the workers' warm-up is submitted: the
    imports then overlap the workers' model compilation, not the tail after the last tile.
    Never from a thread beside the slides' own: two threads importing one package at once
    can fail inside importlib (``KeyError: 'ome_zarr_models'``, one run in four of the sample
    svs when this ran in a background thread).
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    for name in DEFERRED_IMPORTS:
        importlib.import_module(name)

