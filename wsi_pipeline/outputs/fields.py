"""What every per-nucleus output says about a nucleus, defined once.

The GeoJSON (QuPath), the GeoParquet table, the OME-Zarr class image and the report all
name the same quantities; they take the names, the class table and the two
confidence measures from here, so a nucleus reads the same in QuPath, in pandas and in
napari.

Two measures of how sure the model was of a nucleus' class, which are easy to confuse:

- the **class vote fraction**: the share of the nucleus' pixels whose most probable class
  is the nucleus' class (HoVer-Net's "type_prob"; the class itself is the majority of
  those votes, :func:`wsi_pipeline.classes.majority_types`). 1.0 means every pixel
  agrees, even if each pixel was only 40% sure;
- the **class mean probability**: the type head's probability of that class averaged
  over the nucleus' pixels: 0.4 for the nucleus above.

Neither is defined for an *untyped* nucleus: the segmentation found it, but the type
head gave none of its pixels a class (every pixel's most probable channel was
background), or the model has no type head. Such a nucleus gets the class
:data:`UNTYPED_NAME` ("nucleus") and no value for either measure (a missing
measurement in QuPath, null in the table), never a 1.0 that looks like certainty.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from wsi_pipeline.nuclei import Nucleus

__all__ = [
    "BACKGROUND_NAME",
    "LOW_CONFIDENCE",
    "UNTYPED_COLOR",
    "UNTYPED_DESCRIPTION",
    "UNTYPED_NAME",
    "class_mean_probability",
    "class_table",
    "class_vote_fraction",
    "column_name",
    "probability_names",
]

UNTYPED_NAME = "nucleus"
UNTYPED_COLOR = (160, 160, 160)
UNTYPED_DESCRIPTION = (
    "a nucleus the segmentation found but the type head did not classify: none of its pixels had a class "
    "more probable than background (or the model has no type head)"
)
BACKGROUND_NAME = "background"
# A typed nucleus whose class mean probability is below this counts as low-confidence
# in the report: the model spread its belief over classes rather than choosing one.
LOW_CONFIDENCE = 0.5


def class_table(classes: Sequence[Mapping[str, Any]]) -> dict[int, dict[str, Any]]:
    """type id -> ``{"name", "color": [r, g, b]}`` for the model's classes plus the
    untyped class at 0; checks the colours, since QuPath refuses a class without one."""
    table: dict[int, dict[str, Any]] = {0: {"name": UNTYPED_NAME, "color": [int(v) for v in UNTYPED_COLOR]}}
    for cls in classes:
        color = [int(v) for v in cls["color"]]
        if len(color) != 3 or not all(0 <= v <= 255 for v in color):
            raise ValueError(f"class {cls['name']!r}: colour must be 3 integers in 0..255, got {cls['color']}")
        table[int(cls["id"])] = {"name": str(cls["name"]), "color": color}
    return table


def probability_names(classes: Sequence[Mapping[str, Any]], channels: int | None = None) -> list[str]:
    """Name of each type-head channel: background, then the classes by id; channels
    beyond the class list (a checkpoint whose list is short) are ``type_<index>``."""
    names = [BACKGROUND_NAME] + [str(c["name"]) for c in sorted(classes, key=lambda c: int(c["id"]))]
    if channels is not None:
        names = names[:channels] + [f"type_{i}" for i in range(len(names), channels)]
    return names


def column_name(name: str) -> str:
    """A class name as a table column suffix that SQL and pandas take unquoted."""
    return re.sub(r"\W+", "_", name.strip().lower()).strip("_") or "unnamed"


def class_vote_fraction(nucleus: Nucleus) -> float | None:
    """Share of the nucleus' pixels voting for its class; None when it has no class."""
    if int(nucleus.type) <= 0 or np.asarray(nucleus.class_probs).size == 0:
        return None
    return float(nucleus.type_prob)


def class_mean_probability(nucleus: Nucleus) -> float | None:
    """The type head's probability of the nucleus' class, averaged over its pixels;
    None when it has no class."""
    probs = np.asarray(nucleus.class_probs).ravel()
    t = int(nucleus.type)
    if t <= 0 or t >= probs.size:
        return None
    return float(probs[t])
