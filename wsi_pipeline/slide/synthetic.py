"""A synthetic H&E-like image: pink tissue with purple nuclei on white glass.

Not for judging a model (it is nothing like real tissue up close), but it has what the
slide layer needs to be tested anywhere, without downloading data: known tissue
regions on a background, structure at several scales, deterministic per seed.
"""

from __future__ import annotations

import cv2
import numpy as np

GLASS = (243, 242, 240)
STROMA = (228, 160, 196)
NUCLEUS = (92, 56, 140)


def synthetic_he(width: int, height: int, mpp: float = 0.25, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """An RGB uint8 (height, width, 3) image and its boolean tissue mask.

    Tissue is a few large ellipses covering roughly a third of the image; nuclei are
    ~6-10 µm ellipses inside it, sized in µm so the image looks alike at any ``mpp``.
    """
    rng = np.random.default_rng(seed)
    tissue = np.zeros((height, width), dtype=np.uint8)
    for _ in range(3):
        centre = (int(rng.uniform(0.2, 0.8) * width), int(rng.uniform(0.2, 0.8) * height))
        axes = (int(rng.uniform(0.12, 0.25) * width), int(rng.uniform(0.12, 0.25) * height))
        cv2.ellipse(tissue, centre, axes, float(rng.uniform(0, 180)), 0, 360, 1, thickness=-1)
    mask = tissue.astype(bool)

    image = np.empty((height, width, 3), dtype=np.uint8)
    image[:] = GLASS
    texture = rng.normal(0.0, 10.0, size=(height // 4 + 1, width // 4 + 1)).astype(np.float32)
    texture = cv2.resize(cv2.GaussianBlur(texture, (0, 0), 1.5), (width, height))
    stroma = np.clip(np.array(STROMA, np.float32)[None, None, :] + texture[..., None], 0, 255).astype(np.uint8)
    image[mask] = stroma[mask]

    area_um2 = float(mask.sum()) * mpp * mpp
    count = int(area_um2 / 400.0)  # about one nucleus per 20 x 20 µm of tissue
    ys, xs = np.nonzero(mask)
    if count and len(xs):
        picks = rng.integers(0, len(xs), size=count)
        for x, y in zip(xs[picks], ys[picks], strict=True):
            radius_px = rng.uniform(3.0, 5.0) / mpp
            axes = (max(1, int(radius_px)), max(1, int(radius_px * rng.uniform(0.6, 1.0))))
            shade = tuple(int(c + rng.integers(-15, 16)) for c in NUCLEUS)
            cv2.ellipse(image, (int(x), int(y)), axes, float(rng.uniform(0, 180)), 0, 360, shade, -1)
    noise = rng.integers(-3, 4, size=image.shape, dtype=np.int16)
    image = np.clip(image.astype(np.int16) + noise, 0, 255).astype(np.uint8)
    return image, mask
