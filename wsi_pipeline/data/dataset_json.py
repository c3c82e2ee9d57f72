"""A folder dataset's own description, ``dataset.json``: its class list and µm/px.

The class tables themselves (CoNSeP, PanNuke, generic names and colours) live in
:mod:`wsi_pipeline.classes`, which the engine and the writers share; this module only
reads and checks what a user wrote, so a typo is reported against the file that holds it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from wsi_pipeline.classes import class_color
from wsi_pipeline.errors import DataError


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
        color = entry.get("color", class_color(cid))
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
