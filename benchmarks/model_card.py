"""Write a model card from a checkpoint's metadata and `wsi-pipeline evaluate --json` results.

Usage:
  python benchmarks/model_card.py models/NAME.safetensors \
      --eval "CoNSeP dev"=out/eval/consep.json --eval "MoNuSeg dev"=out/eval/monuseg.json \
      [--history RUN/history.json --curve docs/NAME-training.png] --out models/NAME.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from wsi_pipeline.modelcard import render_card

KEYS = ("pq", "aji", "dice", "f1_detection", "mpq", "type_accuracy")


def vs_parent(evals: dict[str, Path], parent_evals: dict[str, str]) -> list[str]:
    """Model minus parent on the same dev images: what pruning and fine-tuning changed, per dataset."""
    lines = ["## Against the parent (same dev images, fp32)", "", "| dataset | metric | parent | this model | change |",
             "|---|---|---:|---:|---:|"]
    for label, path in evals.items():
        if label not in parent_evals:
            continue
        mine, theirs = json.loads(Path(path).read_text()), json.loads(Path(parent_evals[label]).read_text())
        for key in KEYS:
            a, b = theirs.get(key), mine.get(key)
            if isinstance(a, float) and isinstance(b, float):
                lines.append(f"| {label} | {key} | {a:.4f} | {b:.4f} | {100 * (b - a):+.2f} pt |")
    return lines


def speed_table(data: dict, path: Path) -> list[str]:
    lines = [
        f"## Speed against the parent (`{path}`, one process, interleaved, {data['threads']} threads, "
        f"torch {data['torch']})",
        "",
        "| batch | precision | parent ms/patch | this model ms/patch | speedup |",
        "|---:|---|---:|---:|---:|",
    ]
    for batch, row in data["batches"].items():
        for dtype, r in row.items():
            lines.append(
                f"| {batch} | {dtype} | {r['parent_ms_per_patch']:.1f} | {r['model_ms_per_patch']:.1f} | "
                f"{r['speedup']:.2f}x |"
            )
    lines += ["", "Reproduce with `python benchmarks/ship_latency.py`."]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--eval", action="append", default=[], metavar="LABEL=JSON")
    parser.add_argument("--history", type=Path, help="training history.json, for the learning-curve table")
    parser.add_argument("--curve", help="path (relative to the card) of a learning-curve PNG to link")
    parser.add_argument("--note", default="", help="extra Markdown appended to the card")
    parser.add_argument(
        "--parent-eval",
        action="append",
        default=[],
        metavar="LABEL=JSON",
        help="the parent's evaluation for the same LABEL: adds a model-vs-parent table (pruned models)",
    )
    parser.add_argument("--latency", type=Path, help="benchmarks/ship_latency.py JSON: adds the speed table")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    evals = {}
    for item in args.eval:
        label, _, path = item.partition("=")
        evals[label] = Path(path)
    extra = []
    if args.history:
        history = json.loads(args.history.read_text())
        extra += ["## Learning curve (dev split, evaluated during training with bf16 inference)", ""]
        extra += ["| epoch | train min | loss | PQ | AJI | Dice | F1 det |", "|---|---|---|---|---|---|---|"]
        for h in history:
            d = h.get("dev")
            if not d:
                continue
            extra.append(
                f"| {h['epoch']} | {h['train_minutes']:.0f} | {h['train']['total']:.2f} | {d['pq']:.3f} | "
                f"{d['aji']:.3f} | {d['dice']:.3f} | {d['f1_detection']:.3f} |"
            )
        if args.curve:
            extra += ["", f"![learning curve]({args.curve})"]
    if args.parent_eval:
        extra += ["", *vs_parent(evals, dict(item.partition("=")[::2] for item in args.parent_eval))]
    if args.latency:
        extra += ["", *speed_table(json.loads(args.latency.read_text()), args.latency)]
    if args.note:
        extra += ["", args.note]
    text = render_card(args.model, evals, extra="\n".join(extra))
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
