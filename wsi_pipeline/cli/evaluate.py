"""`wsi-pipeline evaluate DATASET [--model NAME|PATH] [--json OUT] [--save-pred DIR]`."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from wsi_pipeline.atomic import write_json_atomic

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="run a model over a labelled dataset and score it (same keys as `score`)",
        description="Predict every image of a labelled dataset (any size) and score it with HoVer-Net's metrics.",
    )
    p.add_argument("dataset", type=Path, metavar="DATASET", help="labelled dataset folder (as for `train`)")
    p.add_argument("--model", help="shipped model name or checkpoint path (default: the default shipped model)")
    p.add_argument("--json", type=Path, help="write the scores (with per-image rows) to this file")
    p.add_argument("--save-pred", type=Path, help="save NAME.npz predictions (inst_map, type_map) here")
    p.add_argument("--dev-split", type=Path, help="evaluate only the held-out sources listed in this YAML")
    p.add_argument("--format", default="auto", help="dataset format (default: auto-detect)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (8)")
    p.add_argument(
        "--runtime", choices=("auto", "torch", "openvino"), default="torch",
        help="inference runtime (torch: the fp32 reference; auto/openvino: what `run` uses on the CPU)",
    )
    p.add_argument("--window", type=int, help="network input side in px (default 768; 256: one patch at a time)")
    p.add_argument("--bf16", choices=("auto", "true", "false"), default="false", help="bf16 arithmetic (false)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--device", default="cpu", help="torch device: cpu (default), cuda or cuda:N")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from wsi_pipeline.data import load_dataset, load_dev_split, split_dev
    from wsi_pipeline.engine.device import torch_device
    from wsi_pipeline.engine.infer import InferenceConfig
    from wsi_pipeline.engine.registry import default_model_name
    from wsi_pipeline.engine.weights import load_model
    from wsi_pipeline.evaluate import evaluate_samples

    torch_device(args.device)  # no GPU: one line now, not a traceback from the first forward pass
    model_ref = args.model or default_model_name()
    model = load_model(model_ref, device=args.device)
    dataset = load_dataset(args.dataset, args.format)
    samples = dataset.samples
    if args.dev_split:
        _, samples = split_dev(samples, load_dev_split(args.dev_split))
    scores = evaluate_samples(
        model,
        samples,
        InferenceConfig(
            device=args.device, batch_size=args.batch_size, threads=args.threads, runtime=args.runtime,
            window=args.window, bf16={"auto": "auto", "true": True, "false": False}[args.bf16],
        ),
        save_pred_dir=args.save_pred,
        progress=True,
    )
    scores = {"model": model.meta.get("name", str(model_ref)), "dataset": str(args.dataset), **scores}
    summary = {k: v for k, v in scores.items() if k != "images"}
    print(json.dumps(summary, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(args.json, scores, indent=1, allow_nan=True)
    return 0
