"""Inference runtimes behind one call: a uint8 RGB batch in, HoVer-Net's probability maps out.

Two runtimes run the same network:

* :class:`TorchRuntime`: PyTorch eager (CPU or CUDA), optional bf16 autocast,
  channels_last and ``torch.compile``. It is the reference and the GPU path.
* :class:`OpenVINORuntime`: the model converted once to OpenVINO (``openvino.convert_model``)
  and compiled for the CPU. On CPUs here PyTorch eager leaves most of the machine idle
  on HoVer-Net's narrow layers; OpenVINO fuses them and picks kernels for the exact
  shape, which ``benchmarks/engine_latency.py`` measures side by side.

Both take the input in the layout the tiles come in (uint8 NHWC) and return softmaxed
float32 maps, so the permute, the cast and the softmax are inside the compiled graph
rather than extra passes over the maps in numpy.

The converted model is cached on disk (:func:`cache_dir`), keyed by a checksum of the
weights, the OpenVINO version and this module's export revision: every Dask worker of
every run loads the cached IR instead of tracing the network again. A cache entry that
cannot be read (a crash mid-write, a truncated file, another OpenVINO's format) is
rebuilt with a warning, never trusted and never fatal. Compiled executables per input
shape go to OpenVINO's own ``CACHE_DIR`` under the same folder.

:func:`make_runtime` picks one: ``auto`` means OpenVINO on the CPU when it is installed
and converts the model, torch otherwise; a model OpenVINO cannot convert falls back to
torch with one warning naming the model and the reason.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
import threading
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
from torch import nn

from wsi_pipeline.engine.device import torch_device
from wsi_pipeline.engine.settings import RUNTIMES
from wsi_pipeline.errors import ConfigError, ModelError

__all__ = [
    "CACHE_ENV",
    "OpenVINORuntime",
    "Runtime",
    "TorchRuntime",
    "cache_dir",
    "make_runtime",
    "openvino_available",
    "weights_checksum",
]

log = logging.getLogger(__name__)

RuntimeName = Literal["auto", "torch", "openvino"]
CACHE_ENV = "WSI_PIPELINE_CACHE"
# Bump when the exported graph changes (inputs, outputs, pre/post-processing inside it):
# older cache entries then no longer match and are rebuilt.
EXPORT_REVISION = 1
# Compiled models kept per runtime: a run sees one interior tile shape plus a few edge ones.
SHAPE_CACHE_SIZE = 8
# Serialises the first touch of each new infer request's tensors, and the inferences of a
# process (see OpenVINORuntime._request and run).
_FIRST_TOUCH = threading.Lock()
_INFER = threading.Lock()
# Largest f32 difference from torch accepted when a conversion is checked, relative to the
# output's range (at least 1; measured on the shipped models: < 1e-4).
VERIFY_TOLERANCE = 1e-2


class Runtime(Protocol):
    """What :class:`~wsi_pipeline.engine.infer.TileInferer` needs of a runtime."""

    name: str
    precision: str  # "bf16" or "f32": what the arithmetic actually is

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """uint8 (N, H, W, 3) RGB -> ``np_prob`` (N, h, w), ``hv`` (N, 2, h, w), ``tp_prob`` (N, C, h, w)."""
        ...


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
    ) -> None:
        self.device = torch_device(device)
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


def openvino_available() -> bool:
    """Whether the ``openvino`` package is installed here (found, not imported: a process
    that only plans a run, the driver, never loads the library)."""
    import importlib.util

    return importlib.util.find_spec("openvino") is not None


def cache_dir() -> Path:
    """Where converted models live: ``$WSI_PIPELINE_CACHE``, else the user's cache folder."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "wsi-pipeline"


def weights_checksum(model: nn.Module) -> str:
    """SHA-256 of the architecture and every weight: the same model wherever its file lies."""
    digest = hashlib.sha256()
    digest.update(f"{type(model).__name__}:{getattr(model, 'mode', '')}:{getattr(model, 'num_types', '')}".encode())
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


class OpenVINORuntime:
    """The model converted to OpenVINO and compiled for the CPU, one executable per shape.

    ``precision``: ``"bf16"`` or ``"f32"``, passed to OpenVINO as the inference precision
    hint. ``threads``: OpenVINO's thread count (``None``: torch's current setting, so one
    knob, ``--threads``/the worker layout, governs both runtimes).

    One compiled model may be called from several Dask task threads at once: each thread
    gets its own infer requests (requests are not thread-safe, compiled models are).

    ``streams``: windows OpenVINO computes at once, each on ``threads / streams`` cores
    (``NUM_STREAMS`` with the THROUGHPUT hint). With one stream every inference spans all
    cores, and a task thread post-processing beside it can stall it: its threads meet at
    every layer, and one of them may have lost its core. With one stream per core
    each window runs on one core without waiting for the other, a tile's windows are
    spread over the streams while no other tile infers, and a second task thread's windows
    or post-processing take a core each. ``benchmarks/engine_streams.py`` times both, alone
    and beside post-processing; a local run's default is a stream per core, which an
    end-to-end side-by-side run measured faster (docs/engine.md).
    """

    name = "openvino"

    def __init__(
        self,
        model: nn.Module,
        *,
        precision: Literal["bf16", "f32"] = "f32",
        threads: int | None = None,
        label: str | None = None,
        streams: int = 1,
    ) -> None:
        import openvino as ov

        self._ov = ov
        self.precision = precision
        self.threads = threads if threads is not None else torch.get_num_threads()
        if isinstance(streams, bool) or not isinstance(streams, int) or streams < 1:
            raise ConfigError(None, f"streams={streams!r} must be a positive integer", "give e.g. streams=2")
        self.streams = min(streams, self.threads)
        self.label = label or type(model).__name__
        self.with_types = getattr(model, "num_types", None) is not None
        self.core = ov.Core()
        self.folder = cache_dir() / "openvino"
        try:  # OpenVINO's own cache of compiled executables (per shape and precision)
            (self.folder / "compiled").mkdir(parents=True, exist_ok=True)
            self.core.set_property({"CACHE_DIR": str(self.folder / "compiled")})
        except (OSError, RuntimeError) as exc:
            log.warning("no compiled-model cache in %s (%s); compiling in memory", self.folder, exc)
        self.key = hashlib.sha256(
            f"{weights_checksum(model)}:{ov.__version__}:{EXPORT_REVISION}".encode()
        ).hexdigest()[:32]
        self.converted_from_cache = False
        # Infer requests per (thread, shape), created before the compiled models they belong to
        # so that they are also destroyed first (a request outliving its compiled model can
        # crash the process when the garbage collector frees them in the other order).
        self._requests: dict[tuple[int, tuple[int, ...], int], Any] = {}
        self._model = self._converted(model)
        self._lock = threading.Lock()
        self._compiled: OrderedDict[tuple[int, ...], Any] = OrderedDict()
        self.compile_seconds = 0.0

    # -------------------------------------------------------------- conversion + cache
    def _converted(self, model: nn.Module) -> Any:
        """The converted model from the cache, or converted now (and cached). Workers of one
        machine starting together take turns (a file lock): one converts, the others read."""
        from filelock import FileLock, Timeout

        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            lock: Any = FileLock(str(self.folder / f"{self.key}.lock"), timeout=600)
            lock.acquire()
        except (OSError, Timeout):
            lock = None  # no shared cache: convert in this process alone
        try:
            return self._converted_locked(model)
        finally:
            if lock is not None:
                lock.release()

    def _converted_locked(self, model: nn.Module) -> Any:
        xml = self.folder / f"{self.key}.xml"
        if xml.is_file() and xml.with_suffix(".bin").is_file():
            try:
                loaded = self.core.read_model(str(xml))
                self.converted_from_cache = True
                return loaded
            except Exception as exc:  # a truncated or foreign file: rebuild, never trust it
                log.warning("compiled-model cache %s is unreadable (%s); converting the model again", xml, exc)
        converted = self._convert(model)
        self._store(converted, xml)
        if xml.is_file() and xml.with_suffix(".bin").is_file():
            # Compute with the IR as read back, as every later process will: the graph saving
            # and reading give is not bit-identical to the in-memory conversion, and a slide's
            # results must not depend on whether this process was the one that converted.
            try:
                return self.core.read_model(str(xml))
            except Exception as exc:  # another process replaced it meanwhile with a damaged file
                log.warning("cannot read back the converted model %s (%s); using it from memory", xml, exc)
        return converted

    def _convert(self, model: nn.Module) -> Any:
        ov = self._ov
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
                converted = ov.convert_model(_Exported(model, self.with_types), example_input=example)
            # Batch, height and width stay free: the graph is reshaped per window size.
            converted.reshape({converted.inputs[0]: ov.PartialShape([-1, -1, -1, 3])})
            self._verify(model, converted, side)
        finally:
            model.train(was_training)
        return converted

    def _verify(self, model: nn.Module, converted: Any, side: int) -> None:
        """Refuse a conversion that does not compute what the model computes.

        Tracing records one run: code that leaves torch (numpy, Python branches on
        values) becomes a constant and the converted graph silently answers something
        else. One f32 forward of both on a fixed random image catches that.
        """
        rng = np.random.default_rng(0)
        probe = rng.integers(0, 256, (1, side, side, 3), dtype=np.uint8)
        with torch.inference_mode():
            expected = _Exported(model, self.with_types)(torch.from_numpy(probe))
        compiled = self.core.compile_model(converted, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
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

    def _store(self, converted: Any, xml: Path) -> None:
        """Write the IR beside its final name and rename it into place (workers race here)."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=self.folder))
            try:
                self._ov.save_model(converted, str(tmp / "model.xml"), compress_to_fp16=False)
                os.replace(tmp / "model.bin", xml.with_suffix(".bin"))
                os.replace(tmp / "model.xml", xml)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError as exc:  # a read-only home: convert per process, say so once
            log.warning("cannot cache the converted model in %s (%s); set %s to a writable folder", self.folder, exc,
                        CACHE_ENV)

    # -------------------------------------------------------------- compile per shape
    def _request(self, shape: tuple[int, ...], slot: int = 0) -> Any:
        key = (threading.get_ident(), shape, slot)
        request = self._requests.get(key)
        if request is None:
            request = self._executable(shape).create_infer_request()
            with _FIRST_TOUCH:
                # pyopenvino initialises function-local statics on the first tensor access; two
                # threads doing that at once deadlock (one holds the static's guard and waits
                # for the GIL, the other the reverse; seen with two Dask task threads). Touch
                # the tensors here, one thread at a time, before any concurrent use.
                request.get_input_tensor(0).data  # noqa: B018
                for i in range(len(request.model_outputs)):
                    request.get_output_tensor(i).data  # noqa: B018
            self._requests[key] = request
        return request

    def close(self) -> None:
        """Free the infer requests, then the compiled models (in that order)."""
        self._requests.clear()
        self._compiled.clear()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown: nothing left to order
            self.close()

    def _executable(self, shape: tuple[int, ...]) -> Any:
        with self._lock:
            compiled = self._compiled.get(shape)
            if compiled is not None:
                self._compiled.move_to_end(shape)
                return compiled
            import time

            start = time.perf_counter()
            model = self._model.clone()
            model.reshape({model.inputs[0]: self._ov.PartialShape(list(shape))})
            config = {
                "INFERENCE_PRECISION_HINT": self.precision,
                "INFERENCE_NUM_THREADS": int(self.threads),
                "PERFORMANCE_HINT": "THROUGHPUT" if self.streams > 1 else "LATENCY",
                "NUM_STREAMS": int(self.streams),
            }
            compiled = self.core.compile_model(model, "CPU", config)
            self.compile_seconds += time.perf_counter() - start
            self._compiled[shape] = compiled
            while len(self._compiled) > SHAPE_CACHE_SIZE:
                old, _ = self._compiled.popitem(last=False)
                for key in [k for k in self._requests if k[1] == old]:
                    del self._requests[key]
            return compiled

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        # One window per request: on the CPU a batch of large windows is no faster than the
        # same windows in turn, and a fixed batch of 1 means one compiled executable per
        # window shape instead of one per (batch size, shape).
        batch = np.ascontiguousarray(batch, dtype=np.uint8)
        shape = (1, *batch.shape[1:])
        names = ("np_prob", "hv", "tp_prob") if self.with_types else ("np_prob", "hv")
        parts: dict[str, list[np.ndarray]] = {name: [] for name in names}

        def collect(request: Any) -> None:
            for j, name in enumerate(names):
                parts[name].append(np.array(request.get_output_tensor(j).data, dtype=np.float32))

        if self.streams == 1:
            request = self._request(shape)
            for i in range(batch.shape[0]):
                # One inference at a time per process: each already uses every engine thread, so
                # nothing is lost, and pyopenvino is never entered by two task threads at once (two
                # Dask threads' concurrent first inferences once deadlocked in it). Post-processing
                # of other tiles goes on meanwhile.
                with _INFER:
                    request.infer({0: batch[i : i + 1]})
                    collect(request)
        else:
            # Up to `streams` windows of this thread in flight at once; OpenVINO queues them
            # with other threads' windows on its streams. start_async and wait release the GIL.
            requests = [self._request(shape, slot) for slot in range(self.streams)]
            for first in range(0, batch.shape[0], self.streams):
                group = requests[: min(self.streams, batch.shape[0] - first)]
                for k, request in enumerate(group):
                    request.start_async({0: batch[first + k : first + k + 1]})
                for request in group:
                    request.wait()
                for request in group:
                    collect(request)
        return {name: np.concatenate(chunks) for name, chunks in parts.items()}


def make_runtime(
    model: nn.Module,
    runtime: RuntimeName,
    *,
    device: str = "cpu",
    bf16: bool = False,
    threads: int | None = None,
    channels_last: bool = True,
    compile: bool = False,
    batch_size: int = 1,
    label: str | None = None,
    streams: int = 1,
) -> Runtime:
    """The runtime for ``model``: ``torch``, ``openvino``, or ``auto`` (OpenVINO on the CPU
    where installed and able to convert the model, torch otherwise).

    ``openvino`` asked for explicitly but impossible (a GPU device, the package missing)
    is a :class:`ConfigError`; ``auto`` never fails for OpenVINO's sake.
    """
    if runtime not in RUNTIMES:
        raise ConfigError(None, f"runtime={runtime!r} is not one of {', '.join(RUNTIMES)}", "use runtime='auto'")
    on_cpu = torch_device(device, require_available=False).type == "cpu"
    want_openvino = runtime == "openvino" or (runtime == "auto" and on_cpu and openvino_available())
    if runtime == "openvino" and not on_cpu:
        raise ConfigError(None, f"the OpenVINO runtime runs on the CPU, not on {device}",
                          "use --runtime torch (or auto) with --device cuda")
    if runtime == "openvino" and not openvino_available():
        raise ConfigError(None, "--runtime openvino needs the openvino package, which is not installed",
                          "pip install openvino, or use --runtime torch")
    if want_openvino:
        try:
            return OpenVINORuntime(
                model, precision="bf16" if bf16 else "f32", threads=threads, label=label, streams=streams
            )
        except Exception as exc:  # conversion can fail on any unusual module
            what = label or type(model).__name__
            warnings.warn(
                f"OpenVINO cannot convert model {what} ({type(exc).__name__}: {exc}); running it with torch instead",
                RuntimeWarning,
                stacklevel=2,
            )
            log.warning("OpenVINO cannot convert model %s (%s); using torch", what, exc)
    return TorchRuntime(
        model, device, bf16=bf16, channels_last=channels_last, compile=compile, batch_size=batch_size
    )
