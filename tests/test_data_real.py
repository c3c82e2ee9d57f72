"""Loaders, XML rasterisation and the dev split on the real CoNSeP and MoNuSeg files."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml

from wsi_pipeline.data import detect_format, load_dataset, load_dev_split, make_targets, split_dev
from wsi_pipeline.data.monuseg_xml import rasterise, read_polygons
from wsi_pipeline.data.splits import DEFAULT_DEV_SPLIT, class_counts_by_source, monuseg_organ, propose_dev_split
from wsi_pipeline.data.torch_dataset import HoverTrainDataset

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def consep(consep_train):
    return load_dataset(consep_train)


@pytest.fixture(scope="module")
def monuseg(monuseg_train):
    return load_dataset(monuseg_train)


def test_consep_crops_load_with_classes_and_tile_sources(consep, consep_train):
    assert detect_format(consep_train) == "folder"
    assert len(consep) == 432 and consep.has_types and consep.num_types == 5
    assert [c["name"] for c in consep.classes] == ["other", "inflammatory", "epithelial", "spindle-shaped"]
    assert len({s.source for s in consep.samples}) == 27
    assert all(s.image.shape == (256, 256, 3) and s.inst_map.shape == (256, 256) for s in consep.samples)
    assert len(consep.empty) == 21  # crops with no nucleus, kept and reported
    assert max(int(s.type_map.max()) for s in consep.samples) == 4


def instance_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Share of instances of ``a`` whose best-overlapping instance of ``b`` has IoU >= 0.5."""
    a, b = a.astype(np.int64).ravel(), b.astype(np.int64).ravel()
    area_a, area_b = np.bincount(a), np.bincount(b)
    both = (a > 0) & (b > 0)
    pairs, inter = np.unique(a[both] * (b.max() + 1) + b[both], return_counts=True)
    ia, ib = pairs // (b.max() + 1), pairs % (b.max() + 1)
    iou = inter / (area_a[ia] + area_b[ib] - inter)
    best = np.zeros(len(area_a))
    np.maximum.at(best, ia, iou)
    ids = np.flatnonzero(area_a[1:]) + 1
    return float(np.mean(best[ids] >= 0.5))


@pytest.mark.parametrize("name", ["TCGA-21-5784-01Z-00-DX1", "TCGA-NH-A8F7-01A-01-TS1"])
def test_monuseg_xml_rasterises_to_the_shipped_labels(monuseg, monuseg_train, name):
    shipped = next(s for s in monuseg.samples if s.name == name).inst_map
    drawn = rasterise(read_polygons(monuseg_train / "annotations" / f"{name}.xml"), shipped.shape)
    assert len(np.unique(drawn)) == len(np.unique(shipped)) > 100
    assert instance_agreement(drawn, shipped) == 1.0
    np.testing.assert_array_equal(drawn, shipped)  # in fact pixel-exact


def test_monuseg_tiles_have_no_classes(monuseg):
    assert len(monuseg) == 13 and not monuseg.has_types and monuseg.classes == []
    assert all(s.image.shape == (1000, 1000, 3) and s.source == s.name for s in monuseg.samples)


def test_dev_split_file_matches_its_recipe_and_holds_every_class(consep, monuseg):
    doc = yaml.safe_load(DEFAULT_DEV_SPLIT.read_text())
    proposal = propose_dev_split(consep.samples, [s.name for s in monuseg.samples], seed=doc["seed"])
    assert doc["dev_sources"] == proposal["dev_sources"]

    counts = class_counts_by_source(consep.samples, 5)
    total = sum(counts.values())[1:]
    held = sum(counts[s] for s in doc["dev_sources"]["consep"])[1:]
    share = held / total
    assert np.all((share > 0.5 * 4 / 27) & (share < 2 * 4 / 27)), share  # incl. "other" (~2% of nuclei)

    organs = [monuseg_organ(n) for n in doc["dev_sources"]["monuseg"]]
    assert len(set(organs)) == 2
    train_organs = {monuseg_organ(s.name) for s in monuseg.samples} - set()
    assert set(organs) <= {
        monuseg_organ(s.name) for s in monuseg.samples if s.name not in doc["dev_sources"]["monuseg"]
    }
    assert train_organs


def test_split_dev_holds_out_whole_tiles(consep, monuseg):
    dev_sources = load_dev_split()
    train, dev = split_dev(consep.samples, dev_sources)
    assert len(dev) == 4 * 16 and len(train) == 432 - 64
    assert not {s.source for s in train} & {s.source for s in dev}
    m_train, m_dev = split_dev(monuseg.samples, dev_sources)
    assert len(m_dev) == 2 and len(m_train) == 11


def test_training_items_from_real_crops_and_tiles(consep, monuseg):
    ds = HoverTrainDataset([consep.samples[0], monuseg.samples[0]], crops_per_large_image=3, seed=0)
    assert len(ds) == 4
    crop, tile = ds[0], ds[1]
    assert bool(crop["has_types"]) and not bool(tile["has_types"])
    assert tile["np"].sum() > 100 and tile["hv"].abs().max() == 1
    # every nucleus pixel has a type in CoNSeP
    assert torch.all((crop["tp"] > 0) == (crop["np"] > 0))


def test_ground_truth_targets_survive_hover_postprocessing(consep):
    """Targets fed to the HoVer post-processing give back the nuclei (PQ ~0.9), but not
    with the HV channels swapped: a check of channel order and signs end to end."""
    from wsi_pipeline.engine.postproc import postprocess
    from wsi_pipeline.metrics import pq

    crops = [s for s in consep.samples if s.source == "consep:train_8" and s.inst_map.any()][:8]
    right, swapped = [], []
    for s in crops:
        t = make_targets(s.inst_map, s.type_map)
        prob = t["np"].astype(np.float32)
        right.append(pq(s.inst_map, postprocess(prob, t["hv"]).inst_map)[2])
        swapped.append(pq(s.inst_map, postprocess(prob, np.ascontiguousarray(t["hv"][::-1])).inst_map)[2])
    assert np.mean(right) > 0.85, right
    assert np.mean(swapped) < np.mean(right) - 0.15, swapped
