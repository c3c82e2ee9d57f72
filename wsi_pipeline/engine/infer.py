"""A tile in, HoVer-Net's NP / HV / TP maps out, for every pixel of the tile.

HoVer-Net only predicts the centre of its input patch (fast mode: 256 px in, 164 px out),
so a tile is covered by a grid of patches whose *outputs* abut: stride = output size. To
give the tile's border pixels the same context as interior ones, the tile is mirrored
(reflect padding) by the context margin ``(input - output) / 2`` on every side, and padded
further at the bottom/right up to a whole number of output patches; the maps are cropped
back to the tile, so callers never see the grid.

Patches are cut and pushed through the model one batch at a time: a huge tile never
holds more than one batch of patches beside its uint8 padded copy and the output maps.

The fast paths (channels_last memory layout, bf16 autocast, ``torch.compile``) change
rounding, not the algorithm. How far they may stray from fp32 eager (figures of
:func:`compare_maps`) is fixed in :data:`TOLERANCE_FP32` and :data:`TOLERANCE_BF16` and
checked by ``tests/test_infer.py`` on a real MoNuSeg crop (300x200 px):

* channels_last / compile (fp32): other kernels and fusions re-order the sums. Measured:
  max |dNP prob| 3e-6, max |dHV| 3e-5; bound: 1e-3 on every max, no confident NP flip.
* bf16 autocast: convolutions run with an 8-bit mantissa (~4e-3 relative rounding), and
  the network amplifies it. How much depends on the weights, not on this code: a randomly
  initialised BN network is chaotic (rounding grows ~1000x from input to output, so bf16
  scrambles it), trained ones are far tamer. Measured, width x 0.125 fast model, bf16 vs
  fp32 eager (mean / max abs difference):

  ============================================  =============  ============  ============  =====  =========
  model                                         NP prob        HV            TP prob       flips  confident
  ============================================  =============  ============  ============  =====  =========
  test model (zero-init residual, BN on H&E)    0.008 / 0.096  0.051 / 0.62  0.003 / 0.08  1.1%   0
  trained 40 steps on CoNSeP (throwaway run)    0.014 / 0.44   0.030 / 0.87  0.006 / 0.15  2.0%   0.02%
  ============================================  =============  ============  ============  =====  =========

  "flips": pixels whose NP decision (prob > 0.5) changes; "confident": among pixels whose
  fp32 prob is outside 0.4-0.6. Single pixels can move a lot (max columns), so the bound is
  on means and decisions: mean |dNP| <= 0.03, mean |dHV| <= 0.1, mean |dTP| <= 0.02,
  flips <= 3%, confident flips <= 0.1%. ``bf16`` stays off by default; check a new
  checkpoint with ``benchmarks/engine_latency.py`` (it reports the differences) or
  :func:`compare_maps` before turning it on.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from wsi_pipeline.engine._malloc import keep_freed_memory
from wsi_pipeline.engine.device import torch_device
from wsi_pipeline.errors import ConfigError, ModelError

__all__ = [
    "TOLERANCE_BF16",
    "TOLERANCE_FP32",
    "InferenceConfig",
    "Maps",
    "TileInferer",
    "Tolerance",
    "bf16_supported",
    "compare_maps",
]


@dataclass(frozen=True)
class InferenceConfig:
    """How the engine runs; every field only trades speed for rounding, never results.

    ``bf16="auto"`` turns bf16 autocast on only where the hardware computes it natively
    (CPU with AVX-512 BF16 or AMX, CUDA GPUs with bf16 tensor cores): elsewhere it is
    emulated and slower than fp32. ``bf16=True`` forces it anyway (useful for testing).
    ``threads`` sets ``torch.set_num_threads`` for the whole process, because that is the
    only knob torch offers; ``None`` leaves torch's default.
    """

    device: str = "cpu"
    threads: int | None = None
    batch_size: int = 4
    bf16: bool | Literal["auto"] = False
    compile: bool = False
    channels_last: bool = True

    def __post_init__(self) -> None:
        torch_device(self.device, require_available=False)
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
        if self.bf16 not in (True, False, "auto"):
            raise ConfigError(None, f"bf16={self.bf16!r} is not one of True, False, 'auto'", "use bf16='auto'")
        for name in ("compile", "channels_last"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(None, f"{name}={getattr(self, name)!r} must be True or False")


@dataclass
class Maps:
    """HoVer-Net's per-pixel outputs for one tile, same height/width as the tile.

    ``np_prob``: float32 (H, W), probability that a pixel is nucleus (softmax channel 1).
    ``hv``: float32 (2, H, W), channel 0 horizontal, channel 1 vertical distance maps.
    ``tp_prob``: float32 (C, H, W) class probabilities (softmax), or ``None`` for a model
    without a type branch.
    """

    np_prob: np.ndarray
    hv: np.ndarray
    tp_prob: np.ndarray | None


@dataclass(frozen=True)
class Tolerance:
    """The largest disagreement with fp32 eager that a fast path may show; ``None`` = unbounded.

    Field names are the keys of :func:`compare_maps`.
    """

    np_prob_max_abs: float | None = None
    np_prob_mean_abs: float | None = None
    hv_max_abs: float | None = None
    hv_mean_abs: float | None = None
    tp_prob_max_abs: float | None = None
    tp_prob_mean_abs: float | None = None
    np_flip_fraction: float | None = None
    np_confident_flip_fraction: float | None = None

    def violations(self, diff: dict[str, float]) -> list[str]:
        """Which figures of :func:`compare_maps` exceed this tolerance (empty list = within)."""
        return [
            f"{name}={diff[name]:.3g} > {limit:g}"
            for name, limit in vars(self).items()
            if limit is not None and name in diff and diff[name] > limit
        ]


TOLERANCE_FP32 = Tolerance(
    np_prob_max_abs=1e-3, hv_max_abs=1e-3, tp_prob_max_abs=1e-3, np_flip_fraction=1e-4, np_confident_flip_fraction=0.0
)
TOLERANCE_BF16 = Tolerance(
    np_prob_mean_abs=0.03,
    hv_mean_abs=0.1,
    tp_prob_mean_abs=0.02,
    np_flip_fraction=0.03,
    np_confident_flip_fraction=1e-3,
)

# A reference probability this far from 0.5 counts as a confident NP decision.
CONFIDENT_MARGIN = 0.1


def compare_maps(reference: Maps, other: Maps) -> dict[str, float]:
    """Disagreement of ``other`` with ``reference``: max and mean abs differences, NP flips.

    ``np_flip_fraction`` counts pixels whose nucleus/background decision (prob > 0.5)
    differs, the figure that changes the segmentation; ``np_confident_flip_fraction``
    counts them only among pixels where the reference is confident (|p - 0.5| > 0.1),
    because flips of undecided pixels are expected from any rounding change.
    """
    if reference.np_prob.shape != other.np_prob.shape:
        raise ModelError(None, f"cannot compare maps of shapes {reference.np_prob.shape} and {other.np_prob.shape}")
    out: dict[str, float] = {}
    pairs = [("np_prob", reference.np_prob, other.np_prob), ("hv", reference.hv, other.hv)]
    if reference.tp_prob is not None and other.tp_prob is not None:
        pairs.append(("tp_prob", reference.tp_prob, other.tp_prob))
    for name, a, b in pairs:
        diff = np.abs(a - b)
        out[f"{name}_max_abs"] = float(diff.max())
        out[f"{name}_mean_abs"] = float(diff.mean())
    flips = (reference.np_prob > 0.5) != (other.np_prob > 0.5)
    confident = np.abs(reference.np_prob - 0.5) > CONFIDENT_MARGIN
    out["np_flip_fraction"] = float(flips.mean())
    out["np_confident_flip_fraction"] = float(flips[confident].mean()) if confident.any() else 0.0
    return out


def _cpu_flags() -> set[str]:
    """CPU feature flags from /proc/cpuinfo (Linux); empty where unavailable."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def bf16_supported(device: str | torch.device = "cpu") -> bool:
    """Whether ``device`` computes bf16 natively, i.e. whether bf16 can be faster than fp32.

    CPU: oneDNN must be built in and the CPU must have AVX-512 BF16 or AMX-BF16 (without
    them oneDNN emulates bf16, slower than fp32). CUDA: the GPU must have bf16 tensor cores
    (Ampere or newer); older GPUs only emulate it.
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            return False
        try:
            return bool(torch.cuda.is_bf16_supported(including_emulation=False))
        except TypeError:  # older torch without the keyword
            return bool(torch.cuda.is_bf16_supported())
    if dev.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    # torch's own CPUID probes first (private, so guarded), then the kernel's flags.
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        fn = getattr(torch.cpu, probe, None)
        if fn is not None:
            try:
                if fn():
                    return True
            except RuntimeError:
                pass
    return bool(_cpu_flags() & {"avx512_bf16", "amx_bf16"})


def _image_problem(image: object, min_side: int) -> tuple[str, str] | None:
    """(problem, fix) if ``image`` is not an (H, W, 3) uint8 RGB array of a usable size."""
    if isinstance(image, torch.Tensor):
        return (
            f"got a torch.Tensor {tuple(image.shape)} {image.dtype}; the engine takes a numpy array",
            "pass image.cpu().numpy() as an (H, W, 3) uint8 RGB array",
        )
    if not isinstance(image, np.ndarray):
        return (f"got a {type(image).__name__}; expected a numpy array", "pass an (H, W, 3) uint8 RGB array")
    shape = image.shape
    if image.ndim == 2 or (image.ndim == 3 and shape[2] == 1):
        return (
            f"got a grayscale image of shape {shape}; HoVer-Net was trained on RGB H&E",
            "read the image as RGB (H, W, 3), e.g. PIL's .convert('RGB')",
        )
    if image.ndim != 3:
        return (
            f"got an array of shape {shape} ({image.ndim}-D); expected one (H, W, 3) RGB image",
            "pass one tile at a time, as an (H, W, 3) array",
        )
    if shape[2] == 4:
        return (f"got 4 channels {shape} (RGBA?)", "drop the alpha channel: image[..., :3]")
    if shape[2] != 3:
        if shape[0] in (1, 3, 4):
            return (
                f"got shape {shape}, which looks channels-first (C, H, W)",
                "transpose to (H, W, 3): image.transpose(1, 2, 0)",
            )
        return (f"got shape {shape}; expected (H, W, 3) RGB", "pass an (H, W, 3) uint8 RGB array")
    if image.dtype != np.uint8:
        return _dtype_problem(image)
    if min(shape[0], shape[1]) < min_side:
        return (
            f"image of {shape[0]}x{shape[1]} px is too small: each side must be at least {min_side} px "
            "so that the model's context margin can be mirrored from real pixels",
            f"pass a larger tile (at least {min_side}x{min_side}, ideally several patch sizes)",
        )
    return None


def _dtype_problem(image: np.ndarray) -> tuple[str, str]:
    """Explain a non-uint8 image, guessing the most likely mistake from its values."""
    dtype = image.dtype
    if np.issubdtype(dtype, np.floating):
        finite = image[np.isfinite(image)] if image.size else image
        lo = float(finite.min()) if finite.size else float("nan")
        hi = float(finite.max()) if finite.size else float("nan")
        if finite.size and lo >= 0.0 and hi <= 1.0:
            return (
                f"got a {dtype} image with values in [{lo:.3g}, {hi:.3g}], apparently scaled to 0-1; "
                "the model expects 0-255 RGB as uint8",
                "convert with (image * 255).round().clip(0, 255).astype(np.uint8)",
            )
        return (
            f"got a {dtype} image with values in [{lo:.3g}, {hi:.3g}]; the model expects 0-255 RGB as uint8",
            "convert with image.round().clip(0, 255).astype(np.uint8) if it is already 0-255",
        )
    if dtype == np.uint16:
        return (
            "got a uint16 (16-bit) image; the model expects 8-bit RGB (uint8, 0-255)",
            "rescale to 8 bits, e.g. (image >> 8).astype(np.uint8) for full-range 16-bit data",
        )
    return (
        f"got a {dtype} image; the model expects 8-bit RGB (uint8, 0-255)",
        "convert with image.clip(0, 255).astype(np.uint8)",
    )


def _model_geometry(model: nn.Module) -> tuple[int, int, int | None]:
    """(input_size, output_size, num_types) of a HoVer-Net-like model, checked."""
    missing = [a for a in ("input_size", "output_size", "num_types") if not hasattr(model, a)]
    if missing:
        raise ModelError(
            None,
            f"{type(model).__name__} lacks {', '.join(missing)}; TileInferer needs a HoVer-Net model",
            "build it with wsi_pipeline.engine.model.HoVerNet or load it with wsi_pipeline.load_model",
        )
    inp, out, num_types = int(model.input_size), int(model.output_size), model.num_types
    if not 0 < out <= inp or (inp - out) % 2:
        raise ModelError(
            None,
            f"model input/output sizes {inp}/{out} do not leave an even context margin",
            "use HoVer-Net fast (256/164) or original (270/80) mode",
        )
    return inp, out, (None if num_types is None else int(num_types))


class TileInferer:
    """Runs one HoVer-Net over tiles of any size, batch by batch.

    The model is put in eval mode and moved to the configured device and memory layout
    in place (no copy: a second copy of a 37 M-parameter model per worker is not free).
    """

    def __init__(self, model: nn.Module, config: InferenceConfig | None = None) -> None:
        self.config = config if config is not None else InferenceConfig()
        self.input_size, self.output_size, self.num_types = _model_geometry(model)
        self.context = (self.input_size - self.output_size) // 2
        self.device = torch_device(self.config.device)
        if self.config.threads is not None:
            torch.set_num_threads(self.config.threads)
        keep_freed_memory()
        self.uses_bf16 = self.config.bf16 is True or (self.config.bf16 == "auto" and bf16_supported(self.device))
        layout = torch.channels_last if self.config.channels_last else torch.contiguous_format
        model.eval()
        model.to(device=self.device, memory_format=layout)
        self.model = model
        # dynamic=False: one static graph per batch shape; infer() pads short final batches
        # to batch_size so a tile never triggers a recompile.
        self._forward = torch.compile(model, dynamic=False) if self.config.compile else model

    @property
    def min_side(self) -> int:
        """Smallest tile side accepted: the context margin must mirror real pixels."""
        return self.context + 1

    def predict_patches(self, patches: torch.Tensor) -> dict[str, torch.Tensor]:
        """Model outputs for a batch of uint8 (N, input, input, 3) RGB patches.

        Returns float32 tensors on the device: ``np_prob`` (N, o, o), ``hv`` (N, 2, o, o),
        ``tp_prob`` (N, C, o, o) when the model has a type branch. Call it inside
        ``torch.inference_mode()``; :meth:`infer` does.
        """
        n = patches.shape[0]
        expected = (self.input_size, self.input_size, 3)
        if patches.ndim != 4 or tuple(patches.shape[1:]) != expected or patches.dtype != torch.uint8:
            raise ModelError(
                None,
                f"patches of shape {tuple(patches.shape)} {patches.dtype}; expected (N, *{expected}) uint8",
                "cut patches of the model's input size from a uint8 RGB image",
            )
        if self.config.compile and n < self.config.batch_size:
            pad = patches.new_zeros((self.config.batch_size - n, *expected))
            patches = torch.cat([patches, pad])
        patches = patches.to(self.device, non_blocking=True)
        # NHWC permuted to NCHW is already channels_last in memory: no copy needed for it.
        x = patches.permute(0, 3, 1, 2).float()
        x = x.contiguous(memory_format=torch.channels_last if self.config.channels_last else torch.contiguous_format)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.uses_bf16):
            raw = self._forward(x)
        if not isinstance(raw, dict) or "np" not in raw or "hv" not in raw:
            raise ModelError(
                None,
                f"{type(self.model).__name__}.forward returned {type(raw).__name__} without 'np'/'hv' keys",
                "use a HoVer-Net model whose forward returns a dict of np, hv (and tp) maps",
            )
        out = {
            "np_prob": torch.softmax(raw["np"][:n].float(), dim=1)[:, 1],
            "hv": raw["hv"][:n].float(),
        }
        if self.num_types is not None and "tp" in raw:
            out["tp_prob"] = torch.softmax(raw["tp"][:n].float(), dim=1)
        return out

    def _grid(self, height: int, width: int) -> tuple[int, int]:
        return math.ceil(height / self.output_size), math.ceil(width / self.output_size)

    def _batches(self, padded: torch.Tensor, rows: int, cols: int) -> Iterator[tuple[list, torch.Tensor]]:
        """Yield (grid positions, uint8 patch batch), row-major, batch_size at a time."""
        size, step, bs = self.input_size, self.output_size, self.config.batch_size
        positions = [(r, c) for r in range(rows) for c in range(cols)]
        for start in range(0, len(positions), bs):
            chunk = positions[start : start + bs]
            patches = torch.stack([padded[r * step : r * step + size, c * step : c * step + size] for r, c in chunk])
            yield chunk, patches

    def infer(self, image: np.ndarray) -> Maps:
        """NP probability, HV and TP probability maps covering the whole ``image``.

        ``image``: (H, W, 3) uint8 RGB at the model's µm/px. Raises :class:`ModelError`
        for anything else (0-1 floats, grayscale, 16-bit, channels-first, tiny images).
        """
        problem = _image_problem(image, self.min_side)
        if problem is not None:
            raise ModelError(None, *problem)
        height, width = image.shape[:2]
        rows, cols = self._grid(height, width)
        ctx, step = self.context, self.output_size
        extra_y, extra_x = rows * step - height, cols * step - width
        # The first ctx mirrored pixels are real context; the extra bottom/right padding
        # only feeds outputs that are cropped away, so numpy's repeated reflection is fine.
        padded = np.pad(image, ((ctx, ctx + extra_y), (ctx, ctx + extra_x), (0, 0)), mode="reflect")
        padded_t = torch.from_numpy(padded)

        np_prob = np.empty((height, width), np.float32)
        hv = np.empty((2, height, width), np.float32)
        tp_prob = None if self.num_types is None else np.empty((self.num_types, height, width), np.float32)
        with torch.inference_mode():
            for chunk, patches in self._batches(padded_t, rows, cols):
                pred = {k: v.cpu().numpy() for k, v in self.predict_patches(patches).items()}
                if tp_prob is not None and "tp_prob" not in pred:
                    raise ModelError(
                        None,
                        f"model declares num_types={self.num_types} but returned no 'tp' map",
                        "set num_types=None for a model without a type branch",
                    )
                for i, (r, c) in enumerate(chunk):
                    y0, x0 = r * step, c * step
                    h, w = min(step, height - y0), min(step, width - x0)
                    np_prob[y0 : y0 + h, x0 : x0 + w] = pred["np_prob"][i, :h, :w]
                    hv[:, y0 : y0 + h, x0 : x0 + w] = pred["hv"][i, :, :h, :w]
                    if tp_prob is not None:
                        tp_prob[:, y0 : y0 + h, x0 : x0 + w] = pred["tp_prob"][i, :, :h, :w]
        return Maps(np_prob=np_prob, hv=hv, tp_prob=tp_prob)
