"""`wsi-pipeline train DATASET... --out MODEL`: train a HoVer-Net on labelled data."""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from pathlib import Path
from typing import Any

from wsi_pipeline.errors import ConfigError

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a HoVer-Net on labelled datasets (folder, CoNSeP .mat, PanNuke, MoNuSeg XML)",
        description="Train HoVer-Net from scratch (or from --init) with a held-out dev split of whole source tiles.",
    )
    p.add_argument("datasets", nargs="+", type=Path, metavar="DATASET",
                   help="labelled dataset folders (CoNSeP, PanNuke, MoNuSeg XML or images/ + labels/)")
    p.add_argument("--out", required=True, type=Path, help="model file to write (.safetensors); best dev checkpoint")
    p.add_argument("--config", type=Path, help="YAML file with training options (see TrainConfig)")
    p.add_argument("--dev-split", type=Path, default=None, help="YAML listing held-out source tiles")
    p.add_argument("--init", help="start from this model (name or path) instead of random weights")
    p.add_argument("--name", help="model name recorded in its metadata (default: the --out stem)")
    p.add_argument("--description", default="", help="one-line description for `wsi-pipeline models`")
    p.add_argument("--workdir", type=Path, help="where resumable checkpoints go (default: OUT.train/)")
    p.add_argument("--resume", action="store_true", help="continue from WORKDIR/last.pt")
    p.add_argument("--max-minutes", type=float, help="wall-clock training budget (drives the LR schedule)")
    p.add_argument("--epochs", type=int, help="maximum epochs")
    p.add_argument("--width", type=float, help="channel multiplier of the full-width HoVer-Net (e.g. 0.25)")
    p.add_argument("--batch-size", type=int, help="crops per optimiser step (8)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice, all cores)")
    p.add_argument("--bn-l1", type=float, help="L1 penalty on BN scales (Network Slimming)")
    p.add_argument("--seed", type=int, help="random seed of crops, augmentation and initial weights (0)")
    p.add_argument("--device", help="torch device: cpu (default) or cuda[:N]")
    p.add_argument("--workers", type=int, help="data-loading worker processes (default 0)")
    p.add_argument("--teacher", metavar="NAME|PATH",
                   help="distil from this model's NP/HV/TP outputs (same classes and mode as the student)")
    p.add_argument("--distill-weight", type=float, help="share of the distillation loss, 0..1 (0.5)")
    p.add_argument("--distill-temperature", type=float, help="softening of the teacher's class maps (2)")
    p.add_argument("--ema-decay", type=float,
                   help="evaluate and save an exponential moving average of the weights (e.g. 0.998 per step)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (for logs of background runs)")
    p.set_defaults(func=run)


def _load_config(args: argparse.Namespace) -> Any:
    from wsi_pipeline.config import load_options
    from wsi_pipeline.train import TrainConfig

    overrides = {name: getattr(args, name) for name in
                 ("max_minutes", "epochs", "width", "batch_size", "threads", "bn_l1", "seed", "device", "workers",
                  "distill_weight", "distill_temperature", "ema_decay")}
    return load_options(TrainConfig, args.config, overrides)


def _check_out(args: argparse.Namespace, workdir: Path, init_path: str | None) -> None:
    """Training writes a new model: it never replaces an existing file (a shipped or committed
    model) except the one its own resumed run is writing."""
    out = args.out.resolve()
    for what, ref in (("--init", init_path), ("--teacher", getattr(args, "teacher", None))):
        if ref:
            from wsi_pipeline.engine.registry import resolve_model

            if resolve_model(ref) == out:
                raise ConfigError(args.out, f"is the {what} model itself", "write the trained model under a new name")
    resuming = args.resume and (workdir / "last.pt").is_file()
    if out.exists() and not resuming:
        raise ConfigError(
            args.out,
            "exists already; training never overwrites a model in place",
            "choose a new --out (a new model name), or pass --resume to continue the run that writes it",
        )


def run(args: argparse.Namespace) -> int:
    import torch

    from wsi_pipeline.config import file_checksum
    from wsi_pipeline.data import load_dataset, load_dev_split, split_dev
    from wsi_pipeline.engine.macs import count_macs, count_params
    from wsi_pipeline.engine.model import ChannelSpec, HoVerNet
    from wsi_pipeline.engine.weights import load_model, save_model
    from wsi_pipeline.train import fit, hardware_summary

    cfg = _load_config(args)
    datasets = [load_dataset(path) for path in args.datasets]
    typed = [d for d in datasets if d.has_types]
    classes = typed[0].classes if typed else []
    for d in typed[1:]:
        if d.classes != classes:
            raise ConfigError(d.root, "class list differs from the first typed dataset",
                              "train on datasets that share one class convention")
    samples = [s for d in datasets for s in d.samples]
    dev_sources = load_dev_split(args.dev_split) if args.dev_split else load_dev_split()
    train_samples, dev_samples = split_dev(samples, dev_sources)
    log.info("%d training and %d dev images (%d dev sources)", len(train_samples), len(dev_samples), len(dev_sources))

    num_types = typed[0].num_types if typed else None
    init_meta: dict[str, Any] = {}
    if args.init:
        model = load_model(args.init)
        init_meta = dict(getattr(model, "meta", {}) or {})
        model.train()
    else:
        model = HoVerNet(mode=cfg.mode, num_types=num_types, spec=ChannelSpec.scaled(cfg.width, cfg.mode))
    init_sha = file_checksum(init_meta["path"]) if init_meta.get("path") else None
    teacher, teacher_sha, distillation = None, None, None
    if args.teacher:
        from wsi_pipeline.engine.registry import resolve_model
        from wsi_pipeline.prune.distill import check_teacher, teacher_record

        teacher_path = resolve_model(args.teacher)
        teacher = load_model(teacher_path)
        if not args.init:
            model.meta = {"classes": classes}
        check_teacher(teacher, model, teacher_path)
        teacher_sha = file_checksum(teacher_path)
        distillation = teacher_record(teacher_path, teacher_sha, teacher.meta, cfg.distill_weight,
                                      cfg.distill_temperature)
    name = args.name or args.out.name.split(".")[0]
    workdir = args.workdir or args.out.with_name(args.out.name + ".train")
    _check_out(args, workdir, init_meta.get("path"))
    params = count_params(model)
    macs = count_macs(model)
    log.info("model %s: %.2f M parameters, %.2f GMAC per patch", name, params / 1e6, macs / 1e9)
    started = time.strftime("%Y-%m-%dT%H:%M:%S")

    def on_best(m: torch.nn.Module, dev: dict[str, Any]) -> None:
        meta = {
            "name": name,
            "description": args.description,
            "classes": classes,
            "mpp": datasets[0].mpp,
            "params": params,
            "macs": macs,
            "training": {
                "datasets": [str(p) for p in args.datasets],
                "train_images": len(train_samples),
                "dev_images": len(dev_samples),
                "dev_sources": sorted(dev_sources),
                "config": json.loads(cfg.model_dump_json()),
                "started": started,
                "hardware": hardware_summary(cfg.device),
                "init": args.init,
                "best_epoch": dev.get("epoch"),
                "train_minutes": dev.get("train_minutes"),
            },
            "metrics": {"dev": dev},
        }
        if distillation is not None:
            meta["distillation"] = distillation
        if init_meta.get("lineage"):
            # A pruned model fine-tuned further keeps its pruning history; this run is added to it.
            lineage = copy.deepcopy(init_meta["lineage"])  # on_best runs many times: append once per run
            lineage.setdefault("further_training", []).append(
                {"init": str(args.init), "init_sha256": init_sha, "best_epoch": dev.get("epoch"),
                 "train_minutes": dev.get("train_minutes"), "device": cfg.device, "distillation": distillation}
            )
            meta["lineage"] = lineage
        args.out.parent.mkdir(parents=True, exist_ok=True)
        save_model(m, args.out, meta)
        log.info("saved best model (dev %s=%.4f) to %s", cfg.select_metric, dev.get(cfg.select_metric, 0.0), args.out)

    result = fit(model, train_samples, dev_samples, cfg, workdir, on_best=on_best, resume=args.resume,
                 progress=not args.no_progress, teacher=teacher, teacher_id=teacher_sha)
    print(json.dumps({"out": str(args.out), "best_" + cfg.select_metric: result.best_metric,
                      "best_epoch": result.best_epoch, "epochs_run": result.epochs_run,
                      "minutes": round(result.minutes, 1)}, indent=1))
    return 0
