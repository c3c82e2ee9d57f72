"""Pyramids written by make-sample: the TIFF layout both readers need, and the shipped sample."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile

from wsi_pipeline.errors import SlideError
from wsi_pipeline.slide import open_slide
from wsi_pipeline.slide._image import ArraySlide
from wsi_pipeline.slide.pyramid import pyramid_levels, write_pyramid
from wsi_pipeline.slide.synthetic import synthetic_he

SAMPLE = Path(__file__).resolve().parents[1] / "sample_slides" / "CMU-1-Small-Region-pyramid.tif"


def _layout(path: Path) -> list[tuple]:
    with tifffile.TiffFile(path) as tif:
        return [
            (
                page.shape,
                page.tilewidth,
                page.tilelength,
                page.compression.name,
                page.subfiletype,
                page.tags["ResolutionUnit"].value,
            )
            for page in tif.pages
        ]


def test_layout_is_top_level_reduced_pages_with_jpeg_tiles(tmp_path: Path) -> None:
    image, _ = synthetic_he(600, 520, mpp=0.25, seed=2)
    out = tmp_path / "p.tif"
    with ArraySlide(image, mpp=0.25) as source:
        write_pyramid(source, out)
    layout = _layout(out)
    assert [shape for shape, *_ in layout] == [(520, 600, 3), (260, 300, 3), (130, 150, 3)]
    assert all(tw == tl == 256 and comp == "JPEG" and unit == 3 for _, tw, tl, comp, _, unit in layout)
    assert [sub for *_, sub, _ in layout] == [0, 1, 1]  # SubfileType: reduced on levels >= 1
    with tifffile.TiffFile(out) as tif:
        x_res = tif.pages[0].tags["XResolution"].value
        assert 1e4 / (x_res[0] / x_res[1]) == pytest.approx(0.25)
        assert not tif.pages[0].subifds


def test_region_and_resampling(tmp_path: Path) -> None:
    image, _ = synthetic_he(800, 800, mpp=0.5, seed=4)
    out = tmp_path / "crop.tif"
    with ArraySlide(image, mpp=0.5) as source:
        info = write_pyramid(source, out, mpp=0.25, region=(100, 200, 300, 150), quality=95)
    assert (info.levels[0].width, info.levels[0].height) == (600, 300)
    for backend in ("openslide", "tiffslide"):
        with open_slide(out, backend) as slide:
            assert slide.mpp_x == pytest.approx(0.25)
            # Level 0 at 0.5 µm/px is the source region at its own resolution.
            back = slide.read_region_at(0, 0, 300, 150, 0.5)
            assert np.abs(back.astype(int) - image[200:350, 100:400].astype(int)).mean() < 4.0


def test_region_outside_the_slide_is_refused(tmp_path: Path) -> None:
    source = ArraySlide(np.zeros((100, 100, 3), np.uint8), mpp=0.5)
    with source, pytest.raises(SlideError, match="not inside"):
        write_pyramid(source, tmp_path / "x.tif", region=(50, 50, 100, 10))
    assert not list(tmp_path.iterdir())  # nothing half-written left behind


def test_level_sizes() -> None:
    levels = pyramid_levels(3194, 3194)
    assert [(lv.width, lv.downsample) for lv in levels] == [(3194, 1), (1597, 2), (799, 4), (400, 8), (200, 16)]
    assert [lv.width for lv in pyramid_levels(200, 100)] == [200]


def test_shipped_sample_pyramid() -> None:
    layout = _layout(SAMPLE)
    assert len(layout) >= 3
    assert [sub for *_, sub, _ in layout] == [0] + [1] * (len(layout) - 1)
    seen = []
    for backend in ("openslide", "tiffslide"):
        with open_slide(SAMPLE, backend) as slide:
            seen.append(([(lv.width, lv.height) for lv in slide.levels], slide.mpp_x, slide.mpp_y))
            assert not slide.is_upsampled(0.25)
    assert seen[0] == seen[1]
    assert seen[0][1] == pytest.approx(0.25)
    assert seen[0][0][0] == (3194, 3194)
    assert SAMPLE.stat().st_size < 5_000_000
