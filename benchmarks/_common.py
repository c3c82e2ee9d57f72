"""Helpers shared by the benchmark scripts (run as scripts, so this sits beside them)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def save_json(path: Path | None, summary: dict[str, Any]) -> None:
    """Write a benchmark's summary where ``--json`` asked, creating the folder."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2) + "\n")
