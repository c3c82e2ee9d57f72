"""`wsi-pipeline models [--json]`: list the shipped models."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the shipped models (name, size, classes, default)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from wsi_pipeline.engine.registry import list_models, models_dir

    entries = list_models()
    if args.json:
        print(json.dumps([e.to_dict() for e in entries], indent=1))
        return 0
    if not entries:
        print(f"no models shipped in {models_dir()}")
        return 0
    print(f"{'':2}{'name':32} {'params':>9} {'GMAC':>7} {'µm/px':>6}  parent / description")
    for e in entries:
        params = f"{e.params / 1e6:.2f}M" if e.params else "?"
        macs = f"{e.macs / 1e9:.2f}" if e.macs else "?"
        mpp = f"{e.mpp:.3f}" if e.mpp else "?"
        mark = "* " if e.default else "  "
        print(f"{mark}{e.name:32} {params:>9} {macs:>7} {mpp:>6}  {e.parent or '-'} / {e.description}")
    return 0
