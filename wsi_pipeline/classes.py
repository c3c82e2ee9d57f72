"""Nucleus classes: the known class tables, their colours, and the one rule for a nucleus' class.

Low in the stack (numpy only) because three layers need the same answers: the engine
names the classes of a checkpoint without any (``engine.weights``), the datasets label
their type maps with them (``data``), and the writers colour them. A class list is
``[{"id": int, "name": str, "color": (r, g, b)}, ...]`` holding the *foreground* classes
only: ids 1..K match the values of type maps, id 0 (background / no class) is never
listed, so a model for K classes has ``K + 1`` type channels. Colours are fixed per
table so that every output (GeoJSON for QuPath, overlays) shows a class in one colour.

:func:`majority_types` is the single definition of a nucleus' class from its pixels,
shared by the post-processing (predicted nuclei), the datasets (split and sampler
class counts) and the metrics (ground truth and predictions), so that a nucleus counted
as "epithelial" when the data is split is scored as "epithelial" too.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = [
    "default_classes",
    "CONSEP_CLASSES",
    "PANNUKE_CLASSES",
    "class_color",
    "generic_classes",
    "majority_types",
]

# HoVer-Net's 4-class CoNSeP convention (the raw 7 CoNSeP labels merged: 3+4 -> 3, 5+6+7 -> 4).
CONSEP_CLASSES: list[dict[str, Any]] = [
    {"id": 1, "name": "other", "color": (255, 165, 0)},
    {"id": 2, "name": "inflammatory", "color": (255, 0, 0)},
    {"id": 3, "name": "epithelial", "color": (0, 200, 0)},
    {"id": 4, "name": "spindle-shaped", "color": (0, 90, 255)},
]

# PanNuke's mask channels 0..4 in order; type id = channel + 1. Colours follow HoVer-Net's
# PanNuke type_info so our overlays look like the official ones.
PANNUKE_CLASSES: list[dict[str, Any]] = [
    {"id": 1, "name": "neoplastic", "color": (255, 0, 0)},
    {"id": 2, "name": "inflammatory", "color": (0, 255, 0)},
    {"id": 3, "name": "connective", "color": (0, 0, 255)},
    {"id": 4, "name": "dead", "color": (255, 255, 0)},
    {"id": 5, "name": "epithelial", "color": (255, 165, 0)},
]

# Distinct colours for classes that come without one.
_PALETTE = [
    (230, 25, 75),
    (60, 180, 75),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 190),
    (0, 128, 128),
]


def class_color(class_id: int) -> tuple[int, int, int]:
    """The palette colour of a class that names none: the same id always gets the same colour."""
    return _PALETTE[(class_id - 1) % len(_PALETTE)]


def generic_classes(num: int) -> list[dict[str, Any]]:
    """Classes ``type_1..type_num`` with palette colours, for type maps without names."""
    return [{"id": i, "name": f"type_{i}", "color": class_color(i)} for i in range(1, num + 1)]


def majority_types(
    labels: np.ndarray,
    types: np.ndarray,
    *,
    num_labels: int | None = None,
    num_types: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Each instance's class by majority vote of its pixels (HoVer-Net's convention).

    The class of a nucleus is the most frequent *non-background* type among its pixels,
    ties going to the lowest type id; background (0) only when none of its pixels is
    typed. Background votes are ignored because a type map's outline is often drawn a
    little tighter than the instance (or a model's type branch is less sure at a
    nucleus' rim): a nucleus two-thirds "background" and one-third "epithelial" is an
    epithelial nucleus, not an untyped one.

    ``labels``: instance ids per pixel (any shape, 0 = no nucleus); ``types``: the type
    per pixel, same shape, non-negative. ``num_labels``/``num_types`` size the output
    (default: the largest value + 1) so callers can index by label directly.

    Returns ``(majority, votes)``, both of length ``num_labels`` and indexed by label
    (entry 0 and labels without pixels: type 0, 0 votes): the class of each instance
    and how many of its pixels have that class, from which a caller derives the
    fraction of agreeing pixels (the post-processing's ``type_prob``).
    """
    labels = np.asarray(labels).ravel()
    types = np.asarray(types).ravel()
    if labels.shape != types.shape:
        raise ValueError(f"labels ({labels.size} px) and types ({types.size} px) differ in size")
    inside = labels > 0
    lab = labels[inside].astype(np.int64)
    typ = types[inside].astype(np.int64)
    if typ.size and typ.min() < 0:
        raise ValueError("types hold negative values")
    n_labels = int(num_labels) if num_labels is not None else (int(lab.max()) + 1 if lab.size else 1)
    n_types = int(num_types) if num_types is not None else (int(typ.max()) + 1 if typ.size else 1)
    n_types = max(n_types, 1)
    counts = np.bincount(lab * n_types + typ, minlength=n_labels * n_types).reshape(n_labels, n_types)
    foreground = counts[:, 1:]
    if foreground.shape[1] == 0:
        majority = np.zeros(n_labels, dtype=np.int64)
    else:
        majority = np.where(foreground.max(axis=1) > 0, np.argmax(foreground, axis=1) + 1, 0).astype(np.int64)
    votes = np.where(counts.sum(axis=1) > 0, counts[np.arange(n_labels), majority], 0)
    return majority, votes.astype(np.int64)


def default_classes(num_types: int | None) -> list[dict[str, Any]]:
    """Foreground classes (ids 1..K; channel 0 is background) for a checkpoint without names.

    6 type channels are the public PanNuke models, 5 the CoNSeP ones (HoVer-Net's
    4-class convention); other counts get generic names.
    """
    if num_types is None or num_types < 2:
        return []
    known = {6: PANNUKE_CLASSES, 5: CONSEP_CLASSES}
    classes = known.get(num_types) or generic_classes(num_types - 1)
    return [{"id": int(c["id"]), "name": str(c["name"]), "color": [int(v) for v in c["color"]]} for c in classes]
