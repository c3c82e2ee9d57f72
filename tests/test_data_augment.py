"""Augmentation keeps image and maps aligned; photometric changes touch the image only."""

from __future__ import annotations

import numpy as np

from wsi_pipeline.data.augment import Augmenter, dihedral, hed_jitter

SIZE = 48


def coordinate_triple() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Image whose red/green encode (row, col), an inst map of unique ids, a type map."""
    rows, cols = np.mgrid[:SIZE, :SIZE]
    image = np.stack([rows * 5, cols * 5, np.full_like(rows, 128)], axis=-1).astype(np.uint8)
    inst = (rows * SIZE + cols + 1).astype(np.int32)
    types = ((rows // 8 + cols // 8) % 5).astype(np.uint8)
    return image, inst, types


def no_photometric(seed: int) -> Augmenter:
    return Augmenter(seed, p_stain=0, p_brightness_contrast=0, p_blur=0)


def test_geometric_moves_image_and_maps_together():
    image, inst, types = coordinate_triple()
    seen = set()
    for seed in range(40):
        aug = no_photometric(seed)
        k, flip = aug.draw_dihedral(np.random.default_rng(seed))
        seen.add((k, flip))
        out_img, out_inst, out_types = aug(image, inst, types, rng=np.random.default_rng(seed))
        assert out_img.shape == image.shape and out_inst.dtype == inst.dtype and out_types.dtype == types.dtype
        # every pixel's image coordinates and inst id point at the same source pixel
        src_row, src_col = out_img[..., 0] // 5, out_img[..., 1] // 5
        np.testing.assert_array_equal(out_inst, src_row.astype(np.int32) * SIZE + src_col + 1)
        np.testing.assert_array_equal(out_types, types[src_row, src_col])
        assert out_img.flags.c_contiguous and out_inst.flags.c_contiguous
    assert len(seen) == 8  # all flips/rotations occur


def test_dihedral_is_what_it_says():
    a = np.arange(6).reshape(2, 3)
    np.testing.assert_array_equal(dihedral(a, 1, False), np.rot90(a))
    np.testing.assert_array_equal(dihedral(a, 0, True), a[:, ::-1])


def test_photometric_changes_the_image_only():
    image, inst, types = coordinate_triple()
    inst0, types0 = inst.copy(), types.copy()
    aug = Augmenter(3, geometric=False, p_stain=1, p_brightness_contrast=1, p_blur=1)
    out_img, out_inst, out_types = aug(image, inst, types)
    assert out_img.dtype == np.uint8 and out_img.shape == image.shape
    assert np.abs(out_img.astype(int) - image).mean() > 1
    np.testing.assert_array_equal(out_inst, inst0)
    np.testing.assert_array_equal(out_types, types0)
    np.testing.assert_array_equal(inst, inst0)  # inputs untouched


def test_hed_jitter_identity_round_trips_and_scaling_darkens():
    rng = np.random.default_rng(0)
    image = rng.integers(30, 250, (16, 16, 3), dtype=np.uint8)
    same = hed_jitter(image, np.ones(3), np.zeros(3))
    assert np.abs(same.astype(int) - image).max() <= 1
    darker = hed_jitter(image, np.array([1.3, 1.3, 1.0]), np.zeros(3))
    assert darker.astype(int).sum() < image.astype(int).sum()


def test_same_seed_same_result_and_type_map_optional():
    image, inst, _ = coordinate_triple()
    a = Augmenter(7)(image, inst, None)
    b = Augmenter(7)(image, inst, None)
    assert a[2] is None
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
