"""This checkout against a previous release, side by side: end-to-end `wsi-pipeline run` per slide.

Speed on a shared machine is only meaningful as a ratio measured in one sitting, so each
round runs the previous release and this checkout one after the other on the same slide,
with the same model file and options, in fresh processes (start-up included: a user pays
it), alternating which goes first. The figure quoted is the median over rounds of
``this / previous`` wall seconds, per slide.

The previous release is a git worktree (created on demand: ``git worktree add ../prev
e196f60``) run with this checkout's virtual environment and ``PYTHONPATH`` pointing at it,
so both use the same libraries and only the code differs.

    .venv/bin/python benchmarks/compare_release.py --json benchmarks/results/compare_release.json
    .venv/bin/python benchmarks/compare_release.py --rev e196f60 --rounds 3 --model models/X.safetensors

Two option sets of this checkout side by side (``--prev`` at this checkout, the other side's
options in ``--previous-options``):

    .venv/bin/python benchmarks/compare_release.py --prev . --previous-options "--engine-streams 1" \
        --rounds 2 --json benchmarks/results/engine_streams_e2e.json
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from _common import save_json

REPO = Path(__file__).resolve().parents[1]
SAMPLES = sorted((REPO / "sample_slides").glob("*.svs")) + sorted((REPO / "sample_slides").glob("*.tif"))
# The default model of the previous release (e196f60), one file for both sides.
DEFAULT_MODEL = REPO / "models" / "hovernet-fast-w025-imp90.safetensors"


def ensure_worktree(path: Path, rev: str) -> Path:
    """The previous release checked out at ``path`` (added as a git worktree if missing)."""
    if not (path / "wsi_pipeline").is_dir():
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(path), rev], check=True,
                       capture_output=True)
    return path


def run_once(code: Path, slide: Path, out: Path, model: Path, extra: list[str]) -> dict[str, Any]:
    """One `wsi-pipeline run` of ``code``'s package in a fresh process; wall seconds and its report."""
    env = {**os.environ, "PYTHONPATH": str(code)}
    command = [sys.executable, "-m", "wsi_pipeline", "run", str(slide), "--out", str(out), "--model", str(model),
               "--bf16", "auto", "--no-progress", *extra]
    began = time.perf_counter()
    done = subprocess.run(command, cwd=code, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - began
    if done.returncode != 0:
        raise SystemExit(f"{code}: `{' '.join(command)}` failed ({done.returncode}):\n{done.stderr[-2000:]}")
    reports = list(out.glob("*/report.json"))
    report = json.loads(reports[0].read_text()) if reports else {}
    return {
        "wall_s": wall,
        "report_wall_s": report.get("seconds", {}).get("wall"),
        "tissue_mm2": report.get("tissue_mm2"),
        "nuclei": report.get("nuclei", {}).get("total"),
        "seconds": report.get("seconds"),
        "engine": report.get("engine"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rev", default="e196f60", help="the previous release (e196f60)")
    parser.add_argument("--prev", type=Path, default=REPO.parent / "prev", help="its worktree (../prev)")
    parser.add_argument("--slides", nargs="+", type=Path, default=SAMPLES)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="one model file for both sides")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--previous-options", default="", help="more `run` options for the previous side (one string)")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more `run` options for this checkout")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    prev = ensure_worktree(args.prev.resolve(), args.rev)
    sides = {"previous": (prev, shlex.split(args.previous_options)), "this": (REPO, list(args.extra))}
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for slide in args.slides:
            runs: dict[str, list[dict[str, Any]]] = {"previous": [], "this": []}
            for round_ in range(args.rounds):
                order = ["previous", "this"] if round_ % 2 == 0 else ["this", "previous"]
                for side in order:
                    code, extra = sides[side]
                    out = Path(tmp) / f"{slide.stem}-{side}-{round_}"
                    runs[side].append(run_once(code, slide, out, args.model.resolve(), extra))
                    print(f"{slide.name} round {round_} {side}: {runs[side][-1]['wall_s']:.1f} s", flush=True)
            ratios = [t["wall_s"] / p["wall_s"] for t, p in zip(runs["this"], runs["previous"], strict=True)]
            tissue = runs["this"][0]["tissue_mm2"]
            this_wall = statistics.median(r["wall_s"] for r in runs["this"])
            prev_wall = statistics.median(r["wall_s"] for r in runs["previous"])
            entry = {
                "slide": slide.name,
                "tissue_mm2": tissue,
                "ratio_this_over_previous": statistics.median(ratios),
                "ratios": ratios,
                "this_wall_s_median": this_wall,
                "previous_wall_s_median": prev_wall,
                "this_s_per_tissue_mm2": this_wall / tissue if tissue else None,
                "previous_s_per_tissue_mm2": prev_wall / tissue if tissue else None,
                "nuclei": {"this": runs["this"][0]["nuclei"], "previous": runs["previous"][0]["nuclei"]},
                "runs": runs,
            }
            print(json.dumps({k: v for k, v in entry.items() if k != "runs"}), flush=True)
            results.append(entry)
    summary = {
        "benchmark": "compare_release",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "previous": args.rev if prev != REPO else "this checkout",
        "previous_options": args.previous_options,
        "extra": list(args.extra),
        "this": subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                               text=True).stdout.strip(),
        "model": str(args.model),
        "cpus": len(os.sched_getaffinity(0)),
        "load_average_at_end": os.getloadavg(),
        "results": results,
    }
    save_json(args.json, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
