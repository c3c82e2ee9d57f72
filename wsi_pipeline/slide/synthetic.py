"""Synthetic H&E-like images: pink tissue with purple nuclei on white glass.

Not for judging a model (it is nothing like real tissue up close), but they have what
the pipeline needs to be tested anywhere, without downloading data, deterministic per
seed: :func:`synthetic_he` known tissue regions on a background, structure at several
scales (the slide layer, tissue detection); :func:`synthetic_nuclei` a crowded field
of nuclei *with* their instance and class labels, whose ground-truth maps stand in for
a model wherever the question is what tiling and stitching do (each nucleus exactly
once, whole), not how good a network is.
"""

from __future__ import annotations

import cv2
import numpy as np
from scipy import ndimage as ndi

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


def synthetic_nuclei(
    width: int,
    height: int,
    mpp: float = 0.25,
    seed: int = 0,
    *,
    num_types: int = 4,
    spacing_um: float = 11.0,
    radius_um: tuple[float, float] = (3.0, 6.5),
    large: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A crowded field of labelled nuclei: RGB uint8 (height, width, 3), instance map
    int32 (ids 1..N, each one connected component), class map uint8 (1..``num_types``
    on nuclei, 0 elsewhere).

    Nuclei are ellipses on a jittered grid ``spacing_um`` apart with semi-axes drawn
    from ``radius_um``, so many touch their neighbours (the case the HV maps must
    separate) and many cross any tile border; a nucleus never takes pixels already
    given to an earlier one. ``large`` extra nuclei of 12-20 µm semi-axis are placed
    first: larger than a tile border's typical reach, still inside the 25 µm the
    worker's margin allows for (``wsi_pipeline.worker.MAX_NUCLEUS_UM``). Ids follow
    no spatial order, as a real annotation's do not.
    """
    rng = np.random.default_rng(seed)
    inst = np.zeros((height, width), dtype=np.int32)
    centres: list[tuple[float, float, float, float]] = []
    for _ in range(large):
        r = rng.uniform(12.0, 20.0) / mpp
        centres.append((rng.uniform(0, width), rng.uniform(0, height), r, r * rng.uniform(0.6, 0.9)))
    step = spacing_um / mpp
    grid = [
        (x + rng.uniform(-0.35, 0.35) * step, y + rng.uniform(-0.35, 0.35) * step)
        for y in np.arange(step / 2, height, step)
        for x in np.arange(step / 2, width, step)
    ]
    for k in rng.permutation(len(grid)):
        r = rng.uniform(*radius_um) / mpp
        centres.append((*grid[k], r, r * rng.uniform(0.55, 1.0)))

    label = 0
    for cx, cy, ax, ay in centres:
        reach = int(np.ceil(ax)) + 1
        x0, y0 = max(int(cx) - reach, 0), max(int(cy) - reach, 0)
        x1, y1 = min(int(cx) + reach + 1, width), min(int(cy) + reach + 1, height)
        if x1 <= x0 or y1 <= y0:
            continue
        shape = np.zeros((y1 - y0, x1 - x0), dtype=np.uint8)
        centre = (round(cx - x0), round(cy - y0))
        cv2.ellipse(shape, centre, (max(1, round(ax)), max(1, round(ay))), float(rng.uniform(0, 180)), 0, 360, 1, -1)
        region = inst[y0:y1, x0:x1]
        free = (shape > 0) & (region == 0)
        # Keep the largest connected piece: a neighbour may have cut the ellipse in two.
        pieces, count = ndi.label(free)
        if count == 0:
            continue
        sizes = np.bincount(pieces.ravel())[1:]
        piece = pieces == int(np.argmax(sizes)) + 1
        if piece.sum() < 0.3 * np.pi * ax * ay or piece.sum() < 30:
            continue  # mostly hidden behind earlier nuclei: a sliver, not a nucleus
        label += 1
        region[piece] = label

    classes = np.zeros(label + 1, dtype=np.uint8)
    classes[1:] = rng.integers(1, num_types + 1, size=label)
    types = classes[inst]

    image = np.empty((height, width, 3), dtype=np.uint8)
    texture = rng.normal(0.0, 10.0, size=(height // 4 + 1, width // 4 + 1)).astype(np.float32)
    texture = cv2.resize(cv2.GaussianBlur(texture, (0, 0), 1.5), (width, height))
    image[:] = np.clip(np.array(STROMA, np.float32)[None, None, :] + texture[..., None], 0, 255).astype(np.uint8)
    shades = np.clip(np.array(NUCLEUS)[None, :] + rng.integers(-15, 16, size=(label + 1, 3)), 0, 255)
    image[inst > 0] = shades[inst[inst > 0]].astype(np.uint8)
    noise = rng.integers(-3, 4, size=image.shape, dtype=np.int16)
    image = np.clip(image.astype(np.int16) + noise, 0, 255).astype(np.uint8)
    return image, inst, types
