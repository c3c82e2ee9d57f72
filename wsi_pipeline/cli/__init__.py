"""The single `wsi-pipeline` entry point.

Each subcommand lives in its own module of this package and exposes
``register(subparsers)``, which adds its parser and sets ``func`` (a callable
taking the parsed args and returning an exit code). Modules are discovered, so
adding a subcommand never means editing a central list.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import pkgutil
import sys
from collections.abc import Sequence

from wsi_pipeline.errors import Interrupted, WsiPipelineError

EXIT_USER_ERROR = 2


def build_parser() -> argparse.ArgumentParser:
    """Build the parser with every discovered subcommand."""
    parser = argparse.ArgumentParser(
        prog="wsi-pipeline",
        description="Nuclei segmentation and classification over whole-slide images (HoVer-Net).",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks and debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        register = getattr(module, "register", None)
        if register is not None:
            register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; user errors become one clear line and exit code 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        # --debug lines carry the milliseconds since start: where a slow run spends its time.
        format="%(relativeCreated)8.0f ms %(levelname)s %(name)s: %(message)s" if args.debug
        else "%(levelname)s %(name)s: %(message)s",
    )
    try:
        code = args.func(args)
    except WsiPipelineError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Interrupted as exc:
        print(f"interrupted by {exc.name}: finished slides are kept; rerun the same command to continue",
              file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted: finished slides are kept; rerun the same command to continue", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader of our output went away (`wsi-pipeline inspect X | head`): not an error.
        # Point stdout at /dev/null so the interpreter's final flush does not fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    return int(code or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
