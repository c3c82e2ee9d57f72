"""The study script's bookkeeping: shards merge safely, and latency is re-timed from what it depends on."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from wsi_pipeline.engine.macs import count_params
from wsi_pipeline.engine.model import ChannelSpec, HoVerNet
from wsi_pipeline.prune.importance import CRITERIA
from wsi_pipeline.prune.structured import prune_channels
from wsi_pipeline.prune.unstructured import sparsity

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import prune_study  # noqa: E402


def _shard(path: Path, sha: str, points: dict, config: dict | None = None) -> Path:
    path.write_text(json.dumps({"parent": {"sha256": sha, "path": "p"}, "config": config or {"steps": 3},
                                "points": points, "failed": {"x": "boom"} if "x" not in points else {}}))
    return path


def test_shards_merge_into_one_result_and_foreign_shards_are_refused(tmp_path: Path) -> None:
    a = _shard(tmp_path / "a.json", "abc", {"p1": {"id": "p1"}})
    b = _shard(tmp_path / "b.json", "abc", {"p2": {"id": "p2"}, "x": {"id": "x"}})
    target = tmp_path / "all.json"
    merged = prune_study.merge_results(target, [a, b])
    assert set(merged["points"]) == {"p1", "p2", "x"}
    assert merged["failed"] == {}  # a point that failed in one shard and finished in another is done
    assert json.loads(target.read_text())["points"].keys() == merged["points"].keys()
    with pytest.raises(SystemExit, match="another parent"):
        prune_study.merge_results(target, [_shard(tmp_path / "c.json", "zzz", {})])
    with pytest.raises(SystemExit, match="other settings"):
        prune_study.merge_results(target, [_shard(tmp_path / "d.json", "abc", {}, {"steps": 2})])


def test_the_grid_starts_with_the_controls_and_covers_the_issue() -> None:
    points = prune_study.grid(3)
    assert [p["method"] for p in points[:2]] == ["control", "control"]
    assert len(points) == 2 + 4 * 2 * 4 + 2 * 5


def test_architecture_of_rebuilds_what_latency_depends_on() -> None:
    torch.manual_seed(0)
    parent = HoVerNet("fast", 5, ChannelSpec.scaled(0.0625)).eval()
    pruned = prune_channels(parent, CRITERIA["l1"].scorer, 0.5, round_to=4).model
    record = {"kind": "structured", "method": "l1", "ratio": 0.5, "spec": pruned.spec.to_dict()}
    rebuilt = prune_study.architecture_of(record, parent)
    assert rebuilt.spec.to_dict() == pruned.spec.to_dict()
    assert count_params(rebuilt) == count_params(pruned)
    x = torch.rand(1, 3, parent.input_size, parent.input_size)
    assert {k: v.shape for k, v in rebuilt(x).items()} == {k: v.shape for k, v in pruned(x).items()}

    record = {"kind": "unstructured", "method": "unstructured-global", "ratio": 0.75}
    masked = prune_study.architecture_of(record, parent)
    assert sparsity(masked)["prunable"] == pytest.approx(0.75, abs=1e-3)
    assert sparsity(parent)["prunable"] < 0.01  # the parent is left dense
