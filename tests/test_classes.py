"""One rule for a nucleus' class, the same answer from every caller.

The rule (HoVer-Net's): the most frequent non-background type among the nucleus' pixels,
ties to the lowest type id, background only when none of its pixels is typed. The
post-processing (predicted nuclei), the datasets (split and sampler class counts) and
the metrics (ground truth and predictions) all call ``wsi_pipeline.classes.majority_types``;
this checks that they agree on a case where counting background would change the answer.
"""

from __future__ import annotations

import numpy as np
import pytest

from wsi_pipeline.classes import CONSEP_CLASSES, PANNUKE_CLASSES, class_color, generic_classes, majority_types
from wsi_pipeline.data.dataset import Sample, instance_types
from wsi_pipeline.data.splits import class_counts_by_source
from wsi_pipeline.engine.postproc import describe_nuclei
from wsi_pipeline.metrics import centroids_and_types, score_images

NUM_TYPES = 5  # CoNSeP: 4 classes + background


def labelled_crop() -> tuple[np.ndarray, np.ndarray, dict[int, int]]:
    """Three nuclei (sparse ids 4, 7, 9) and a type map drawn tighter than the instances.

    * id 4: 30 px, 20 of them background-typed, 6 of class 3, 4 of class 1 -> class 3;
    * id 7: 10 px, 5 of class 4 and 5 of class 2 (a tie) -> class 2, the lowest;
    * id 9: 12 px, none typed -> background (0).
    """
    inst = np.zeros((12, 20), dtype=np.int32)
    types = np.zeros((12, 20), dtype=np.uint8)
    inst[1:6, 1:7] = 4  # 5 x 6 = 30 px
    types[1, 1:7] = 3  # 6 px of class 3
    types[2, 1:5] = 1  # 4 px of class 1; the other 20 px stay background
    inst[8:10, 1:6] = 7  # 2 x 5 = 10 px
    types[8, 1:6] = 4
    types[9, 1:6] = 2
    inst[1:4, 12:16] = 9  # 3 x 4 = 12 px, untyped
    return inst, types, {4: 3, 7: 2, 9: 0}


def test_the_rule_itself() -> None:
    inst, types, expected = labelled_crop()
    majority, votes = majority_types(inst, types)
    assert majority.shape == votes.shape == (10,)
    assert {i: int(majority[i]) for i in expected} == expected
    assert votes[4] == 6 and votes[7] == 5 and votes[9] == 12  # pixels of the winning type
    assert majority[[0, 1, 5]].tolist() == [0, 0, 0] and votes[[0, 1, 5]].tolist() == [0, 0, 0]  # absent ids
    sized, _ = majority_types(inst, types, num_labels=12, num_types=8)
    assert sized.shape == (12,) and sized[4] == 3
    with pytest.raises(ValueError, match="differ in size"):
        majority_types(inst, types[:5])


def test_every_caller_agrees_with_the_rule() -> None:
    inst, types, expected = labelled_crop()

    # datasets: the per-instance classes, and the split's class counts built on them
    assert instance_types(inst, types) == expected
    sample = Sample(
        name="crop", source="crop", image=np.zeros((*inst.shape, 3), np.uint8), inst_map=inst, type_map=types
    )
    counts = class_counts_by_source([sample], NUM_TYPES)["crop"]
    assert counts.tolist() == [0, 0, 1, 1, 0]  # one class-2 and one class-3 nucleus; untyped ones not counted

    # metrics: ground-truth classes in label order (4, 7, 9)
    _, metric_types = centroids_and_types(inst, types)
    assert metric_types.tolist() == [expected[4], expected[7], expected[9]]

    # post-processing: the same nuclei as predictions, with one-hot type probabilities
    consecutive = np.searchsorted([0, 4, 7, 9], inst).astype(np.int32)
    tp = np.stack([types == c for c in range(NUM_TYPES)]).astype(np.float32)
    nuclei = describe_nuclei(consecutive, (inst > 0).astype(np.float32), tp)
    assert [n.type for n in nuclei] == [expected[4], expected[7], expected[9]]
    assert [n.type_prob for n in nuclei] == pytest.approx([6 / 30, 5 / 10, 12 / 12])

    # scoring a prediction that draws nucleus 4 fully as class 3 (and 7 as class 2): the
    # ground truth's nucleus 4 is class 3 too, so every paired class agrees
    pred_types = np.zeros_like(types)
    pred_types[inst == 4], pred_types[inst == 7] = 3, 2
    scores = score_images([("crop", inst, types, inst, pred_types)])
    assert scores["type_accuracy"] == 1.0
    assert scores["pq_per_type"] == {"2": 1.0, "3": 1.0}


def test_class_tables() -> None:
    for table in (CONSEP_CLASSES, PANNUKE_CLASSES, generic_classes(12)):
        assert [c["id"] for c in table] == list(range(1, len(table) + 1))
        assert all(len(c["color"]) == 3 for c in table)
    assert generic_classes(12)[10]["color"] == class_color(11) == class_color(1)  # the palette repeats
