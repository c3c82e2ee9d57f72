"""Tissue mask: finds known tissue, ignores glass, survives a blank slide."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from wsi_pipeline.slide import TissueMask, open_slide, tissue_mask
from wsi_pipeline.slide._image import ArraySlide
from wsi_pipeline.slide.synthetic import GLASS, synthetic_he
from wsi_pipeline.slide.tissue import detect_tissue, otsu_threshold

SAMPLES = Path(__file__).resolve().parents[1] / "sample_slides"


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum()) / max(1, float((a | b).sum()))


def test_finds_synthetic_tissue() -> None:
    image, truth = synthetic_he(2048, 1536, mpp=0.5, seed=1)
    with ArraySlide(image, mpp=0.5) as slide:
        mask = tissue_mask(slide, mpp=8.0)
    assert mask.mask.shape == (96, 128)  # 1536 * 0.5 / 8, 2048 * 0.5 / 8
    assert mask.downsample == pytest.approx(16.0) and mask.mpp == 8.0
    small_truth = cv2.resize(truth.astype(np.uint8), (128, 96), interpolation=cv2.INTER_AREA) > 0
    assert _iou(mask.mask, small_truth) > 0.9
    assert mask.area_mm2 == pytest.approx(truth.sum() * 0.25 / 1e6, rel=0.1)


def test_blank_slide_gives_an_empty_mask_not_an_error() -> None:
    rng = np.random.default_rng(0)
    glass = np.clip(np.array(GLASS)[None, None, :] + rng.normal(0, 3, (800, 1000, 3)), 0, 255).astype(np.uint8)
    with ArraySlide(glass, mpp=0.5) as slide:
        mask = tissue_mask(slide)
    assert mask.is_empty and mask.area_mm2 == 0.0 and mask.fraction == 0.0


def test_black_and_white_areas_are_not_tissue() -> None:
    image = np.full((400, 400, 3), 255, dtype=np.uint8)
    image[:, :100] = 0  # scanner's black out-of-scan area
    image[150:350, 200:350] = (200, 120, 170)  # a pink block
    mask, _ = detect_tissue(image, mpp=8.0, min_area_um2=0.0, max_hole_um2=0.0)
    assert not mask[:, :100].any()
    assert mask[160:340, 210:340].all()


def test_threshold_is_configurable() -> None:
    image = np.full((300, 300, 3), 245, dtype=np.uint8)
    image[50:250, 50:250] = (235, 215, 225)  # very pale tissue: saturation ~0.085
    lenient, used = detect_tissue(image, mpp=8.0, threshold=0.05)
    strict, _ = detect_tissue(image, mpp=8.0, threshold=0.2)
    assert used == 0.05
    assert lenient[100:200, 100:200].all() and not strict.any()


def test_otsu_separates_two_populations() -> None:
    values = np.concatenate([np.full(500, 0.02), np.full(500, 0.4)])
    assert 0.02 < otsu_threshold(values) <= 0.4
    assert otsu_threshold(np.full(100, 0.3)) == 1.0


def test_small_debris_is_dropped_and_small_holes_filled() -> None:
    image = np.full((200, 200, 3), 245, dtype=np.uint8)
    image[20:180, 20:180] = (210, 120, 170)
    image[95:100, 95:100] = 245  # a 5x5 px hole = 40 x 40 µm at 8 µm/px: filled
    image[5:7, 190:192] = (90, 50, 140)  # 2x2 px speck: dropped
    mask, _ = detect_tissue(image, mpp=8.0)
    assert mask[95:100, 95:100].all()
    assert not mask[5:7, 190:192].any()


def test_real_slide_mask_matches_between_backends_and_is_plausible() -> None:
    masks = {}
    for backend in ("openslide", "tiffslide"):
        with open_slide(SAMPLES / "CMU-1-Small-Region.svs", backend) as slide:
            masks[backend] = tissue_mask(slide)
    a, b = masks["openslide"], masks["tiffslide"]
    np.testing.assert_array_equal(a.mask, b.mask)
    # 2220 x 2967 px at 0.499 µm/px = 1.64 mm²; about 40 % of it is tissue.
    assert 0.4 < a.area_mm2 < 0.9
    assert a.mask.shape == (186, 139)


def test_full_mask_covers_the_slide() -> None:
    mask = TissueMask.full(1000, 500, 0.5, 0.5, 8.0)
    assert mask.mask.shape == (32, 63) and mask.mask.all()


def test_a_tissue_crop_resampled_onto_a_read_region_matches_the_mask_pixel_by_pixel() -> None:
    """What a tile task carries: the mask under its read region, looked up per read pixel."""
    from wsi_pipeline.slide import TissueCrop

    rng = np.random.default_rng(5)
    mask = rng.random((40, 50)) > 0.6
    tissue = TissueMask(mask, 8.0, 16.0, 16.0, 0.1)  # 16 level-0 px (0.5 µm/px) per mask pixel
    scale = 0.5  # a 0.25 µm/px read grid: half a level-0 pixel per pixel
    x0, y0, width, height = 301, 97, 900, 640  # read region in read-grid pixels
    crop = tissue.crop(x0 * scale, y0 * scale, (x0 + width) * scale, (y0 + height) * scale)
    assert isinstance(crop, TissueCrop) and crop.mask.size < mask.size
    got = crop.on_grid(x0, y0, width, height, scale, scale)
    cols = np.floor((x0 + np.arange(width) + 0.5) * scale / 16.0).astype(int)
    rows = np.floor((y0 + np.arange(height) + 0.5) * scale / 16.0).astype(int)
    np.testing.assert_array_equal(got, mask[np.ix_(rows, cols)])
    # A region reaching past the slide's edge: no tissue there.
    edge = tissue.crop(700.0, 560.0, 900.0, 700.0).on_grid(1400, 1120, 400, 280, scale, scale)
    assert edge.shape == (280, 400) and not edge[:, 200:].any() and not edge[200:].any()
