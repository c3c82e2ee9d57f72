"""What a batch is asked to process: slide files, folders and CSV lists -> slide jobs.

Folders are searched recursively (:func:`~wsi_pipeline.slide.discover.find_slides`); CSV
files name slides in a ``path`` column, relative to the CSV (so a CSV travels with its
slides). Every slide gets an output folder name that is unique in the out folder and
*stable*: it depends on the slide and on what the out folder already holds, never on the
order of the inputs, so a rerun with the inputs listed differently finds its outputs again
(see :func:`~wsi_pipeline.slide.discover.assign_names`).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from wsi_pipeline.errors import ConfigError
from wsi_pipeline.slide.discover import assign_names, find_slides
from wsi_pipeline.slide.opener import SUPPORTED_EXTENSIONS, slide_extension


@dataclass(frozen=True)
class SlideJob:
    """One slide to process: its path, its output name, and a problem found before
    processing (a CSV row naming a missing file), which makes it fail at once."""

    path: Path
    name: str
    problem: str | None = None


def _csv_paths(csv_path: Path) -> list[tuple[Path, str | None]]:
    """(path, problem) per row of a CSV's ``path`` column, relative to the CSV's folder."""
    try:
        text = csv_path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(csv_path, f"cannot be read as a UTF-8 CSV ({exc})", "save it as UTF-8 text") from None
    reader = csv.DictReader(text.splitlines())
    columns = {(name or "").strip().lower(): name for name in reader.fieldnames or []}
    if "path" not in columns:
        found = ", ".join(repr(c) for c in reader.fieldnames or []) or "none"
        raise ConfigError(
            csv_path,
            f"has no 'path' column (columns: {found})",
            "add a header row whose column 'path' names the slides",
        )
    rows: list[tuple[Path, str | None]] = []
    for line, row in enumerate(reader, start=2):
        value = (row.get(columns["path"]) or "").strip()
        if not value:
            continue
        path = Path(value).expanduser()
        if not path.is_absolute():
            path = csv_path.parent / path
        problem = None
        if not path.is_file():
            problem = f"{csv_path} line {line}: {path} " + ("is a folder" if path.is_dir() else "does not exist")
        elif slide_extension(path) not in SUPPORTED_EXTENSIONS:
            problem = f"{csv_path} line {line}: {path} has an unsupported extension {slide_extension(path)!r}"
        rows.append((path, problem))
    if not rows:
        raise ConfigError(csv_path, "lists no slides (its 'path' column is empty)", "add one slide path per row")
    return rows


def gather_inputs(inputs: Sequence[str | os.PathLike[str]]) -> list[tuple[Path, str | None]]:
    """(slide path, problem) for every slide ``inputs`` name, deduplicated, in input order.

    A missing or unsupported file named on the command line is an error (a typo is best
    caught before hours of work); one listed in a CSV gets a problem, so it fails alone
    and the rest of the list still runs.
    """
    entries: list[tuple[Path, str | None]] = []
    for item in inputs:
        path = Path(item)
        if path.is_file() and path.suffix.lower() == ".csv":
            entries.extend(_csv_paths(path))
        else:
            entries.extend((slide, None) for slide in find_slides([path]))
    seen: set[Path] = set()
    unique: list[tuple[Path, str | None]] = []
    for path, problem in entries:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            unique.append((path, problem))
    return unique


def name_jobs(entries: Sequence[tuple[Path, str | None]], owners: Mapping[str, str] | None = None) -> list[SlideJob]:
    """Jobs with their output names; ``owners`` describes the out folder (see
    :func:`~wsi_pipeline.slide.discover.assign_names`)."""
    names = assign_names([path for path, _ in entries], owners)
    return [SlideJob(path, names[path], problem) for path, problem in entries]


def collect_jobs(
    inputs: Sequence[str | os.PathLike[str]], owners: Mapping[str, str] | None = None
) -> list[SlideJob]:
    """The slides named by ``inputs`` (files, folders, CSVs) as named jobs, in input order."""
    return name_jobs(gather_inputs(inputs), owners)
