"""Training loop for HoVer-Net on CPU-sized budgets.

Why it looks the way it does:
- The learning-rate schedule is driven by *wall-clock* budget (``max_minutes``)
  when one is given, because this shared 2-core machine's speed varies by up to
  50% between epochs: a step count planned from one epoch would end the cosine
  at the wrong time.
- Every epoch writes a resumable checkpoint (model, optimiser, progress, history)
  that loads with ``torch.load(weights_only=True)``, and keeps the best model by
  the dev-split metric in the project's own checkpoint format, so a run that is
  stopped at any point leaves a usable model behind.
- ``fit`` is the single loop: the `train` command, Network Slimming (``bn_l1``)
  and the pruning framework's fine-tuning (``step_hook`` re-applies masks) all use it.
"""

from __future__ import annotations

import json
import logging
import math
import platform
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader
from tqdm import tqdm

from wsi_pipeline.atomic import atomic_path
from wsi_pipeline.budget_clock import BudgetClock
from wsi_pipeline.data import Sample
from wsi_pipeline.data.torch_dataset import BalancedSampler, HoverTrainDataset
from wsi_pipeline.engine._malloc import keep_freed_memory
from wsi_pipeline.engine.device import torch_device
from wsi_pipeline.engine.infer import InferenceConfig, bf16_supported
from wsi_pipeline.engine.postproc import PostprocConfig
from wsi_pipeline.errors import ConfigError
from wsi_pipeline.evaluate import evaluate_samples
from wsi_pipeline.losses import LossWeights, bn_l1_penalty, distillation_loss, hovernet_loss

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "last.pt"
HISTORY_NAME = "history.json"


class TrainConfig(BaseModel):
    """Every training option, validated; also readable from YAML (`--config`)."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["fast", "original"] = "fast"
    width: float = Field(0.25, gt=0, le=1, description="uniform channel multiplier of the full HoVer-Net")
    batch_size: int = Field(8, ge=1)
    lr: float = Field(1.0e-3, gt=0)
    min_lr: float = Field(1.0e-5, ge=0)
    weight_decay: float = Field(1.0e-4, ge=0)
    warmup_steps: int = Field(50, ge=0)
    epochs: int = Field(50, ge=1, description="maximum number of epochs")
    max_minutes: float | None = Field(None, gt=0, description="wall-clock budget; drives the cosine schedule")
    crops_per_large_image: int = Field(8, ge=1, description="random crops per epoch from images larger than a patch")
    balance_rare_classes: bool = True
    augment: bool = True
    scale_jitter: float = Field(
        0.0, ge=0, lt=0.5, description="random rescale by up to +-this fraction (scanners differ in true µm/px)"
    )
    reach_edges: bool = Field(
        True,
        description="mirror image edges as the engine does and let output crops reach them "
        "(else a 256 px image only supervises its centre 164 px)",
    )
    bn_l1: float = Field(0.0, ge=0, description="L1 penalty on BN scales (Network Slimming)")
    seed: int = 0
    threads: int | None = Field(None, ge=1)
    eval_every: int = Field(1, ge=1)
    eval_every_minutes: float | None = Field(
        None, gt=0, description="evaluate after this much training time instead of each N epochs (GPU epochs are short)"
    )
    select_metric: str = "pq"
    grad_clip: float | None = Field(5.0, gt=0)
    bf16: bool | Literal["auto"] = Field(
        "auto", description="bf16 autocast (~2x faster on CPUs with AVX-512 BF16 or AMX); weights stay fp32"
    )
    tp_class_weights: bool = Field(True, description="weight TP cross-entropy by inverse sqrt class frequency")
    device: str = Field("cpu", description="torch device to train on: 'cpu' or 'cuda[:N]'")
    workers: int = Field(
        0, ge=0, description="data-loading worker processes (0: in the training process; use ~cores-1 on a GPU)"
    )
    loss_weights: dict[str, float] = Field(default_factory=dict)
    distill_weight: float = Field(
        0.5, ge=0, le=1, description="with a teacher: share of the distillation loss (the rest: ground truth)"
    )
    distill_temperature: float = Field(2.0, gt=0, le=20, description="softening of the teacher's NP/TP maps")
    ema_decay: float | None = Field(
        None, gt=0, lt=1,
        description="keep an exponential moving average of the weights (and BN statistics) with this decay per "
        "step; the average is what is evaluated and saved (dev scores swing by ±0.01 PQ between evaluations)",
    )


@dataclass
class FitResult:
    """What a finished (or budget-stopped) run leaves behind."""

    best_metric: float
    best_epoch: int
    epochs_run: int
    minutes: float
    history: list[dict[str, Any]] = field(default_factory=list)


def seed_everything(seed: int) -> None:
    """Fix Python, NumPy and torch RNGs so a run is repeatable on one machine."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def lr_at(progress: float, step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine from ``lr`` to ``min_lr`` over progress 0..1."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(max(progress, 0.0), 1.0)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


def tp_class_weights(samples: Sequence[Sample], num_types: int, clip: tuple[float, float] = (0.5, 5.0)) -> torch.Tensor:
    """Inverse square-root pixel frequency per type, normalised to mean 1 over nucleus classes.

    CoNSeP's "other" class is ~2% of nuclei: unweighted, the network learns never to
    predict it. The square root keeps the rare class from dominating the loss.
    """
    counts = np.zeros(num_types, dtype=np.float64)
    for sample in samples:
        if sample.type_map is not None:
            counts += np.bincount(sample.type_map.ravel(), minlength=num_types)[:num_types]
    freq = counts / max(counts.sum(), 1.0)
    weights = np.ones(num_types, dtype=np.float64)
    fg = freq[1:]
    if fg.sum() > 0:
        w = 1.0 / np.sqrt(np.maximum(fg, 1e-6))
        w = w / w[fg > 0].mean()
        weights[1:] = np.clip(w, *clip)
    return torch.as_tensor(weights, dtype=torch.float32)


def _collate_to(batch: dict[str, torch.Tensor], device: torch.device, channels_last: bool) -> dict[str, torch.Tensor]:
    batch = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    if channels_last:
        batch["image"] = batch["image"].contiguous(memory_format=torch.channels_last)
    return batch


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    with atomic_path(path, mode=None) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a resumable training checkpoint without unpickling arbitrary objects; a damaged
    or foreign file is refused with what to do (training never silently starts over)."""
    from wsi_pipeline.engine.weights import load_torch_file

    fix = (f"delete {path} to start this run again from the beginning (or train into another --workdir); "
           "the best model saved so far is unaffected")
    state = load_torch_file(path, fix=fix)
    missing = [k for k in ("model", "optimizer", "epoch", "step", "elapsed_s", "best", "best_epoch", "history")
               if not isinstance(state, dict) or k not in state]
    if missing:
        raise ConfigError(path, f"is not a wsi_pipeline training checkpoint (missing {', '.join(missing)})", fix)
    return state


def fit(
    model: torch.nn.Module,
    train_samples: Sequence[Sample],
    dev_samples: Sequence[Sample],
    cfg: TrainConfig,
    workdir: Path,
    *,
    on_best: Callable[[torch.nn.Module, dict[str, Any]], None] | None = None,
    step_hook: Callable[[torch.nn.Module], None] | None = None,
    resume: bool = False,
    progress: bool = True,
    teacher: torch.nn.Module | None = None,
    teacher_id: str | None = None,
) -> FitResult:
    """Train ``model`` in place; evaluate on ``dev_samples`` each ``eval_every`` epochs.

    ``on_best(model, dev_scores)`` is called whenever the dev metric improves (the
    caller saves the model in its format); the scores also carry ``epoch`` and
    ``train_minutes``. ``step_hook(model)`` runs after every
    optimiser step (unstructured pruning re-applies its masks there).

    With ``teacher`` the loss is ``(1 - w) * ground truth + w * distillation`` (``w`` =
    ``cfg.distill_weight``, :func:`~wsi_pipeline.losses.distillation_loss`); ``teacher_id``
    (its checksum) is kept in the checkpoint, and resuming with another teacher is refused.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    keep_freed_memory()
    seed_everything(cfg.seed)
    num_types = getattr(model, "num_types", None)
    dataset = HoverTrainDataset(
        list(train_samples),
        input_size=model.input_size,
        output_size=model.output_size,
        augment=cfg.augment,
        crops_per_large_image=cfg.crops_per_large_image,
        seed=cfg.seed,
        scale_jitter=cfg.scale_jitter,
        reach_edges=cfg.reach_edges,
    )
    if len(dataset) == 0:
        raise ConfigError(workdir, "no training samples left after the dev split", "pass more training data")
    sampler = BalancedSampler(dataset, num_types, seed=cfg.seed) if cfg.balance_rare_classes and num_types else None
    class_weights = tp_class_weights(train_samples, num_types) if cfg.tp_class_weights and num_types else None
    device = torch_device(cfg.device)
    use_bf16 = cfg.bf16 is True or (cfg.bf16 == "auto" and bf16_supported(device))
    if class_weights is not None:
        class_weights = class_weights.to(device)
    model.train()
    model.to(device=device, memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    ema = _ema_of(model, cfg.ema_decay)
    weights = LossWeights(**cfg.loss_weights)
    steps_per_epoch = math.ceil(len(dataset) / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs

    start_epoch, step, elapsed, best, best_epoch = 0, 0, 0.0, -math.inf, -1
    history: list[dict[str, Any]] = []
    ckpt_path = workdir / CHECKPOINT_NAME
    if teacher is not None:
        teacher.eval()
        teacher.to(device=device, memory_format=torch.channels_last)
        for parameter in teacher.parameters():
            parameter.requires_grad_(False)
    if resume and ckpt_path.exists():
        state = load_checkpoint(ckpt_path)
        if state.get("teacher") != teacher_id:
            raise ConfigError(
                ckpt_path,
                f"was trained with teacher {state.get('teacher') or 'none'}, not {teacher_id or 'none'}",
                "resume with the teacher of the run that wrote it, or delete it to start a new run",
            )
        try:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError, TypeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError(
                ckpt_path,
                f"was written for another model architecture ({first[:200]})",
                "resume with the same --init/--width as the run that wrote it, or delete it to start over",
            ) from None
        _resume_ema(ema, state, ckpt_path)
        start_epoch, step, elapsed = int(state["epoch"]), int(state["step"]), float(state["elapsed_s"])
        best, best_epoch = float(state["best"]), int(state["best_epoch"])
        history = json.loads(state["history"])
        log.info("resumed from %s at epoch %d (%.1f min trained)", ckpt_path, start_epoch, elapsed / 60)

    def progress_of() -> float:
        if cfg.max_minutes:
            return elapsed / (cfg.max_minutes * 60.0)
        return step / max(total_steps, 1)

    epoch = start_epoch
    last_eval_s = elapsed
    # Time the process spends stopped (kill -STOP, Ctrl-Z) is not budget: see BudgetClock.
    with BudgetClock() as clock:
        while epoch < cfg.epochs and progress_of() < 1.0:
            epoch_seed = cfg.seed * 100_003 + epoch
            dataset.set_epoch(epoch)
            generator = torch.Generator().manual_seed(epoch_seed)
            # Workers are forked per epoch so they see this epoch's augmentation seed.
            loader_opts: dict[str, Any] = {"batch_size": cfg.batch_size, "drop_last": True, "num_workers": cfg.workers,
                                           "pin_memory": device.type == "cuda"}
            if sampler is not None:
                sampler.set_epoch(epoch)
                loader = DataLoader(dataset, sampler=sampler, **loader_opts)
            else:
                loader = DataLoader(dataset, shuffle=True, generator=generator, **loader_opts)
            model.train()
            sums: dict[str, float] = {}
            n_batches = 0
            t_epoch = time.perf_counter()
            bar = tqdm(loader, desc=f"epoch {epoch + 1}", unit="batch", disable=not progress, mininterval=5.0)
            # The budget counts the waits for data too: on a GPU the loader, not the step, can be the bottleneck.
            clock.restart()
            for batch in bar:
                lr = lr_at(progress_of(), step, cfg)
                for group in opt.param_groups:
                    group["lr"] = lr
                batch = _collate_to(batch, device, channels_last=True)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                    out = model(batch["image"])
                # Loss terms stay on the device until the epoch ends: a GPU is not stalled by per-step syncs.
                loss, terms = hovernet_loss(out, batch, weights, tp_class_weights=class_weights, as_floats=False)
                if teacher is not None:
                    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                        teacher_out = teacher(batch["image"])
                    kd, kd_terms = distillation_loss(out, teacher_out, cfg.distill_temperature)
                    loss = (1.0 - cfg.distill_weight) * loss + cfg.distill_weight * kd
                    terms.update(kd_terms)
                    terms["total"] = loss.detach()
                if cfg.bn_l1 > 0:
                    penalty = bn_l1_penalty(model)
                    loss = loss + cfg.bn_l1 * penalty
                    terms["bn_l1"] = penalty.detach()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                opt.step()
                if step_hook is not None:
                    step_hook(model)
                if ema is not None:
                    ema.update_parameters(model)
                step += 1
                n_batches += 1
                for key, value in terms.items():
                    sums[key] = sums[key] + value if key in sums else value
                elapsed += clock.step()
                if progress and n_batches % 10 == 1:
                    bar.set_postfix(loss=f"{float(terms['total']):.3f}", lr=f"{lr:.2e}")
                if progress_of() >= 1.0:
                    break
            bar.close()
            epoch += 1
            row: dict[str, Any] = {
                "epoch": epoch,
                "step": step,
                "train_minutes": round(elapsed / 60.0, 2),
                "epoch_seconds": round(time.perf_counter() - t_epoch, 1),
                "lr": lr_at(progress_of(), step, cfg),
                "train": {k: round(float(v) / max(n_batches, 1), 5) for k, v in sums.items()},
                "bf16": use_bf16,
            }
            last_epoch = epoch >= cfg.epochs or progress_of() >= 1.0
            if cfg.eval_every_minutes:
                due = elapsed - last_eval_s >= cfg.eval_every_minutes * 60.0
            else:
                due = epoch % cfg.eval_every == 0
            if dev_samples and (due or last_epoch):
                last_eval_s = elapsed
                judged = model if ema is None else ema.module
                judged.eval()
                infer_cfg = InferenceConfig(batch_size=8, bf16=use_bf16, device=cfg.device)
                scores = evaluate_samples(judged, dev_samples, infer_cfg, PostprocConfig())
                dev = {k: v for k, v in scores.items() if k != "images"}
                row["dev"] = dev
                metric = dev.get(cfg.select_metric)
                if metric is None or not isinstance(metric, int | float):
                    raise ConfigError(None, f"select_metric {cfg.select_metric!r} is not a dev metric",
                                      f"choose one of {sorted(k for k, v in dev.items() if isinstance(v, float))}")
                if metric > best:
                    best, best_epoch = float(metric), epoch
                    row["best"] = True
                    if on_best is not None:
                        on_best(judged, {**dev, "epoch": epoch, "train_minutes": row["train_minutes"]})
                model.train()
            history.append(row)
            log.info("epoch %d: %s", epoch, json.dumps(row))
            _save_checkpoint(
                ckpt_path,
                {
                    "model": model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "epoch": epoch,
                    "step": step,
                    "elapsed_s": elapsed,
                    "best": best,
                    "best_epoch": best_epoch,
                    "history": json.dumps(history),
                    "config": cfg.model_dump_json(),
                    "teacher": teacher_id,
                    "ema": None if ema is None else ema.module.state_dict(),
                },
            )
            (workdir / HISTORY_NAME).write_text(json.dumps(history, indent=1))
    if ema is not None:
        # The run's result is the average: the caller prunes, saves or evaluates what ``model`` holds.
        model.load_state_dict(ema.module.state_dict())
    model.eval()
    return FitResult(best, best_epoch, epoch - start_epoch, elapsed / 60.0, history)


def _ema_of(model: torch.nn.Module, decay: float | None) -> AveragedModel | None:
    """An exponential moving average of ``model``'s weights and BN buffers, or None.

    Buffers are averaged too (``use_buffers``): BN running statistics that belong to the
    averaged weights, without a separate pass over the data to recompute them.
    """
    if decay is None:
        return None
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def _resume_ema(ema: AveragedModel | None, state: dict[str, Any], path: Path) -> None:
    """Restore the average a checkpoint holds; a run that gains EMA on resume starts it from the weights."""
    if ema is None:
        return
    saved = state.get("ema")
    if saved is None:
        log.warning("%s holds no weight average; it starts from the resumed weights", path)
        return
    try:
        ema.module.load_state_dict(saved)
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(path, f"holds a weight average of another architecture ({str(exc)[:200]})",
                          "delete it to start over") from None
    ema.n_averaged.fill_(max(int(state.get("step", 1)), 1))


def hardware_summary(device: str = "cpu") -> dict[str, Any]:
    """Where a model was trained, for its model card."""
    import os

    summary: dict[str, Any] = {
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": device,
    }
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        summary["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return summary
