"""PanNuke folds: ``images.npy`` (N, 256, 256, 3) and ``masks.npy`` (N, 256, 256, 6).

Mask channels 0..4 are instance maps of neoplastic, inflammatory, connective, dead and
epithelial nuclei; channel 5 is background. Type id = channel + 1. Instance ids are
renumbered 1..N per image across channels (PanNuke reuses ids between channels).

Both the flat layout (the two files in one folder) and the release layout
(``Fold 1/images/fold1/images.npy`` with ``Fold 1/masks/fold1/masks.npy``) are found,
for every fold under the given folder. A fold is several GB as float64, so the arrays
are memory-mapped and each sample is decoded when indexed (:class:`LazySamples`).
The *fold* is each sample's source: PanNuke does not say which slide a patch came from,
and the folds are its intended split unit.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np

from wsi_pipeline.classes import PANNUKE_CLASSES
from wsi_pipeline.data.dataset import DEFAULT_MPP, LabelledDataset, LazySamples, Sample
from wsi_pipeline.errors import DataError

log = logging.getLogger(__name__)

FORMAT = "pannuke"
_NUM_CLASSES = len(PANNUKE_CLASSES)


def find_folds(root: Path) -> list[tuple[str, Path, Path]]:
    """(fold name, images.npy, masks.npy) for every fold at or below ``root``."""
    folds = []
    for images in sorted(root.rglob("images.npy")):
        flat = images.with_name("masks.npy")
        nested = Path(*["masks" if part == "images" else part for part in images.parent.parts]) / "masks.npy"
        masks = flat if flat.is_file() else nested
        if not masks.is_file():
            raise DataError(images, "has no masks.npy beside it (or under the matching masks/ folder)")
        label = images.parent.name if images.parent != root else root.name
        folds.append((re.sub(r"[^A-Za-z0-9]+", "", label.lower()) or "fold", images, masks))
    names = [f[0] for f in folds]
    if len(set(names)) != len(names):
        folds = [(f"{name}_{k}", i, m) for k, (name, i, m) in enumerate(folds)]
    return folds


def masks_to_maps(masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(inst_map int32, type_map uint8) from one (H, W, C) PanNuke mask, classes = C - 1 channels."""
    h, w, c = masks.shape
    inst = np.zeros((h, w), dtype=np.int32)
    types = np.zeros((h, w), dtype=np.uint8)
    next_id = 1
    for ch in range(c - 1):
        layer = np.asarray(masks[..., ch])
        ids = np.unique(layer)
        ids = ids[ids > 0]
        if not ids.size:
            continue
        lut = np.zeros(int(ids.max()) + 1, dtype=np.int32)
        lut[ids.astype(np.int64)] = np.arange(next_id, next_id + ids.size, dtype=np.int32)
        fg = layer > 0
        inst[fg] = lut[layer[fg].astype(np.int64)]
        types[fg] = ch + 1
        next_id += ids.size
    return inst, types


def _open(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DataError(path, f"cannot be read as a .npy array ({exc})", "replace the file") from exc


def load_pannuke(root: Path) -> LabelledDataset:
    """Every fold under ``root`` as one lazily decoded dataset."""
    folds = find_folds(root)
    if not folds:
        raise DataError(root, "is not a PanNuke folder: expected images.npy and masks.npy (in any subfolder)")
    names, sources, shapes, where = [], [], [], []
    arrays = []
    for fold, images_path, masks_path in folds:
        images, masks = _open(images_path), _open(masks_path)
        if images.ndim != 4 or images.shape[-1] != 3:
            raise DataError(images_path, f"has shape {images.shape}, expected (N, H, W, 3)")
        if masks.ndim != 4 or masks.shape[-1] != _NUM_CLASSES + 1:
            raise DataError(masks_path, f"has shape {masks.shape}, expected (N, H, W, {_NUM_CLASSES + 1})")
        if masks.shape[:3] != images.shape[:3]:
            raise DataError(masks_path, f"masks {masks.shape[:3]} do not match images {images.shape[:3]} (N, H, W)")
        k = len(arrays)
        arrays.append((images, masks, images_path))
        for i in range(images.shape[0]):
            names.append(f"{fold}_{i:05d}")
            sources.append(f"pannuke:{fold}")
            shapes.append(images.shape[1:3])
            where.append((k, i))

    def build(index: int) -> Sample:
        k, i = where[index]
        images, masks, images_path = arrays[k]
        pixels = np.asarray(images[i])
        if pixels.dtype != np.uint8:
            if pixels.size and (pixels.min() < 0 or pixels.max() > 255):
                raise DataError(images_path, f"image {i} has values outside 0..255")
            pixels = np.round(pixels).astype(np.uint8)
        inst, types = masks_to_maps(np.asarray(masks[i]))
        return Sample(name=names[index], source=sources[index], image=pixels, inst_map=inst, type_map=types)

    samples = LazySamples(names, sources, shapes, build)
    empty = _empty_names(arrays, names)
    return LabelledDataset(
        samples=samples,
        classes=list(PANNUKE_CLASSES),
        has_types=True,
        format=FORMAT,
        mpp=DEFAULT_MPP,
        root=root,
        empty=empty,
    )


def _empty_names(arrays: list[tuple[np.ndarray, np.ndarray, Path]], names: list[str]) -> list[str]:
    """Names of images without any nucleus, read in chunks from the memory-mapped masks."""
    empty, offset = [], 0
    for _, masks, _ in arrays:
        n = masks.shape[0]
        for start in range(0, n, 64):
            chunk = np.asarray(masks[start : start + 64, ..., :_NUM_CLASSES])
            has = chunk.reshape(chunk.shape[0], -1).max(axis=1) > 0
            empty.extend(names[offset + start + j] for j in np.flatnonzero(~has))
        offset += n
    if empty:
        log.warning("%d PanNuke image(s) have no nucleus (kept as all-background)", len(empty))
    return empty
