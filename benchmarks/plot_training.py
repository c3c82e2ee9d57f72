"""Learning curves of a training run: loss terms and dev metrics per epoch.

Usage: python benchmarks/plot_training.py RUN/history.json --out docs/training-parent.png [--json OUT]
Prints a compact table and saves the figure (and the table as JSON if asked).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("history", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    history = json.loads(args.history.read_text())
    rows = []
    for h in history:
        dev = h.get("dev", {})
        rows.append({
            "epoch": h["epoch"], "train_minutes": h["train_minutes"], "loss": h["train"].get("total"),
            "pq": dev.get("pq"), "aji": dev.get("aji"), "dice": dev.get("dice"),
            "f1_detection": dev.get("f1_detection"), "mpq": dev.get("mpq"),
        })
    print(f"{'epoch':>5} {'min':>7} {'loss':>8} {'PQ':>6} {'AJI':>6} {'Dice':>6} {'F1':>6} {'mPQ':>6}")
    for r in rows:
        keys = ("pq", "aji", "dice", "f1_detection", "mpq")
        vals = [f"{r[k]:.3f}" if isinstance(r[k], float) else "-" for k in keys]
        print(f"{r['epoch']:>5} {r['train_minutes']:>7.1f} {r['loss']:>8.3f} " + " ".join(f"{v:>6}" for v in vals))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    minutes = [r["train_minutes"] for r in rows]
    ax1.plot(minutes, [r["loss"] for r in rows], marker="o")
    ax1.set_xlabel("training minutes")
    ax1.set_ylabel("training loss (sum of terms)")
    ax1.set_yscale("log")
    for key in ("pq", "aji", "dice", "f1_detection", "mpq"):
        pts = [(r["train_minutes"], r[key]) for r in rows if isinstance(r[key], float)]
        if pts:
            ax2.plot(*zip(*pts, strict=True), marker="o", label=key)
    ax2.set_xlabel("training minutes")
    ax2.set_ylabel("dev split")
    ax2.set_ylim(0, 1)
    ax2.legend()
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
