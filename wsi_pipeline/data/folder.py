"""The project's own dataset layout: ``images/NAME.ext`` + ``labels/NAME.npz``.

Each ``.npz`` holds ``inst_map`` (0 background, 1..N nuclei) and optionally ``type_map``
(class ids). An optional ``dataset.json`` beside the two folders names the classes and
µm/px; without it, type maps whose ids stay within 1..4 are read with HoVer-Net's CoNSeP
convention (other, inflammatory, epithelial, spindle-shaped), which is how
/work/shared/data/consep is stored.
"""

from __future__ import annotations

import logging
import zipfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from wsi_pipeline.classes import CONSEP_CLASSES, generic_classes
from wsi_pipeline.data.dataset import DEFAULT_MPP, LabelledDataset, as_label_array, assemble_dataset, highest_type
from wsi_pipeline.data.dataset_json import read_dataset_json
from wsi_pipeline.data.images import IMAGE_SUFFIXES
from wsi_pipeline.errors import DataError

log = logging.getLogger(__name__)

FORMAT = "folder"


def pair_files(
    root: Path, images: Iterable[Path], labels: Iterable[Path], label_dir: str, allow_unpaired: bool
) -> list[tuple[str, Path, Path]]:
    """Match images to labels by file stem.

    Unmatched files are an error by default (a half-copied dataset should not train
    quietly on what is left); with ``allow_unpaired`` they are skipped and every skipped
    name is logged.
    """
    by_stem: dict[str, Path] = {}
    for p in sorted(images):
        if p.stem in by_stem:
            raise DataError(
                root, f"two images share the name {p.stem!r}: {by_stem[p.stem].name} and {p.name}", "keep one"
            )
        by_stem[p.stem] = p
    label_by_stem = {p.stem: p for p in sorted(labels)}
    no_label = sorted(set(by_stem) - set(label_by_stem))
    no_image = sorted(set(label_by_stem) - set(by_stem))
    pairs = [(stem, by_stem[stem], label_by_stem[stem]) for stem in sorted(set(by_stem) & set(label_by_stem))]
    if not pairs:
        raise DataError(
            root,
            f"no image has a label: expected images/NAME{{{','.join(IMAGE_SUFFIXES)}}} with a matching "
            f"{label_dir}/NAME file (found {len(by_stem)} images, {len(label_by_stem)} labels)",
            "check the folder layout and that image and label names match",
        )
    for what, names in (("images without a label", no_label), ("labels without an image", no_image)):
        if not names:
            continue
        shown = ", ".join(names[:10]) + (" ..." if len(names) > 10 else "")
        if not allow_unpaired:
            raise DataError(
                root,
                f"{len(names)} {what}: {shown}",
                "add the missing files, remove the strays, or load with allow_unpaired=True to skip them",
            )
        log.warning("%s: skipping %d %s: %s", root, len(names), what, shown)
    return pairs


def read_npz_labels(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """``inst_map`` and optional ``type_map`` from one label file."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            keys = list(npz.keys())
            if "inst_map" not in keys:
                raise DataError(path, f"has no 'inst_map' array (found {keys})", "save inst_map=... in the .npz")
            inst = as_label_array(npz["inst_map"], path, "inst_map")
            types = as_label_array(npz["type_map"], path, "type_map") if "type_map" in keys else None
    except DataError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise DataError(path, f"cannot be read as .npz ({exc})", "replace the file") from exc
    return inst, types


def load_folder(root: Path, allow_unpaired: bool = False) -> LabelledDataset:
    """Load ``root/images`` + ``root/labels`` into memory (these datasets are small)."""
    image_dir, label_dir = root / "images", root / "labels"
    if not image_dir.is_dir() or not label_dir.is_dir():
        raise DataError(root, "is not a folder dataset: expected subfolders images/ and labels/")
    images = [p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES]
    labels = list(label_dir.glob("*.npz"))
    pairs = pair_files(root, images, labels, "labels/NAME.npz", allow_unpaired)
    meta = read_dataset_json(root)

    raw = [(name, image_path, label_path, *read_npz_labels(label_path)) for name, image_path, label_path in pairs]
    with_types = [r[0] for r in raw if r[4] is not None]
    if with_types and len(with_types) != len(raw):
        missing = [r[0] for r in raw if r[4] is None]
        raise DataError(
            root,
            f"{len(with_types)} label files have a type_map and {len(missing)} do not (e.g. {', '.join(missing[:5])})",
            "give every label file a type_map, or none",
        )
    has_types = bool(with_types)
    classes: list[dict] = []
    if has_types:
        top = highest_type(raw)
        if "classes" in meta:
            classes = meta["classes"]
        elif top <= len(CONSEP_CLASSES):
            classes = CONSEP_CLASSES
            log.info("%s: no dataset.json; reading type ids 1..4 as CoNSeP's classes", root)
        else:
            classes = generic_classes(top)
            log.warning("%s: no dataset.json naming the %d classes; calling them type_1..type_%d", root, top, top)

    return assemble_dataset(root, raw, classes, has_types, FORMAT, float(meta.get("mpp", DEFAULT_MPP)))
