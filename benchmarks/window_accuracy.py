"""Does whole-tile inference change accuracy? Dev-split scores per window size and runtime.

Issue 10 asks that large windows cost no more than 0.005 PQ against 256 px patch inference
(the previous release's way, fp32). Each configuration runs `wsi-pipeline evaluate` on the
dev split of CoNSeP and MoNuSeg (whole held-out source tiles, `configs/dev_split.yaml`) in a
fresh process, and the table gives PQ, AJI, detection F1 and mPQ with the change against the
256 px torch fp32 reference.

    .venv/bin/python benchmarks/window_accuracy.py --json benchmarks/results/window_accuracy.json
    .venv/bin/python benchmarks/window_accuracy.py --model models/X.safetensors --configs torch:fp32:256 torch:fp32:768
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from _common import save_json

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
DATASETS = {"consep": DATA / "consep" / "train", "monuseg": DATA / "monuseg" / "train"}
# runtime:precision:window; the first is the reference.
DEFAULT_CONFIGS = ["torch:fp32:256", "torch:fp32:768", "openvino:bf16:768"]
METRICS = ("pq", "aji", "f1_detection", "mpq")


def evaluate(dataset: Path, model: str | None, runtime: str, precision: str, window: int, threads: int) -> dict:
    """One `wsi-pipeline evaluate` run in a fresh process; its JSON scores."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "scores.json"
        command = [sys.executable, "-m", "wsi_pipeline", "evaluate", str(dataset), "--dev-split",
                   str(REPO / "configs" / "dev_split.yaml"), "--runtime", runtime, "--window", str(window),
                   "--bf16", "true" if precision == "bf16" else "false", "--threads", str(threads),
                   "--json", str(out)]
        if model:
            command += ["--model", model]
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"`{' '.join(command)}` failed ({done.returncode}):\n{done.stderr[-2000:]}")
        return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model name or path (default: the shipped default)")
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS,
                        help="runtime:precision:window, the reference first")
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    rows: list[dict[str, Any]] = []
    for name in args.datasets:
        reference: dict[str, float | None] | None = None
        for config in args.configs:
            runtime, precision, window = config.split(":")
            scores = evaluate(DATASETS[name], args.model, runtime, precision, int(window), args.threads)
            row = {"dataset": name, "config": config, "model": scores.get("model"), "n_images": scores["n_images"],
                   **{m: None if scores.get(m) is None else float(scores[m]) for m in METRICS}}
            if reference is None:
                reference = {m: row[m] for m in METRICS}
            row["delta"] = {m: None if row[m] is None else row[m] - reference[m] for m in METRICS}
            rows.append(row)
            shown = [f"{m} {row[m]:.4f} ({row['delta'][m]:+.4f})" for m in METRICS if row[m] is not None]
            print(f"{name:8s} {config:18s} " + "  ".join(shown), flush=True)
    result = {
        "benchmark": "window_accuracy",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "reference": args.configs[0],
        "rows": rows,
    }
    save_json(args.json, result)


if __name__ == "__main__":
    main()
