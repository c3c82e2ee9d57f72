"""`wsi-pipeline run` options: defaults < YAML < command line, every bad value a clear ConfigError."""

from __future__ import annotations

from pathlib import Path

import pytest

from wsi_pipeline.cli import build_parser
from wsi_pipeline.cli.run import _given
from wsi_pipeline.config import (
    RESULT_OPTIONS,
    SCHEDULER_ENV,
    RunConfig,
    checksum,
    load_run_config,
    option_names,
    read_yaml_options,
)
from wsi_pipeline.errors import ConfigError


def parse(*argv: str):
    return build_parser().parse_args(["run", "slides", "--out", "out", *argv])


def test_defaults_leave_derived_values_open() -> None:
    config = load_run_config(environ={})
    assert config.model is None and config.tile_size is None and config.margin is None
    assert config.workers is None and config.threads_per_worker is None and config.scheduler is None
    assert (config.geojson, config.device, config.retries, config.overwrite) == ("gz", "cpu", 2, False)
    # bf16 where the hardware computes it natively, as DESIGN.md gives the CPU engine's default.
    assert config.bf16 == "auto" and config.runtime == "auto"


def test_every_option_has_a_flag_of_its_name() -> None:
    """Each RunConfig field is reachable from the command line (and so documented in --help)."""
    flags = {
        "model": "x.safetensors",
        "tile_size": "512",
        "margin": "64",
        "batch_size": "8",
        "device": "cpu",
        "bf16": "auto",
        "runtime": "openvino",
        "window": "1024",
        "workers": "3",
        "threads_per_worker": "2",
        "engine_streams": "2",
        "scheduler": "tcp://127.0.0.1:8786",
        "cluster": "slurm",
        "mpp": "0.5",
        "target_mpp": "0.25",
        "backend": "tiffslide",
        "geojson": "plain",
        "dask_report": "dask.html",
        "max_in_flight": "7",
        "slides_in_flight": "1",
        "retries": "0",
        "lock_wait": "30",
    }
    argv = [part for name, value in flags.items() for part in (f"--{name.replace('_', '-')}", value)]
    given = _given(parse(*argv, "--overwrite", "--no-progress", "--zarr-image", "--no-skip-glass",
                         "--dashboard"))
    assert set(given) == set(option_names()) - set(RunConfig.YAML_ONLY)
    config = load_run_config(None, given, environ={})
    assert config.tile_size == 512 and config.bf16 == "auto" and config.scheduler == "tcp://127.0.0.1:8786"
    assert config.overwrite is True and config.progress is False and config.dask_report == Path("dask.html")
    assert config.zarr_image is True and config.skip_glass is False and config.dashboard is True


def test_flags_not_given_are_not_overrides() -> None:
    assert _given(parse()) == {}


def test_yaml_then_command_line(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("tile-size: 656\nmargin: 82\ngeojson: plain\nworkers: 2\n")
    config = load_run_config(path, {"margin": 164}, environ={})
    assert (config.tile_size, config.margin, config.geojson, config.workers) == (656, 164, "plain", 2)
    assert read_yaml_options(path) == {"tile_size": 656, "margin": 82, "geojson": "plain", "workers": 2}


def test_scheduler_from_the_environment_unless_given(tmp_path: Path) -> None:
    env = {SCHEDULER_ENV: "tcp://10.0.0.5:8786"}
    assert load_run_config(environ=env).scheduler == "tcp://10.0.0.5:8786"
    assert load_run_config(None, {"scheduler": "tcp://127.0.0.1:1"}, environ=env).scheduler == "tcp://127.0.0.1:1"
    with pytest.raises(ConfigError, match=f"environment variable {SCHEDULER_ENV}.*'scheduler'"):
        load_run_config(environ={SCHEDULER_ENV: "nonsense"})


@pytest.mark.parametrize(
    ("yaml_text", "expected"),
    [
        ("tile_size: 10\n", r"run.yaml: option 'tile_size' = 10 is invalid: .*greater than or equal to 128"),
        ("tile_sise: 1024\n", r"run.yaml: unknown option 'tile_sise' Fix: did you mean 'tile_size'\?"),
        ("device: tpu\n", r"option 'device' = 'tpu' is invalid: 'tpu' is not a device"),
        ("geojson: zip\n", r"option 'geojson' = 'zip' is invalid: .*'plain' or 'gz'"),
        ("bf16: maybe\n", r"option 'bf16' = 'maybe' is invalid: .*boolean.*; or .*'auto'"),
        ("cluster: k8s\n", r"option 'cluster' = 'k8s' is invalid"),
        ("- tile_size\n", r"run.yaml: holds a list, not a mapping of options"),
        ("tile_size: [1\n", r"run.yaml: is not valid YAML"),
        ("tile_size: 1024\ntile-size: 2048\n", r"option 'tile_size' is given twice"),
    ],
)
def test_bad_yaml_names_the_file_and_the_option(tmp_path: Path, yaml_text: str, expected: str) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError, match=expected):
        load_run_config(path, environ={})


def test_bad_command_line_value_names_the_flag() -> None:
    with pytest.raises(ConfigError, match=r"command line: option --workers = 0 is invalid.*Fix: give --workers"):
        load_run_config(None, _given(parse("--workers", "0")), environ={})


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nope.yaml: does not exist"):
        load_run_config(tmp_path / "nope.yaml", environ={})


def test_empty_yaml_is_all_defaults(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing set\n")
    assert load_run_config(path, environ={}) == RunConfig()


def test_result_settings_ignore_scheduling() -> None:
    """Only options that change outputs enter the "already done" checksum."""
    base = RunConfig()
    scheduled = RunConfig(workers=8, threads_per_worker=1, batch_size=16, retries=0, progress=False, overwrite=True)
    assert checksum(base.result_settings()) == checksum(scheduled.result_settings())
    assert checksum(base.result_settings()) != checksum(RunConfig(tile_size=656).result_settings())
    assert set(base.result_settings()) == set(RESULT_OPTIONS)
