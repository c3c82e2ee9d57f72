"""The slide object: metadata of the real Aperio slide, read geometry, resolution flags."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from wsi_pipeline.errors import SlideError
from wsi_pipeline.slide import SlideSpec, open_slide
from wsi_pipeline.slide._image import ArraySlide

SAMPLES = Path(__file__).resolve().parents[1] / "sample_slides"
SVS = SAMPLES / "CMU-1-Small-Region.svs"
PYRAMID = SAMPLES / "CMU-1-Small-Region-pyramid.tif"


@pytest.mark.parametrize("backend", ["auto", "openslide", "tiffslide"])
def test_aperio_metadata(backend: str) -> None:
    with open_slide(SVS, backend) as slide:
        assert (slide.width, slide.height) == (2220, 2967)
        assert slide.mpp_x == pytest.approx(0.499) and slide.mpp_y == pytest.approx(0.499)
        assert slide.objective_power == 20
        assert slide.vendor == "aperio"
        assert [(lv.width, lv.height, lv.downsample) for lv in slide.levels] == [(2220, 2967, 1.0)]
        assert set(slide.associated_images) == {"label", "macro", "thumbnail"}
        label = slide.associated_image("label")
        assert label.dtype == np.uint8 and label.shape == (463, 387, 3)
    assert slide.closed


def test_auto_backend_prefers_openslide_for_vendor_files_and_tiffslide_for_tiff() -> None:
    with open_slide(SVS) as svs, open_slide(PYRAMID) as tif:
        assert svs.backend == "openslide"
        assert tif.backend == "tiffslide"


def test_the_shipped_svs_is_the_shared_copy(aperio_svs: Path) -> None:
    assert SVS.read_bytes() == aperio_svs.read_bytes()


def test_read_sizes_follow_the_documented_rounding() -> None:
    with open_slide(SVS) as slide:
        # 1000 level-0 px at 0.499 -> 0.25 µm/px: 1996 px; 333 px at 0.499 -> 1.0: round(166.17) = 166
        assert slide.read(0, 0, 1000, 10, mpp=0.25).shape == (20, 1996, 3)
        assert slide.read(0, 0, 333, 333, mpp=1.0).shape == (166, 166, 3)
        assert slide.read_region_at(10.5, 20.25, 300, 200, mpp=0.25).shape == (200, 300, 3)
        assert slide.size_at(0.25) == (4432, 5923)  # ceil(2220 * 0.499 / 0.25)


def test_native_reads_are_bit_exact_against_the_backend() -> None:
    import openslide

    with open_slide(SVS, "openslide") as slide, openslide.OpenSlide(str(SVS)) as raw:
        ours = slide.read(700, 900, 256, 128)
        theirs = np.asarray(raw.read_region((700, 900), 0, (256, 128)).convert("RGB"))
        np.testing.assert_array_equal(ours, theirs)
        np.testing.assert_array_equal(slide.read_region_at(700, 900, 256, 128, slide.mpp_x), theirs)


def test_outside_the_slide_is_white() -> None:
    with open_slide(SVS) as slide:
        region = slide.read_region_at(-100, slide.height - 50, 200, 100, slide.mpp_x)
    assert (region[:, :100] == 255).all() and (region[50:] == 255).all()
    assert (region[:50, 100:] != 255).any()


def test_upsampling_is_flagged() -> None:
    with open_slide(SVS) as slide, open_slide(PYRAMID) as pyramid:
        assert slide.is_upsampled(0.25) and slide.upsample_factor(0.25) == pytest.approx(1.996)
        assert not slide.is_upsampled(0.5)
        assert not pyramid.is_upsampled(0.25)
        assert not pyramid.is_upsampled(0.2475)  # within 5 %: a "40x" scan at 0.2475 is native enough


def test_best_level_is_the_coarsest_not_coarser_than_the_target() -> None:
    with open_slide(PYRAMID) as slide:
        assert [lv.width for lv in slide.levels] == [3194, 1597, 799, 400, 200]
        assert slide.best_level(0.25) == 0
        assert slide.best_level(0.49) == 0
        assert slide.best_level(0.5) == 1  # downsample 2.0: exactly the target
        assert slide.best_level(1.9) == 2
        assert slide.best_level(100.0) == 4
        assert slide.best_level(0.1) == 0


def test_mpp_override_and_spec_reopen_identically() -> None:
    with open_slide(SVS, "tiffslide", mpp=0.5) as slide:
        assert (slide.mpp_x, slide.mpp_y, slide.mpp_source) == (0.5, 0.5, "override")
        spec = slide.spec
    assert spec == SlideSpec(str(SVS), "tiffslide", 0.5)
    with spec.open() as again:
        assert again.backend == "tiffslide" and again.mpp_x == 0.5


def test_plain_image_needs_mpp(tmp_path: Path) -> None:
    image = np.zeros((40, 60, 3), dtype=np.uint8)
    image[:, :, 0] = np.arange(60, dtype=np.uint8)[None, :]
    path = tmp_path / "crop.png"
    cv2.imwrite(str(path), image[:, :, ::-1])
    with pytest.raises(SlideError, match="pass its resolution"):
        open_slide(path)
    with open_slide(path, mpp=0.25) as slide:
        assert slide.backend == "image" and (slide.width, slide.height) == (60, 40)
        np.testing.assert_array_equal(slide.read(0, 0, 60, 40), image)
        assert slide.read(0, 0, 60, 40, mpp=0.5).shape == (20, 30, 3)


def test_reading_a_closed_slide_is_an_error() -> None:
    slide = open_slide(SVS)
    slide.close()
    slide.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        slide.read(0, 0, 10, 10)


# --- resampling geometry, on arrays whose correct answer is known exactly ---------


def _ramp(width: int, height: int) -> np.ndarray:
    """R = x, G = y: a pixel's value says where it came from."""
    image = np.zeros((height, width, 3), dtype=np.uint8)
    image[:, :, 0] = np.arange(width, dtype=np.uint8)[None, :]
    image[:, :, 1] = np.arange(height, dtype=np.uint8)[:, None]
    return image


def test_downsampling_by_two_averages_pixel_pairs() -> None:
    image = _ramp(200, 100)
    with ArraySlide(image, mpp=0.25) as slide:
        out = slide.read_region_at(20, 10, 50, 40, mpp=0.5)
    # Output pixel i covers source pixels 20 + 2i and 21 + 2i: mean 20.5 + 2i.
    expected_x = 20.5 + 2 * np.arange(50)
    assert np.abs(out[5, :, 0] - expected_x).max() <= 0.5
    assert np.abs(out[:, 5, 1] - (10.5 + 2 * np.arange(40))).max() <= 0.5


def test_fractional_origin_shifts_by_the_fraction() -> None:
    image = _ramp(200, 100)
    with ArraySlide(image, mpp=0.25) as slide:
        out = slide.read_region_at(30.5, 0, 20, 10, mpp=0.25)
    # Output pixel i covers [30.5 + i, 31.5 + i): centre 31 + i, halfway between pixels 30+i and 31+i.
    np.testing.assert_allclose(out[3, :, 0], 30.5 + np.arange(20), atol=0.51)


def test_big_reductions_are_area_averages_not_samples() -> None:
    checker = (np.indices((512, 512)).sum(axis=0) % 2 * 255).astype(np.uint8)
    with ArraySlide(np.dstack([checker] * 3), mpp=0.25) as slide:
        out = slide.read_region_at(0, 0, 32, 32, mpp=4.0)  # 16x16 blocks
    assert np.abs(out.astype(int) - 128).max() <= 2  # aliasing would give 0 or 255


def test_chunked_reads_match_one_piece() -> None:
    import wsi_pipeline.slide.base as base

    image = cv2.resize(_ramp(64, 64), (600, 500), interpolation=cv2.INTER_CUBIC)
    with ArraySlide(image, mpp=0.25) as slide:
        whole = slide.read_region_at(3.25, 7.5, 300, 250, mpp=0.4)
        old = base._MAX_WINDOW_PX
        base._MAX_WINDOW_PX = 64
        try:
            chunked = slide.read_region_at(3.25, 7.5, 300, 250, mpp=0.4)
        finally:
            base._MAX_WINDOW_PX = old
    assert np.abs(whole.astype(int) - chunked.astype(int)).max() <= 1


def test_alpha_is_composited_on_white() -> None:
    from wsi_pipeline.slide.base import to_rgb

    rgba = np.zeros((1, 3, 4), dtype=np.uint8)
    rgba[0, :, :3] = (100, 0, 200)
    rgba[0, :, 3] = (255, 0, 128)  # opaque, transparent (outside the scan), half
    out = to_rgb(rgba)
    assert out.shape == (1, 3, 3)
    assert out[0, 0].tolist() == [100, 0, 200]
    assert out[0, 1].tolist() == [255, 255, 255]
    np.testing.assert_allclose(out[0, 2], [177, 127, 227], atol=1)
    assert to_rgb(np.full((2, 2), 7, np.uint16) * 257).tolist() == [[[7, 7, 7]] * 2] * 2
