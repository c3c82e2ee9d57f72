"""CoNSeP's release layout: ``Images/NAME.png`` + ``Labels/NAME.mat``.

Each .mat (MATLAB v5, as written by ``scipy.io.savemat``) holds ``inst_map`` and
``type_map``, plus per-instance ``inst_type`` and ``inst_centroid`` that we only use to
rebuild a missing ``type_map``. The release uses 7 classes; HoVer-Net trains on 4 by
merging healthy and dysplastic epithelial (3, 4 -> 3) and fibroblast, muscle and
endothelial (5, 6, 7 -> 4 "spindle-shaped"). A dataset whose type ids exceed 4 is read as
the 7-class release and merged; one within 1..4 is taken as already merged. A
``dataset.json`` beside the folders overrides the classes (then nothing is merged).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import scipy.io

from wsi_pipeline.classes import CONSEP_CLASSES
from wsi_pipeline.data.dataset import DEFAULT_MPP, LabelledDataset, as_label_array, assemble_dataset, highest_type
from wsi_pipeline.data.dataset_json import read_dataset_json
from wsi_pipeline.data.folder import pair_files
from wsi_pipeline.data.images import IMAGE_SUFFIXES
from wsi_pipeline.errors import DataError

log = logging.getLogger(__name__)

FORMAT = "consep_mat"

# raw CoNSeP id -> HoVer-Net 4-class id
_MERGE_7_TO_4 = np.array([0, 1, 2, 3, 3, 4, 4, 4], dtype=np.uint8)


def find_subdir(root: Path, name: str) -> Path | None:
    """``root/name`` matched case-insensitively (the release spells them ``Images``/``Labels``)."""
    for p in sorted(root.iterdir()) if root.is_dir() else []:
        if p.is_dir() and p.name.lower() == name:
            return p
    return None


def read_mat_labels(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """``inst_map`` and ``type_map`` (rebuilt from ``inst_type`` when absent, else None)."""
    try:
        mat = scipy.io.loadmat(path)
    except Exception as exc:  # scipy raises several unrelated types for damaged files
        raise DataError(path, f"cannot be read as a MATLAB .mat file ({exc})", "replace the file") from exc
    keys = sorted(k for k in mat if not k.startswith("__"))
    if "inst_map" not in mat:
        raise DataError(path, f"has no 'inst_map' (found {keys})", "use CoNSeP/HoVer-Net style .mat labels")
    inst = as_label_array(mat["inst_map"], path, "inst_map")
    if "type_map" in mat:
        return inst, as_label_array(mat["type_map"], path, "type_map")
    if "inst_type" in mat:
        inst_type = np.asarray(mat["inst_type"]).reshape(-1)
        top = int(inst.max()) if inst.size else 0
        if inst_type.size < top:
            raise DataError(path, f"inst_type lists {inst_type.size} instances but inst_map has ids up to {top}")
        lut = np.zeros(top + 1, dtype=np.int64)
        lut[1:] = inst_type[:top].astype(np.int64)
        return inst, as_label_array(lut[inst], path, "inst_type")
    return inst, None


def load_consep_mat(root: Path, allow_unpaired: bool = False) -> LabelledDataset:
    """Load a CoNSeP split folder (``Train/`` or ``Test/`` of the release)."""
    image_dir, label_dir = find_subdir(root, "images"), find_subdir(root, "labels")
    if image_dir is None or label_dir is None:
        raise DataError(root, "is not a CoNSeP folder: expected subfolders Images/ (*.png) and Labels/ (*.mat)")
    images = [p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES]
    pairs = pair_files(root, images, label_dir.glob("*.mat"), "Labels/NAME.mat", allow_unpaired)
    meta = read_dataset_json(root)

    raw = [(name, image_path, label_path, *read_mat_labels(label_path)) for name, image_path, label_path in pairs]
    typed = [r for r in raw if r[4] is not None]
    if typed and len(typed) != len(raw):
        raise DataError(root, "some .mat files have types (type_map/inst_type) and others not", "fix the labels")
    has_types = bool(typed)
    classes: list[dict] = []
    merge = False
    if has_types:
        top = highest_type(raw)
        if "classes" in meta:
            classes = meta["classes"]
        elif top <= 4:
            classes = CONSEP_CLASSES
        elif top <= 7:
            classes, merge = CONSEP_CLASSES, True
            log.info("%s: type ids up to %d: merging CoNSeP's 7 classes into HoVer-Net's 4", root, top)
        else:
            raise DataError(
                root,
                f"type ids go up to {top}, more than CoNSeP's 7 classes",
                "add a dataset.json naming the classes",
            )

    if merge:
        raw = [(*record[:4], _MERGE_7_TO_4[record[4]]) for record in raw]
    return assemble_dataset(root, raw, classes, has_types, FORMAT, float(meta.get("mpp", DEFAULT_MPP)))
