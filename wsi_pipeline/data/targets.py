"""HoVer-Net training targets: NP (nucleus pixels), HV (distance maps), TP (classes).

HV follows the official HoVer-Net convention (vqdang/hover_net ``gen_instance_hv_map``),
so that a model trained here sees the same targets as the public checkpoints:

* channel 0 is horizontal (x, along columns), channel 1 vertical (y, along rows);
* inside a nucleus a pixel's value is its offset from the nucleus' centre of mass, which
  is rounded half-up to a pixel, computed as ``index + 1 - round(com)``. The ``+ 1`` is
  the official code's (it numbers box pixels from 1); it moves the zero crossing one
  pixel up/left of the centre, and we keep it deliberately;
* negative and positive offsets are scaled separately, per nucleus and per axis, by the
  largest magnitude on their side, so every nucleus spans [-1, 1] (left/top edge -1,
  right/bottom edge +1); background is 0.

Cropping: the official loader computes HV on the network's input window and then crops the
output window, for instances present in that output window only, so nuclei cut by the
output crop keep their true centre. :func:`make_targets` does the same (``output_size``);
the training dataset calls it on as much context around the window as the image has.
Two official details are not reproduced: ``remove_small_objects(min_size=30)`` on the crop
(it gives small nuclei and small cut fragments HV = 0 while NP = 1, inconsistent targets),
and ``fix_mirror_padding`` (we never mirror-pad labels).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from scipy import ndimage


def np_map(inst_map: np.ndarray) -> np.ndarray:
    """Nucleus-pixel map: 1 inside any nucleus, 0 elsewhere, (H, W) uint8."""
    return (np.asarray(inst_map) > 0).astype(np.uint8)


def _compact_labels(inst_map: np.ndarray) -> np.ndarray:
    """Labels renumbered 1..N when ids are sparse, so find_objects' table stays small."""
    top = int(inst_map.max()) if inst_map.size else 0
    if top < 4096:
        return inst_map
    ids, inverse = np.unique(inst_map, return_inverse=True)
    if ids[0] != 0:
        inverse = inverse + 1
    return inverse.reshape(inst_map.shape).astype(np.int32)


def _scale_signed(v: np.ndarray) -> np.ndarray:
    """Scale negatives by their largest magnitude and positives by their maximum."""
    v = v.astype(np.float32)
    neg = v < 0
    if neg.any():
        v[neg] /= -v[neg].min()
    pos = v > 0
    if pos.any():
        v[pos] /= v[pos].max()
    return v


def hv_map(inst_map: np.ndarray, only_ids: Iterable[int] | None = None) -> np.ndarray:
    """Horizontal and vertical distance maps, (2, H, W) float32 in [-1, 1].

    ``only_ids`` restricts the work to some instances (the ones a crop will keep); the
    others stay 0. Each instance's centre is taken over all its pixels in ``inst_map``.
    """
    inst = np.asarray(inst_map)
    out = np.zeros((2, *inst.shape), dtype=np.float32)
    if not inst.size:
        return out
    if only_ids is not None:
        wanted = np.unique(np.fromiter((int(i) for i in only_ids), dtype=np.int64))
        if not wanted.size:
            return out
        inst = np.where(np.isin(inst, wanted), inst, 0)
    labels = _compact_labels(inst)
    boxes = ndimage.find_objects(labels)
    for k, box in enumerate(boxes, start=1):
        if box is None:
            continue
        mask = labels[box] == k
        rows, cols = np.nonzero(mask)
        # official convention: 1-based index minus the half-up rounded centre of mass
        dx = cols + 1 - int(np.floor(cols.mean() + 0.5))
        dy = rows + 1 - int(np.floor(rows.mean() + 0.5))
        out[0][box][mask] = _scale_signed(dx)
        out[1][box][mask] = _scale_signed(dy)
    return out


def center_crop_box(shape: tuple[int, int], size: int) -> tuple[slice, slice]:
    """Slices of the centred ``size`` x ``size`` window (offset floor((H - size) / 2))."""
    h, w = shape
    if size > h or size > w:
        raise ValueError(f"crop {size} is larger than the map {h}x{w}")
    top, left = (h - size) // 2, (w - size) // 2
    return slice(top, top + size), slice(left, left + size)


def crop_targets(inst_map: np.ndarray, type_map: np.ndarray | None, box: tuple[slice, slice]) -> dict[str, np.ndarray]:
    """NP, HV and TP targets of the window ``box`` of a larger labelled region.

    The HV of every nucleus visible in the window is computed over all of ``inst_map``
    before cropping, so a nucleus cut by the window keeps its real centre. Returns ``np``
    (h, w) int64, ``hv`` (2, h, w) float32 and ``tp`` (h, w) int64 (all zeros when
    ``type_map`` is None: the caller masks the TP loss).
    """
    inst = np.asarray(inst_map)
    inst_c = inst[box]
    visible = np.unique(inst_c)
    hv = hv_map(inst, only_ids=visible[visible > 0])[(slice(None), *box)]
    tp = np.zeros(inst_c.shape, np.int64) if type_map is None else np.asarray(type_map)[box].astype(np.int64)
    return {
        "np": (inst_c > 0).astype(np.int64),
        "hv": np.ascontiguousarray(hv, dtype=np.float32),
        "tp": tp,
    }


def make_targets(
    inst_map: np.ndarray, type_map: np.ndarray | None, output_size: int | None = None
) -> dict[str, np.ndarray]:
    """NP, HV and TP targets of the whole map, or of its centre ``output_size`` crop.

    Same dtypes as :func:`crop_targets`; the centre crop starts at floor((H - size) / 2),
    as HoVer-Net's ``cropping_center``.
    """
    inst = np.asarray(inst_map)
    size = output_size
    box = (slice(None), slice(None)) if size is None else center_crop_box(inst.shape, size)
    return crop_targets(inst, type_map, box)
