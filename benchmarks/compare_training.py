"""Two or more training runs side by side: dev metrics against training minutes and steps.

For comparisons at equal budget (issue 11: distillation vs plain fine-tuning of the same
student, same init, seed, schedule and wall-clock budget, run at the same time on the same
machine). Prints a table per run (every evaluated epoch: train minutes, steps, dev PQ, AJI,
detection F1, mPQ), the best epoch of each, and draws dev PQ against training minutes.

    .venv/bin/python benchmarks/compare_training.py \\
        distilled=runs/distill/M.safetensors.train/history.json \\
        plain=runs/control/M.safetensors.train/history.json \\
        --plot docs/distillation.png --json benchmarks/results/distillation_vs_plain.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from _common import save_json

KEYS = ("pq", "aji", "f1_detection", "mpq", "type_accuracy")


def curve(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The evaluated epochs of a history: minutes, steps and dev metrics."""
    return [
        {"epoch": row["epoch"], "train_minutes": row["train_minutes"], "step": row["step"],
         **{k: row["dev"].get(k) for k in KEYS}}
        for row in history
        if row.get("dev")
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="LABEL=HISTORY", help="label=path/to/history.json")
    parser.add_argument("--plot", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    summary: dict[str, Any] = {"benchmark": "compare_training", "runs": {}}
    for item in args.runs:
        label, _, path = item.partition("=")
        if not path:
            parser.error(f"{item!r}: give LABEL=HISTORY")
        history = json.loads(Path(path).read_text())
        points = curve(history)
        best = max(points, key=lambda p: p["pq"] or -1)
        last = history[-1]
        summary["runs"][label] = {
            "history": path,
            "epochs": last["epoch"],
            "steps": last["step"],
            "train_minutes": last["train_minutes"],
            "seconds_per_step": 60 * last["train_minutes"] / last["step"] if last["step"] else None,
            "best": best,
            "curve": points,
        }
        print(f"\n{label}: {last['epoch']} epochs, {last['step']} steps in {last['train_minutes']:.1f} train min")
        print(f"{'epoch':>5} {'min':>6} {'step':>6} " + " ".join(f"{k:>8}" for k in KEYS))
        for p in points:
            print(f"{p['epoch']:>5} {p['train_minutes']:>6.1f} {p['step']:>6} "
                  + " ".join(f"{p[k]:>8.4f}" if isinstance(p[k], float) else f"{'-':>8}" for k in KEYS))
        print(f"best: epoch {best['epoch']} PQ {best['pq']:.4f}")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
        for label, run in summary["runs"].items():
            xs = [p["train_minutes"] for p in run["curve"]]
            ax.plot(xs, [p["pq"] for p in run["curve"]], marker="o", label=f"{label} ({run['steps']} steps)")
        ax.set_xlabel("training minutes (same machine, same time)")
        ax.set_ylabel("dev PQ during training (CoNSeP + MoNuSeg dev)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.plot)
        print(f"saved {args.plot}")
    save_json(args.json, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
