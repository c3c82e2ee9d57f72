"""wsi_pipeline: nuclei segmentation and classification over whole-slide images.

``load_model`` is imported lazily so that light users (slide inspection, the
CLI's help) do not pay for importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["__version__", "load_model", "open_slide"]

if TYPE_CHECKING:  # pragma: no cover
    from wsi_pipeline.engine.weights import load_model
    from wsi_pipeline.slide import open_slide


def __getattr__(name: str) -> Any:
    if name == "load_model":
        from wsi_pipeline.engine.weights import load_model

        return load_model
    if name == "open_slide":
        from wsi_pipeline.slide import open_slide

        return open_slide
    raise AttributeError(f"module 'wsi_pipeline' has no attribute {name!r}")
