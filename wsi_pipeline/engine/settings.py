"""How the engine runs, as plain settings: what the driver builds and ships to the workers.

Nothing here imports torch. The driver of a run only describes the inference (this module);
torch is imported where the network runs, on the workers, and in the driver only by its
model check (:func:`wsi_pipeline.batch.plan.prepare_model`). Importing torch costs seconds,
a visible share of a run on a small slide, so a driver that one day reads everything it
needs from the checkpoint's metadata can leave it out entirely.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from wsi_pipeline.errors import ConfigError

__all__ = ["ALIGN", "DEFAULT_WINDOW", "RUNTIMES", "InferenceConfig", "check_device_name"]

# The encoder's total stride: predictions depend on a pixel's phase on this grid.
ALIGN = 8
# Input side of the windows a tile is cut into, chosen by measurement
# (benchmarks/engine_latency.py --sizes, results in benchmarks/results/engine_latency.json).
DEFAULT_WINDOW = 768
RUNTIMES: tuple[str, ...] = ("auto", "torch", "openvino")

_DEVICE = re.compile(r"(cpu|cuda)(:\d+)?")


def check_device_name(name: object) -> str:
    """``name`` if it names a device the engine supports (cpu, cuda, cuda:N), else a
    :class:`ConfigError` saying what to pass; whether a GPU is there is checked where the
    model runs (:func:`wsi_pipeline.engine.device.torch_device`)."""
    if not isinstance(name, str) or not _DEVICE.fullmatch(name):
        raise ConfigError(None, f"device {name!r} is not supported", "use 'cpu' or 'cuda[:N]'")
    return name


@dataclass(frozen=True)
class InferenceConfig:
    """How the engine runs; every field only trades speed for rounding, never results.

    ``bf16="auto"`` turns bf16 autocast on only where the hardware computes it natively
    (CPU with AVX-512 BF16 or AMX, CUDA GPUs with bf16 tensor cores): elsewhere it is
    emulated and slower than fp32. ``bf16=True`` forces it anyway (useful for testing).
    ``threads`` sets OpenVINO's thread count and, in a process where torch is loaded,
    ``torch.set_num_threads`` for the whole process (the only knob torch offers); ``None``
    leaves torch's default (the cores this process may use when torch is not loaded).
    ``runtime``: ``torch`` (the reference; the library default), ``openvino`` or ``auto``
    (OpenVINO on the CPU where installed; what ``wsi-pipeline run`` uses).
    ``window``: the network's input side for whole-tile inference; ``None`` takes
    :data:`DEFAULT_WINDOW` for models that accept any size (HoVer-Net), the model's own
    input size otherwise. ``batch_size`` counts windows per runtime call.
    ``streams``: OpenVINO windows in flight at once, sharing the ``threads`` (see
    :class:`~wsi_pipeline.engine.runtime.OpenVINORuntime`); torch ignores it.
    """

    device: str = "cpu"
    threads: int | None = None
    batch_size: int = 4
    bf16: bool | Literal["auto"] = False
    compile: bool = False
    channels_last: bool = True
    runtime: Literal["auto", "torch", "openvino"] = "torch"
    window: int | None = None
    streams: int = 1

    def __post_init__(self) -> None:
        check_device_name(self.device)
        if self.threads is not None and (
            isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 1
        ):
            raise ConfigError(
                None, f"threads={self.threads!r} must be a positive integer", "give e.g. threads=2 or None"
            )
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(
                None, f"batch_size={self.batch_size!r} must be a positive integer", "give e.g. batch_size=4"
            )
        if isinstance(self.streams, bool) or not isinstance(self.streams, int) or self.streams < 1:
            raise ConfigError(None, f"streams={self.streams!r} must be a positive integer", "give e.g. streams=2")
        if self.bf16 not in (True, False, "auto"):
            raise ConfigError(None, f"bf16={self.bf16!r} is not one of True, False, 'auto'", "use bf16='auto'")
        for name in ("compile", "channels_last"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(None, f"{name}={getattr(self, name)!r} must be True or False")
        if self.runtime not in RUNTIMES:
            raise ConfigError(None, f"runtime={self.runtime!r} is not one of {', '.join(RUNTIMES)}", "use 'auto'")
        if self.window is not None and (isinstance(self.window, bool) or not isinstance(self.window, int)):
            raise ConfigError(None, f"window={self.window!r} must be an integer side in px", "give e.g. window=768")
