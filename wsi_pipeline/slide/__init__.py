"""The slide layer: open a whole-slide image with openslide or tiffslide (or a plain
image), know its physical resolution, read any region at a target µm/px, and find
the tissue.

>>> with open_slide("sample_slides/CMU-1-Small-Region.svs") as slide:
...     tile = slide.read_region_at(0, 0, 512, 512, mpp=0.25)  # 512x512 RGB at 0.25 µm/px
"""

from wsi_pipeline.slide.base import Level, Slide, SlideSpec
from wsi_pipeline.slide.discover import assign_names, find_slides
from wsi_pipeline.slide.opener import (
    IMAGE_EXTENSIONS,
    SLIDE_EXTENSIONS,
    SUPPORTED_EXTENSIONS,
    open_slide,
    slide_stem,
)
from wsi_pipeline.slide.tissue import DEFAULT_MASK_MPP, TissueCrop, TissueMask, tissue_mask

__all__ = [
    "DEFAULT_MASK_MPP",
    "IMAGE_EXTENSIONS",
    "SLIDE_EXTENSIONS",
    "SUPPORTED_EXTENSIONS",
    "Level",
    "Slide",
    "SlideSpec",
    "TissueCrop",
    "TissueMask",
    "find_slides",
    "open_slide",
    "assign_names",
    "slide_stem",
    "tissue_mask",
]
