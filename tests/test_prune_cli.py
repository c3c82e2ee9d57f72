"""`wsi-pipeline prune` end to end on a tiny checkpoint written by the test."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from wsi_pipeline.cli import main
from wsi_pipeline.engine.macs import count_params
from wsi_pipeline.engine.model import ChannelSpec, HoVerNet
from wsi_pipeline.engine.weights import load_model, save_model
from wsi_pipeline.prune.unstructured import sparsity

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def parent_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = HoVerNet("fast", 5, ChannelSpec.scaled(0.0625))
    meta = {"name": "tiny-parent", "description": "test parent", "mpp": 0.25, "metrics": {"dev": {"pq": 0.1}}}
    return save_model(model, tmp_path_factory.mktemp("models") / "tiny-parent", meta)


def _last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


def _prune(parent: Path, out: Path, options: str, *paths: str) -> int:
    """Exit code of ``wsi-pipeline prune PARENT OPTIONS PATHS --out OUT``.

    ``options`` is split on spaces as a shell would; ``paths`` (e.g. ``--finetune``, DIR)
    are passed unsplit because temporary folders may contain spaces.
    """
    return main(["prune", str(parent), *options.split(), *paths, "--out", str(out)])


def test_structured_prune_writes_a_smaller_loadable_model(parent_path: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "tiny-l1.safetensors"
    code = _prune(parent_path, out, "--method l1 --ratio 0.5 --round-to 4 --latency-iters 1 --threads 1")
    printed = capsys.readouterr().out
    assert code == 0
    for label in ("parameters", "GMAC / patch", "latency fp32, batch 4", "latency bf16, batch 4"):
        assert label in printed
    pruned, parent = load_model(out), load_model(parent_path)
    summary = _last_json(printed)
    assert summary["params"] == count_params(pruned) < count_params(parent)
    assert abs(summary["achieved_ratio"] - 0.5) < 0.05
    lineage = pruned.meta["lineage"]
    assert lineage["parent"] == "tiny-parent"
    assert (lineage["method"], lineage["schedule"], lineage["steps"], lineage["global"]) == ("l1", "oneshot", 1, False)
    assert set(lineage["latency"]) == {"fp32", "bf16"}
    assert pruned.meta["metrics"] == {} and pruned.meta["mpp"] == 0.25  # parent's scores do not carry over


def test_unstructured_prune_reports_sparsity_and_storage(parent_path: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "tiny-ug"
    code = _prune(parent_path, out, "--method unstructured-global --ratio 0.9 --latency-iters 0")
    printed = capsys.readouterr().out
    assert code == 0
    assert "sparsity: 0.9000 of conv weights" in printed and "sparse bitmask+values" in printed
    pruned = load_model(tmp_path / "tiny-ug.safetensors")
    assert sparsity(pruned)["prunable"] == pytest.approx(0.9, abs=1e-4)
    assert pruned.meta["storage_bytes"]["sparse"] < pruned.meta["storage_bytes"]["dense"]


def test_fine_tuning_from_the_command_line(parent_path: Path, consep_train: Path, tmp_path: Path, capsys) -> None:
    data = tmp_path / "data"
    for sub, suffix in (("images", ".jpg"), ("labels", ".npz")):
        (data / sub).mkdir(parents=True)
        for name in ("train_1_003", "train_2_005", "train_10_001"):  # train_10 is a dev tile: held out
            shutil.copy(consep_train / sub / f"{name}{suffix}", data / sub / f"{name}{suffix}")
    out = tmp_path / "tiny-l2-ft.safetensors"
    options = "--method l2 --ratio 0.3 --round-to 4 --epochs 1 --batch-size 2 --threads 1 --latency-iters 0"
    code = _prune(parent_path, out, options, "--finetune", str(data))
    assert code == 0
    finetune = load_model(out).meta["lineage"]["finetune"]
    assert finetune["samples"] == 2 and finetune["optimizer_steps"] == 1
    assert "fine-tuning: 1 steps" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("--method l1 --ratio 0.5 --epochs 2", "without --finetune"),
        ("--method l1 --ratio 0 --latency-iters 0", "between 0 and 1"),
        ("--method imp --ratio 0.5 --schedule oneshot --steps 3", "one-shot"),
    ],
)
def test_user_errors_exit_2_with_a_message(parent_path: Path, tmp_path: Path, capsys, extra, message) -> None:
    code = _prune(parent_path, tmp_path / "x.safetensors", extra)
    assert code == 2
    assert message in capsys.readouterr().err
