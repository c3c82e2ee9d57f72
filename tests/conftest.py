"""Shared fixtures: the real data in ../shared/data, skipped cleanly where absent."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("WSI_SHARED_DATA", REPO.parent / "shared" / "data"))


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(
            f"real data not found at {path}: these tests read ../shared/data "
            "(set WSI_SHARED_DATA to its location to run them)"
        )
    return path


@pytest.fixture(scope="session", autouse=True)
def _engine_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """One OpenVINO conversion cache for the whole session (and the CLI subprocesses it
    starts), never the user's ~/.cache: tests start from an empty cache and share it."""
    folder = tmp_path_factory.mktemp("engine-cache")
    before = os.environ.get("WSI_PIPELINE_CACHE")
    os.environ["WSI_PIPELINE_CACHE"] = str(folder)
    yield
    if before is None:
        os.environ.pop("WSI_PIPELINE_CACHE", None)
    else:
        os.environ["WSI_PIPELINE_CACHE"] = before


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Root of the real annotated data (../shared/data)."""
    return _require(SHARED_DATA)


@pytest.fixture(scope="session")
def aperio_svs() -> Path:
    """The real Aperio slide CMU-1-Small-Region (CC0)."""
    return _require(SHARED_DATA / "cmu_small_region.svs")


@pytest.fixture(scope="session")
def consep_train() -> Path:
    """CoNSeP train crops: images/NAME.jpg + labels/NAME.npz (inst_map, type_map)."""
    return _require(SHARED_DATA / "consep" / "train")


@pytest.fixture(scope="session")
def monuseg_train() -> Path:
    """MoNuSeg train tiles: images/*.tif, annotations/*.xml, labels/*.npz."""
    return _require(SHARED_DATA / "monuseg" / "train")


@pytest.fixture
def torch_one_thread() -> Iterator[None]:
    """Run the test on one torch thread, restoring the previous count afterwards.

    The machine's cores are shared with other jobs; one thread keeps model-running tests
    from oversubscribing them. torch is imported here, not at the top, so tests that never
    touch a model do not pay for loading it.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
