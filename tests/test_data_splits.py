"""Source ids, dev splitting and the split recipe on constructed inputs."""

from __future__ import annotations

import numpy as np
import pytest

from wsi_pipeline.data import Sample, load_dev_split, source_of, split_dev
from wsi_pipeline.data.splits import monuseg_organ, pick_balanced_sources, pick_organ_sources
from wsi_pipeline.errors import DataError


def sample(name: str) -> Sample:
    return Sample(name, source_of(name), np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4), np.int32), None)


def test_source_of():
    assert source_of("train_12_003") == "consep:train_12"
    assert source_of("train_12") == "consep:train_12"
    assert source_of("test_3_015") == "consep:test_3"
    assert source_of("TCGA-21-5784-01Z-00-DX1") == "TCGA-21-5784-01Z-00-DX1"
    assert source_of("train_x_1") == "train_x_1"


def test_split_dev_by_source():
    samples = [sample(n) for n in ["train_1_000", "train_1_001", "train_2_000", "TCGA-B0-5698-01Z-00-DX1"]]
    train, dev = split_dev(samples, {"consep:train_1", "TCGA-ZZ-0000"})
    assert [s.name for s in dev] == ["train_1_000", "train_1_001"]
    assert [s.name for s in train] == ["train_2_000", "TCGA-B0-5698-01Z-00-DX1"]
    with pytest.raises(DataError, match="nothing left to train on"):
        split_dev(samples[:2], {"consep:train_1"})


def test_load_dev_split_reads_all_groups_and_rejects_bad_files(tmp_path):
    path = tmp_path / "split.yaml"
    path.write_text("seed: 0\ndev_sources:\n  a: [x, y]\n  b: [z]\n")
    assert load_dev_split(path) == {"x", "y", "z"}
    path.write_text("dev_sources:\n  a: x\n")
    with pytest.raises(DataError, match="dev_sources.a must be a list"):
        load_dev_split(path)
    path.write_text("seed: 0\n")
    with pytest.raises(DataError, match="has no dev_sources"):
        load_dev_split(path)
    with pytest.raises(DataError, match="not found"):
        load_dev_split(tmp_path / "missing.yaml")
    assert {"consep:train_10", "TCGA-21-5784-01Z-00-DX1"} <= load_dev_split()  # the shipped config


def test_pick_balanced_sources_prefers_representative_tiles():
    # 8 sources; class 1 only in "r1" and "r2": a 2-of-8 pick must take exactly one of them
    counts = {f"s{i}": np.array([0, 0, 10, 10]) for i in range(6)}
    counts["r1"] = np.array([0, 4, 10, 10])
    counts["r2"] = np.array([0, 4, 10, 10])
    picked = pick_balanced_sources(counts, 2, seed=0)
    assert len(picked) == 2 and len({"r1", "r2"} & set(picked)) == 1
    assert picked == pick_balanced_sources(counts, 2, seed=0)
    with pytest.raises(ValueError):
        pick_balanced_sources(counts, 8)


def test_pick_organ_sources_takes_distinct_organs_that_stay_in_training():
    names = [
        "TCGA-21-5784-01Z-00-DX1",
        "TCGA-50-5931-01Z-00-DX1",
        "TCGA-A7-A13E-01Z-00-DX1",
        "TCGA-AR-A1AK-01Z-00-DX1",
        "TCGA-NH-A8F7-01A-01-TS1",
    ]
    for seed in range(5):
        picked = pick_organ_sources(names, 2, seed)
        assert sorted(monuseg_organ(n) for n in picked) == ["breast", "lung"]  # colon has one tile only
    assert monuseg_organ("TCGA-QQ-0000-01Z") == "unknown:QQ"
    with pytest.raises(ValueError):
        pick_organ_sources(names, 3)
