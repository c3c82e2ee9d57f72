"""``wsi-pipeline inspect SLIDE``: what the slide layer sees in a file, as JSON."""

from __future__ import annotations

import argparse
import json
import sys

from wsi_pipeline.slide import open_slide
from wsi_pipeline.slide.opener import BACKENDS


def add_slide_options(parser: argparse.ArgumentParser) -> None:
    """--backend and --mpp, shared by the commands that open slides."""
    parser.add_argument("--backend", choices=BACKENDS, default="auto", help="slide reader (default: by file extension)")
    parser.add_argument(
        "--mpp",
        type=float,
        default=None,
        help="µm per level-0 pixel, overriding the file's metadata (needed for plain images)",
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "inspect",
        help="print a slide's size, resolution and pyramid levels as JSON",
        description="Open a slide and print its size, µm/px, pyramid levels, objective power and "
        "vendor as JSON (a slide without µm/px is shown with null values, not an error).",
    )
    parser.add_argument("slide", help="slide file (.svs .ndpi .mrxs .scn .vms .vmu .bif .tif .tiff) or image")
    add_slide_options(parser)
    parser.add_argument("--properties", action="store_true", help="also list every metadata property")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    with open_slide(args.slide, backend=args.backend, mpp=args.mpp, require_mpp=False) as slide:
        info = slide.info()
        if args.properties:
            info["properties"] = slide.properties
    json.dump(info, sys.stdout, indent=2, ensure_ascii=False)
    sys.stdout.write("\n")
    return 0
