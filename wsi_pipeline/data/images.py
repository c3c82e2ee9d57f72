"""Read a dataset image file as (H, W, 3) uint8 RGB, or fail naming the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from wsi_pipeline.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def read_rgb(path: Path) -> np.ndarray:
    """Decode ``path`` to RGB uint8.

    TIFFs go through tifffile (MoNuSeg ships plain RGB TIFFs, which Pillow reads slowly or
    not at all when compressed exotically); everything else through Pillow. An alpha
    channel is dropped; grey images are refused because H&E models need colour.
    """
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            arr = np.asarray(tifffile.imread(path))
        else:
            from PIL import Image

            with Image.open(path) as im:
                if im.mode not in ("RGB", "RGBA"):
                    if im.mode in ("L", "I", "I;16", "F", "1"):
                        raise DataError(path, f"is a single-channel ({im.mode}) image", "give RGB H&E images")
                    im = im.convert("RGB")
                arr = np.asarray(im)
    except DataError:
        raise
    except Exception as exc:
        raise DataError(path, f"cannot be read as an image ({type(exc).__name__}: {exc})", "replace the file") from exc
    if arr.ndim == 3 and arr.shape[0] in (3, 4) and arr.shape[2] not in (3, 4):
        arr = np.moveaxis(arr, 0, -1)  # planar TIFF
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise DataError(path, f"has shape {arr.shape}, expected an RGB image (H, W, 3)", "give RGB H&E images")
    if arr.dtype != np.uint8:
        raise DataError(path, f"has {arr.dtype} pixels, expected 8-bit RGB", "convert it to 8-bit RGB")
    return np.ascontiguousarray(arr[..., :3])
