"""Pruning schedules on a tiny HoVer-Net, fine-tuned for a step or two on real CoNSeP crops."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from wsi_pipeline.data import load_dataset
from wsi_pipeline.engine.macs import count_params
from wsi_pipeline.engine.model import ChannelSpec, HoVerNet
from wsi_pipeline.errors import ConfigError
from wsi_pipeline.prune.schedule import METHODS, STRUCTURED, Finetune, PruneConfig, run_pruning
from wsi_pipeline.prune.unstructured import sparsity
from wsi_pipeline.train import TrainConfig

torch.set_num_threads(1)

CROPS = ("train_1_003", "train_2_005", "train_3_007")  # tiles outside the dev split


@pytest.fixture(scope="module")
def crops(consep_train: Path, tmp_path_factory: pytest.TempPathFactory) -> list:
    root = tmp_path_factory.mktemp("consep_mini")
    for sub, suffix in (("images", ".jpg"), ("labels", ".npz")):
        (root / sub).mkdir()
        for name in CROPS:
            shutil.copy(consep_train / sub / f"{name}{suffix}", root / sub / f"{name}{suffix}")
    return list(load_dataset(root).samples)


@pytest.fixture()
def tiny() -> HoVerNet:
    torch.manual_seed(0)
    model = HoVerNet("fast", 5, ChannelSpec.scaled(0.0625)).eval()
    model.meta = {"name": "tiny-parent", "training": {"config": {"lr": 5e-4}}}
    return model


def _finetune(crops: list, epochs: int = 1) -> Finetune:
    base = TrainConfig(batch_size=2, threads=1, augment=False, balance_rare_classes=False, seed=0)
    return Finetune(crops, epochs=epochs, base=base, datasets=["consep-mini"])


def _run(tiny: HoVerNet, crops: list, method: str, schedule: str, steps: int) -> tuple:
    parent_state = {k: v.clone() for k, v in tiny.state_dict().items()}
    cfg = PruneConfig(method, 0.5, schedule, steps, round_to=4)
    outcome = run_pruning(tiny, cfg, _finetune(crops, epochs=steps + (method == "slimming")))
    for key, value in tiny.state_dict().items():  # the parent is never modified
        assert torch.equal(value, parent_state[key]), key
    return cfg, outcome


def _check(tiny: HoVerNet, cfg: PruneConfig, outcome) -> None:
    lineage = outcome.lineage
    assert lineage["parent"] == "tiny-parent"
    assert (lineage["method"], lineage["schedule"], lineage["steps"]) == (cfg.method, cfg.schedule, cfg.steps)
    assert lineage["finetune"]["optimizer_steps"] >= cfg.steps  # every round fine-tuned
    assert len(outcome.rounds) == cfg.steps
    if cfg.structured:
        assert count_params(outcome.model) == lineage["params"] < count_params(tiny)
        assert abs(lineage["achieved_ratio"] - cfg.ratio) < 0.06  # tiny model: coarse channel steps
    else:
        assert sparsity(outcome.model)["prunable"] == pytest.approx(cfg.ratio, abs=1e-3)  # masks held through fit


def test_slimming_trains_with_a_gamma_penalty_before_pruning(tiny: HoVerNet, crops: list) -> None:
    cfg, outcome = _run(tiny, crops, "slimming", "oneshot", 1)
    _check(tiny, cfg, outcome)
    phases = outcome.lineage["finetune"]["phases"]
    assert [p["phase"] for p in phases] == ["sparsity", "round1"]
    assert phases[0]["bn_l1"] > 0 and phases[1]["bn_l1"] == 0
    assert outcome.lineage["global"] is True


def test_imp_iterative_rewinds_the_learning_rate(tiny: HoVerNet, crops: list) -> None:
    cfg, outcome = _run(tiny, crops, "imp", "iterative", 2)
    _check(tiny, cfg, outcome)
    assert [r["finetune"]["lr"] for r in outcome.rounds] == [5e-4, 5e-4]  # the parent's training LR
    first, second = (r["achieved_ratio"] for r in outcome.rounds)
    assert first < second  # geometric: half of the removal in parameters' keep-fraction per round


def test_unstructured_iterative_keeps_the_masks_through_fine_tuning(tiny: HoVerNet, crops: list) -> None:
    cfg, outcome = _run(tiny, crops, "unstructured-layer", "iterative", 2)
    _check(tiny, cfg, outcome)


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["oneshot", "iterative"])
@pytest.mark.parametrize("method", METHODS)
def test_every_method_and_schedule_runs(tiny: HoVerNet, crops: list, method: str, schedule: str) -> None:
    cfg, outcome = _run(tiny, crops, method, schedule, 1 if schedule == "oneshot" else 2)
    _check(tiny, cfg, outcome)


def test_without_data_it_only_prunes(tiny: HoVerNet) -> None:
    outcome = run_pruning(tiny, PruneConfig("l2", 0.4, round_to=4))
    assert outcome.lineage["finetune"] is None
    assert outcome.lineage["global"] is False  # L2 ranks per layer unless --global
    assert 0.35 < outcome.lineage["achieved_ratio"] < 0.45


def test_step_ratios_keep_a_geometric_fraction() -> None:
    ratios = PruneConfig("imp", 0.875, "iterative", 3).step_ratios()
    assert ratios == pytest.approx([0.5, 0.75, 0.875])
    assert PruneConfig("l1", 0.7).step_ratios() == [pytest.approx(0.7)]
    assert set(STRUCTURED) < set(METHODS)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"method": "l3", "ratio": 0.5}, "unknown pruning method"),
        ({"method": "l1", "ratio": 1.2}, "between 0 and 1"),
        ({"method": "l1", "ratio": 0.5, "schedule": "oneshot", "steps": 3}, "one-shot"),
        ({"method": "l1", "ratio": 0.5, "schedule": "iterative", "steps": 1}, "steps >= 2"),
        ({"method": "unstructured-layer", "ratio": 0.5, "global_ranking": True}, "contradicts"),
    ],
)
def test_bad_configs_are_config_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        PruneConfig(**kwargs)


def test_finetune_needs_exactly_one_budget(crops: list) -> None:
    with pytest.raises(ConfigError, match="exactly one budget"):
        Finetune(crops)
    with pytest.raises(ConfigError, match="exactly one budget"):
        Finetune(crops, epochs=1, minutes=1.0)


def test_the_control_fine_tunes_the_parent_without_pruning(tiny: HoVerNet, crops: list) -> None:
    from wsi_pipeline.prune.schedule import run_control

    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    outcome = run_control(tiny, _finetune(crops), lr=1e-3)
    assert outcome.lineage["kind"] == "control" and outcome.lineage["achieved_ratio"] == 0.0
    assert count_params(outcome.model) == count_params(tiny)
    assert outcome.lineage["finetune"]["optimizer_steps"] >= 1
    assert outcome.lineage["finetune"]["phases"][0]["lr"] == 1e-3
    assert all(torch.equal(v, before[k]) for k, v in tiny.state_dict().items())  # parent untouched
    trained = outcome.model.state_dict()
    changed = [k for k, v in trained.items() if v.is_floating_point() and not torch.equal(v, before[k])]
    assert changed  # the copy did train
    assert next(outcome.model.parameters()).device.type == "cpu"
