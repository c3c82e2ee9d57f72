"""Bring a dataset to the model's µm/px.

A HoVer-Net learns nucleus sizes in pixels, so training data must be at the resolution
the model will run at (0.25 µm/px for the CoNSeP/PanNuke/MoNuSeg models). CoNSeP and
MoNuSeg are already there; a 20x dataset (0.5 µm/px) is upsampled 2x here. Images are
resized with area averaging when shrinking and bilinear when enlarging; label maps with
nearest neighbour (sampling each output pixel's centre), so ids and classes stay exact.
"""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np

from wsi_pipeline.data.dataset import LabelledDataset, LazySamples, Sample


def _nearest(arr: np.ndarray, height: int, width: int) -> np.ndarray:
    rows = np.minimum(((np.arange(height) + 0.5) * arr.shape[0] / height).astype(np.int64), arr.shape[0] - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * arr.shape[1] / width).astype(np.int64), arr.shape[1] - 1)
    return np.ascontiguousarray(arr[rows[:, None], cols[None, :]])


def scaled_shape(shape: tuple[int, int], factor: float) -> tuple[int, int]:
    """(H, W) after scaling by ``factor`` (rounded, at least 1 px)."""
    return max(1, round(shape[0] * factor)), max(1, round(shape[1] * factor))


def rescale_sample(sample: Sample, factor: float) -> Sample:
    """``sample`` with every side scaled by ``factor`` (>1 enlarges)."""
    h, w = scaled_shape(sample.inst_map.shape, factor)
    interp = cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR
    return Sample(
        name=sample.name,
        source=sample.source,
        image=cv2.resize(sample.image, (w, h), interpolation=interp),
        inst_map=_nearest(sample.inst_map, h, w),
        type_map=None if sample.type_map is None else _nearest(sample.type_map, h, w),
    )


def resample_dataset(dataset: LabelledDataset, mpp: float, tolerance: float = 0.05) -> LabelledDataset:
    """``dataset`` at ``mpp`` µm/px; unchanged when already within ``tolerance`` (relative).

    The small tolerance keeps e.g. MoNuSeg's 0.2527 µm/px as it is: resampling by 1% would
    blur the images for no gain.
    """
    if mpp <= 0:
        raise ValueError(f"mpp must be positive, got {mpp}")
    factor = dataset.mpp / mpp
    if abs(factor - 1) <= tolerance:
        return dataset
    samples = dataset.samples
    if isinstance(samples, LazySamples):
        source = samples
        new: LazySamples | list[Sample] = LazySamples(
            source.names,
            source.sources,
            [scaled_shape(s, factor) for s in source.shapes],
            lambda i: rescale_sample(source[i], factor),
        )
    else:
        new = [rescale_sample(s, factor) for s in samples]
    return dataclasses.replace(dataset, samples=new, mpp=mpp)
