"""The options of ``wsi-pipeline run``, validated in one place.

Options come from three sources, later ones winning: the defaults below, a YAML file
(``--config``), the command line. The YAML keys are the option names with ``_`` or
``-`` (``tile_size`` or ``tile-size``), so a line copied from the shell works in the file.
``DASK_SCHEDULER_ADDRESS`` stands in for ``scheduler`` when neither source sets it, the
same variable Dask itself reads.

Every invalid value becomes a :class:`~wsi_pipeline.errors.ConfigError` naming the file
(or "command line") and the option, so a typo in a 30-line YAML is found at once rather
than hours into a batch.

Only some options change what a run computes (:data:`RESULT_OPTIONS`); the rest say how
it is scheduled. The checksum used to decide whether a slide is already done covers the
first group only, so rerunning a batch with more workers does not redo finished slides.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)

from wsi_pipeline.errors import ConfigError

SCHEDULER_ENV = "DASK_SCHEDULER_ADDRESS"
OptionsT = TypeVar("OptionsT", bound=BaseModel)
CLI_SOURCE = "command line"

# The options that change the outputs; scheduling options (workers, scheduler...) and the
# batch size do not. The model is compared by its file checksum, not by how it was named.
RESULT_OPTIONS = (
    "tile_size", "margin", "device", "bf16", "runtime", "window", "mpp", "target_mpp", "backend", "geojson",
    "zarr_image", "skip_glass",
)


class ClusterOptions(BaseModel):
    """How dask-jobqueue asks SLURM or PBS for workers: ``cluster_options`` in the run YAML.

    One job is one batch-system job holding ``processes`` Dask workers that share ``cores``
    and ``memory``. A key left out falls back to dask-jobqueue's own configuration
    (``jobqueue.slurm.*`` / ``jobqueue.pbs.*`` in ``~/.config/dask/jobqueue.yaml``), then to
    its default; ``cores`` and ``memory`` must come from one of the two. Keys may be spelled
    with ``_`` or ``-``. See ``docs/cluster.md``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    queue: str | None = Field(None, description="partition (SLURM -p) or queue (PBS -q)")
    account: str | None = Field(None, description="account charged for the jobs (SLURM -A, PBS -A)")
    cores: int | None = Field(None, ge=1, le=4096, description="cores per job")
    memory: str | None = Field(None, description="memory per job, e.g. 16GB")
    processes: int | None = Field(
        None, ge=1, le=4096, description="Dask worker processes per job (default: one per core / --threads-per-worker)"
    )
    walltime: str | None = Field(None, description="time limit per job, HH:MM:SS")
    job_extra_directives: tuple[str, ...] | None = Field(
        None, description="extra #SBATCH / #PBS lines, e.g. ['--gres=gpu:1']"
    )
    job_script_prologue: tuple[str, ...] | None = Field(
        None, description="shell lines run in the job before the worker starts (module load ...)"
    )
    interface: str | None = Field(
        None, description="network interface of the scheduler and workers (ib0, eth0; lo on one machine)"
    )
    log_directory: str | None = Field(None, description="folder for the jobs' stdout/stderr files")
    local_directory: str | None = Field(None, description="workers' scratch folder on the compute nodes")
    python: str | None = Field(None, description="Python on the compute nodes (default: the one running the run)")
    adaptive_minimum: int | None = Field(None, ge=1, le=100_000, description="adaptive scaling: fewest workers")
    adaptive_maximum: int | None = Field(None, ge=1, le=100_000, description="adaptive scaling: most workers")

    @model_validator(mode="wrap")
    @classmethod
    def _check(cls, data: Any, handler: ValidatorFunctionWrapHandler) -> ClusterOptions:
        """Keys with ``-`` or ``_``, unknown keys with a suggestion, and the key named in
        every problem (the run's error names only the option ``cluster_options``)."""
        if isinstance(data, Mapping):
            known = list(cls.model_fields)
            normalised: dict[str, Any] = {}
            for raw_key, value in data.items():
                key = str(raw_key).strip().replace("-", "_")
                if key not in known:
                    close = difflib.get_close_matches(key, known, n=1)
                    hint = f"did you mean '{close[0]}'? " if close else ""
                    raise ValueError(f"unknown key '{raw_key}': {hint}known keys: {', '.join(known)}")
                normalised[key] = value
            data = normalised
        try:
            options = handler(data)
        except ValidationError as exc:
            error = exc.errors()[0]
            key = ".".join(str(part) for part in error["loc"])
            where = f"key '{key}' = {error.get('input')!r}: " if key else ""
            message = str(error["msg"]).removeprefix("Value error, ").replace("a valid tuple", "a list")
            raise ValueError(f"{where}{message}") from None
        if options.memory is not None:
            from dask.utils import parse_bytes

            try:
                parse_bytes(options.memory)
            except ValueError:
                raise ValueError(f"key 'memory' = {options.memory!r} is not an amount of memory: e.g. 16GB") from None
        low, high = options.adaptive_minimum, options.adaptive_maximum
        if low is not None and high is not None and low > high:
            raise ValueError(f"adaptive_minimum ({low}) is above adaptive_maximum ({high})")
        return options

    @property
    def adaptive(self) -> bool:
        return self.adaptive_minimum is not None or self.adaptive_maximum is not None


class RunConfig(BaseModel):
    """Every option of ``wsi-pipeline run`` (inputs and output folder aside).

    ``None`` means "derived at run time": the default model from the registry, the margin
    from the model and post-processing reach, the worker layout from the machine, the
    inference µm/px from the checkpoint, the in-flight bound from the worker threads, the
    tile size from a measured default (see :func:`wsi_pipeline.batch.default_tile_size`).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    model: str | None = Field(None, description="shipped model name or checkpoint path (default: the registry's)")
    tile_size: int | None = Field(
        None, ge=128, le=16384, description="tile core side in px at the inference µm/px (default: derived)"
    )
    margin: int | None = Field(None, ge=0, le=4096, description="context on each tile side in px (default: derived)")
    batch_size: int = Field(4, ge=1, le=1024, description="patches per model forward pass")
    device: str = Field("cpu", description="torch device: cpu, cuda or cuda:N")
    # "auto" by default: the CPU engine is the product, and f32 on a CPU with native bf16 costs
    # 1.8x per window for a PQ change of about 0.002 (docs/engine.md); f32 elsewhere.
    bf16: bool | Literal["auto"] = Field(
        "auto", description="bf16 arithmetic: auto (where the CPU or GPU computes it natively), true or false"
    )
    runtime: Literal["auto", "torch", "openvino"] = Field(
        "auto", description="inference runtime: auto (OpenVINO on CPU where installed, else torch), torch, openvino"
    )
    window: int | None = Field(
        None, ge=96, le=4096, description="network input side in px for whole-tile inference (default: measured best)"
    )
    skip_glass: bool = Field(
        True,
        description="leave out network windows farther than 25 µm from the detected tissue (false: compute them all)",
    )
    engine_streams: int | None = Field(
        None, ge=1, le=256,
        description="OpenVINO windows in flight at once per worker, sharing its engine threads "
        "(default: one per core on a local OpenVINO cluster, else 1)",
    )
    workers: int | None = Field(None, ge=1, le=4096, description="Dask workers (default: sized to the machine)")
    threads_per_worker: int | None = Field(None, ge=1, le=1024, description="threads per Dask worker")
    scheduler: str | None = Field(None, description="address of an existing Dask scheduler")
    cluster: Literal["local", "slurm", "pbs"] = Field("local", description="cluster to start without --scheduler")
    mpp: float | None = Field(None, gt=0, le=1000, description="slide level-0 µm/px, overriding its metadata")
    target_mpp: float | None = Field(None, gt=0, le=1000, description="inference µm/px (default: the model's)")
    backend: Literal["auto", "openslide", "tiffslide", "image"] = Field("auto", description="slide reader")
    overwrite: bool = Field(False, description="redo slides whose outputs exist")
    geojson: Literal["plain", "gz"] = Field("gz", description="GeoJSON compression")
    zarr_image: bool = Field(
        False, description="also store the RGB slide at the inference µm/px in the OME-Zarr (napari shows both)"
    )
    dask_report: Path | None = Field(None, description="write Dask's performance report (HTML) here")
    dashboard: bool = Field(
        False,
        description="serve Dask's dashboard from a local cluster (its address is logged); off by default because "
        "starting it costs every local run about a second (bokeh's import and server)",
    )
    max_in_flight: int | None = Field(
        None, ge=1, le=100_000, description="tiles in flight at once, shared by the slides in flight"
    )
    slides_in_flight: int = Field(
        2, ge=1, le=2,
        description="slides processed at once: 2 starts the next slide while the previous one's last tiles finish",
    )
    retries: int = Field(2, ge=0, le=100, description="retries of a failed tile task")
    progress: bool = Field(True, description="progress bar per slide")
    lock_wait: float = Field(
        0.0, ge=-1, le=7 * 24 * 3600,
        description="seconds to wait for another run on the same --out to finish (0: stop at once; -1: forever)",
    )

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        base, _, index = value.partition(":")
        if base not in ("cpu", "cuda") or (index and not index.isdigit()) or (base == "cpu" and index):
            raise ValueError(f"{value!r} is not a device: use cpu, cuda or cuda:N")
        return value

    @field_validator("scheduler")
    @classmethod
    def _check_scheduler(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.strip()
        if not value:
            return None
        if "://" not in value and ":" not in value:
            raise ValueError(f"{value!r} is not a scheduler address: give e.g. tcp://10.0.0.5:8786")
        return value

    @field_validator("model")
    @classmethod
    def _check_model(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("is empty: give a shipped model name or a checkpoint path")
        return value

    def result_settings(self) -> dict[str, Any]:
        """The options that change the outputs, JSON-ready."""
        data = self.model_dump(mode="json")
        return {key: data[key] for key in RESULT_OPTIONS}

    # Cluster options (SLURM/PBS through dask-jobqueue): YAML only, as one mapping.
    cluster_options: ClusterOptions = Field(
        default_factory=ClusterOptions,
        description="the jobs --cluster slurm|pbs asks for: a mapping of queue, cores, memory... (docs/cluster.md)",
    )

    # Options set only in the YAML file (--config): they have no command-line flag.
    YAML_ONLY: ClassVar[tuple[str, ...]] = ("cluster_options",)


def option_names(cls: type[BaseModel] = RunConfig) -> list[str]:
    """Every option name an options model accepts (underscore form)."""
    return list(cls.model_fields)


def _normalise_keys(data: Mapping[str, Any], source: str, cls: type[BaseModel]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    known = option_names(cls)
    for raw_key, value in data.items():
        if not isinstance(raw_key, str):
            raise ConfigError(source, f"option names must be text, got {raw_key!r}", f"use one of: {', '.join(known)}")
        key = raw_key.strip().replace("-", "_")
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise ConfigError(source, f"unknown option '{raw_key}'", f"{hint}known options: {', '.join(known)}")
        if key in out:
            raise ConfigError(source, f"option '{key}' is given twice (as '-' and '_' spellings)", "keep one")
        out[key] = value
    return out


def read_yaml_options(path: str | os.PathLike[str], cls: type[BaseModel] = RunConfig) -> dict[str, Any]:
    """The options of a YAML config file, keys normalised against ``cls``, not yet validated."""
    path = Path(path)
    if not path.is_file():
        problem = "is a folder, not a YAML file" if path.is_dir() else "does not exist"
        raise ConfigError(path, problem, "pass --config with the path of a YAML file of options")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(path, f"is not valid YAML ({exc})".replace("\n", " "), "fix the syntax") from None
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(
            path, f"holds a {type(data).__name__}, not a mapping of options", "write one 'option: value' per line"
        )
    return _normalise_keys(data, str(path), cls)


def _validation_problem(exc: ValidationError, origin: Mapping[str, str], cls: type[BaseModel]) -> ConfigError:
    """The first invalid option as a ConfigError naming its source (file, command line or
    environment variable), the option, the value given and what is allowed."""
    errors = exc.errors()
    option = str(errors[0]["loc"][0]) if errors[0]["loc"] else "?"
    # A union type (bf16: bool | "auto") reports one error per alternative: say them all.
    messages = []
    for error in errors:
        if error["loc"] and str(error["loc"][0]) == option:
            message = str(error["msg"]).removeprefix("Value error, ")
            if message not in messages:
                messages.append(message)
    given = errors[0].get("input")
    source = origin.get(option, CLI_SOURCE)
    field = cls.model_fields.get(option)
    meaning = f" ({field.description})" if field is not None and field.description else ""
    name = f"--{option.replace('_', '-')}" if source == CLI_SOURCE else f"'{option}'"
    return ConfigError(
        source,
        f"option {name} = {given!r} is invalid: {'; or '.join(messages)}",
        f"give {name}{meaning} a valid value",
    )


def load_options(
    cls: type[OptionsT],
    config_file: str | os.PathLike[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    defaults_from: Mapping[str, tuple[Any, str]] | None = None,
) -> OptionsT:
    """Build an options model (run or train): defaults < YAML file < ``overrides``.

    The one loader behind ``run --config`` and ``train --config``, so both accept the same
    YAML (``_`` or ``-`` in keys) and report a bad value the same way: the file or "command
    line", the option, the value and what is allowed. ``overrides`` holds only what the user
    actually gave (``None`` values are ignored, so argparse defaults of ``None`` mean "not
    given"). ``defaults_from`` fills options neither source set, as ``{option: (value, source)}``
    (the run's ``DASK_SCHEDULER_ADDRESS``).
    """
    values: dict[str, Any] = {}
    origin: dict[str, str] = {}
    if config_file is not None:
        for key, value in read_yaml_options(config_file, cls).items():
            values[key] = value
            origin[key] = str(config_file)
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    for key, value in _normalise_keys(given, CLI_SOURCE, cls).items():
        values[key] = value
        origin[key] = CLI_SOURCE
    for key, (value, source) in (defaults_from or {}).items():
        if values.get(key) is None and value is not None:
            values[key] = value
            origin[key] = source
    try:
        return cls(**values)
    except ValidationError as exc:
        raise _validation_problem(exc, origin, cls) from None


def load_run_config(
    config_file: str | os.PathLike[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> RunConfig:
    """The run configuration (see :func:`load_options`); ``environ`` (default ``os.environ``)
    supplies ``DASK_SCHEDULER_ADDRESS`` when no scheduler is set, as Dask itself reads it."""
    environ = os.environ if environ is None else environ
    scheduler = environ.get(SCHEDULER_ENV) or None
    return load_options(
        RunConfig, config_file, overrides, {"scheduler": (scheduler, f"environment variable {SCHEDULER_ENV}")}
    )


def checksum(data: Any) -> str:
    """SHA-256 of a JSON-ready value, keys sorted: equal settings give equal sums."""
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def file_checksum(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes (a model checkpoint), read in chunks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
