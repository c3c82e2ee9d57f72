"""Resampling a dataset to the model's µm/px keeps labels exact and aligned."""

from __future__ import annotations

import numpy as np

from wsi_pipeline.data import LabelledDataset, LazySamples, Sample, resample_dataset


def small_sample() -> Sample:
    inst = np.zeros((20, 30), np.int32)
    inst[2:6, 4:10] = 7
    image = np.where(inst[..., None] > 0, 50, 220).astype(np.uint8).repeat(3, axis=2)
    return Sample("a", "a", image, inst, (inst > 0).astype(np.uint8) * 2)


def test_20x_data_is_upsampled_2x_with_exact_labels():
    ds = LabelledDataset([small_sample()], classes=[], has_types=True, format="folder", mpp=0.5)
    out = resample_dataset(ds, 0.25)
    s = out.samples[0]
    assert out.mpp == 0.25 and s.image.shape == (40, 60, 3) and s.inst_map.shape == (40, 60)
    assert set(np.unique(s.inst_map)) == {0, 7} and set(np.unique(s.type_map)) == {0, 2}
    assert (s.inst_map == 7).sum() == 4 * 4 * 6  # each pixel became 2 x 2
    np.testing.assert_array_equal(s.inst_map[4:12, 8:20], 7)
    assert s.image[8, 14, 0] < 100 and s.image[30, 50, 0] > 200  # image follows the labels


def test_close_resolution_is_left_alone_and_lazy_stays_lazy():
    ds = LabelledDataset([small_sample()], classes=[], has_types=True, format="folder", mpp=0.2527)
    assert resample_dataset(ds, 0.25) is ds
    lazy = LazySamples(["a"], ["a"], [(20, 30)], lambda i: small_sample())
    ds = LabelledDataset(lazy, classes=[], has_types=True, format="pannuke", mpp=0.5)
    out = resample_dataset(ds, 0.25)
    assert isinstance(out.samples, LazySamples) and out.samples.shapes == [(40, 60)]
    assert out.samples[0].inst_map.shape == (40, 60)
