"""Parameter and multiply-accumulate counts of a model, per patch.

MACs are counted with forward hooks on ``Conv2d`` and ``Linear`` rather than
with fvcore, whose tracer trips over the ``/`` in HoVer-Net's official module
names. The forward runs on the ``meta`` device (shapes only, no arithmetic and
no copy of the weights), so counting a full-width model costs milliseconds.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call

from wsi_pipeline.errors import ModelError

__all__ = ["count_macs", "count_params", "model_macs"]


def count_params(model: nn.Module) -> int:
    """Number of parameters (each shared tensor once); pruned-away channels are simply not there."""
    return sum(p.numel() for p in model.parameters())


def _conv_macs(module: nn.Conv2d, output: Tensor) -> int:
    # Each output element is a dot product over (in_channels / groups) x kernel area.
    per_output = module.weight.shape[1] * module.weight.shape[2] * module.weight.shape[3]
    return output.numel() * per_output


def _linear_macs(module: nn.Linear, output: Tensor) -> int:
    return output.numel() * module.in_features


def count_macs(model: nn.Module, input_size: int | tuple[int, int] | None = None) -> int:
    """Multiply-accumulates of one forward pass on one RGB patch (biases and BN not counted).

    ``input_size`` defaults to the model's ``input_size`` attribute (256 for
    HoVer-Net fast, 270 for original). FLOPs are about twice this number.
    """
    if input_size is None:
        input_size = getattr(model, "input_size", None)
        if input_size is None:
            raise ModelError(None, f"{type(model).__name__} has no input_size", "pass input_size=")
    height, width = (input_size, input_size) if isinstance(input_size, int) else input_size

    total = 0

    def hook(module: nn.Module, _inputs: tuple[Tensor, ...], output: Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            total += _conv_macs(module, output)
        elif isinstance(module, nn.Linear):
            total += _linear_macs(module, output)

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    tensors = {name: torch.empty_like(t, device="meta") for name, t in model.state_dict(keep_vars=True).items()}
    try:
        with torch.no_grad():
            functional_call(model, tensors, (torch.empty(1, 3, height, width, device="meta"),), strict=False)
    finally:
        for handle in handles:
            handle.remove()
    return int(total)


def model_macs(model: nn.Module) -> int:
    """The MACs a checkpoint recorded when it was written, when its recorded parameter count
    matches the loaded model (the widths, and with them the MACs, are then the recorded
    ones); otherwise counted.

    Why: counting runs on the ``meta`` device, whose ops go through torch's Python
    reference implementations; their first call imports ``torch._dynamo``, 1.5-2.4 s that
    every run's driver paid only to print a figure the file already holds.
    """
    meta = getattr(model, "meta", None) or {}
    try:
        recorded_params, recorded_macs = int(meta["params"]), int(meta["macs"])
    except (KeyError, TypeError, ValueError):
        return count_macs(model)
    if recorded_params != count_params(model) or recorded_macs <= 0:
        return count_macs(model)
    return recorded_macs
