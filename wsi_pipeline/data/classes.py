"""Nucleus class names and colours that travel with a dataset.

A class list is ``[{"id": int, "name": str, "color": (r, g, b)}, ...]`` holding the
*foreground* classes only: ids 1..K match the values of the dataset's type maps, and
id 0 (background / no class) is never listed. A model trained on the dataset therefore
has ``len(classes) + 1`` type channels. Colours are fixed per dataset so that every
output (GeoJSON for QuPath, overlays) shows the same class in the same colour.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from wsi_pipeline.errors import DataError

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

# Distinct colours for datasets that name their classes without colours.
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


def generic_classes(num: int) -> list[dict[str, Any]]:
    """Classes ``type_1..type_num`` with palette colours, for type maps without names."""
    return [{"id": i, "name": f"type_{i}", "color": _PALETTE[(i - 1) % len(_PALETTE)]} for i in range(1, num + 1)]


def validate_classes(raw: Any, source: Path) -> list[dict[str, Any]]:
    """Check a user-given class list and normalise it (ids 1..K in order, RGB tuples).

    Raises DataError naming ``source`` when the list has the wrong shape, so a typo in a
    dataset.json is caught at load time rather than as a wrong colour in QuPath.
    """
    fix = 'give "classes" as [{"id": 1, "name": "...", "color": [r, g, b]}, ...] with ids 1..K'
    if not isinstance(raw, list) or not raw:
        raise DataError(source, "classes must be a non-empty list", fix)
    out = []
    for entry in raw:
        if not isinstance(entry, dict) or not {"id", "name"} <= entry.keys():
            raise DataError(source, f"class entry {entry!r} lacks id or name", fix)
        cid = entry["id"]
        if not isinstance(cid, int) or cid < 1:
            raise DataError(source, f"class id {cid!r} must be an integer >= 1 (0 is background)", fix)
        color = entry.get("color", _PALETTE[(cid - 1) % len(_PALETTE)])
        if not (isinstance(color, list | tuple) and len(color) == 3 and all(0 <= int(c) <= 255 for c in color)):
            raise DataError(source, f"class {entry['name']!r} has colour {color!r}, not [r, g, b] in 0..255", fix)
        out.append({"id": cid, "name": str(entry["name"]), "color": tuple(int(c) for c in color)})
    out.sort(key=lambda c: c["id"])
    if [c["id"] for c in out] != list(range(1, len(out) + 1)):
        raise DataError(source, f"class ids {[c['id'] for c in out]} are not 1..{len(out)}", fix)
    return out


def read_dataset_json(root: Path) -> dict[str, Any]:
    """The optional ``dataset.json`` of a folder dataset (classes, mpp), or {} when absent."""
    path = root / "dataset.json"
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(path, f"cannot be read as JSON ({exc})", "fix the JSON syntax or remove the file") from exc
    if not isinstance(meta, dict):
        raise DataError(path, "must hold a JSON object", 'write {"classes": [...], "mpp": 0.25}')
    if "classes" in meta:
        meta["classes"] = validate_classes(meta["classes"], path)
    if "mpp" in meta and not (isinstance(meta["mpp"], int | float) and meta["mpp"] > 0):
        raise DataError(path, f"mpp {meta['mpp']!r} is not a positive number", "give µm per pixel, e.g. 0.25")
    return meta
