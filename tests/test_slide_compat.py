"""Compatibility: openslide and tiffslide give the same answers on the same files.

Like tiffslide's own test against openslide, but through our slide layer, on the real
Aperio slide and on pyramids written by make-sample.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from wsi_pipeline.slide import open_slide
from wsi_pipeline.slide._image import ArraySlide
from wsi_pipeline.slide.pyramid import write_pyramid
from wsi_pipeline.slide.synthetic import synthetic_he

SAMPLES = Path(__file__).resolve().parents[1] / "sample_slides"
FILES = [SAMPLES / "CMU-1-Small-Region.svs", SAMPLES / "CMU-1-Small-Region-pyramid.tif"]


def _pair(path: Path):
    return open_slide(path, "openslide"), open_slide(path, "tiffslide")


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_same_geometry_and_resolution(path: Path) -> None:
    a, b = _pair(path)
    with a, b:
        assert a.levels == b.levels
        assert (a.mpp_x, a.mpp_y) == pytest.approx((b.mpp_x, b.mpp_y))
        assert a.objective_power == b.objective_power
        assert a.vendor == b.vendor
        assert a.associated_images == b.associated_images
        for name in a.associated_images:
            ia, ib = a.associated_image(name), b.associated_image(name)
            assert ia.shape == ib.shape
            assert np.abs(ia.astype(int) - ib.astype(int)).mean() < 1.0


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
@pytest.mark.parametrize(
    ("x0", "y0", "width", "height", "mpp"),
    [
        (0, 0, 256, 256, None),  # native
        (700.5, 900.25, 300, 200, 0.25),  # fractional origin, upsampled on the SVS
        (0, 0, 300, 300, 2.0),  # from a reduced level on the pyramid
        (-40, -40, 128, 128, 0.5),  # partly outside the slide
    ],
)
def test_same_pixels(path: Path, x0: float, y0: float, width: int, height: int, mpp: float | None) -> None:
    a, b = _pair(path)
    with a, b:
        target = a.mpp_x if mpp is None else mpp
        ra = a.read_region_at(x0, y0, width, height, target)
        rb = b.read_region_at(x0, y0, width, height, target)
    assert ra.shape == rb.shape == (height, width, 3)
    diff = np.abs(ra.astype(int) - rb.astype(int))
    # openslide positions non-integer downsample levels with sub-pixel interpolation;
    # elsewhere the two decode the same JPEG tiles identically.
    assert diff.mean() < 1.5


def test_generated_pyramid_reads_alike_through_both(tmp_path: Path) -> None:
    image, _ = synthetic_he(1000, 700, mpp=0.5, seed=3)
    out = tmp_path / "synthetic.tif"
    with ArraySlide(image, mpp=0.5) as source:
        info = write_pyramid(source, out, quality=95)
    assert [(lv.width, lv.height) for lv in info.levels] == [(1000, 700), (500, 350), (250, 175)]
    a, b = _pair(out)
    with a, b:
        assert a.levels == b.levels and len(a.levels) == 3
        assert a.mpp_x == pytest.approx(0.5) and b.mpp_x == pytest.approx(0.5)
        assert a.vendor == b.vendor == "generic-tiff"
        for mpp in (0.5, 1.0, 2.0):
            ra = a.thumbnail(mpp)
            rb = b.thumbnail(mpp)
            assert np.abs(ra.astype(int) - rb.astype(int)).mean() < 1.0
        # Level 0 is the source, up to JPEG loss.
        assert np.abs(a.read(0, 0, 1000, 700).astype(int) - image.astype(int)).mean() < 3.0
