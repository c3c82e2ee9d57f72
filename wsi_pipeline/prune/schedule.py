"""Pruning schedules: one-shot, iterative and IMP, each with a fine-tuning budget.

* **one-shot**: prune to the target, then fine-tune with the whole budget;
* **iterative** (``steps`` = N): N rounds of prune + fine-tune, each with 1/N of the budget.
  Round ``i`` keeps ``(1 - ratio) ** (i / N)`` of the parent's parameters (or weights),
  so every round removes the same fraction of what is left, as IMP does;
* **Network Slimming** adds a sparsity-training phase before the first prune (fine-tuning
  with an L1 penalty on the BatchNorm gammas, ``TrainConfig.bn_l1``) and keeps the penalty
  on in every fine-tune but the last; the budget is shared by the N + 1 phases;
* **IMP** ranks channels by filter magnitude across the whole network and, by default,
  *rewinds the learning rate* (Renda et al., 2020): each fine-tune replays a cosine from the
  parent's training learning rate instead of fine-tuning at a small one.

"The same budget" is the same total fine-tuning time (``minutes``), or the same number of
epochs split among the phases (at least one each). Fine-tuning is :func:`wsi_pipeline.train.fit`
without dev evaluation: the caller evaluates the result once, on its own held-out data.
"""

from __future__ import annotations

import copy
import logging
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from torch import nn

from wsi_pipeline.data import Sample
from wsi_pipeline.engine.macs import count_macs, count_params
from wsi_pipeline.engine.model import HoVerNet
from wsi_pipeline.errors import ConfigError
from wsi_pipeline.prune.importance import CRITERIA
from wsi_pipeline.prune.structured import prune_channels
from wsi_pipeline.prune.unstructured import apply_masks, magnitude_masks, mask_hook, sparsity

__all__ = [
    "METHODS",
    "STRUCTURED",
    "UNSTRUCTURED",
    "Finetune",
    "PruneConfig",
    "PruneOutcome",
    "run_control",
    "run_pruning",
]

log = logging.getLogger(__name__)

STRUCTURED = ("l1", "l2", "slimming", "imp")
UNSTRUCTURED = {"unstructured-layer": "layer", "unstructured-global": "global"}
METHODS = STRUCTURED + tuple(UNSTRUCTURED)
_GLOBAL_BY_DEFAULT = {"slimming", "imp"}  # Network Slimming and IMP rank network-wide in their papers


@dataclass
class PruneConfig:
    """What to prune and how; validated on creation (a :class:`ConfigError` names the option).

    ``ratio``: fraction of the parent's parameters removed (structured) or of its prunable
    weights zeroed (unstructured). ``global_ranking=None`` takes the method's default
    (network-wide for slimming and IMP, per-layer uniform for L1/L2).
    """

    method: str
    ratio: float
    schedule: Literal["oneshot", "iterative"] = "oneshot"
    steps: int = 1
    global_ranking: bool | None = None
    round_to: int = 8
    max_layer_ratio: float = 0.9
    lr_rewind: bool = True
    finetune_lr: float = 1.0e-4
    rewind_lr: float | None = None
    slimming_penalty: float = 1.0e-4
    slimming_lr: float = 1.0e-3

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(None, f"unknown pruning method {self.method!r}", f"use one of {', '.join(METHODS)}")
        if not 0.0 < self.ratio < 1.0:
            raise ConfigError(None, f"--ratio {self.ratio!r} must be between 0 and 1", "e.g. --ratio 0.7")
        if self.schedule not in ("oneshot", "iterative"):
            raise ConfigError(None, f"unknown schedule {self.schedule!r}", "use oneshot or iterative")
        if self.steps < 1 or (self.schedule == "oneshot" and self.steps != 1):
            raise ConfigError(
                None, f"--steps {self.steps} with --schedule {self.schedule}", "one-shot has 1 step; iterative >= 2"
            )
        if self.schedule == "iterative" and self.steps < 2:
            raise ConfigError(None, "an iterative schedule needs --steps >= 2", "e.g. --schedule iterative --steps 3")
        if self.method in UNSTRUCTURED and self.global_ranking is not None:
            implied = UNSTRUCTURED[self.method] == "global"
            if self.global_ranking != implied:
                raise ConfigError(
                    None,
                    f"--global contradicts --method {self.method}",
                    "the method name says layer-wise or network-wide; drop --global",
                )
        if self.round_to < 1:
            raise ConfigError(None, f"round_to={self.round_to} must be >= 1", "use e.g. 8")
        if not 0.0 < self.max_layer_ratio < 1.0:
            raise ConfigError(None, f"max_layer_ratio={self.max_layer_ratio} must be in (0, 1)", "use e.g. 0.9")

    @property
    def structured(self) -> bool:
        return self.method in STRUCTURED

    @property
    def uses_global(self) -> bool:
        if self.method in UNSTRUCTURED:
            return UNSTRUCTURED[self.method] == "global"
        return self.method in _GLOBAL_BY_DEFAULT if self.global_ranking is None else self.global_ranking

    def step_ratios(self) -> list[float]:
        """Cumulative ratio after each round: the kept fraction shrinks geometrically."""
        keep = 1.0 - self.ratio
        return [1.0 - keep ** ((i + 1) / self.steps) for i in range(self.steps)]


@dataclass
class Finetune:
    """Fine-tuning data and budget (``epochs`` or ``minutes``, for the whole schedule)."""

    samples: Sequence[Sample]
    epochs: int | None = None
    minutes: float | None = None
    base: Any = None  # a TrainConfig (batch size, threads, seed...); defaults if None
    workdir: Path | None = None
    datasets: Sequence[str] = ()
    progress: bool = False

    def __post_init__(self) -> None:
        if (self.epochs is None) == (self.minutes is None):
            raise ConfigError(None, "fine-tuning needs exactly one budget", "give --epochs E or --minutes M")
        if self.epochs is not None and self.epochs < 1:
            raise ConfigError(None, f"--epochs {self.epochs} must be >= 1", "e.g. --epochs 2")
        if self.minutes is not None and not self.minutes > 0:
            raise ConfigError(None, f"--minutes {self.minutes} must be > 0", "e.g. --minutes 5")
        if not self.samples:
            raise ConfigError(None, "no fine-tuning samples", "pass labelled datasets to --finetune")


@dataclass
class PruneOutcome:
    """The pruned model, its lineage record (for the checkpoint) and per-round figures."""

    model: HoVerNet
    lineage: dict[str, Any]
    rounds: list[dict[str, Any]] = field(default_factory=list)


def _phase_config(finetune: Finetune, phases: int, lr: float, bn_l1: float) -> Any:
    from wsi_pipeline.train import TrainConfig

    base = finetune.base if finetune.base is not None else TrainConfig()
    update: dict[str, Any] = {
        "lr": lr,
        "min_lr": min(base.min_lr, lr),
        "warmup_steps": 0,  # a trained network needs no warm-up, and short budgets cannot afford one
        "bn_l1": bn_l1,
    }
    if finetune.minutes is not None:
        update.update(max_minutes=finetune.minutes / phases, epochs=1_000_000)
    else:
        update.update(max_minutes=None, epochs=max(1, finetune.epochs // phases))
    return base.model_copy(update=update)


def _fine_tune(model: nn.Module, finetune: Finetune, cfg: Any, hook: Any, tag: str) -> dict[str, Any]:
    from wsi_pipeline.train import fit

    with tempfile.TemporaryDirectory(prefix="prune-ft-") as tmp:
        workdir = (finetune.workdir / tag) if finetune.workdir else Path(tmp)
        result = fit(model, finetune.samples, (), cfg, workdir, step_hook=hook, progress=finetune.progress)
    # Pruning surgery, importance scores and checkpoints work on CPU tensors; fit may have used a GPU.
    model.to("cpu")
    steps = int(result.history[-1]["step"]) if result.history else 0
    return {
        "minutes": round(result.minutes, 3),
        "optimizer_steps": steps,
        "epochs": result.epochs_run,
        "lr": cfg.lr,
        "bn_l1": cfg.bn_l1,
    }


def _finetune_lineage(finetune: Finetune, phases: list[dict[str, Any]]) -> dict[str, Any]:
    """What fine-tuning a lineage records: data, budget, and each phase's time and steps."""
    return {
        "datasets": [str(d) for d in finetune.datasets],
        "samples": len(finetune.samples),
        "budget_epochs": finetune.epochs,
        "budget_minutes": finetune.minutes,
        "train_minutes": round(sum(r["minutes"] for r in phases), 3),
        "optimizer_steps": sum(r["optimizer_steps"] for r in phases),
        "phases": phases,
    }


def _parent_name(model: nn.Module) -> str | None:
    meta = getattr(model, "meta", None) or {}
    return meta.get("name")


def _parent_lr(model: nn.Module) -> float | None:
    meta = getattr(model, "meta", None) or {}
    lr = ((meta.get("training") or {}).get("config") or {}).get("lr")
    return float(lr) if isinstance(lr, int | float) else None


def run_pruning(model: HoVerNet, cfg: PruneConfig, finetune: Finetune | None = None) -> PruneOutcome:
    """Prune ``model`` (left untouched) by ``cfg``, fine-tuning between/after rounds if given data."""
    started = time.perf_counter()
    work = copy.deepcopy(model)
    meta = getattr(model, "meta", None)
    parent_params = count_params(model)
    parent_macs = count_macs(model)
    reference_widths = dict(model.spec.widths)
    rewind_lr = cfg.rewind_lr or _parent_lr(model) or 1.0e-3
    slimming = cfg.method == "slimming"
    rewind = cfg.method == "imp" and cfg.lr_rewind
    phases = cfg.steps + (1 if slimming else 0)
    ft_records: list[dict[str, Any]] = []
    rounds: list[dict[str, Any]] = []

    if slimming and finetune is not None:
        phase_cfg = _phase_config(finetune, phases, cfg.slimming_lr, cfg.slimming_penalty)
        ft_records.append({"phase": "sparsity", **_fine_tune(work, finetune, phase_cfg, None, "sparsity")})

    for i, step_ratio in enumerate(cfg.step_ratios()):
        last = i == cfg.steps - 1
        hook = None
        if cfg.structured:
            criterion = CRITERIA[cfg.method]
            result = prune_channels(
                work,
                criterion.scorer,
                step_ratio,
                global_ranking=cfg.uses_global,
                normalize=criterion.normalize,
                round_to=cfg.round_to,
                max_layer_ratio=cfg.max_layer_ratio,
                reference_params=parent_params,
                reference_widths=reference_widths,
            )
            work = result.model
            record = {
                "round": i + 1,
                "target_ratio": round(step_ratio, 5),
                "achieved_ratio": round(result.removed_fraction, 5),
                "params": result.params_after,
            }
        else:
            masks = magnitude_masks(work, step_ratio, UNSTRUCTURED[cfg.method])
            apply_masks(work, masks)
            hook = mask_hook(masks)
            record = {
                "round": i + 1,
                "target_ratio": round(step_ratio, 5),
                "achieved_ratio": round(float(sparsity(work)["prunable"]), 5),
            }
        if finetune is not None:
            if slimming and not last:
                phase_cfg = _phase_config(finetune, phases, cfg.slimming_lr, cfg.slimming_penalty)
            else:
                phase_cfg = _phase_config(finetune, phases, rewind_lr if rewind else cfg.finetune_lr, 0.0)
            ft = _fine_tune(work, finetune, phase_cfg, hook, f"round{i + 1}")
            ft_records.append({"phase": f"round{i + 1}", **ft})
            record["finetune"] = ft
        rounds.append(record)
        log.info("pruning round %d/%d: %s", i + 1, cfg.steps, record)

    work.eval()
    params = count_params(work)
    lineage: dict[str, Any] = {
        "parent": _parent_name(model),
        "parent_path": (meta or {}).get("path"),
        "parent_params": parent_params,
        "parent_macs": parent_macs,
        "method": cfg.method,
        "kind": "structured" if cfg.structured else "unstructured",
        "ratio": cfg.ratio,
        "schedule": cfg.schedule,
        "steps": cfg.steps,
        "global": cfg.uses_global,
        "params": params,
        "macs": count_macs(work),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "seconds": round(time.perf_counter() - started, 1),
    }
    if cfg.structured:
        lineage.update(
            achieved_ratio=round(1.0 - params / parent_params, 5),
            criterion={
                "l1": "filter L1 norm",
                "l2": "filter L2 norm",
                "slimming": "BatchNorm |gamma|",
                "imp": "filter L1 norm",
            }[cfg.method],
            round_to=cfg.round_to,
            max_layer_ratio=cfg.max_layer_ratio,
        )
    else:
        stats = sparsity(work)
        lineage.update(
            achieved_ratio=round(float(stats["prunable"]), 5), sparsity_overall=round(float(stats["overall"]), 5)
        )
    if cfg.method == "imp":
        lineage["lr_rewind"] = cfg.lr_rewind
    if slimming:
        lineage["slimming_penalty"] = cfg.slimming_penalty if finetune is not None else 0.0
    lineage["finetune"] = _finetune_lineage(finetune, ft_records) if finetune is not None else None
    if meta is not None:
        work.meta = copy.deepcopy(meta)
    return PruneOutcome(work, lineage, rounds)


def run_control(model: HoVerNet, finetune: Finetune, lr: float) -> PruneOutcome:
    """The parent fine-tuned with a pruning point's budget and nothing removed.

    A pruned model that beats its parent may owe it to the extra training, not to pruning;
    this control, given the same data and budget, tells the two apart.
    """
    started = time.perf_counter()
    work = copy.deepcopy(model)
    cfg = _phase_config(finetune, 1, lr, 0.0)
    ft = _fine_tune(work, finetune, cfg, None, "control")
    work.eval()
    meta = getattr(model, "meta", None)
    params, macs = count_params(work), count_macs(work)  # nothing removed: the parent's counts
    lineage: dict[str, Any] = {
        "parent": _parent_name(model),
        "parent_path": (meta or {}).get("path"),
        "parent_params": params,
        "parent_macs": macs,
        "method": "control",
        "kind": "control",
        "ratio": 0.0,
        "schedule": "oneshot",
        "steps": 1,
        "global": False,
        "params": params,
        "macs": macs,
        "achieved_ratio": 0.0,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "seconds": round(time.perf_counter() - started, 1),
        "finetune": _finetune_lineage(finetune, [{"phase": "control", **ft}]),
    }
    if meta is not None:
        work.meta = copy.deepcopy(meta)
    return PruneOutcome(work, lineage, [])
