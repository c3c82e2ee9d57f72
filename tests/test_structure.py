"""The one-way flow of DESIGN.md, checked on the source: lower layers never import higher ones.

Import statements are read with ``ast`` (every one, including those inside functions,
which are still dependencies), so a violation fails here with the module and line
instead of surfacing later as an import cycle or as torch loading in a light process.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "wsi_pipeline"

# Layers that know nothing of Dask, the CLI, the batch, the writers or the scheduler.
LOW_LAYERS = ("slide", "engine", "metrics.py")
FORBIDDEN_IN_LOW = (
    "dask",
    "distributed",
    "wsi_pipeline.cli",
    "wsi_pipeline.batch",
    "wsi_pipeline.outputs",
    "wsi_pipeline.schedule",
)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, imported module) of every import in ``path``, relative ones resolved.

    ``from a import b`` yields both ``a`` and ``a.b`` (b may be a submodule).
    """
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.append((node.lineno, module))
            found.extend((node.lineno, f"{module}.{alias.name}") for alias in node.names)
    return found


def _matches(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def _files(*parts: str) -> list[Path]:
    files: list[Path] = []
    for part in parts:
        target = PACKAGE / part
        files.extend(sorted(target.rglob("*.py")) if target.is_dir() else [target])
    return files


def _violations(files: list[Path], forbidden: tuple[str, ...]) -> list[str]:
    """One message per offending import statement."""
    found: dict[tuple[Path, int], str] = {}
    for path in files:
        for line, module in imports_of(path):
            if any(_matches(module, prefix) for prefix in forbidden):
                found.setdefault((path, line), module)
    return [f"{path.relative_to(PACKAGE.parent)}:{line} imports {module}" for (path, line), module in found.items()]


def test_engine_never_imports_the_data_layer() -> None:
    files = _files("engine")
    assert len(files) > 5
    assert _violations(files, ("wsi_pipeline.data",)) == []


def test_low_layers_know_nothing_of_dask_cli_batch_outputs_or_schedule() -> None:
    files = _files(*LOW_LAYERS)
    assert len(files) > 15
    assert _violations(files, FORBIDDEN_IN_LOW) == []


def test_shared_records_sit_below_the_engine() -> None:
    """The nucleus record and the class rule import numpy and the standard library only."""
    for name in ("nuclei.py", "classes.py"):
        imported = {module.split(".")[0] for _, module in imports_of(PACKAGE / name)}
        assert imported <= {"__future__", "dataclasses", "typing", "numpy"}, (name, imported)


def test_the_checker_sees_lazy_and_relative_imports(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "wsi_pipeline" / "engine"
    fake.mkdir(parents=True)
    lazy = "def f():\n    from wsi_pipeline.data.targets import hv_map\n"
    (fake / "thing.py").write_text(lazy + "from ..outputs import geojson\nimport dask.array\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", tmp_path / "wsi_pipeline")
    found = {module for _, module in imports_of(fake / "thing.py")}
    assert {"wsi_pipeline.data.targets", "wsi_pipeline.outputs.geojson", "dask.array"} <= found
    assert len(_violations([fake / "thing.py"], ("wsi_pipeline.data", "wsi_pipeline.outputs", "dask"))) == 3


def test_stitcher_and_writers_import_without_torch() -> None:
    """A process that only stitches and writes (or inspects a slide) never loads torch."""
    code = (
        "import sys, wsi_pipeline, wsi_pipeline.nuclei, wsi_pipeline.classes, wsi_pipeline.stitch, "
        "wsi_pipeline.outputs.geojson, wsi_pipeline.outputs.zarr_store, wsi_pipeline.outputs.report, "
        "wsi_pipeline.tiling, wsi_pipeline.metrics; "
        "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('wsi_pipeline'))"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=PACKAGE.parent, timeout=120)


def test_the_run_driver_and_the_worker_import_without_torch() -> None:
    """`wsi-pipeline run`'s driver modules (the CLI, the batch, the scheduler, the engine's
    settings) and a worker's (the tile task, the engine, the OpenVINO runtime, the checkpoint
    header) load without torch: its import is seconds, so it is imported only where a network
    must be loaded (a first run of a model, the torch runtime; ``engine.header``)."""
    code = (
        "import sys, wsi_pipeline.cli as cli, wsi_pipeline.batch, wsi_pipeline.batch.runner, wsi_pipeline.schedule, "
        "wsi_pipeline.engine.settings, wsi_pipeline.worker, wsi_pipeline.engine.infer, wsi_pipeline.engine.runtime, "
        "wsi_pipeline.engine.header, wsi_pipeline.engine.ir_cache, wsi_pipeline.engine.registry; cli.build_parser(); "
        "from wsi_pipeline.batch.plan import inference_config; from wsi_pipeline.config import RunConfig; "
        "inference_config(RunConfig(), 2, streams=2); "
        "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('wsi_pipeline'))"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=PACKAGE.parent, timeout=120)


def test_the_run_imports_what_its_outputs_defer_while_workers_warm_up() -> None:
    """A run imports the writers' and the report's lazily loaded libraries once its workers'
    warm-up is submitted (``outputs.import_deferred``), so that they are not paid after the
    last tile; the list names real modules, and none of them is torch."""
    code = (
        "import sys; from wsi_pipeline.outputs import DEFERRED_IMPORTS, import_deferred; "
        "before = set(sys.modules); import_deferred(); "
        "missing = [m for m in DEFERRED_IMPORTS if m not in sys.modules]; assert not missing, missing; "
        "assert any(m not in before for m in DEFERRED_IMPORTS); "
        "import matplotlib; assert matplotlib.get_backend().lower() == 'agg', matplotlib.get_backend(); "
        "assert 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=PACKAGE.parent, timeout=120)
