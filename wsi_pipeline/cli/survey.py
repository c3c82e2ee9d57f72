"""``wsi-pipeline survey INPUT... --out DIR``: what a run would process, without a model.

For each slide: its metadata (``inspect.json``), the tissue mask drawn over a
thumbnail with the tile cores (``tissue.png``), and the tile grid with the tissue
area (``tiles.json``), plus one summary line. It is quick (thumbnail reads only) and
catches problems (no µm/px, no tissue found, a 20x slide for a 40x model) before
hours of inference. A bad slide is reported and skipped; the exit code is 2 if any was.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from wsi_pipeline.atomic import write_json_atomic
from wsi_pipeline.cli.inspect import add_slide_options
from wsi_pipeline.errors import ConfigError, WsiPipelineError
from wsi_pipeline.slide import DEFAULT_MASK_MPP, assign_names, find_slides, open_slide, tissue_mask
from wsi_pipeline.slide.base import Slide
from wsi_pipeline.slide.tissue import TissueMask
from wsi_pipeline.tiling import Tile, grid_shape, tile_grid

TISSUE_COLOUR = (0, 170, 0)
TILE_COLOUR = (30, 60, 220)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "survey",
        help="tissue mask, tile grid and metadata per slide (no model needed)",
        description="For each slide: write OUT/<name>/inspect.json, tissue.png (mask and tiles over a "
        "thumbnail) and tiles.json (tile grid, tissue mm²), and print one summary line.",
    )
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="slide files and/or folders of slides")
    parser.add_argument("--out", required=True, help="output folder")
    add_slide_options(parser)
    parser.add_argument(
        "--model", metavar="NAME|PATH", help="model whose tile grid to show (default: the shipped default, as `run`)"
    )
    parser.add_argument("--target-mpp", type=float, help="µm/px tiles are processed at (default: as `run`)")
    parser.add_argument("--tile-size", type=int, help="tile core size in px at --target-mpp (default: as `run`)")
    parser.add_argument("--margin", type=int, help="context on each side in px at --target-mpp (default: as `run`)")
    parser.add_argument(
        "--mask-mpp", type=float, default=DEFAULT_MASK_MPP, help=f"tissue mask µm/px ({DEFAULT_MASK_MPP:g})"
    )
    parser.add_argument(
        "--tissue-threshold",
        type=float,
        default=None,
        help="saturation threshold in [0, 1] for tissue (default: Otsu, clipped to 0.05..0.10)",
    )
    parser.set_defaults(func=run)


def _fill_run_defaults(args: argparse.Namespace) -> None:
    """Tile grid options not given take `run`'s values for the same model, so the survey
    shows exactly the tiles a run would process."""
    from wsi_pipeline.batch.plan import prepare_model
    from wsi_pipeline.config import load_run_config

    given = {"model": args.model, "target_mpp": args.target_mpp, "tile_size": args.tile_size, "margin": args.margin}
    model = prepare_model(load_run_config(None, given, environ={}))
    args.target_mpp, args.tile_size, args.margin = model.mpp, model.tile_size, model.margin


def _check_args(args: argparse.Namespace) -> None:
    for name in ("target_mpp", "mask_mpp"):
        if getattr(args, name) is not None and not getattr(args, name) > 0:
            raise ConfigError(None, f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}", None)
    if args.tile_size is not None and args.tile_size < 16:
        raise ConfigError(None, f"--tile-size must be at least 16 px, got {args.tile_size}", None)
    if args.margin is not None and args.margin < 0:
        raise ConfigError(None, f"--margin must be >= 0, got {args.margin}", None)
    _fill_run_defaults(args)
    if args.tissue_threshold is not None and not 0 <= args.tissue_threshold <= 1:
        raise ConfigError(None, f"--tissue-threshold must be in [0, 1], got {args.tissue_threshold}", None)


def _write_json(path: Path, data: Any) -> None:
    write_json_atomic(path, data, allow_nan=True)


def overlay(thumbnail: np.ndarray, mask: TissueMask, tiles: list[Tile]) -> np.ndarray:
    """The thumbnail with tissue tinted and outlined, and the kept tile cores boxed."""
    image = thumbnail.copy()
    tint = np.array(TISSUE_COLOUR, dtype=np.float32)
    image[mask.mask] = (0.88 * image[mask.mask] + 0.12 * tint).astype(np.uint8)
    contours, _ = cv2.findContours(mask.mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(image, contours, -1, TISSUE_COLOUR, 1)
    for tile in tiles:
        box = tile.core_level0
        top_left = (round(box.x0 / mask.downsample_x), round(box.y0 / mask.downsample_y))
        bottom_right = (round(box.x1 / mask.downsample_x) - 1, round(box.y1 / mask.downsample_y) - 1)
        cv2.rectangle(image, top_left, bottom_right, TILE_COLOUR, 1)
    return image


def survey_slide(slide: Slide, out_dir: Path, args: argparse.Namespace) -> str:
    """Write the three outputs for one open slide; return its summary line."""
    started = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    info = slide.info()
    info["file_size_bytes"] = slide.path.stat().st_size
    _write_json(out_dir / "inspect.json", info)

    thumbnail = slide.thumbnail(args.mask_mpp)
    mask = tissue_mask(slide, args.mask_mpp, args.tissue_threshold, thumbnail=thumbnail)
    mpp0 = (slide.mpp_x, slide.mpp_y)
    tiles = tile_grid(slide.width, slide.height, mpp0, args.target_mpp, args.tile_size, args.margin, mask)
    rows, cols = grid_shape(slide.width, slide.height, mpp0, args.target_mpp, args.tile_size)
    png = cv2.imencode(".png", cv2.cvtColor(overlay(thumbnail, mask, tiles), cv2.COLOR_RGB2BGR))[1]
    (out_dir / "tissue.png").write_bytes(png.tobytes())

    upsampled = slide.is_upsampled(args.target_mpp)
    summary = {
        "slide": str(slide.path),
        "target_mpp": args.target_mpp,
        "tile_px": args.tile_size,
        "margin_px": args.margin,
        "read_level": slide.best_level(args.target_mpp),
        "upsampled": upsampled,
        "upsample_factor": round(slide.upsample_factor(args.target_mpp), 4),
        "mask_mpp": mask.mpp,
        "tissue_threshold": round(mask.threshold, 4),
        "tissue_mm2": round(mask.area_mm2, 4),
        "tissue_fraction": round(mask.fraction, 4),
        "grid": {"rows": rows, "cols": cols},
        "tiles": len(tiles),
        "target_megapixels": round(sum(t.core.width * t.core.height for t in tiles) / 1e6, 3),
        "seconds": round(time.perf_counter() - started, 3),
        "tile_list": [
            {
                "index": t.index,
                "row": t.row,
                "col": t.col,
                "core": t.core.as_list(),
                "read": t.read.as_list(),
                "core_level0": t.core_level0.as_list(3),
                "read_level0": t.read_level0.as_list(3),
            }
            for t in tiles
        ],
    }
    _write_json(out_dir / "tiles.json", summary)
    note = f" (upsampled {summary['upsample_factor']:.2f}x from level 0)" if upsampled else ""
    empty = " NO TISSUE FOUND" if mask.is_empty else ""
    return (
        f"{slide.path.name}: {slide.width}x{slide.height} px at {slide.mpp_x:g} µm/px "
        f"({slide.backend}, {slide.vendor}), tissue {mask.area_mm2:.2f} mm²{empty}, "
        f"{len(tiles)}/{rows * cols} tiles of {args.tile_size} px at {args.target_mpp:g} µm/px{note} "
        f"-> {out_dir}"
    )


def run(args: argparse.Namespace) -> int:
    _check_args(args)
    slides = find_slides(args.inputs)
    names = assign_names(slides)
    out_root = Path(args.out)
    failed = 0
    for path in slides:
        try:
            with open_slide(path, backend=args.backend, mpp=args.mpp) as slide:
                print(survey_slide(slide, out_root / names[path], args), flush=True)
        except WsiPipelineError as exc:
            failed += 1
            print(f"error: {exc}", file=sys.stderr, flush=True)
    if failed:
        print(f"{failed} of {len(slides)} slides failed", file=sys.stderr)
        return 2
    return 0
