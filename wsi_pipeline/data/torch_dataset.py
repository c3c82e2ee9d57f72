"""The PyTorch view of a dataset for HoVer-Net training: input windows and their targets.

One item is one network input window (``input_size``, 256 in fast mode) with the NP/HV/TP
targets of its centre ``output_size`` crop (164), the window the network predicts.
Images of at most ``input_size`` give one item each (smaller ones are padded with white
and background); larger images (MoNuSeg's 1000 x 1000 tiles) give
``crops_per_large_image`` items at random positions, drawn anew every epoch.

With ``reach_edges`` the image is first mirrored by the network's margin ``(input - output) / 2``
on every side, as the engine pads an image or slide edge (:mod:`wsi_pipeline.engine.infer`),
and windows are drawn so their output crop may lie anywhere in the image. Without it an image
of the input size (CoNSeP's 256 px crops) only ever supervises its centre 164 px, 41% of its
labels, and the network never sees the mirrored context it meets at inference on every
image edge.

HV targets are computed with up to ``context`` pixels of the image around the window,
so nuclei cut by the window edge keep their true centre (see
:mod:`wsi_pipeline.data.targets`).

Randomness is a function of ``(seed, epoch, item)``, never of worker state, so results
do not depend on the number of DataLoader workers and every worker draws differently.
Call :meth:`HoverTrainDataset.set_epoch` at the start of each epoch (as with
``DistributedSampler``): otherwise, with a seed, every epoch repeats the same crops and
augmentations. ``seed=None`` draws fresh OS entropy on every item instead.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from wsi_pipeline.data.augment import Augmenter
from wsi_pipeline.data.dataset import Sample, instance_types, sample_shapes
from wsi_pipeline.data.targets import crop_targets

_PAD_IMAGE = 255  # white, like slide background, and labelled background


def _pad_to(arr: np.ndarray, height: int, width: int, value: int) -> np.ndarray:
    """Pad (centred) so both sides are at least height x width."""
    dh, dw = max(0, height - arr.shape[0]), max(0, width - arr.shape[1])
    if not dh and not dw:
        return arr
    pad = [(dh // 2, dh - dh // 2), (dw // 2, dw - dw // 2)] + [(0, 0)] * (arr.ndim - 2)
    return np.pad(arr, pad, mode="constant", constant_values=value)


def _mirror_margin(
    image: np.ndarray, inst: np.ndarray, types: np.ndarray | None, margin: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Mirror the image by ``margin`` on every side (the engine's edge padding); labels get background.

    The mirrored band is context only: every output crop drawn afterwards lies inside the
    original image, so a nucleus cut by the image edge is labelled by its visible part, as the
    ground truth of a crop is.
    """
    if margin <= 0:
        return image, inst, types
    image = np.pad(image, ((margin, margin), (margin, margin), (0, 0)), mode="reflect")
    inst = np.pad(inst, margin, mode="constant", constant_values=0)
    types = None if types is None else np.pad(types, margin, mode="constant", constant_values=0)
    return image, inst, types


def rescale_sample(
    image: np.ndarray, inst: np.ndarray, types: np.ndarray | None, factor: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Resample a triple by ``factor`` (scanners differ by about +-10% in true µm/px).

    The image is interpolated linearly; the label maps take the nearest source pixel by index
    arithmetic, which keeps instance ids exact for any integer dtype (OpenCV's nearest
    resize does not take uint16/int64 maps alike).
    """
    h, w = inst.shape
    nh, nw = max(1, round(h * factor)), max(1, round(w * factor))
    if (nh, nw) == (h, w):
        return image, inst, types
    rows = np.minimum(((np.arange(nh) + 0.5) * h / nh).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(nw) + 0.5) * w / nw).astype(np.int64), w - 1)
    image = cv2.resize(np.ascontiguousarray(image), (nw, nh), interpolation=cv2.INTER_LINEAR)
    inst = inst[rows][:, cols]
    types = None if types is None else types[rows][:, cols]
    return image, inst, types


class HoverTrainDataset(Dataset):
    """Input windows + NP/HV/TP targets for HoVer-Net training or validation.

    Items are dicts: ``image`` float32 (3, input_size, input_size) in 0-255, ``np`` int64
    (o, o), ``hv`` float32 (2, o, o), ``tp`` int64 (o, o) and ``has_types`` a bool tensor
    (False for samples without a type map: their ``tp`` is all zeros and the TP loss must
    be masked), with o = ``output_size``. With ``augment=False`` crops of large images are
    still random but fixed across epochs, so validation numbers are comparable.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        input_size: int = 256,
        output_size: int = 164,
        augment: bool = True,
        crops_per_large_image: int = 8,
        seed: int | None = 0,
        *,
        context: int = 64,
        augmenter: Augmenter | None = None,
        scale_jitter: float = 0.0,
        reach_edges: bool = False,
    ) -> None:
        if output_size > input_size:
            raise ValueError(f"output_size {output_size} exceeds input_size {input_size}")
        if (input_size - output_size) % 2:
            raise ValueError("input_size - output_size must be even so the output window is centred")
        if crops_per_large_image < 1:
            raise ValueError("crops_per_large_image must be >= 1")
        if seed is not None and seed < 0:
            raise ValueError("seed must be a non-negative integer or None")
        if not 0.0 <= scale_jitter < 0.5:
            raise ValueError("scale_jitter must be in [0, 0.5)")
        self.samples = samples
        self.input_size = input_size
        self.output_size = output_size
        self.augment = augment
        self.seed = seed
        self.context = max(0, context)
        self.augmenter = augmenter if augmenter is not None else Augmenter()
        self.scale_jitter = float(scale_jitter)
        self.reach_edges = bool(reach_edges)
        self.epoch = 0
        counts = [crops_per_large_image if (h > input_size or w > input_size) else 1 for h, w in sample_shapes(samples)]
        self.item_sample = np.repeat(np.arange(len(counts)), counts).astype(np.int64)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's crops and augmentations (call before each epoch)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.item_sample)

    def _rng(self, index: int, draw: int) -> np.random.Generator:
        if self.seed is None:
            return np.random.default_rng()
        epoch = self.epoch if self.augment else 0
        return np.random.default_rng([self.seed, epoch, index, draw])

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        """Item ``key``, or ``(item, draw)``: the draw-th repeat of an item within one epoch.

        Samplers that draw with replacement (:class:`BalancedSampler`) pass ``(item, draw)``
        so that repeats of an item get their own crop and augmentation.
        """
        index, draw = (int(key[0]), int(key[1])) if isinstance(key, tuple) else (int(key), 0)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        rng = self._rng(index, draw)
        sample = self.samples[int(self.item_sample[index])]
        image, inst, types = sample.image, sample.inst_map, sample.type_map
        if self.augment:
            image, inst, types = self.augmenter.geometric(image, inst, types, rng)
            if self.scale_jitter:
                factor = float(rng.uniform(1.0 - self.scale_jitter, 1.0 + self.scale_jitter))
                image, inst, types = rescale_sample(image, inst, types, factor)
        n, o = self.input_size, self.output_size
        if self.reach_edges:
            image, inst, types = _mirror_margin(image, inst, types, (n - o) // 2)
        image = _pad_to(image, n, n, _PAD_IMAGE)
        inst = _pad_to(inst, n, n, 0)
        types = None if types is None else _pad_to(types, n, n, 0)

        h, w = inst.shape
        top = int(rng.integers(0, h - n + 1))
        left = int(rng.integers(0, w - n + 1))
        # region = window plus the context the image has; targets for the centre crop
        r0, r1 = max(0, top - self.context), min(h, top + n + self.context)
        c0, c1 = max(0, left - self.context), min(w, left + n + self.context)
        off = (n - o) // 2
        box = (slice(top + off - r0, top + off - r0 + o), slice(left + off - c0, left + off - c0 + o))
        targets = crop_targets(inst[r0:r1, c0:c1], None if types is None else types[r0:r1, c0:c1], box)

        window = image[top : top + n, left : left + n]
        window = self.augmenter.photometric(window, rng) if self.augment else np.ascontiguousarray(window)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(window.transpose(2, 0, 1), dtype=np.float32)),
            "np": torch.from_numpy(targets["np"]),
            "hv": torch.from_numpy(targets["hv"]),
            "tp": torch.from_numpy(targets["tp"]),
            "has_types": torch.tensor(types is not None),
        }

    def item_weights(self, num_types: int, max_weight: float = 5.0) -> np.ndarray:
        """Per-item sampling weights (for ``WeightedRandomSampler``): each item gets its sample's."""
        return sample_weights(self.samples, num_types, max_weight)[self.item_sample]


def sample_weights(samples: Sequence[Sample], num_types: int, max_weight: float = 5.0) -> np.ndarray:
    """Sampling weights that favour samples holding rare classes, mean 1.

    ``num_types`` counts type channels including background (classes + 1). A class's
    frequency is the share of typed samples holding at least one nucleus of it (class by
    majority vote of the nucleus' pixels); a sample's weight is the largest
    ``most_frequent / frequency`` over the classes it holds, capped at ``max_weight``, and
    at least 1. On CoNSeP this mostly up-weights crops with "other" nuclei (~2% of nuclei),
    which a model otherwise learns never to predict. Samples without types weigh 1.
    """
    present = np.zeros((len(samples), max(num_types, 1)), dtype=bool)
    typed = np.zeros(len(samples), dtype=bool)
    for i, s in enumerate(samples):
        if s.type_map is None:
            continue
        typed[i] = True
        for t in set(instance_types(s.inst_map, s.type_map).values()):
            if 0 < t < num_types:
                present[i, t] = True
    weights = np.ones(len(samples), dtype=np.float64)
    if typed.any():
        freq = present[typed].mean(axis=0)
        freq[0] = 0.0
        ref = freq.max()
        if ref > 0:
            boost = np.where(freq > 0, np.minimum(max_weight, ref / np.maximum(freq, 1e-12)), 1.0)
            for i in np.flatnonzero(typed):
                held = np.flatnonzero(present[i])
                if held.size:
                    weights[i] = max(1.0, float(boost[held].max()))
    return weights / weights.mean() if len(weights) else weights


class BalancedSampler(Sampler[tuple[int, int]]):
    """Draws items with replacement in proportion to :meth:`HoverTrainDataset.item_weights`.

    Like ``WeightedRandomSampler``, but reproducible per ``(seed, epoch)`` and it yields
    ``(item, draw)`` keys so an item drawn three times in an epoch gives three different
    crops/augmentations instead of one repeated thrice. ``num_samples`` defaults to the
    dataset's length. Call :meth:`set_epoch` each epoch (the dataset's too).
    """

    def __init__(
        self,
        dataset: HoverTrainDataset,
        num_types: int,
        num_samples: int | None = None,
        max_weight: float = 5.0,
        seed: int = 0,
    ) -> None:
        self.weights = dataset.item_weights(num_types, max_weight)
        self.num_samples = len(dataset) if num_samples is None else int(num_samples)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's draws."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[tuple[int, int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        items = rng.choice(len(self.weights), size=self.num_samples, p=self.weights / self.weights.sum())
        seen: dict[int, int] = {}
        for item in items.tolist():
            draw = seen.get(item, 0)
            seen[item] = draw + 1
            yield item, draw
