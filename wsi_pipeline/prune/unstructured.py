"""Unstructured magnitude pruning: zero single weights, layer by layer or network-wide.

The model keeps its dense shapes (so it loads and runs like any other checkpoint); the
zeros only pay off in storage, where :func:`storage_sizes` measures them honestly, and
not in latency: dense kernels multiply zeros as fast as anything else.

Which weights: every conv kernel except the output heads ``decoder.*.u0.conv`` (as in
structured pruning: their widths are the task, and they hold ~0.02% of the weights).
BatchNorm parameters and biases stay dense. Sparsity is stated over those prunable
kernels, and :func:`sparsity` also gives it over all parameters.

* layer-wise: every kernel loses ``ratio`` of its own weights (its smallest ``|w|``);
* network-wide (global): one ``|w|`` threshold for all kernels, so layers with many small
  weights lose more. Ties at the threshold are broken by position, so the count is exact.

Masks are boolean tensors held beside the model (never ``torch.nn.utils.prune``
reparametrisations, which our checkpoints refuse): fine-tuning re-applies them after every
optimiser step (:func:`mask_hook`), and the zeroed weights are the permanent result.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable, Mapping
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from wsi_pipeline.errors import ModelError
from wsi_pipeline.prune.importance import magnitude

__all__ = [
    "apply_masks",
    "dense_state_dict",
    "magnitude_masks",
    "mask_hook",
    "prunable_weights",
    "sparse_state_dict",
    "sparsity",
    "storage_sizes",
]

Scope = Literal["layer", "global"]
_MASK_SUFFIX = "::mask"
_VALUES_SUFFIX = "::values"


def prunable_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """Conv kernels that unstructured pruning may zero, by parameter name (heads excluded)."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d) and not name.endswith(".u0.conv"):
            out[f"{name}.weight"] = module.weight
    return out


def _lowest(scores: Tensor, k: int) -> Tensor:
    """Boolean mask of the ``k`` lowest entries (exactly k, ties broken by position)."""
    flat = scores.reshape(-1)
    drop = torch.zeros(flat.numel(), dtype=torch.bool)
    if k > 0:
        order = torch.argsort(flat, stable=True)
        drop[order[:k]] = True
    return drop.view(scores.shape)


def magnitude_masks(model: nn.Module, ratio: float, scope: Scope = "layer") -> dict[str, Tensor]:
    """Keep-masks (True = kept) zeroing ``ratio`` of the prunable weights by magnitude."""
    if not 0.0 <= ratio < 1.0:
        raise ModelError(None, f"sparsity {ratio!r} must be in [0, 1)", "give the fraction of weights to zero")
    if scope not in ("layer", "global"):
        raise ModelError(None, f"unknown unstructured scope {scope!r}", "use 'layer' or 'global'")
    weights = {name: magnitude(w).to("cpu", torch.float32) for name, w in prunable_weights(model).items()}
    if scope == "layer":
        return {name: ~_lowest(s, round(ratio * s.numel())) for name, s in weights.items()}
    names = list(weights)
    pooled = torch.cat([weights[n].reshape(-1) for n in names])
    drop = _lowest(pooled, round(ratio * pooled.numel()))
    masks, start = {}, 0
    for name in names:
        n = weights[name].numel()
        masks[name] = ~drop[start : start + n].view(weights[name].shape)
        start += n
    return masks


@torch.no_grad()
def apply_masks(model: nn.Module, masks: Mapping[str, Tensor]) -> None:
    """Zero the masked-out weights in place."""
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        param = params.get(name)
        if param is None or param.shape != mask.shape:
            raise ModelError(None, f"mask {name} does not fit the model", "compute masks on this model")
        param.mul_(mask.to(device=param.device, dtype=param.dtype))


def mask_hook(masks: Mapping[str, Tensor]) -> Callable[[nn.Module], None]:
    """A ``fit(step_hook=...)`` that keeps pruned weights at zero during fine-tuning."""

    on_device = dict(masks)

    def hook(model: nn.Module) -> None:
        # Masks are copied to the weights' device once, not at every optimiser step.
        device = next(model.parameters()).device
        if on_device and next(iter(on_device.values())).device != device:
            on_device.update({name: mask.to(device) for name, mask in masks.items()})
        apply_masks(model, on_device)

    return hook


def sparsity(model: nn.Module) -> dict[str, object]:
    """Fraction of zero weights: over prunable kernels, over all parameters, and per kernel."""
    per_layer = {}
    zeros = total = 0
    for name, w in prunable_weights(model).items():
        z = int((w == 0).sum())
        per_layer[name] = z / w.numel()
        zeros += z
        total += w.numel()
    all_zeros = sum(int((p == 0).sum()) for p in model.parameters())
    all_total = sum(p.numel() for p in model.parameters())
    return {
        "prunable": zeros / max(total, 1),
        "overall": all_zeros / max(all_total, 1),
        "prunable_weights": total,
        "zero_weights": zeros,
        "per_layer": per_layer,
    }


def sparse_state_dict(state_dict: Mapping[str, Tensor], min_sparsity: float = 0.25) -> dict[str, Tensor]:
    """Bitmask + values encoding of the sparse tensors; the others unchanged.

    A tensor with at least ``min_sparsity`` zeros becomes ``NAME::mask`` (the non-zero
    pattern, 1 bit per weight, ``numpy.packbits`` order) and ``NAME::values`` (its
    non-zeros in order), with ``NAME::shape``; below that sparsity the mask costs more
    than it saves. :func:`dense_state_dict` restores the dense tensors exactly.
    """
    out: dict[str, Tensor] = {}
    for name, t in state_dict.items():
        t = t.detach().to("cpu")
        if t.is_floating_point() and t.numel() >= 64 and float((t == 0).float().mean()) >= min_sparsity:
            nz = (t != 0).reshape(-1)
            bits = np.packbits(nz.numpy())
            out[name + _MASK_SUFFIX] = torch.from_numpy(bits)
            out[name + _VALUES_SUFFIX] = t.reshape(-1)[nz].contiguous()
            out[name + "::shape"] = torch.tensor(list(t.shape), dtype=torch.int64)
        else:
            out[name] = t.contiguous()
    return out


def dense_state_dict(sparse: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Inverse of :func:`sparse_state_dict`."""
    out: dict[str, Tensor] = {}
    for name, t in sparse.items():
        if name.endswith(_MASK_SUFFIX):
            base = name[: -len(_MASK_SUFFIX)]
            shape = [int(v) for v in sparse[base + "::shape"].tolist()]
            n = int(np.prod(shape))
            nz = torch.from_numpy(np.unpackbits(t.numpy(), count=n).astype(bool))
            values = sparse[base + _VALUES_SUFFIX]
            dense = torch.zeros(n, dtype=values.dtype)
            dense[nz] = values
            out[base] = dense.view(shape)
        elif not name.endswith((_VALUES_SUFFIX, "::shape")):
            out[name] = t
    return out


def storage_sizes(model: nn.Module, meta: Mapping[str, object] | None = None) -> dict[str, int]:
    """Bytes of the model stored four ways: dense / sparse safetensors, each raw and gzipped.

    ``dense`` is what ``save_model`` writes (zeros stored as zeros); ``sparse`` is
    :func:`sparse_state_dict` in a safetensors file. gzip (level 6) shows what a generic
    compressor gets from the zeros alone.
    """
    from safetensors.torch import save

    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    header = {"wsi_pipeline": json.dumps(dict(meta or {}))}
    dense = save(state, metadata=header)
    sparse = save(sparse_state_dict(state), metadata=header)
    return {
        "dense": len(dense),
        "dense_gzip": len(gzip.compress(dense, 6)),
        "sparse": len(sparse),
        "sparse_gzip": len(gzip.compress(sparse, 6)),
    }
