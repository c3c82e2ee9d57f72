"""HoVer-Net's training losses (NP: CE + Dice; HV: MSE + MSGE; TP: CE + Dice).

Kept apart from the training loop so pruning's fine-tuning and any future
trainer share one definition. The MSGE term follows the paper: squared error of
the Sobel gradients of the HV maps, only inside nuclei, because the gradients
are what the watershed's marker energy is built from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LossWeights:
    """Per-term weights; the official release weights every term 1."""

    np_ce: float = 1.0
    np_dice: float = 1.0
    hv_mse: float = 1.0
    hv_msge: float = 1.0
    tp_ce: float = 1.0
    tp_dice: float = 1.0


def _sobel_kernels(size: int = 5, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised Sobel-like kernels (x/(x²+y²)) as in HoVer-Net's MSGE."""
    r = torch.arange(-(size // 2), size // 2 + 1, dtype=torch.float32, device=device)
    v, h = torch.meshgrid(r, r, indexing="ij")
    denom = h * h + v * v + 1.0e-15
    return h / denom, v / denom


def hv_gradients(hv: torch.Tensor) -> torch.Tensor:
    """d(h)/dx and d(v)/dy of an (N, 2, H, W) HV map, same shape, 'same' padding."""
    kh, kv = _sobel_kernels(5, hv.device)
    weight = torch.stack([kh, kv]).unsqueeze(1).to(hv.dtype)  # (2, 1, 5, 5): one kernel per channel
    return F.conv2d(hv, weight, padding=2, groups=2)


def soft_dice_loss(probs: torch.Tensor, onehot: torch.Tensor, smooth: float = 1.0e-3) -> torch.Tensor:
    """Soft Dice summed over classes, computed over the whole batch (official convention)."""
    dims = (0, 2, 3)
    inter = (probs * onehot).sum(dims)
    union = probs.sum(dims) + onehot.sum(dims)
    return (1.0 - (2.0 * inter + smooth) / (union + smooth)).sum()


def _ce_dice(
    logits: torch.Tensor, target: torch.Tensor, num_classes: int, class_weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    ce = F.cross_entropy(logits, target, weight=class_weights)
    probs = logits.softmax(1)
    onehot = F.one_hot(target, num_classes).permute(0, 3, 1, 2).to(probs.dtype)
    return ce, soft_dice_loss(probs, onehot)


def hovernet_loss(
    out: dict[str, torch.Tensor],
    batch: dict[str, torch.Tensor],
    weights: LossWeights | None = None,
    *,
    tp_class_weights: torch.Tensor | None = None,
    as_floats: bool = True,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Total loss and its terms for one batch.

    ``batch`` holds ``np`` (N,H,W) int64, ``hv`` (N,2,H,W), ``tp`` (N,H,W) int64 and
    ``has_types`` (N,) bool. The TP terms only use the samples that carry types, so
    instance-only datasets (MoNuSeg) train NP/HV without teaching "background" as
    every nucleus' class. ``tp_class_weights`` (num_types,) weights the TP
    cross-entropy so rare classes are not ignored.
    """
    w = weights or LossWeights()
    np_t = batch["np"]
    np_ce, np_dice = _ce_dice(out["np"].float(), np_t, 2)

    hv_pred = out["hv"].float()
    hv_true = batch["hv"]
    hv_mse = F.mse_loss(hv_pred, hv_true)
    focus = np_t.unsqueeze(1).to(hv_pred.dtype).expand_as(hv_pred)
    grad_err = (hv_gradients(hv_pred) - hv_gradients(hv_true)) ** 2
    hv_msge = (grad_err * focus).sum() / (focus.sum() + 1.0e-8)

    total = w.np_ce * np_ce + w.np_dice * np_dice + w.hv_mse * hv_mse + w.hv_msge * hv_msge
    terms: dict[str, Any] = {
        "np_ce": np_ce.detach(),
        "np_dice": np_dice.detach(),
        "hv_mse": hv_mse.detach(),
        "hv_msge": hv_msge.detach(),
    }
    if "tp" in out:
        sel = batch["has_types"].bool()
        if bool(sel.any()):
            tp_logits = out["tp"][sel].float()
            tp_ce, tp_dice = _ce_dice(tp_logits, batch["tp"][sel], tp_logits.shape[1], tp_class_weights)
            total = total + w.tp_ce * tp_ce + w.tp_dice * tp_dice
            terms["tp_ce"] = tp_ce.detach()
            terms["tp_dice"] = tp_dice.detach()
    terms["total"] = total.detach()
    if as_floats:
        terms = {k: float(v) for k, v in terms.items()}
    return total, terms


def bn_l1_penalty(model: torch.nn.Module) -> torch.Tensor:
    """Sum of |gamma| over every BatchNorm: Network Slimming's sparsity term."""
    terms = [m.weight.abs().sum() for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d) and m.affine]
    if not terms:
        return torch.zeros(())
    return torch.stack(terms).sum()


def _soft_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) of softened class maps, per pixel, times T² (Hinton et al. 2015)."""
    t = temperature
    log_p = F.log_softmax(student_logits.float() / t, dim=1)
    q = F.softmax(teacher_logits.float() / t, dim=1)
    kl = (q * (torch.log(q.clamp_min(1.0e-8)) - log_p)).sum(1)
    return kl.mean() * (t * t)


def distillation_loss(
    out: dict[str, torch.Tensor], teacher_out: dict[str, torch.Tensor], temperature: float = 2.0
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The student's distance to the teacher's NP/HV/TP outputs (soft targets).

    NP and TP: KL divergence of the temperature-softened class maps, so the student learns
    the teacher's uncertainty at nucleus borders and between look-alike classes (and gets
    class targets for instance-only images, which have no TP ground truth). HV: mean squared
    error to the teacher's maps, weighted towards the teacher's nuclei, where the watershed
    reads the gradients.
    """
    terms: dict[str, torch.Tensor] = {"kd_np": _soft_kl(out["np"], teacher_out["np"], temperature)}
    teacher_fg = teacher_out["np"].float().softmax(1)[:, 1:2]
    hv_err = (out["hv"].float() - teacher_out["hv"].float()) ** 2
    terms["kd_hv"] = (hv_err * (0.25 + teacher_fg)).mean()
    if "tp" in out and "tp" in teacher_out:
        terms["kd_tp"] = _soft_kl(out["tp"], teacher_out["tp"], temperature)
    total = torch.stack(list(terms.values())).sum()
    return total, {k: v.detach() for k, v in terms.items()}
