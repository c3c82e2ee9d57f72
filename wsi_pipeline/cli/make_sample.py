"""``wsi-pipeline make-sample OUT.tif``: write a small pyramidal TIFF to try the pipeline on.

From a real slide (``--from``, optionally a ``--region`` of it, resampled to
``--mpp``), or a synthetic H&E-like image when no slide is given. The file is checked
with both openslide and tiffslide after writing, and the command fails if they
disagree on its levels or resolution.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from wsi_pipeline.errors import ConfigError, SlideError
from wsi_pipeline.slide import open_slide
from wsi_pipeline.slide._image import ArraySlide
from wsi_pipeline.slide.opener import BACKENDS, TIFF_EXTENSIONS
from wsi_pipeline.slide.pyramid import DEFAULT_QUALITY, DEFAULT_TILE, write_pyramid

SYNTHETIC_MPP = 0.25


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "make-sample",
        help="write a multi-level pyramidal TIFF (from a slide, or synthetic)",
        description="Write a tiled (256 px JPEG) pyramidal TIFF with resolution tags that openslide "
        "and tiffslide both open with the same levels and µm/px.",
    )
    parser.add_argument("out", help="output file (.tif or .tiff)")
    parser.add_argument("--from", dest="source", default=None, help="source slide (default: synthetic image)")
    parser.add_argument("--backend", choices=BACKENDS, default="auto", help="reader for --from")
    parser.add_argument("--source-mpp", type=float, default=None, help="µm/px of --from when its metadata has none")
    parser.add_argument(
        "--mpp",
        type=float,
        default=None,
        help=f"µm/px of the written level 0 (default: the source's; {SYNTHETIC_MPP} for synthetic)",
    )
    parser.add_argument(
        "--region",
        type=float,
        nargs=4,
        metavar=("X", "Y", "W", "H"),
        default=None,
        help="part of --from to write, in its level-0 pixels",
    )
    parser.add_argument(
        "--size",
        type=int,
        nargs=2,
        metavar=("W", "H"),
        default=(4096, 3072),
        help="synthetic image size in pixels (default: 4096 3072)",
    )
    parser.add_argument("--seed", type=int, default=0, help="synthetic image seed")
    parser.add_argument("--tile-size", type=int, default=DEFAULT_TILE, help="TIFF tile size (default: 256)")
    parser.add_argument("--quality", type=int, default=DEFAULT_QUALITY, help="JPEG quality (default: 85)")
    parser.set_defaults(func=run)


def reader_summary(path: Path) -> dict[str, Any]:
    """Levels and µm/px of ``path`` as each backend sees them; raises if they differ."""
    seen: dict[str, Any] = {}
    for backend in ("openslide", "tiffslide"):
        with open_slide(path, backend=backend) as slide:
            seen[backend] = {
                "levels": [[lv.width, lv.height] for lv in slide.levels],
                "mpp": [slide.mpp_x, slide.mpp_y],
            }
    if seen["openslide"] != seen["tiffslide"]:
        raise SlideError(
            path,
            f"is read differently by openslide and tiffslide: {seen}",
            "this is a bug in make-sample's TIFF layout: please report it",
        )
    return seen["openslide"]


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.suffix.lower() not in TIFF_EXTENSIONS:
        raise ConfigError(out, "is not a .tif/.tiff name", "name the output e.g. sample.tif")
    if args.mpp is not None and not args.mpp > 0:
        raise ConfigError(None, f"--mpp must be a positive number of µm per pixel, got {args.mpp}", None)
    if not 1 <= args.quality <= 100:
        raise ConfigError(None, f"--quality must be 1..100, got {args.quality}", None)
    if args.source is None:
        width, height = args.size
        if width < 16 or height < 16:
            raise ConfigError(None, f"--size must be at least 16x16, got {width}x{height}", None)
        from wsi_pipeline.slide.synthetic import synthetic_he  # scipy-heavy: only when asked for

        image, _ = synthetic_he(width, height, mpp=SYNTHETIC_MPP, seed=args.seed)
        source = ArraySlide(image, mpp=SYNTHETIC_MPP, path=f"<synthetic seed={args.seed}>")
        what = f"synthetic H&E-like image, seed {args.seed}"
    else:
        source = open_slide(args.source, backend=args.backend, mpp=args.source_mpp)
        what = f"{Path(args.source).name}" + (f" region {args.region}" if args.region else "")
    with source:
        mpp = args.mpp if args.mpp is not None else source.mpp_x
        description = f"wsi_pipeline make-sample: {what}, resampled to {mpp} um/px"
        info = write_pyramid(
            source,
            out,
            mpp=args.mpp,
            region=tuple(args.region) if args.region else None,
            tile=args.tile_size,
            quality=args.quality,
            description=description,
        )
    checked = reader_summary(out)
    summary = {
        "path": str(out),
        "source": what,
        "mpp": info.mpp,
        "levels": checked["levels"],
        "size_bytes": info.size_bytes,
        "readers_agree": True,
    }
    json.dump(summary, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0
