"""``load_dataset``: one entry point for every supported dataset format."""

from __future__ import annotations

from pathlib import Path

from wsi_pipeline.data.consep_mat import load_consep_mat
from wsi_pipeline.data.dataset import LabelledDataset
from wsi_pipeline.data.detect import FORMATS, detect_format
from wsi_pipeline.data.folder import load_folder
from wsi_pipeline.data.monuseg_xml import load_monuseg_xml
from wsi_pipeline.data.pannuke import load_pannuke
from wsi_pipeline.errors import ConfigError, DataError


def load_dataset(path: str | Path, fmt: str = "auto", *, allow_unpaired: bool = False) -> LabelledDataset:
    """Load the annotated dataset at ``path``.

    ``fmt`` is ``"auto"`` or one of :data:`FORMATS`. Images without labels (or labels
    without images) are an error unless ``allow_unpaired``, which skips them with a
    warning naming each. Label maps of another size than their image, unreadable files
    and a folder of an unknown layout raise :class:`DataError`; empty label maps are
    kept as all-background and listed in ``dataset.empty``.
    """
    root = Path(path)
    if not root.exists():
        raise DataError(root, "does not exist", "give the path of a dataset folder")
    if fmt == "auto":
        fmt = detect_format(root)
    if fmt == "folder":
        return load_folder(root, allow_unpaired)
    if fmt == "consep_mat":
        return load_consep_mat(root, allow_unpaired)
    if fmt == "pannuke":
        return load_pannuke(root)
    if fmt == "monuseg_xml":
        return load_monuseg_xml(root, allow_unpaired)
    raise ConfigError(None, f"unknown dataset format {fmt!r}", f"use 'auto' or one of {', '.join(FORMATS)}")
