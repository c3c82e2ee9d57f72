"""HoVer post-processing: splitting touching nuclei, nucleus records, conventions on real data."""

from __future__ import annotations

import numpy as np
import pytest
import shapely
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage as ndi

from wsi_pipeline import metrics
from wsi_pipeline.data.targets import hv_map
from wsi_pipeline.engine.postproc import PostprocConfig, describe_nuclei, postprocess
from wsi_pipeline.errors import ConfigError

MODES = ("none", "minmax")


def two_touching_discs(shape=(64, 80), c1=(32, 28), c2=(32, 50), r=13) -> np.ndarray:
    """Two overlapping discs; the shared lens goes to the nearer centre (a straight cut)."""
    yy, xx = np.indices(shape)
    d1 = np.hypot(yy - c1[0], xx - c1[1])
    d2 = np.hypot(yy - c2[0], xx - c2[1])
    inst = np.zeros(shape, np.int32)
    inst[(d1 <= r) & (d1 <= d2)] = 1
    inst[(d2 <= r) & (d2 < d1)] = 2
    return inst


def onehot(type_map: np.ndarray, n_types: int) -> np.ndarray:
    return np.eye(n_types, dtype=np.float32)[type_map].transpose(2, 0, 1)


@pytest.mark.parametrize("mode", MODES)
def test_touching_discs_are_separated(mode: str) -> None:
    inst = two_touching_discs()
    # The blob is a single connected component: only the HV maps can split it.
    assert ndi.label(inst > 0)[1] == 1
    res = postprocess((inst > 0).astype(np.float32), hv_map(inst), config=PostprocConfig(hv_norm=mode))
    assert len(res.nuclei) == 2
    assert res.inst_map.dtype == np.int32
    assert sorted(np.unique(res.inst_map).tolist()) == [0, 1, 2]
    dq, sq, _ = metrics.pq(inst, res.inst_map)
    assert dq == 1.0
    assert sq > 0.9
    gt_xy = metrics.centroids_and_types(inst)[0] + 0.5  # pixel-centre index -> pixel-edge coordinates
    got_xy = np.array(sorted(n.centroid for n in res.nuclei))
    np.testing.assert_allclose(got_xy, gt_xy, atol=1.0)


def test_hv_maps_matter_flat_hv_gives_one_nucleus() -> None:
    inst = two_touching_discs()
    res = postprocess((inst > 0).astype(np.float32), np.zeros((2, *inst.shape), np.float32))
    assert len(res.nuclei) == 1


def test_nucleus_record_geometry_and_pixel_edge_convention() -> None:
    inst = np.zeros((40, 50), np.int32)
    inst[10:20, 20:30] = 1  # 10 x 10 square
    res = postprocess((inst > 0).astype(np.float32), hv_map(inst))
    (nuc,) = res.nuclei
    assert nuc.label == 1
    assert nuc.area_px == 100
    assert nuc.bbox == (20, 10, 30, 20)  # x0, y0, x1, y1 with x1/y1 exclusive
    assert nuc.centroid == pytest.approx((25.0, 15.0))  # pixel (r, c) spans [c, c+1] x [r, r+1]
    poly = shapely.Polygon(nuc.polygon)
    assert poly.is_valid
    assert poly.bounds == pytest.approx((20.0, 10.0, 30.0, 20.0))
    assert poly.area == pytest.approx(100 - 4 * 0.125)  # marching squares cuts each corner by 1/8 px^2
    assert nuc.polygon.dtype == np.float32 and nuc.polygon.shape[1] == 2
    assert not np.array_equal(nuc.polygon[0], nuc.polygon[-1])  # open ring
    assert nuc.type == 0 and nuc.class_probs.shape == (0,)
    assert nuc.type_prob == pytest.approx(1.0)  # mean NP probability without a TP map


def test_type_by_majority_excluding_background_and_class_means() -> None:
    inst = np.zeros((30, 30), np.int32)
    inst[5:15, 5:15] = 1
    inst[18:26, 18:26] = 2
    pix_type = np.zeros_like(inst)
    pix_type[5:15, 5:11] = 0  # 60 background votes inside nucleus 1 ...
    pix_type[5:15, 11:14] = 3  # ... 30 for class 3 ...
    pix_type[5:15, 14:15] = 2  # ... 10 for class 2: class 3 wins, background excluded
    pix_type[18:26, 18:26] = 1
    tp = 0.25 * onehot(pix_type, 4) + 0.75 / 4  # softmax-like, argmax = pix_type
    nuclei = describe_nuclei(inst, (inst > 0).astype(np.float32), tp)
    assert [n.type for n in nuclei] == [3, 1]
    assert nuclei[0].type_prob == pytest.approx(0.30)
    assert nuclei[1].type_prob == pytest.approx(1.0)
    expected = tp[:, inst == 1].mean(axis=1)
    np.testing.assert_allclose(nuclei[0].class_probs, expected, rtol=1e-6)
    assert nuclei[0].class_probs.dtype == np.float32
    assert nuclei[0].class_probs.sum() == pytest.approx(1.0, abs=1e-5)


def test_nucleus_with_only_background_votes_gets_type_zero() -> None:
    inst = np.zeros((20, 20), np.int32)
    inst[5:12, 5:12] = 1
    (nuc,) = describe_nuclei(inst, (inst > 0).astype(np.float32), onehot(np.zeros_like(inst), 3))
    assert nuc.type == 0 and nuc.type_prob == pytest.approx(1.0)


def test_empty_maps_give_no_nuclei() -> None:
    res = postprocess(np.zeros((32, 32), np.float32), np.zeros((2, 32, 32), np.float32))
    assert res.nuclei == [] and not res.inst_map.any()


def test_small_blobs_are_removed() -> None:
    inst = np.zeros((40, 40), np.int32)
    inst[5:8, 5:8] = 1  # 9 px < 10 (official min size)
    inst[20:32, 20:32] = 2
    res = postprocess((inst > 0).astype(np.float32), hv_map(inst))
    assert len(res.nuclei) == 1 and res.nuclei[0].bbox == (20, 20, 32, 32)


def test_bad_shapes_and_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="hv must be"):
        postprocess(np.zeros((8, 8)), np.zeros((8, 8, 2)))
    with pytest.raises(ValueError, match="tp_prob"):
        postprocess(np.zeros((8, 8)), np.zeros((2, 8, 8)), np.zeros((3, 8, 9)))
    with pytest.raises(ConfigError, match="hv_norm"):
        PostprocConfig(hv_norm="zscore")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="np_threshold"):
        PostprocConfig(np_threshold=1.5)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    sigma=st.floats(0.0, 3.0),
    level=st.floats(0.3, 0.7),
    eight=st.booleans(),
)
def test_contours_are_valid_polygons_that_hold_exactly_their_pixels(
    seed: int, sigma: float, level: float, eight: bool
) -> None:
    rng = np.random.default_rng(seed)
    field = ndi.gaussian_filter(rng.random((48, 48)), sigma)  # sigma 0: pixel noise, the worst shapes
    mask = field > np.quantile(field, level)
    # Watershed regions are 4-connected; 8-connected pieces (diagonal steps) must work too.
    inst = ndi.label(mask, structure=np.ones((3, 3)) if eight else None)[0].astype(np.int32)
    for nuc in describe_nuclei(inst, mask.astype(np.float32)):
        poly = shapely.Polygon(nuc.polygon)
        assert poly.is_valid, shapely.is_valid_reason(poly)
        x0, y0, x1, y1 = nuc.bbox
        own = ndi.binary_fill_holes(inst[y0:y1, x0:x1] == nuc.label)
        yy, xx = np.indices(own.shape)
        inside = shapely.contains_xy(poly, xx + x0 + 0.5, yy + y0 + 0.5)
        np.testing.assert_array_equal(inside, own)
        assert abs(poly.area - own.sum()) <= 0.5 * poly.length


def test_default_is_tile_independent_away_from_the_border(monuseg_train) -> None:
    """A window's nuclei (away from its edge) equal the whole image's with hv_norm='none'."""
    inst = np.load(sorted((monuseg_train / "labels").glob("*.npz"))[0])["inst_map"][:600, :600].astype(np.int32)
    rng = np.random.default_rng(0)
    np_prob = np.clip(ndi.gaussian_filter((inst > 0).astype(np.float32), 1.0), 0, 1)
    hv = hv_map(inst) * 0.85 + ndi.gaussian_filter(rng.normal(0, 0.05, (2, *inst.shape)), (0, 1, 1))
    hv[:, :300, :300] *= 0.8  # one corner under-confident: different extremes per window
    hv = hv.astype(np.float32)
    whole = postprocess(np_prob, hv)
    y0, x0 = 100, 100
    part = postprocess(np_prob[y0:, x0:], hv[:, y0:, x0:])
    margin = 24
    checked = 0
    for nuc in part.nuclei:
        bx0, by0, bx1, by1 = nuc.bbox
        if min(bx0, by0) < margin:
            continue
        mask = part.inst_map == nuc.label
        labels = np.unique(whole.inst_map[y0:, x0:][mask])
        assert labels.size == 1 and labels[0] > 0
        assert (whole.inst_map == labels[0]).sum() == mask.sum()
        checked += 1
    assert checked > 80


@pytest.fixture(scope="module")
def consep_crops(consep_train):
    """One crop from each of 9 CoNSeP source tiles (crops of one tile overlap)."""
    names = [f"train_{tile}_{(5 * tile) % 16:03d}" for tile in range(1, 28, 3)]
    out = []
    for name in names:
        data = np.load(consep_train / "labels" / f"{name}.npz")
        out.append((name, data["inst_map"].astype(np.int32), data["type_map"].astype(np.int64)))
    return out


def test_ground_truth_maps_round_trip_on_consep(consep_crops) -> None:
    """GT inst/type -> NP/HV/TP -> post-processing recovers the GT: checks every convention."""
    items = []
    for name, inst, types in consep_crops:
        res = postprocess((inst > 0).astype(np.float32), hv_map(inst), onehot(types, 5))
        lookup = np.array([0] + [n.type for n in res.nuclei])
        pred_types = lookup[res.inst_map]
        items.append((name, inst, types, res.inst_map, pred_types))
        for nuc in res.nuclei[:20]:
            assert shapely.Polygon(nuc.polygon).is_valid
    scores = metrics.score_images(items)
    assert scores["pq"] > 0.85
    assert scores["dice"] > 0.95
    assert scores["type_accuracy"] > 0.98
    assert scores["mpq"] > 0.8


def test_size_limits_are_areas_in_um2_at_the_maps_resolution() -> None:
    from wsi_pipeline.engine.postproc import postprocess

    np_prob = np.zeros((64, 64), np.float32)
    np_prob[8:14, 8:14] = 1.0  # 36 px: 2.25 µm² at 0.25 µm/px, 9 µm² at 0.5 µm/px
    np_prob[30:50, 30:50] = 1.0
    hv = np.zeros((2, 64, 64), np.float32)
    config = PostprocConfig(min_object_um2=4.0, min_marker_um2=0.5)
    assert len(postprocess(np_prob, hv, config=config, mpp=0.25).nuclei) == 1
    assert len(postprocess(np_prob, hv, config=config, mpp=0.5).nuclei) == 2
    assert config.pixels(4.0, 0.25) == 64


def test_fill_holes_closes_a_pale_nucleus_centre() -> None:
    from wsi_pipeline.engine.postproc import postprocess

    np_prob = np.zeros((48, 48), np.float32)
    np_prob[10:30, 10:30] = 1.0
    np_prob[18:22, 18:22] = 0.0  # pale chromatin read as background
    hv = np.zeros((2, 48, 48), np.float32)
    open_ = postprocess(np_prob, hv, config=PostprocConfig(fill_holes=False)).inst_map
    filled = postprocess(np_prob, hv, config=PostprocConfig(fill_holes=True)).inst_map
    assert (open_ > 0).sum() == 400 - 16 and (filled > 0).sum() == 400


def test_a_models_postproc_metadata_is_validated_and_carried(tmp_path) -> None:
    import pytest

    from wsi_pipeline.engine.model import ChannelSpec, HoVerNet
    from wsi_pipeline.engine.weights import load_model, model_postproc, save_model
    from wsi_pipeline.errors import ConfigError

    model = HoVerNet("fast", 5, ChannelSpec.scaled(0.0625, "fast", round_to=4)).eval()
    calibrated = PostprocConfig(np_threshold=0.55, min_object_um2=6.0, fill_holes=True)
    path = save_model(model, tmp_path / "cal.safetensors", {"postproc": calibrated.to_meta()})
    assert model_postproc(load_model(path)) == calibrated
    assert model_postproc(model) == PostprocConfig()  # not from a file: the defaults
    for bad, words in (({"np_threshold": 1.5}, "out of range"), ({"npthreshold": 0.5}, "unknown keys"),
                       ({"min_object_um2": "big"}, "out of range"), ([0.5], "not a mapping")):
        bad_path = save_model(model, tmp_path / "bad.safetensors", {"postproc": bad})
        with pytest.raises(ConfigError, match=words) as info:
            load_model(bad_path)
        assert str(bad_path) in str(info.value) and "Fix:" in str(info.value)
