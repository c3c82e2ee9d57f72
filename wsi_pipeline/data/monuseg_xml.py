"""MoNuSeg's polygon annotations: ``images/NAME.tif`` + ``annotations/NAME.xml``.

The XML (Aperio ImageScope style) has one ``<Region>`` per nucleus whose ``<Vertex X= Y=>``
points outline it in pixel coordinates (x right, y down). We fill each polygon with its
own id, in file order, later regions overwriting earlier ones where they overlap; pixel
(r, c) is inside when its centre lies inside the polygon. This reproduces the
``labels/*.npz`` shipped in /work/shared/data/monuseg exactly.
"""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
from skimage.draw import polygon as fill_polygon

from wsi_pipeline.data.dataset import DEFAULT_MPP, LabelledDataset, Sample, check_sample, report_empty, source_of
from wsi_pipeline.data.folder import pair_files
from wsi_pipeline.data.images import IMAGE_SUFFIXES, read_rgb
from wsi_pipeline.errors import DataError

log = logging.getLogger(__name__)

FORMAT = "monuseg_xml"


def read_polygons(path: Path) -> list[np.ndarray]:
    """Each region's vertices as an (N, 2) float array of (x, y); regions under 3 vertices are dropped.

    Dropped regions are logged with their count: they enclose no area, so they cannot be
    drawn, and a silent drop would hide a damaged file.
    """
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as exc:
        raise DataError(path, f"cannot be parsed as XML ({exc})", "replace the annotation file") from exc
    polygons, degenerate = [], []
    for k, region in enumerate(root.iter("Region")):
        try:
            pts = [(float(v.attrib["X"]), float(v.attrib["Y"])) for v in region.iter("Vertex")]
        except (KeyError, ValueError) as exc:
            raise DataError(path, f"region {region.get('Id', k)} has a vertex without numeric X/Y") from exc
        if len(pts) < 3:
            degenerate.append(region.get("Id", str(k)))
            continue
        polygons.append(np.asarray(pts, dtype=np.float64))
    if degenerate:
        log.warning("%s: skipped %d region(s) with fewer than 3 vertices (ids %s)", path, len(degenerate), degenerate)
    return polygons


def rasterise(polygons: list[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """Instance map (int32) with polygon k filled as id k + 1, clipped to ``shape``."""
    inst = np.zeros(shape, dtype=np.int32)
    for k, pts in enumerate(polygons, start=1):
        rows, cols = fill_polygon(pts[:, 1], pts[:, 0], shape=shape)
        inst[rows, cols] = k
    return inst


def load_monuseg_xml(root: Path, allow_unpaired: bool = False) -> LabelledDataset:
    """Rasterise every ``annotations/NAME.xml`` onto its ``images/NAME.*`` (no classes)."""
    image_dir, ann_dir = root / "images", root / "annotations"
    if not image_dir.is_dir() or not ann_dir.is_dir():
        raise DataError(root, "is not a MoNuSeg folder: expected subfolders images/ and annotations/ (*.xml)")
    images = [p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES]
    pairs = pair_files(root, images, ann_dir.glob("*.xml"), "annotations/NAME.xml", allow_unpaired)
    samples = []
    for name, image_path, xml_path in pairs:
        image = read_rgb(image_path)
        inst = rasterise(read_polygons(xml_path), image.shape[:2])
        image, inst, _ = check_sample(xml_path, image, inst, None, None)
        samples.append(Sample(name=name, source=source_of(name), image=image, inst_map=inst, type_map=None))
    return LabelledDataset(
        samples=samples,
        classes=[],
        has_types=False,
        format=FORMAT,
        mpp=DEFAULT_MPP,
        root=root,
        empty=report_empty(samples, root),
    )
