"""HoVer-Net targets on constructed nuclei: HV signs, range, centre and crop behaviour."""

from __future__ import annotations

import numpy as np
import pytest

from wsi_pipeline.data.targets import center_crop_box, crop_targets, hv_map, make_targets, np_map


def disc(shape: tuple[int, int], cy: float, cx: float, r: float) -> np.ndarray:
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    return (rows - cy) ** 2 + (cols - cx) ** 2 <= r**2


def test_hv_on_rectangle_matches_hand_computed_official_convention():
    # rows 1..5, cols 2..7: centre of mass (3, 4.5) -> rounded half-up (3, 5);
    # value = index + 1 - rounded centre, then negatives / max|neg|, positives / max pos.
    inst = np.zeros((7, 9), np.int32)
    inst[1:6, 2:8] = 3
    hv = hv_map(inst)
    assert hv.shape == (2, 7, 9) and hv.dtype == np.float32
    np.testing.assert_allclose(hv[0, 3, 2:8], [-1, -0.5, 0, 1 / 3, 2 / 3, 1], atol=1e-6)
    np.testing.assert_allclose(hv[1, 1:6, 4], [-1, 0, 1 / 3, 2 / 3, 1], atol=1e-6)
    # horizontal map is constant down a column, vertical constant along a row
    assert np.all(hv[0, 1:6, :] == hv[0, 3, :])
    assert np.all(hv[1, :, 2:8] == hv[1, :, 2:3])
    assert np.all(hv[:, inst == 0] == 0)


def test_hv_signs_and_range_on_a_disc():
    inst = np.zeros((64, 64), np.int32)
    inst[disc(inst.shape, 30, 34, 10)] = 1
    inst[disc(inst.shape, 10, 10, 5)] = 7
    hv = hv_map(inst)
    assert hv.min() == -1.0 and hv.max() == 1.0
    for k in (1, 7):
        m = inst == k
        assert hv[0][m].min() == -1 and hv[0][m].max() == 1
        assert hv[1][m].min() == -1 and hv[1][m].max() == 1
    # left of the centre negative, right positive; above negative, below positive
    assert hv[0, 30, 26] < 0 < hv[0, 30, 42]
    assert hv[1, 22, 34] < 0 < hv[1, 38, 34]
    # monotone non-decreasing left to right through the nucleus
    assert np.all(np.diff(hv[0, 30, 24:45]) >= 0)


def test_np_map_and_make_targets_dtypes():
    inst = np.zeros((32, 32), np.int32)
    inst[4:10, 4:10] = 2
    types = (inst > 0).astype(np.uint8) * 3
    assert np_map(inst).dtype == np.uint8 and np_map(inst).sum() == 36
    t = make_targets(inst, types)
    assert t["np"].dtype == np.int64 and t["hv"].dtype == np.float32 and t["tp"].dtype == np.int64
    assert t["tp"].max() == 3 and t["np"].sum() == 36
    assert make_targets(inst, None)["tp"].sum() == 0


def test_crop_keeps_the_true_centre_of_a_cut_nucleus():
    # a 21 px wide nucleus centred at column 40, cut by a centre crop starting at column 38
    inst = np.zeros((100, 100), np.int32)
    inst[45:56, 30:51] = 5
    full = hv_map(inst)
    t = make_targets(inst, None, output_size=24)
    box = center_crop_box(inst.shape, 24)
    assert box == (slice(38, 62), slice(38, 62))
    np.testing.assert_array_equal(t["hv"], full[(slice(None), *box)])
    # its left part is outside the crop, so inside the crop it starts near the centre, not at -1
    assert t["hv"][0][t["np"] > 0].min() > -0.5
    # recomputing on the cropped map would have moved the centre: the values differ
    assert not np.array_equal(t["hv"], hv_map(inst[box]))


def test_instances_outside_the_crop_are_not_computed_and_ids_may_be_sparse():
    inst = np.zeros((50, 50), np.int32)
    inst[20:30, 20:30] = 70000  # sparse large id
    inst[0:5, 0:5] = 3  # outside the centre crop
    t = crop_targets(inst, None, center_crop_box(inst.shape, 20))
    assert t["hv"].shape == (2, 20, 20)
    assert t["hv"].min() == -1 and t["hv"].max() == 1
    assert np.all(hv_map(inst, only_ids=[])[:] == 0)
    assert np.all(hv_map(inst, only_ids=[3])[:, 20:30, 20:30] == 0)


def test_crop_larger_than_map_is_refused():
    with pytest.raises(ValueError, match="larger than the map"):
        make_targets(np.zeros((10, 10), np.int32), None, output_size=12)
