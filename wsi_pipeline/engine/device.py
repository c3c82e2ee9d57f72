"""One check of a user's device name, shared by inference and training.

A config may name ``cuda`` on a machine that only schedules work for GPU workers, so the
name is checked when the config is built and availability only where the model runs.
"""

from __future__ import annotations

import torch

from wsi_pipeline.engine.settings import check_device_name
from wsi_pipeline.errors import ConfigError

__all__ = ["torch_device"]


def torch_device(name: str, *, require_available: bool = True) -> torch.device:
    """``torch.device(name)`` for cpu/cuda, or a :class:`ConfigError` saying what to pass instead."""
    device = torch.device(check_device_name(name))  # the one name check: cpu, cuda, cuda:N
    if require_available and device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            None,
            f"device {name!r} asked for but torch sees no CUDA GPU",
            "use device 'cpu', or install a CUDA build of torch on a machine with a GPU",
        )
    return device
