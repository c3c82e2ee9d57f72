"""Inference runtimes behind one call: a uint8 RGB batch in, HoVer-Net's probability maps out.

Two runtimes run the same network:

* :class:`~wsi_pipeline.engine.torch_runtime.TorchRuntime`: PyTorch eager (CPU or CUDA),
  optional bf16 autocast, channels_last and ``torch.compile``. It is the reference and the
  GPU path.
* :class:`OpenVINORuntime`: the model converted once to OpenVINO (``openvino.convert_model``)
  and compiled for the CPU. On CPUs here PyTorch eager leaves most of the machine idle
  on HoVer-Net's narrow layers; OpenVINO fuses them and picks kernels for the exact
  shape, which ``benchmarks/engine_latency.py`` measures side by side.

Both take the input in the layout the tiles come in (uint8 NHWC) and return softmaxed
float32 maps, so the permute, the cast and the softmax are inside the compiled graph
rather than extra passes over the maps in numpy.

The converted model is cached on disk (:mod:`~wsi_pipeline.engine.ir_cache`), keyed by the
checksum of the checkpoint file (of the weights for a model that exists only in memory), the
OpenVINO version and the export revision: every Dask worker of every run loads the cached IR
instead of tracing the network again, and a process given the checkpoint as a
:class:`~wsi_pipeline.engine.header.ModelFile` whose graph is cached never imports torch
(the torch side lives in :mod:`~wsi_pipeline.engine.torch_runtime`). A cache entry that
cannot be read (a crash mid-write, a truncated file, another OpenVINO's format) is
rebuilt with a warning, never trusted and never fatal. Compiled executables per input
shape go to OpenVINO's own ``CACHE_DIR`` under the same folder.

:func:`make_runtime` picks one: ``auto`` means OpenVINO on the CPU when it is installed
and converts the model, torch otherwise; a model OpenVINO cannot convert falls back to
torch with one warning naming the model and the reason.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import tempfile
import threading
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np

from wsi_pipeline.engine.header import ModelFile
from wsi_pipeline.engine.ir_cache import CACHE_ENV, cache_dir, cached_graph, graph_folder, graph_key, openvino_available
from wsi_pipeline.engine.settings import RUNTIMES, check_device_name
from wsi_pipeline.errors import ConfigError

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "CACHE_ENV",
    "OpenVINORuntime",
    "Runtime",
    "cache_dir",
    "make_runtime",
    "openvino_available",
]

log = logging.getLogger(__name__)

RuntimeName = Literal["auto", "torch", "openvino"]
# Compiled models kept per runtime: a run sees one interior tile shape plus a few edge ones.
SHAPE_CACHE_SIZE = 8
# Serialises the first touch of each new infer request's tensors, and the inferences of a
# process (see OpenVINORuntime._request and run).
_FIRST_TOUCH = threading.Lock()
_INFER = threading.Lock()


class Runtime(Protocol):
    """What :class:`~wsi_pipeline.engine.infer.TileInferer` needs of a runtime."""

    name: str
    precision: str  # "bf16" or "f32": what the arithmetic actually is

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """uint8 (N, H, W, 3) RGB -> ``np_prob`` (N, h, w), ``hv`` (N, 2, h, w), ``tp_prob`` (N, C, h, w)."""
        ...


class OpenVINORuntime:
    """The model converted to OpenVINO and compiled for the CPU, one executable per shape.

    ``precision``: ``"bf16"`` or ``"f32"``, passed to OpenVINO as the inference precision
    hint. ``threads``: OpenVINO's thread count (``None``: torch's current setting where torch
    is loaded, so one knob, ``--threads``/the worker layout, governs both runtimes; else the
    cores this process may use).

    ``model``: a loaded network, or a :class:`~wsi_pipeline.engine.header.ModelFile`, which is
    loaded (with torch) only when its graph is not in the cache yet. ``checksum`` keys the
    cache (default: the file's, or the weights' of a network given as such).

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
        model: nn.Module | ModelFile,
        *,
        precision: Literal["bf16", "f32"] = "f32",
        threads: int | None = None,
        label: str | None = None,
        streams: int = 1,
        checksum: str | None = None,
    ) -> None:
        import openvino as ov

        self._ov = ov
        self.precision = precision
        self.threads = threads if threads is not None else _default_threads()
        if isinstance(streams, bool) or not isinstance(streams, int) or streams < 1:
            raise ConfigError(None, f"streams={streams!r} must be a positive integer", "give e.g. streams=2")
        self.streams = min(streams, self.threads)
        self.label = label or (model.meta.get("name", model.path.stem) if isinstance(model, ModelFile)
                               else type(model).__name__)
        self.with_types = getattr(model, "num_types", None) is not None
        self.core = ov.Core()
        self.folder = graph_folder()
        try:  # OpenVINO's own cache of compiled executables (per shape and precision)
            (self.folder / "compiled").mkdir(parents=True, exist_ok=True)
            self.core.set_property({"CACHE_DIR": str(self.folder / "compiled")})
        except (OSError, RuntimeError) as exc:
            log.warning("no compiled-model cache in %s (%s); compiling in memory", self.folder, exc)
        if checksum is None:
            checksum = model.checksum if isinstance(model, ModelFile) else _weights_checksum(model)
        self.key = graph_key(checksum)
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
    def _converted(self, model: nn.Module | ModelFile) -> Any:
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

    def _converted_locked(self, model: nn.Module | ModelFile) -> Any:
        xml = self.folder / f"{self.key}.xml"
        if xml.is_file() and xml.with_suffix(".bin").is_file():
            try:
                loaded = self.core.read_model(str(xml))
                self.converted_from_cache = True
                return loaded
            except Exception as exc:  # a truncated or foreign file: rebuild, never trust it
                log.warning("compiled-model cache %s is unreadable (%s); converting the model again", xml, exc)
        from wsi_pipeline.engine.torch_runtime import convert_to_openvino

        network = model.load() if isinstance(model, ModelFile) else model
        converted = convert_to_openvino(network, self.with_types, self.core, self.threads)
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


def _default_threads() -> int:
    """torch's thread setting where torch is loaded (one knob for both runtimes), else the
    cores this process may run on."""
    torch = sys.modules.get("torch")
    if torch is not None:
        return int(torch.get_num_threads())
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _weights_checksum(model: nn.Module) -> str:
    from wsi_pipeline.engine.torch_runtime import weights_checksum

    return weights_checksum(model)


def make_runtime(
    model: nn.Module | ModelFile,
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

    ``model`` may be a :class:`~wsi_pipeline.engine.header.ModelFile`: it is loaded with torch
    only when the runtime needs the network (torch, or a conversion not cached yet), and its
    conversion is cached under the file's checksum either way.

    ``openvino`` asked for explicitly but impossible (a GPU device, the package missing)
    is a :class:`ConfigError`; ``auto`` never fails for OpenVINO's sake.
    """
    if runtime not in RUNTIMES:
        raise ConfigError(None, f"runtime={runtime!r} is not one of {', '.join(RUNTIMES)}", "use runtime='auto'")
    on_cpu = check_device_name(device) == "cpu"
    want_openvino = runtime == "openvino" or (runtime == "auto" and on_cpu and openvino_available())
    if runtime == "openvino" and not on_cpu:
        raise ConfigError(None, f"the OpenVINO runtime runs on the CPU, not on {device}",
                          "use --runtime torch (or auto) with --device cuda")
    if runtime == "openvino" and not openvino_available():
        raise ConfigError(None, "--runtime openvino needs the openvino package, which is not installed",
                          "pip install openvino, or use --runtime torch")
    what = label or (model.meta.get("name", model.path.stem) if isinstance(model, ModelFile) else type(model).__name__)
    checksum = model.checksum if isinstance(model, ModelFile) else None
    if isinstance(model, ModelFile) and not (want_openvino and cached_graph(model.checksum)):
        # The network is needed: loaded here, so a damaged file is reported as such, not as a
        # conversion failure.
        model = model.load(device)
    if want_openvino:
        try:
            return OpenVINORuntime(
                model, precision="bf16" if bf16 else "f32", threads=threads, label=what, streams=streams,
                checksum=checksum,
            )
        except Exception as exc:  # conversion can fail on any unusual module
            warnings.warn(
                f"OpenVINO cannot convert model {what} ({type(exc).__name__}: {exc}); running it with torch instead",
                RuntimeWarning,
                stacklevel=2,
            )
            log.warning("OpenVINO cannot convert model %s (%s); using torch", what, exc)
    from wsi_pipeline.engine.torch_runtime import TorchRuntime

    network = model.load(device) if isinstance(model, ModelFile) else model
    return TorchRuntime(
        network, device, bf16=bf16, channels_last=channels_last, compile=compile, batch_size=batch_size,
        threads=threads,
    )
