"""Annotated datasets for training and evaluation, HoVer-Net targets and augmentation.

``load_dataset(path)`` reads any supported layout (auto-detected) into a
:class:`LabelledDataset`; :class:`HoverTrainDataset` (in ``torch_dataset``, imported
lazily because it pulls in torch) turns its samples into network windows and targets.
"""

from __future__ import annotations

from typing import Any

from wsi_pipeline.classes import CONSEP_CLASSES, PANNUKE_CLASSES
from wsi_pipeline.data.augment import Augmenter
from wsi_pipeline.data.dataset import DEFAULT_MPP, LabelledDataset, LazySamples, Sample, source_of
from wsi_pipeline.data.detect import FORMATS, detect_format
from wsi_pipeline.data.load import load_dataset
from wsi_pipeline.data.resample import resample_dataset
from wsi_pipeline.data.splits import load_dev_split, split_dev
from wsi_pipeline.data.targets import hv_map, make_targets, np_map

__all__ = [
    "CONSEP_CLASSES",
    "DEFAULT_MPP",
    "FORMATS",
    "PANNUKE_CLASSES",
    "Augmenter",
    "BalancedSampler",
    "HoverTrainDataset",
    "LabelledDataset",
    "LazySamples",
    "Sample",
    "detect_format",
    "hv_map",
    "load_dataset",
    "load_dev_split",
    "make_targets",
    "np_map",
    "resample_dataset",
    "sample_weights",
    "source_of",
    "split_dev",
]


def __getattr__(name: str) -> Any:
    if name in ("BalancedSampler", "HoverTrainDataset", "sample_weights"):
        from wsi_pipeline.data import torch_dataset

        return getattr(torch_dataset, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
