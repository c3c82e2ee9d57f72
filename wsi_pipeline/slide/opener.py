"""``open_slide``: pick a backend by extension, check the file, explain failures.

Vendor formats go to openslide first (it knows their quirks), TIFFs to tiffslide
first (it also reads untiled TIFFs that openslide refuses), each with the other as a
fallback. Before any backend sees the file we check the things users actually get
wrong (a wrong path, a folder, an empty or truncated copy, a web page saved as .svs)
so that the error names the problem instead of a C library's "unsupported format".
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from wsi_pipeline.errors import ConfigError, SlideError
from wsi_pipeline.slide.base import Slide

VENDOR_EXTENSIONS = (".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif")
TIFF_EXTENSIONS = (".tif", ".tiff")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
SLIDE_EXTENSIONS = VENDOR_EXTENSIONS + TIFF_EXTENSIONS
SUPPORTED_EXTENSIONS = SLIDE_EXTENSIONS + IMAGE_EXTENSIONS
# Formats stored as TIFF containers, whose header and data layout we can check cheaply.
_TIFF_CONTAINERS = (".svs", ".ndpi", ".scn", ".bif") + TIFF_EXTENSIONS
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")

BACKENDS = ("auto", "openslide", "tiffslide", "image")


def slide_extension(path: str | os.PathLike[str]) -> str:
    """Lower-case extension (``.ome.tif`` counts as ``.tif``)."""
    return Path(path).suffix.lower()


def slide_stem(path: str | os.PathLike[str]) -> str:
    """File name without its slide extension (``x.ome.tif`` -> ``x``)."""
    name = Path(path).name
    stem = name[: -len(Path(name).suffix)] if Path(name).suffix else name
    if stem.lower().endswith(".ome"):
        stem = stem[:-4]
    return stem


def _backend_factories() -> dict[str, Callable[..., Slide]]:
    from wsi_pipeline.slide._image import ImageSlide
    from wsi_pipeline.slide._openslide import OpenSlideSlide
    from wsi_pipeline.slide._tiffslide import TiffSlideSlide

    return {"openslide": OpenSlideSlide, "tiffslide": TiffSlideSlide, "image": ImageSlide}


def _backend_order(extension: str, backend: str) -> list[str]:
    if backend != "auto":
        return [backend]
    if extension in VENDOR_EXTENSIONS:
        return ["openslide", "tiffslide"]
    if extension in TIFF_EXTENSIONS:
        return ["tiffslide", "openslide"]
    return ["image"]


def open_slide(
    path: str | os.PathLike[str],
    backend: str = "auto",
    *,
    mpp: float | None = None,
    require_mpp: bool = True,
) -> Slide:
    """Open a slide or plain image.

    Args:
        path: the slide file (.svs .ndpi .mrxs .scn .vms .vmu .bif .tif .tiff) or a
            plain image (.png .jpg .jpeg, which need ``mpp``).
        backend: "auto", "openslide", "tiffslide" (or "image" for plain images).
        mpp: µm/px overriding whatever the file says (both axes).
        require_mpp: raise :class:`SlideError` when no µm/px is known. Only inspection
            tools pass False; everything that measures needs a resolution.

    Raises:
        SlideError: naming the file, what is wrong and how to fix it.
    """
    if backend not in BACKENDS:
        raise ConfigError(None, f"unknown slide backend {backend!r}", f"use one of: {', '.join(BACKENDS)}")
    if mpp is not None and not (math.isfinite(mpp) and mpp > 0):
        raise ConfigError(None, f"--mpp must be a positive number of µm per pixel, got {mpp}", None)
    p = Path(path)
    _check_file(p)
    extension = slide_extension(p)
    factories = _backend_factories()
    failures: list[str] = []
    for name in _backend_order(extension, backend):
        try:
            return factories[name](p, mpp=mpp, require_mpp=require_mpp)
        except SlideError:
            raise
        except ImportError as exc:
            failures.append(f"{name} is not installed ({exc})")
        except Exception as exc:  # each library has its own error types
            failures.append(f"{name}: {type(exc).__name__}: {exc}".strip())
    raise SlideError(
        p,
        f"could not be opened as a slide ({'; '.join(failures)})",
        "the file may be damaged or in a variant these readers do not support: check that it "
        "opens in the scanner's viewer, copy it again, or convert it to a pyramidal TIFF "
        "(`vips tiffsave IN OUT.tif --tile --pyramid --compression jpeg`)",
    )


def _check_file(p: Path) -> None:
    """The user mistakes we can name precisely before a backend sees the file."""
    if not p.exists():
        raise SlideError(p, "does not exist", f"check the path (relative paths start from {Path.cwd()})")
    if p.is_dir():
        raise SlideError(
            p,
            "is a folder, not a slide file",
            "pass a slide file; to process every slide in a folder, give the folder to `wsi-pipeline survey`/`run`",
        )
    extension = slide_extension(p)
    if extension not in SUPPORTED_EXTENSIONS:
        raise SlideError(
            p,
            f"has an unsupported extension {extension!r}",
            f"supported: {' '.join(SUPPORTED_EXTENSIONS)}; convert other formats to a pyramidal "
            "TIFF (`vips tiffsave IN OUT.tif --tile --pyramid --compression jpeg`)",
        )
    size = p.stat().st_size
    if size == 0:
        raise SlideError(p, "is empty (0 bytes)", "the copy or download did not finish: copy the slide again")
    if extension in _TIFF_CONTAINERS:
        _check_tiff(p, size)


def _ifd_chain_problem(p: Path, head: bytes, size: int) -> str | None:
    """Walk the chain of image directories; describe the first one that lies past the
    end of the file (an interrupted copy), or None when all are inside."""
    order = "little" if head[:2] == b"II" else "big"
    big = head[2:4] in (b"+\x00", b"\x00+")
    offset_size, count_size, entry_size = (8, 8, 20) if big else (4, 2, 12)
    offset = int.from_bytes(head[8:16] if big else head[4:8], order)
    seen: set[int] = set()
    with p.open("rb") as handle:
        while offset and offset not in seen and len(seen) < 100_000:
            seen.add(offset)
            if offset + count_size > size:
                return f"image directory {len(seen)} is at byte {offset:,}, past the end ({size:,} bytes)"
            handle.seek(offset)
            count = int.from_bytes(handle.read(count_size), order)
            next_at = offset + count_size + count * entry_size
            if next_at + offset_size > size:
                return f"image directory {len(seen)} at byte {offset:,} runs past the end ({size:,} bytes)"
            handle.seek(next_at)
            offset = int.from_bytes(handle.read(offset_size), order)
    return None


@contextmanager
def _quiet_tifffile() -> Iterator[None]:
    """tifffile logs warnings about the very damage we report as an error."""
    logger = logging.getLogger("tifffile")
    previous = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(previous)


def _check_tiff(p: Path, size: int) -> None:
    """A TIFF-based slide must start with a TIFF header and hold all its image data."""
    with p.open("rb") as handle:
        head = handle.read(16)
    if head[:4] not in _TIFF_MAGIC:
        raise SlideError(
            p,
            f"is not a TIFF-based image, although {slide_extension(p)} files are (it starts with {head[:4]!r})",
            "the file is something else under a slide's name (e.g. an error page saved by a failed "
            "download): download or export the slide again",
        )
    truncated_fix = "the copy did not finish: copy the slide again and compare its size with the original"
    # NDPI files over 4 GB keep the high bits of their offsets elsewhere (tifffile knows
    # how); walking their chain naively would misread it, so only tifffile checks them.
    if len(head) < 16:
        problem: str | None = "the header is incomplete"
    elif slide_extension(p) == ".ndpi":
        problem = None
    else:
        problem = _ifd_chain_problem(p, head, size)
    if problem:
        raise SlideError(p, f"is truncated: {problem}", truncated_fix)
    import tifffile

    try:
        with _quiet_tifffile(), tifffile.TiffFile(p) as tif:
            pages = list(tif.pages)
            end = 0
            for page in pages:
                offsets = getattr(page, "dataoffsets", ()) or ()
                counts = getattr(page, "databytecounts", ()) or ()
                for offset, count in zip(offsets, counts, strict=False):
                    if count:
                        end = max(end, int(offset) + int(count))
    except Exception as exc:
        raise SlideError(
            p,
            f"has a damaged TIFF structure ({type(exc).__name__}: {exc})",
            "the file is probably truncated or corrupt: copy it again from the scanner or archive",
        ) from exc
    if not pages:
        raise SlideError(p, "has no readable image directory (truncated or corrupt)", truncated_fix)
    if end > size:
        raise SlideError(
            p,
            f"is truncated: its image data runs to byte {end:,} but the file has only {size:,} bytes",
            truncated_fix,
        )
