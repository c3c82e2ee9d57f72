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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--eval", action="append", default=[], metavar="LABEL=JSON")
    parser.add_argument("--history", type=Path, help="training history.json, for the learning-curve table")
    parser.add_argument("--curve", help="path (relative to the card) of a learning-curve PNG to link")
    parser.add_argument("--note", default="", help="extra Markdown appended to the card")
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
    if args.note:
        extra += ["", args.note]
    text = render_card(args.model, evals, extra="\n".join(extra))
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
