"""Metrics against values computed by hand on small constructed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from wsi_pipeline import metrics
from wsi_pipeline.errors import DataError


def canvas() -> np.ndarray:
    return np.zeros((30, 40), np.int32)


def two_nuclei() -> np.ndarray:
    """A: 10x10 (100 px) at rows 0-9, cols 0-9; B: 10x10 at rows 15-24, cols 20-29."""
    m = canvas()
    m[0:10, 0:10] = 1
    m[15:25, 20:30] = 2
    return m


def all_metrics(true: np.ndarray, pred: np.ndarray) -> list[float]:
    return [metrics.dice(true, pred), metrics.aji(true, pred), metrics.aji_plus(true, pred), *metrics.pq(true, pred)]


def test_perfect_match_scores_one_and_ignores_label_values() -> None:
    true = two_nuclei()
    pred = np.where(true == 1, 7, np.where(true == 2, 300, 0))  # other, sparse label values
    assert all_metrics(true, pred) == pytest.approx([1, 1, 1, 1, 1, 1])


def test_one_missed_nucleus() -> None:
    true = two_nuclei()
    pred = np.where(true == 1, 1, 0)
    # Dice 2*100/(200+100); AJI 100/(100 + 100 unpaired GT); DQ 1/(1 + 0.5); SQ 1.
    assert all_metrics(true, pred) == pytest.approx([2 / 3, 0.5, 0.5, 2 / 3, 1.0, 2 / 3])


def test_one_false_positive() -> None:
    true = canvas()
    true[0:10, 0:10] = 1
    pred = true.copy()
    pred[20:25, 20:30] = 2  # 50 px where there is no nucleus
    # Dice 200/(100+150); AJI 100/(100 + 50 unpaired pred); DQ 1/(1 + 0.5).
    assert all_metrics(true, pred) == pytest.approx([0.8, 100 / 150, 100 / 150, 2 / 3, 1.0, 2 / 3])


def test_merge_of_two_nuclei() -> None:
    true = canvas()
    true[0:10, 0:10] = 1  # A, 100 px
    true[0:10, 10:16] = 2  # B, 60 px, touching A
    pred = np.where(true > 0, 1, 0)  # one 160 px prediction over both
    # IoU(A)=100/160=0.625 (matched), IoU(B)=60/160=0.375 (missed): DQ 1/1.5, SQ .625.
    # AJI reuses the prediction for both: (100+60)/(160+160). AJI+ pairs it once: 100/(160+60).
    expected = [1.0, 160 / 320, 100 / 220, 2 / 3, 0.625, 2 / 3 * 0.625]
    assert all_metrics(true, pred) == pytest.approx(expected)


def test_split_of_one_nucleus() -> None:
    true = canvas()
    true[0:10, 0:20] = 1  # 200 px
    pred = canvas()
    pred[0:10, 0:12] = 1  # 120 px: IoU 0.6, matched
    pred[0:10, 12:20] = 2  # 80 px: IoU 0.4, a false positive
    # AJI and AJI+ both pair GT with the 120 px part: 120/(200 + 80).
    assert all_metrics(true, pred) == pytest.approx([1.0, 120 / 280, 120 / 280, 2 / 3, 0.6, 0.4])


def test_pq_below_half_uses_a_unique_hungarian_pairing() -> None:
    true = canvas()
    true[0:10, 0:10] = 1
    true[0:10, 10:16] = 2
    pred = np.where(true > 0, 1, 0)
    # At IoU > 0.3 only one GT can take the single prediction: the higher-IoU one.
    dq, sq, pq = metrics.pq(true, pred, iou=0.3)
    assert (dq, sq) == pytest.approx((2 / 3, 0.625))


def test_empty_images() -> None:
    empty = canvas()
    both = all_metrics(empty, empty)
    assert all(math.isnan(v) for v in both)
    assert all_metrics(empty, two_nuclei()) == pytest.approx([0, 0, 0, 0, 0, 0])
    assert all_metrics(two_nuclei(), empty) == pytest.approx([0, 0, 0, 0, 0, 0])


def test_centroids_and_majority_types_exclude_background() -> None:
    inst = two_nuclei()
    types = np.zeros_like(inst)
    types[0:10, 0:3] = 2  # 30 px of type 2 ...
    types[0:10, 3:5] = 1  # ... 20 px of type 1, 50 px background: type 2
    centroids, kinds = metrics.centroids_and_types(inst, types)
    np.testing.assert_allclose(centroids, [[4.5, 4.5], [24.5, 19.5]])
    assert kinds.tolist() == [2, 0]  # B has no typed pixel
    assert metrics.centroids_and_types(inst)[1].tolist() == [0, 0]


def test_pair_centroids_radius_is_inclusive_and_pairing_unique() -> None:
    true = np.array([[0.0, 0.0], [100.0, 0.0], [200.0, 0.0]])
    pred = np.array([[12.0, 0.0], [100.0, 12.5], [201.0, 0.0], [199.0, 0.0]])
    pairs, un_t, un_p = metrics.pair_centroids(true, pred)
    pairs = pairs[np.argsort(pairs[:, 0])]
    assert pairs[:, 0].tolist() == [0, 2]  # 12 px away still pairs
    assert pairs[0, 1] == 0 and pairs[1, 1] in (2, 3)  # one of two equally near predictions
    assert un_t.tolist() == [1]  # 12.5 px away: beyond the 12 px radius
    assert len(un_p) == 2
    empty_pairs, un_t, un_p = metrics.pair_centroids(true, np.zeros((0, 2)))
    assert empty_pairs.shape == (0, 2) and un_t.tolist() == [0, 1, 2] and un_p.size == 0


def test_detection_and_type_stats_by_hand() -> None:
    stats = metrics.detection_and_type_stats(
        paired_true_type=np.array([1, 1, 2, 2]),
        paired_pred_type=np.array([1, 2, 2, 2]),
        unpaired_true_type=np.array([1]),
        unpaired_pred_type=np.array([2, 2]),
    )
    assert stats["f1_detection"] == pytest.approx(8 / 11)  # 2*4 / (2*4 + 2 FP + 1 FN)
    assert stats["type_accuracy"] == pytest.approx(3 / 4)
    # type 1: TP 1, FN 1 (paired, called 2), FN_d 1 -> 2 / (2 + 2*1 + 1)
    # type 2: TP 2, FP 1 (true 1 called 2), FP_d 2 -> 4 / (4 + 2*1 + 2)
    assert stats["f1_type"] == pytest.approx({"1": 2 / 5, "2": 4 / 8})
    untyped = metrics.detection_and_type_stats(np.zeros(4), np.zeros(4), np.zeros(1), np.zeros(2), typed=False)
    assert untyped["f1_detection"] == pytest.approx(8 / 11) and untyped["f1_type"] is None


def typed_image(types_a: int, types_b: int) -> tuple[np.ndarray, np.ndarray]:
    inst = two_nuclei()
    return inst, np.where(inst == 1, types_a, np.where(inst == 2, types_b, 0))


def test_score_images_aggregates_and_mpq_by_hand() -> None:
    true1, ttype1 = typed_image(1, 2)
    pred1, ptype1 = typed_image(1, 1)  # B found but called type 1
    empty = canvas()
    true3, ttype3 = typed_image(1, 1)
    pred3 = np.where(true3 == 1, 1, 0)  # B missed
    ptype3 = np.where(pred3 > 0, 1, 0)
    result = metrics.score_images(
        [
            ("img1", true1, ttype1, pred1, ptype1),
            ("empty", empty, empty, empty, empty),
            ("img3", true3, ttype3, pred3, ptype3),
        ]
    )
    rows = {r["name"]: r for r in result["images"]}
    assert rows["img1"]["pq"] == pytest.approx(1.0)
    # img1 class 1: GT {A}, pred {A, B}: DQ 1/1.5, SQ 1; class 2: GT {B}, no pred: 0.
    assert rows["img1"]["pq_per_type"] == pytest.approx({"1": 2 / 3, "2": 0.0})
    assert rows["img1"]["mpq"] == pytest.approx(1 / 3)
    assert rows["empty"]["pq"] is None and rows["empty"]["mpq"] is None and rows["empty"]["aji"] is None
    assert rows["img3"]["pq"] == pytest.approx(2 / 3) and rows["img3"]["mpq"] == pytest.approx(2 / 3)
    # Per-image values averaged over the images where they are defined.
    assert result["pq"] == pytest.approx((1 + 2 / 3) / 2)
    assert result["dice"] == pytest.approx((1 + 2 / 3) / 2)
    assert result["mpq"] == pytest.approx((1 / 3 + 2 / 3) / 2)
    assert result["pq_per_type"] == pytest.approx({"1": (2 / 3 + 2 / 3) / 2, "2": 0.0})
    # Pooled detection: 3 pairs, 1 miss. Types: pairs (1,1), (2,1), (1,1); miss of type 1.
    assert result["detection"]["tp"] == 3 and result["detection"]["fn"] == 1 and result["detection"]["fp"] == 0
    assert result["f1_detection"] == pytest.approx(6 / 7)
    assert result["type_accuracy"] == pytest.approx(2 / 3)
    # type 1: TP 2, FP 1 (true 2 called 1), FN_d 1 -> 4/(4+2+1); type 2: FN 1 -> 0/(0+2)
    assert result["f1_type"] == pytest.approx({"1": 4 / 7, "2": 0.0})
    assert result["n_images"] == 3


def test_score_images_without_types_leaves_type_metrics_empty() -> None:
    true = two_nuclei()
    result = metrics.score_images([("a", true, None, true, None)])
    assert result["pq"] == pytest.approx(1.0) and result["f1_detection"] == pytest.approx(1.0)
    assert result["type_accuracy"] is None and result["f1_type"] is None and result["mpq"] is None


def test_score_images_refuses_mismatched_sizes_naming_the_image() -> None:
    with pytest.raises(DataError, match="slide_7"):
        metrics.score_images([("slide_7", two_nuclei(), None, np.zeros((30, 41), np.int32), None)])


def test_mixed_typed_and_untyped_images_still_report_types() -> None:
    """A dev split mixing CoNSeP (typed) and MoNuSeg (instances only) keeps its type metrics."""
    from wsi_pipeline.metrics import score_images

    inst = np.zeros((40, 40), np.int32)
    inst[5:15, 5:15] = 1
    inst[25:35, 25:35] = 2
    types = np.where(inst == 1, 2, np.where(inst == 2, 3, 0)).astype(np.uint8)
    wrong = np.where(inst > 0, 2, 0).astype(np.uint8)
    result = score_images([("typed", inst, types, inst, wrong), ("untyped", inst, None, inst, None)])
    assert result["n_images"] == 2 and result["n_typed_images"] == 1
    assert result["type_accuracy"] == pytest.approx(0.5)
    assert result["f1_detection"] == pytest.approx(1.0)
    assert result["detection"]["tp"] == 4
    only_untyped = score_images([("untyped", inst, None, inst, None)])
    assert only_untyped["type_accuracy"] is None and only_untyped["mpq"] is None
