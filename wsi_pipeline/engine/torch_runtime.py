"""The torch side of the engine: the eager runtime, and tracing a model for OpenVINO.

Kept apart from :mod:`~wsi_pipeline.engine.runtime` so that a process running a model whose
OpenVINO conversion is already cached never imports torch (seconds at every start): only the
torch runtime, a conversion and the checksum of an in-memory model come here.
"""

from __future__ import annotations

import hashlib
import warnings
from typing import Any

import numpy as np
import torch
from torch import nn

from wsi_pipeline.engine.device import torch_device
from wsi_pipeline.errors import ModelError

__all__ = ["TorchRuntime", "convert_to_openvino", "weights_checksum"]

# Largest f32 difference from torch accepted when a conversion is checked, relative to the
# output's range (at least 1; measured on the shipped models: < 1e-4).
VERIFY_TOLERANCE = 1e-2


def _raw_check(model: nn.Module, raw: Any) -> None:
    if not isinstance(raw, dict) or "np" not in raw or "hv" not in raw:
        raise ModelError(
            None,
            f"{type(model).__name__}.forward returned {type(raw).__name__} without 'np'/'hv' keys",
            "use a HoVer-Net model whose forward returns a dict of np, hv (and tp) maps",
        )


def _probabilities(raw: dict[str, torch.Tensor], with_types: bool) -> dict[str, torch.Tensor]:
    """The maps callers use, from the network's logits (one definition for both runtimes)."""
    out = {"np_prob": torch.softmax(raw["np"].float(), dim=1)[:, 1], "hv": raw["hv"].float()}
    if with_types and "tp" in raw:
        out["tp_prob"] = torch.softmax(raw["tp"].float(), dim=1)
    return out


class TorchRuntime:
    """PyTorch eager (or compiled) on CPU or CUDA.

    The model is put in eval mode and moved to the device and memory layout in place
    (no copy: a second copy of a 37 M-parameter model per worker is not free).
    """

    name = "torch"

    def __init__(
        self,
        model: nn.Module,
        device: str = "cpu",
        *,
        bf16: bool = False,
        channels_last: bool = True,
        compile: bool = False,
        batch_size: int = 1,
        threads: int | None = None,
    ) -> None:
        self.device = torch_device(device)
        if threads is not None:
            torch.set_num_threads(threads)
        self.uses_bf16 = bf16
        self.precision = "bf16" if bf16 else "f32"
        self.channels_last = channels_last
        self.batch_size = batch_size
        self.with_types = getattr(model, "num_types", None) is not None
        layout = torch.channels_last if channels_last else torch.contiguous_format
        model.eval()
        model.to(device=self.device, memory_format=layout)
        self.model = model
        self.compiled = compile
        # dynamic=False: one static graph per batch shape; run() pads short batches to
        # batch_size so a tile's last batch never triggers a recompile.
        self._forward = torch.compile(model, dynamic=False) if compile else model

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        n = batch.shape[0]
        patches = torch.from_numpy(np.ascontiguousarray(batch))
        if self.compiled and n < self.batch_size:
            patches = torch.cat([patches, patches.new_zeros((self.batch_size - n, *patches.shape[1:]))])
        with torch.inference_mode():
            patches = patches.to(self.device, non_blocking=True)
            # NHWC permuted to NCHW is already channels_last in memory: no copy needed for it.
            x = patches.permute(0, 3, 1, 2).float()
            x = x.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.uses_bf16):
                raw = self._forward(x)
            _raw_check(self.model, raw)
            out = _probabilities({k: v[:n] for k, v in raw.items()}, self.with_types)
            return {k: v.cpu().numpy() for k, v in out.items()}


class _Exported(nn.Module):
    """The graph OpenVINO compiles: uint8 NHWC in, softmaxed maps out (a tuple: fixed order)."""

    def __init__(self, model: nn.Module, with_types: bool) -> None:
        super().__init__()
        self.model, self.with_types = model, with_types

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        raw = self.model(x.permute(0, 3, 1, 2).float())
        out = _probabilities(raw, self.with_types)
        return tuple(out[k] for k in ("np_prob", "hv", "tp_prob") if k in out)


def weights_checksum(model: nn.Module) -> str:
    """SHA-256 of the architecture and every weight: the same model wherever its file lies."""
    digest = hashlib.sha256()
    digest.update(f"{type(model).__name__}:{getattr(model, 'mode', '')}:{getattr(model, 'num_types', '')}".encode())
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()




def convert_to_openvino(model: nn.Module, with_types: bool, core: Any, threads: int | None = None) -> Any:
    """``model`` traced and converted to an OpenVINO graph (uint8 NHWC in, softmaxed maps out,
    batch and sides left free), checked against torch before it is trusted."""
    import openvino as ov

    if threads is not None:
        torch.set_num_threads(threads)
    was_training = model.training
    model.eval()
    side = int(getattr(model, "input_size", 256))
    example = torch.zeros((1, side, side, 3), dtype=torch.uint8)
    try:
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            # The tracer notes that "same" padding is computed from the input shape: it is
            # constant for every side that divides by 8, the only sides windows have.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.trace's own notice
            converted = ov.convert_model(_Exported(model, with_types), example_input=example)
        converted.reshape({converted.inputs[0]: ov.PartialShape([-1, -1, -1, 3])})
        _verify(model, with_types, core, converted, side)
    finally:
        model.train(was_training)
    return converted


def _verify(model: nn.Module, with_types: bool, core: Any, converted: Any, side: int) -> None:
    """Refuse a conversion that does not compute what the model computes.

    Tracing records one run: code that leaves torch (numpy, Python branches on
    values) becomes a constant and the converted graph silently answers something
    else. One f32 forward of both on a fixed random image catches that.
    """
    rng = np.random.default_rng(0)
    probe = rng.integers(0, 256, (1, side, side, 3), dtype=np.uint8)
    with torch.inference_mode():
        expected = _Exported(model, with_types)(torch.from_numpy(probe))
    compiled = core.compile_model(converted, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    got = compiled({0: probe})
    for i, want in enumerate(expected):
        reference = want.float().numpy()
        diff = float(np.abs(np.asarray(got[compiled.outputs[i]]) - reference).max())
        # Relative to the output's range: an untrained network amplifies rounding (its HV
        # maps can reach large values), a constant baked in by tracing is off by O(range).
        scale = max(1.0, float(np.abs(reference).max()))
        if not diff <= VERIFY_TOLERANCE * scale:
            raise ModelError(
                None,
                f"the converted model differs from torch by {diff:.3g} on output {i} (f32, same input)",
                "its forward probably leaves torch (numpy, value-dependent Python code); use --runtime torch",
            )
