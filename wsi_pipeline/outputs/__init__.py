"""Writers of a slide's outputs (GeoJSON, GeoParquet, OME-Zarr) and its reports."""

from __future__ import annotations

import contextlib
import importlib
import threading

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
    """Import :data:`DEFERRED_IMPORTS` (matplotlib with its file-only Agg backend)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    for name in DEFERRED_IMPORTS:
        importlib.import_module(name)


def import_deferred_in_background() -> threading.Thread:
    """Start :func:`import_deferred` in a daemon thread: a run calls it once its cluster is up,
    so the imports happen while the driver mostly waits for tiles, not after the last one.
    A failure there is not reported (the writer that needs the module raises it itself)."""

    def work() -> None:
        with contextlib.suppress(Exception):  # the writer's own import raises it, with its context
            import_deferred()

    thread = threading.Thread(target=work, name="deferred imports", daemon=True)
    thread.start()
    return thread
