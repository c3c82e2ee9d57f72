"""A tile in, HoVer-Net's NP / HV / TP maps out, for every pixel of the tile.

HoVer-Net predicts only the centre of its input (fast mode: ``input - 92`` px of any input
whose side divides by 8; 256 in, 164 out by default). The network is fully convolutional,
so a tile runs as a few large *windows* rather than many 256 px patches: a 256 px patch
spends (256/164)^2 = 2.44x the arithmetic per output pixel, a 768 px window (768/676)^2 =
1.29x. To give the tile's border pixels the same context as interior ones, the tile is
mirrored (reflect padding) by the context margin ``(input - output) / 2`` on every side
and padded at the bottom/right to the windows' coverage; the maps are cropped back, so
callers never see the windows.

Where a prediction may depend on the windows (measured on the shipped default, fp32,
and checked by ``tests/test_infer.py::test_windows_do_not_change_interior_predictions``):

* the phase of the encoder's stride-8 grid: the same pixel predicted from a window
  shifted by 4 px differs by ~0.005 mean NP probability, shifted by 8 px by < 1e-5. So
  every window starts on the same phase of the *slide-wide* 8 px grid (the worker aligns
  slide-wide window grid, ``WindowGrid``, that the worker cuts tiles from), whatever the tile size;
* the window's own edge: only the outermost 8 output px of a window see its zero padding
  (beyond them, differences < 3e-4). Windows therefore overlap by ``2 * trim`` px
  (trim 10 in fast mode: the smallest >= 8 that keeps the window step a multiple of 8)
  and each contributes its output minus ``trim`` on the sides it shares with a neighbour.

Windows of one tile share one shape (one compiled executable per tile shape) and go to
the runtime ``batch_size`` at a time: a huge tile never holds more than one batch of
windows beside its uint8 padded copy and the output maps. The runtime (torch or OpenVINO,
:mod:`wsi_pipeline.engine.runtime`) is chosen by :class:`InferenceConfig`.

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
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from wsi_pipeline.engine._malloc import keep_freed_memory
from wsi_pipeline.engine.header import ModelFile
from wsi_pipeline.engine.runtime import Runtime, make_runtime
from wsi_pipeline.engine.settings import ALIGN, DEFAULT_WINDOW, InferenceConfig, check_device_name
from wsi_pipeline.errors import ConfigError, ModelError

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = [
    "ALIGN",
    "DEFAULT_WINDOW",
    "TOLERANCE_BF16",
    "TOLERANCE_FP32",
    "InferenceConfig",
    "Maps",
    "TileInferer",
    "Tolerance",
    "WindowGrid",
    "WindowPlan",
    "bf16_native_note",
    "window_grid",
    "resolve_window",
    "bf16_supported",
    "compare_maps",
]


@dataclass
class Maps:
    """HoVer-Net's per-pixel outputs for one tile, same height/width as the tile.

    ``np_prob``: float32 (H, W), probability that a pixel is nucleus (softmax channel 1).
    ``hv``: float32 (2, H, W), channel 0 horizontal, channel 1 vertical distance maps.
    ``tp_prob``: float32 (C, H, W) class probabilities (softmax), or ``None`` for a model
    without a type branch. ``windows_run`` / ``windows_total``: how many of the network
    windows covering the tile were computed (the rest lay on glass; see :meth:`TileInferer.infer`),
    ``windows_reused``: how many came from a neighbouring tile (:mod:`wsi_pipeline.engine.window_cache`).
    """

    np_prob: np.ndarray
    hv: np.ndarray
    tp_prob: np.ndarray | None
    windows_run: int = 0
    windows_total: int = 0
    windows_reused: int = 0


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

    On a Linux CPU the kernel's flags answer without importing torch (a process running a
    cached OpenVINO model never loads it); torch is asked where it is loaded anyway, and
    where the flags are not available.
    """
    if check_device_name(str(device)) == "cpu" and "torch" not in sys.modules:
        flags = _cpu_flags()
        if flags:
            return bool(flags & {"avx512_bf16", "amx_bf16"})
    import torch

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


def bf16_native_note(bf16: bool | str, device: str, used: dict[str, int], native: bool | None = None) -> str:
    """A line for the report when the arithmetic is not what ``--bf16`` suggests; else ''.

    ``used``: tiles per "runtime precision" (:attr:`TileResult.engine` values); ``native``:
    whether ``device`` computes bf16 natively (default: :func:`bf16_supported`).
    """
    native = bf16_supported(device) if native is None else native
    f32 = sum(n for engine, n in used.items() if engine.endswith(" f32"))
    if bf16 == "auto" and f32 and not native:
        return (
            f"bf16 'auto': this {device.upper()} has no native bf16 (AVX-512 BF16 or AMX), so {f32} tile(s) "
            "ran in f32 (bf16 would be emulated, slower)"
        )
    if bf16 is True and not native:
        return f"bf16 was forced on a {device.upper()} without native bf16: it is emulated, slower than f32"
    return ""


def _image_problem(image: object, min_side: int) -> tuple[str, str] | None:
    """(problem, fix) if ``image`` is not an (H, W, 3) uint8 RGB array of a usable size."""
    torch = sys.modules.get("torch")  # a tensor can only come from a process that loaded torch
    if torch is not None and isinstance(image, torch.Tensor):
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


def _model_geometry(model: nn.Module | ModelFile) -> tuple[int, int, int | None]:
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


# Outermost output px of a window that its zero padding reaches (measured: 8 in fast mode).
EDGE_REACH = 8


# (window start, first output px it contributes, end px) along one axis.
Span = tuple[int, int, int]


def resolve_window(model: nn.Module | ModelFile, window: int | None) -> int:
    """The window side to use for ``model`` (``None``: :data:`DEFAULT_WINDOW` for models
    that take any size, the model's own input size otherwise); a side the network does not
    take is a :class:`ConfigError` naming the valid ones. The driver checks ``--window``
    with this before any worker starts."""
    sizes = getattr(model, "output_size_for", None)
    input_size = int(model.input_size)

    def output(side: int) -> int | None:
        if sizes is None:
            return int(model.output_size) if side == input_size else None
        try:
            return int(sizes(side))
        except ModelError:
            return None

    if window is None:
        window = DEFAULT_WINDOW if sizes is not None else input_size
    out = output(window)
    if out is None or out <= 2 * EDGE_REACH + ALIGN:
        valid = [n for n in range(96, 2049) if (output(n) or 0) > 2 * EDGE_REACH + ALIGN]
        shown = ", ".join(map(str, valid[:6])) + (", ..." if len(valid) > 6 else "")
        step = valid[1] - valid[0] if len(valid) > 1 else ALIGN
        raise ConfigError(
            None,
            f"window {window} px does not fit this model (it takes inputs of {shown}: every {step} px; "
            f"output = input - {input_size - int(model.output_size)})",
            f"use --window {max(valid[0], min(valid, key=lambda n: abs(n - window)))}" if valid else "use the default",
        )
    return window


@dataclass(frozen=True)
class WindowPlan:
    """Windows along one axis: ``count`` windows of ``output`` px, ``step`` apart (overlap
    ``2 * trim``), covering ``coverage >= length`` output px from 0."""

    length: int
    output: int
    count: int
    trim: int

    @property
    def step(self) -> int:
        return self.output - 2 * self.trim

    @property
    def coverage(self) -> int:
        return self.output + (self.count - 1) * self.step

    def spans(self) -> list[Span]:
        """(window start, first output px it contributes, end px), all in tile coordinates."""
        out = []
        for i in range(self.count):
            start = i * self.step
            first = start + (self.trim if i else 0)
            end = min(self.length, start + self.output - (self.trim if i < self.count - 1 else 0))
            out.append((start, first, end))
        return out


def _trim_for(output: int) -> int:
    """Smallest trim >= EDGE_REACH that keeps the window step on the stride grid."""
    trim = EDGE_REACH
    while (output - 2 * trim) % ALIGN:
        trim += 1
    return trim


@dataclass(frozen=True)
class WindowGrid:
    """The slide-wide grid of network windows that tiles share.

    Window ``(i, j)`` contributes the output pixels ``[j * step, (j + 1) * step)`` x
    ``[i * step, (i + 1) * step)`` of the slide (at the inference µm/px); its input is that
    box grown by ``border = trim + context`` px on every side: ``context`` px that the
    network consumes and ``trim`` output px that see the window's own zero padding and are
    dropped (see the module doc). Why one grid for the whole slide: a tile's margin is
    then made of the same windows as its neighbour's core, so each window is computed once
    and shared (:mod:`wsi_pipeline.engine.window_cache`) instead of once per tile that
    reads it, and every pixel's prediction is the same whatever the tiling. ``step`` and
    ``border`` are multiples of :data:`ALIGN`, so every window sits on the same phase of
    the encoder's stride grid.
    """

    step: int
    trim: int
    context: int

    @property
    def border(self) -> int:
        return self.trim + self.context

    @property
    def input_side(self) -> int:
        return self.step + 2 * self.border

    def indices(self, lo: int, hi: int) -> range:
        """Window indices along one axis whose contributed px meet ``[lo, hi)``."""
        if hi <= lo:
            return range(0)
        return range(lo // self.step, (hi - 1) // self.step + 1)

    def contributed(self, i: int, j: int) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) of the output px window (i, j) contributes (unclipped)."""
        s = self.step
        return (j * s, i * s, (j + 1) * s, (i + 1) * s)


def window_grid(model: nn.Module | ModelFile, window: int | None) -> WindowGrid:
    """The slide-wide window grid of ``model`` run with ``--window`` (see :class:`WindowGrid`);
    the driver plans the sharing with it, the workers compute on it (one definition)."""
    side = resolve_window(model, window)
    sizes = getattr(model, "output_size_for", None)
    output = int(sizes(side)) if sizes is not None else int(model.output_size)
    trim = _trim_for(output)
    return WindowGrid(step=output - 2 * trim, trim=trim, context=(side - output) // 2)


class TileInferer:
    """Runs one HoVer-Net over tiles of any size, window batch by window batch."""

    def __init__(
        self, model: nn.Module | ModelFile, config: InferenceConfig | None = None, *, label: str | None = None
    ) -> None:
        self.config = config if config is not None else InferenceConfig()
        self.input_size, self.output_size, self.num_types = _model_geometry(model)
        self.context = (self.input_size - self.output_size) // 2
        self.device = check_device_name(self.config.device)
        if self.device != "cpu":  # a GPU must be there; asking imports torch
            from wsi_pipeline.engine.device import torch_device

            torch_device(self.device)
        torch = sys.modules.get("torch")
        if self.config.threads is not None and torch is not None:
            torch.set_num_threads(self.config.threads)
        keep_freed_memory()
        self.uses_bf16 = self.config.bf16 is True or (self.config.bf16 == "auto" and bf16_supported(self.device))
        self.model = model
        self._sizes = getattr(model, "output_size_for", None)
        self.window = self._check_window(self.config.window)
        self.runtime: Runtime = make_runtime(
            model,
            self.config.runtime,
            device=self.config.device,
            bf16=self.uses_bf16,
            threads=self.config.threads,
            channels_last=self.config.channels_last,
            compile=self.config.compile,
            batch_size=self.config.batch_size,
            label=label,
            streams=self.config.streams,
        )

    # ------------------------------------------------------------------ geometry
    def output_for(self, side: int) -> int | None:
        """Output side of an input side, ``None`` where the network does not take it."""
        if self._sizes is None:
            return self.output_size if side == self.input_size else None
        try:
            return int(self._sizes(side))
        except ModelError:
            return None

    def valid_windows(self, low: int = 96, high: int = 4096) -> list[int]:
        """Input sides this model accepts in ``[low, high]``."""
        if self._sizes is None:
            return [self.input_size] if low <= self.input_size <= high else []
        return [n for n in range(low, high + 1) if self.output_for(n) is not None]

    def _check_window(self, window: int | None) -> int:
        return resolve_window(self.model, window)

    @staticmethod
    def _trim(output: int) -> int:
        return _trim_for(output)

    @property
    def grid(self) -> WindowGrid:
        """The slide-wide window grid of this engine's window (:func:`window_grid`)."""
        return window_grid(self.model, self.window)

    def _fit_output(self, need: int) -> int:
        """Smallest valid window output >= ``need`` (never above the configured window's)."""
        largest = self.output_for(self.window)
        assert largest is not None
        if self._sizes is None:
            return largest
        side = self.window
        # Valid inputs step by ALIGN; walk down from the window while the output still covers.
        while True:
            smaller = self.output_for(side - ALIGN)
            if smaller is None or smaller < need:
                return self.output_for(side)  # type: ignore[return-value]
            side -= ALIGN

    def plan(self, length: int) -> WindowPlan:
        """How one axis of ``length`` output px is cut into windows (see the module doc)."""
        largest = self.output_for(self.window)
        assert largest is not None
        trim = self._trim(largest)
        if length <= largest:
            output = self._fit_output(length)
            return WindowPlan(length, output, 1, self._trim(output))
        # Several windows: all of the configured size, the last one overhanging the edge
        # (mirrored pixels, cropped away). Shrinking them to fit would give each edge tile
        # its own input shapes, and each new shape costs the runtime a compilation (~0.4 s
        # for OpenVINO here, against ~0.1 s of extra compute for an edge tile's overhang).
        count = math.ceil((length - 2 * trim) / (largest - 2 * trim))
        return WindowPlan(length, largest, count, trim)

    @property
    def min_side(self) -> int:
        """Smallest tile side accepted: the context margin must mirror real pixels."""
        return self.context + 1

    def input_side(self, output: int) -> int:
        return output + 2 * self.context

    # ------------------------------------------------------------------ inference
    def predict(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """The runtime's maps for a uint8 (N, h, w, 3) batch of windows (checked)."""
        if batch.ndim != 4 or batch.shape[3] != 3 or batch.dtype != np.uint8:
            raise ModelError(
                None,
                f"windows of shape {tuple(batch.shape)} {batch.dtype}; expected (N, h, w, 3) uint8",
                "cut windows of a valid input size from a uint8 RGB image",
            )
        for side in batch.shape[1:3]:
            if self.output_for(int(side)) is None:
                raise ModelError(None, f"window side {side} px does not fit the model", "use TileInferer.infer")
        out = self.runtime.run(batch)
        if self.num_types is not None and "tp_prob" not in out:
            raise ModelError(
                None,
                f"model declares num_types={self.num_types} but returned no 'tp' map",
                "set num_types=None for a model without a type branch",
            )
        return out

    def predict_grid(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """The maps of a batch of :attr:`grid` windows, (N, side, side, 3) uint8 with side
        ``grid.input_side``, each cropped to the ``step`` x ``step`` px it contributes."""
        grid = self.grid
        if batch.ndim != 4 or batch.shape[1:3] != (grid.input_side, grid.input_side):
            raise ModelError(
                None,
                f"grid windows of shape {tuple(batch.shape)}; expected (N, {grid.input_side}, {grid.input_side}, 3)",
                "cut the windows with the engine's WindowGrid",
            )
        out = self.predict(batch)
        kept = slice(grid.trim, grid.trim + grid.step)
        return {name: value[..., kept, kept] for name, value in out.items()}

    def _check_image(self, image: object) -> None:
        problem = _image_problem(image, self.min_side)
        if problem is not None:
            raise ModelError(None, *problem)

    def windows(self, image: np.ndarray, tissue: np.ndarray | None = None, reach: int = 0) -> tuple[
        list[tuple[Span, Span]], int
    ]:
        """The (row, col) spans of the windows to compute over ``image``, and how many cover it.

        With ``tissue`` (bool, the image's height and width), a window is left out when no
        tissue pixel lies within ``reach`` px of the output it contributes: glass holds no
        nuclei, and a nucleus whose pixels reach into such a window (at most ``reach`` px from
        its tissue) is still computed whole. The decision depends only on the slide-wide tissue
        mask, so neighbouring tiles agree about every pixel near tissue.
        """
        self._check_image(image)
        height, width = image.shape[:2]
        rows, cols = self.plan(height), self.plan(width)
        spans = [(r, c) for r in rows.spans() for c in cols.spans()]
        if tissue is None:
            return spans, len(spans)
        if tissue.shape != (height, width):
            raise ModelError(None, f"tissue mask of shape {tissue.shape} for a {height}x{width} image",
                             "give the tissue mask of the image's own pixels")
        reach = max(0, int(reach))
        kept = [
            (r, c)
            for r, c in spans
            if tissue[max(r[1] - reach, 0) : r[2] + reach, max(c[1] - reach, 0) : c[2] + reach].any()
        ]
        return kept, len(spans)

    def window_batches(
        self, image: np.ndarray, spans: list[tuple[Span, Span]] | None = None
    ) -> Iterator[tuple[list[tuple[Span, Span]], np.ndarray]]:
        """The windows :meth:`infer` runs over ``image``: (their (row, col) spans, uint8 batch).
        ``spans``: a subset from :meth:`windows` (default: all of them).

        Public so benchmarks can time the forward passes alone over exactly these windows.
        """
        self._check_image(image)
        height, width = image.shape[:2]
        rows, cols = self.plan(height), self.plan(width)
        ctx = self.context
        extra_y, extra_x = rows.coverage - height, cols.coverage - width
        # The first ctx mirrored pixels are real context; the extra bottom/right padding
        # only feeds outputs that are cropped away, so numpy's repeated reflection is fine.
        padded = np.pad(image, ((ctx, ctx + extra_y), (ctx, ctx + extra_x), (0, 0)), mode="reflect")
        in_h, in_w = self.input_side(rows.output), self.input_side(cols.output)
        windows = [(r, c) for r in rows.spans() for c in cols.spans()] if spans is None else spans
        bs = self.config.batch_size
        for start in range(0, len(windows), bs):
            chunk = windows[start : start + bs]
            yield chunk, np.stack([padded[r[0] : r[0] + in_h, c[0] : c[0] + in_w] for r, c in chunk])

    def infer(self, image: np.ndarray, tissue: np.ndarray | None = None, reach: int = 0) -> Maps:
        """NP probability, HV and TP probability maps covering the whole ``image``.

        ``image``: (H, W, 3) uint8 RGB at the model's µm/px. Raises :class:`ModelError`
        for anything else (0-1 floats, grayscale, 16-bit, channels-first, tiny images).
        ``tissue``/``reach``: windows on glass are not computed (see :meth:`windows`); their
        pixels read as background (NP 0, HV 0, type 0 certain), what the network says of glass.
        """
        spans, total = self.windows(image, tissue, reach)
        height, width = image.shape[:2]
        # Every pixel is written by exactly one window; only skipped windows leave pixels to fill.
        fill = np.zeros if len(spans) < total else np.empty
        np_prob = fill((height, width), np.float32)
        hv = fill((2, height, width), np.float32)
        tp_prob = None if self.num_types is None else fill((self.num_types, height, width), np.float32)
        if tp_prob is not None and len(spans) < total:
            tp_prob[0] = 1.0
        if spans:
            for chunk, batch in self.window_batches(image, spans):
                pred = self.predict(batch)
                for i, ((y0, ya, yb), (x0, xa, xb)) in enumerate(chunk):
                    src = (slice(ya - y0, yb - y0), slice(xa - x0, xb - x0))
                    np_prob[ya:yb, xa:xb] = pred["np_prob"][i][src]
                    hv[:, ya:yb, xa:xb] = pred["hv"][i][(slice(None), *src)]
                    if tp_prob is not None:
                        tp_prob[:, ya:yb, xa:xb] = pred["tp_prob"][i][(slice(None), *src)]
        return Maps(np_prob=np_prob, hv=hv, tp_prob=tp_prob, windows_run=len(spans), windows_total=total)
