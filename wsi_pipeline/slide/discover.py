"""Find the slides in a list of files and folders, in a stable order.

Folders are searched recursively for slide extensions. Hidden entries (``.x``, which
includes macOS ``._x.svs`` resource forks that look like slides but are not) and MIRAX
data folders (the folder beside ``x.mrxs`` holding ``Slidedat.ini`` and the ``.dat``
files) are skipped. The order is the inputs' order, and sorted paths within a folder,
so every run sees slides in the same order and output names are stable.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from wsi_pipeline.errors import SlideError
from wsi_pipeline.slide.opener import (
    IMAGE_EXTENSIONS,
    SLIDE_EXTENSIONS,
    SUPPORTED_EXTENSIONS,
    slide_extension,
    slide_stem,
)


def is_mrxs_data_folder(folder: Path) -> bool:
    """A MIRAX data folder: holds Slidedat.ini, or sits beside a same-named .mrxs."""
    if (folder / "Slidedat.ini").is_file():
        return True
    return any(folder.with_name(folder.name + ext).is_file() for ext in (".mrxs", ".MRXS"))


def _walk(folder: Path, extensions: tuple[str, ...]) -> Iterator[Path]:
    for root, dirs, files in os.walk(folder):
        root_path = Path(root)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not is_mrxs_data_folder(root_path / d))
        for name in sorted(files):
            if not name.startswith(".") and slide_extension(name) in extensions:
                yield root_path / name


def find_slides(inputs: Sequence[str | os.PathLike[str]], *, include_images: bool = False) -> list[Path]:
    """Slides named by ``inputs`` (files or folders), deduplicated, in a stable order.

    Folders contribute their slide files (.svs .ndpi .mrxs .scn .vms .vmu .bif .tif
    .tiff, plus .png/.jpg/.jpeg with ``include_images``), sorted by path. A file named
    explicitly must have a supported extension.

    Raises:
        SlideError: for a missing input, an explicit file of an unsupported type, or a
            folder without slides.
    """
    extensions = SLIDE_EXTENSIONS + (IMAGE_EXTENSIONS if include_images else ())
    found: list[Path] = []
    seen: set[Path] = set()
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            in_folder = list(_walk(path, extensions))
            if not in_folder:
                raise SlideError(
                    path,
                    "contains no slide files",
                    f"slides must end in one of: {' '.join(extensions)} (hidden files and MIRAX data "
                    "folders are skipped)",
                )
            candidates: Iterable[Path] = in_folder
        elif path.is_file():
            if slide_extension(path) not in SUPPORTED_EXTENSIONS:
                raise SlideError(
                    path,
                    f"has an unsupported extension {slide_extension(path)!r}",
                    f"supported: {' '.join(SUPPORTED_EXTENSIONS)}",
                )
            candidates = [path]
        else:
            raise SlideError(path, "does not exist", f"check the path (relative paths start from {Path.cwd()})")
        for candidate in candidates:
            key = candidate.resolve()
            if key not in seen:
                seen.add(key)
                found.append(candidate)
    return found


def output_names(slides: Sequence[Path]) -> dict[Path, str]:
    """A distinct output folder name per slide: its stem, with ``-2``, ``-3``... added
    in input order when two slides share a stem (a/x.svs and b/x.svs)."""
    names: dict[Path, str] = {}
    used: set[str] = set()
    for slide in slides:
        stem = slide_stem(slide)
        name, n = stem, 1
        while name.lower() in used:
            n += 1
            name = f"{stem}-{n}"
        used.add(name.lower())
        names[slide] = name
    return names
