"""Find the slides in a list of files and folders, in a stable order.

Folders are searched recursively for slide extensions. Hidden entries (``.x``, which
includes macOS ``._x.svs`` resource forks that look like slides but are not) and MIRAX
data folders (the folder beside ``x.mrxs`` holding ``Slidedat.ini`` and the ``.dat``
files) are skipped. The order is the inputs' order, and sorted paths within a folder,
so every run sees slides in the same order and output names are stable.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
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


def _path_tag(path: Path) -> str:
    """Eight hex digits of the slide's resolved path: the same slide always gets the same tag."""
    return hashlib.sha256(str(path.resolve()).encode("utf-8")).hexdigest()[:8]


def assign_names(paths: Sequence[Path], owners: Mapping[str, str] | None = None) -> dict[Path, str]:
    """An output folder name per slide, unique and independent of input order.

    ``owners`` maps the names of folders already in the out folder to the resolved slide
    path their done marker records ("" for a folder we did not make). A slide keeps the
    folder that already holds its results; otherwise it gets its stem when no other input
    and no existing folder claims that stem, and ``<stem>-<tag>`` (``tag`` from its resolved
    path) when one does. Case is ignored when comparing, as on macOS and Windows shares.
    """
    existing = dict(owners or {})
    by_owner = {owner: name for name, owner in existing.items() if owner}  # the folder's own spelling
    taken_stems = {name.lower() for name in existing}
    stems: dict[str, int] = {}
    for path in paths:
        stems[slide_stem(path).lower()] = stems.get(slide_stem(path).lower(), 0) + 1
    names: dict[Path, str] = {}
    for path in paths:
        resolved = str(path.resolve())
        if resolved in by_owner:
            names[path] = by_owner[resolved]
            continue
        stem = slide_stem(path)
        taken = stem.lower() in taken_stems
        names[path] = stem if stems[stem.lower()] == 1 and not taken else f"{stem}-{_path_tag(path)}"
    return names
