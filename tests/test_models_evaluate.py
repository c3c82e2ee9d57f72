"""Shipped-model registry, `models`, `evaluate` and `train` commands on real files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from wsi_pipeline.cli import main
from wsi_pipeline.data import CONSEP_CLASSES, load_dataset
from wsi_pipeline.engine.model import ChannelSpec, HoVerNet
from wsi_pipeline.engine.registry import ENV_VAR, default_model_name, list_models, resolve_model_name
from wsi_pipeline.engine.weights import load_model, save_model
from wsi_pipeline.errors import ModelError
from wsi_pipeline.evaluate import evaluate_samples

torch.set_num_threads(1)


@pytest.fixture()
def models_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "models"
    folder.mkdir()
    monkeypatch.setenv(ENV_VAR, str(folder))
    torch.manual_seed(0)
    parent = HoVerNet("fast", 5, ChannelSpec.scaled(0.0625))
    save_model(parent, folder / "parent.safetensors",
               {"name": "parent", "classes": CONSEP_CLASSES, "mpp": 0.25, "description": "dense"})
    child = HoVerNet("fast", 5, ChannelSpec.scaled(0.0625))
    save_model(child, folder / "child.safetensors",
               {"name": "child", "classes": CONSEP_CLASSES, "mpp": 0.25, "description": "pruned",
                "lineage": {"parent": "parent", "method": "l1", "ratio": 0.7}})
    (folder / "index.yaml").write_text("default: child\n")
    return folder


def test_registry_lists_resolves_and_flags_the_default(models_dir: Path) -> None:
    assert default_model_name() == "child"
    assert resolve_model_name("parent") == models_dir / "parent.safetensors"
    entries = {e.name: e for e in list_models()}
    assert entries["child"].default and not entries["parent"].default
    assert entries["child"].parent == "parent"
    assert entries["parent"].classes == [c["name"] for c in CONSEP_CLASSES]
    assert load_model("parent").meta["name"] == "parent"


def test_unknown_model_name_lists_what_exists(models_dir: Path) -> None:
    with pytest.raises(ModelError, match="child, parent"):
        load_model("no-such-model")


def test_models_command_prints_json_with_the_documented_keys(models_dir: Path, capsys) -> None:
    assert main(["models", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {"name", "path", "params", "macs", "mpp", "classes", "default", "parent", "description"} <= set(rows[0])
    assert main(["models"]) == 0
    assert "* child" in capsys.readouterr().out


def test_evaluate_three_real_consep_crops(consep_train: Path, models_dir: Path, tmp_path: Path) -> None:
    ds = load_dataset(consep_train)
    samples = [s for s in ds.samples if s.name in ("train_1_000", "train_1_001", "train_2_005")]
    scores = evaluate_samples(load_model("parent"), samples, save_pred_dir=tmp_path / "pred")
    assert scores["n_images"] == 3 and len(scores["images"]) == 3
    for key in ("dice", "aji", "aji_plus", "dq", "sq", "pq", "f1_detection", "type_accuracy", "f1_type", "mpq"):
        assert key in scores
    saved = np.load(tmp_path / "pred" / "train_1_000.npz")
    assert saved["inst_map"].shape == (256, 256) and "type_map" in saved


def test_evaluate_cli_on_a_small_real_folder(consep_train: Path, models_dir: Path, tmp_path: Path, capsys) -> None:
    folder = tmp_path / "ds"
    for sub in ("images", "labels"):
        (folder / sub).mkdir(parents=True)
    for name in ("train_1_000", "train_2_005"):
        shutil.copy(consep_train / "images" / f"{name}.jpg", folder / "images")
        shutil.copy(consep_train / "labels" / f"{name}.npz", folder / "labels")
    out = tmp_path / "scores.json"
    assert main(["evaluate", str(folder), "--model", "parent", "--json", str(out)]) == 0
    scores = json.loads(out.read_text())
    assert scores["model"] == "parent" and len(scores["images"]) == 2


def test_evaluate_with_a_missing_model_exits_2_with_a_clear_message(models_dir: Path, tmp_path: Path, capsys) -> None:
    assert main(["evaluate", str(tmp_path), "--model", str(tmp_path / "absent.safetensors")]) == 2
    assert "absent.safetensors" in capsys.readouterr().err


def _mini_consep(consep_train: Path, tmp_path: Path) -> tuple[Path, Path]:
    """Three real CoNSeP crops in the folder format, and a dev split holding out one source tile."""
    folder = tmp_path / "ds"
    for sub in ("images", "labels"):
        (folder / sub).mkdir(parents=True)
    for name in ("train_1_000", "train_1_001", "train_2_005"):
        shutil.copy(consep_train / "images" / f"{name}.jpg", folder / "images")
        shutil.copy(consep_train / "labels" / f"{name}.npz", folder / "labels")
    split = tmp_path / "dev.yaml"
    split.write_text("dev_sources:\n  consep:\n    - consep:train_2\n")
    return folder, split


def test_train_cli_writes_a_loadable_model(consep_train: Path, tmp_path: Path) -> None:
    folder, split = _mini_consep(consep_train, tmp_path)
    cfg = tmp_path / "train.yaml"
    cfg.write_text("width: 0.0625\nbatch_size: 2\nwarmup_steps: 1\nbf16: false\n")
    out = tmp_path / "m.safetensors"
    code = main(["train", str(folder), "--out", str(out), "--config", str(cfg), "--dev-split", str(split),
                 "--epochs", "1", "--threads", "1", "--no-progress"])
    assert code == 0
    model = load_model(out)
    assert model.meta["training"]["dev_images"] == 1
    assert [c["name"] for c in model.meta["classes"]] == [c["name"] for c in CONSEP_CLASSES]


def test_train_init_keeps_a_pruned_models_lineage_and_adds_this_run_once(
    consep_train: Path, models_dir: Path, tmp_path: Path
) -> None:
    folder, split = _mini_consep(consep_train, tmp_path)
    cfg = tmp_path / "ft.yaml"
    # dev Dice usually improves on both epochs, so on_best runs more than once
    cfg.write_text("batch_size: 2\nwarmup_steps: 0\nbf16: false\neval_every: 1\nselect_metric: dice\n")
    # A pruned model that was already fine-tuned once: its history must grow by exactly this run.
    earlier = {"init": "study point", "device": "cuda"}
    torch.manual_seed(0)
    save_model(HoVerNet("fast", 5, ChannelSpec.scaled(0.0625)), models_dir / "child2.safetensors",
               {"name": "child2", "classes": CONSEP_CLASSES, "mpp": 0.25,
                "lineage": {"parent": "parent", "method": "l1", "ratio": 0.7, "further_training": [earlier]}})
    out = tmp_path / "child-ft.safetensors"
    code = main(["train", str(folder), "--out", str(out), "--config", str(cfg), "--dev-split", str(split),
                 "--init", "child2", "--epochs", "3", "--threads", "1", "--no-progress"])
    assert code == 0
    lineage = load_model(out).meta["lineage"]
    assert (lineage["parent"], lineage["method"], lineage["ratio"]) == ("parent", "l1", 0.7)
    history = json.loads(out.with_name(out.name + ".train").joinpath("history.json").read_text())
    assert sum(bool(row.get("best")) for row in history) >= 2  # the checkpoint was saved more than once
    first, record = lineage["further_training"]  # the earlier run, then one entry for this run
    assert first == earlier
    assert record["init"] == "child2" and len(record["init_sha256"]) == 64 and record["device"] == "cpu"


def test_train_cli_rejects_a_bad_config(tmp_path: Path, capsys) -> None:
    cfg = tmp_path / "train.yaml"
    cfg.write_text("widht: 0.5\n")
    assert main(["train", str(tmp_path), "--out", str(tmp_path / "m"), "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "train.yaml" in err and "widht" in err
