"""Tell a dataset's format from its folder layout.

Checked in order, first match wins:

* ``folder``: ``images/`` + ``labels/*.npz`` (the project's own layout; also how
  /work/shared/data stores MoNuSeg, whose ``annotations/`` are then not needed);
* ``consep_mat``: ``Images/`` + ``Labels/*.mat`` (any case);
* ``pannuke``: ``images.npy`` + ``masks.npy`` at or below the folder;
* ``monuseg_xml``: ``images/`` + ``annotations/*.xml``.
"""

from __future__ import annotations

from pathlib import Path

from wsi_pipeline.errors import DataError

FORMATS = ("folder", "consep_mat", "pannuke", "monuseg_xml")

EXPECTED = (
    "one of: images/ + labels/NAME.npz (folder); Images/ + Labels/NAME.mat (CoNSeP); "
    "images.npy + masks.npy (PanNuke fold); images/ + annotations/NAME.xml (MoNuSeg)"
)


def _subdir(root: Path, name: str) -> Path | None:
    for p in sorted(root.iterdir()):
        if p.is_dir() and p.name.lower() == name:
            return p
    return None


def _has(folder: Path | None, pattern: str) -> bool:
    return folder is not None and any(folder.glob(pattern))


def detect_format(path: str | Path) -> str:
    """The format name of the dataset at ``path``, or DataError listing what was expected."""
    root = Path(path)
    if not root.is_dir():
        raise DataError(root, "is not a folder", "give the dataset's root folder")
    images = _subdir(root, "images")
    labels = _subdir(root, "labels")
    if images is not None and _has(labels, "*.npz"):
        return "folder"
    if images is not None and _has(labels, "*.mat"):
        return "consep_mat"
    if (root / "images.npy").is_file() or any(root.rglob("images.npy")):
        return "pannuke"
    if images is not None and _has(_subdir(root, "annotations"), "*.xml"):
        return "monuseg_xml"
    found = sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir())
    shown = ", ".join(found[:12]) + (" ..." if len(found) > 12 else "") if found else "nothing"
    raise DataError(root, f"is not a dataset folder of a known layout (found {shown})", f"expected {EXPECTED}")
