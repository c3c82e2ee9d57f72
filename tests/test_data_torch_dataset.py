"""The training dataset: shapes, crops, target alignment, randomness, sampling weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from wsi_pipeline.data.augment import Augmenter
from wsi_pipeline.data.dataset import Sample
from wsi_pipeline.data.targets import hv_map
from wsi_pipeline.data.torch_dataset import BalancedSampler, HoverTrainDataset, sample_weights
from wsi_pipeline.engine.infer import InferenceConfig, TileInferer
from wsi_pipeline.engine.model import ChannelSpec, HoVerNet

torch.set_num_threads(1)


def blob_sample(name: str, size: int, n: int, seed: int, typed: bool = True) -> Sample:
    """Separate dark round nuclei on a white background; the image shows exactly the inst map."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[:size, :size]
    inst = np.zeros((size, size), np.int32)
    types = np.zeros((size, size), np.uint8)
    for k in range(1, n + 1):
        cy, cx = rng.uniform(0, size, 2)
        r = rng.uniform(4, 9)
        d2 = (rows - cy) ** 2 + (cols - cx) ** 2
        if np.any(inst[d2 <= (r + 2) ** 2]):
            continue  # keep nuclei apart so connected components are nuclei
        m = d2 <= r**2
        inst[m] = k
        types[m] = 1 + k % 4
    image = np.full((size, size, 3), 240, np.uint8)
    image[inst > 0] = (60, 20, 120)
    return Sample(name=name, source=name, image=image, inst_map=inst, type_map=types if typed else None)


def geometric_only() -> Augmenter:
    return Augmenter(p_stain=0, p_brightness_contrast=0, p_blur=0)


def test_item_shapes_and_dtypes():
    ds = HoverTrainDataset([blob_sample("a", 256, 30, 0)], input_size=256, output_size=164, augment=True)
    item = ds[0]
    assert len(ds) == 1
    assert item["image"].shape == (3, 256, 256) and item["image"].dtype == torch.float32
    assert item["image"].min() >= 0 and item["image"].max() <= 255 and item["image"].max() > 1
    assert item["np"].shape == (164, 164) and item["np"].dtype == torch.int64
    assert item["hv"].shape == (2, 164, 164) and item["hv"].dtype == torch.float32
    assert item["tp"].shape == (164, 164) and item["tp"].dtype == torch.int64
    assert item["has_types"].dtype == torch.bool and bool(item["has_types"])
    batch = torch.utils.data.default_collate([ds[0], ds[0]])
    assert batch["has_types"].shape == (2,)


def test_large_images_give_several_crops_and_small_ones_are_padded():
    samples = [
        blob_sample("big", 600, 60, 1, typed=False),
        blob_sample("crop", 256, 30, 2),
        blob_sample("s", 200, 9, 3),
    ]
    ds = HoverTrainDataset(samples, augment=False, crops_per_large_image=5, seed=0)
    assert len(ds) == 5 + 1 + 1
    assert list(ds.item_sample) == [0, 0, 0, 0, 0, 1, 2]
    assert not bool(ds[0]["has_types"]) and int(ds[0]["tp"].sum()) == 0
    small = ds[6]
    # 200 px image centred in 256: 28 px of white (background) padding each side
    assert torch.all(small["image"][:, :28] == 255)
    assert small["np"].shape == (164, 164)


def test_targets_line_up_with_the_image_window_under_augmentation():
    samples = [blob_sample("big", 500, 150, 4), blob_sample("crop", 256, 40, 5)]
    ds = HoverTrainDataset(samples, augment=True, crops_per_large_image=6, seed=1, augmenter=geometric_only())
    off = (256 - 164) // 2
    for epoch in range(2):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            item = ds[i]
            dark = (item["image"][2] > 90) & (item["image"][0] < 100)  # nucleus colour
            np.testing.assert_array_equal(dark[off : off + 164, off : off + 164].numpy(), item["np"].numpy() == 1)
            # nuclei wholly inside the output crop: HV equals HV recomputed there
            labels, _ = ndimage.label(item["np"].numpy())
            inner = [
                k
                for k, sl in enumerate(ndimage.find_objects(labels), 1)
                if sl[0].start > 0 and sl[1].start > 0 and sl[0].stop < 164 and sl[1].stop < 164
            ]
            mask = np.isin(labels, inner)
            ref = hv_map(np.where(mask, labels, 0))
            np.testing.assert_allclose(item["hv"].numpy()[:, mask], ref[:, mask], atol=1e-6)


def test_epochs_and_seeds_control_randomness():
    samples = [blob_sample("big", 500, 150, 6)]
    ds = HoverTrainDataset(samples, augment=True, crops_per_large_image=2, seed=3)
    first = ds[0]["image"].clone()
    assert torch.equal(first, ds[0]["image"])  # same (seed, epoch, item) -> same item
    ds.set_epoch(1)
    assert not torch.equal(first, ds[0]["image"])
    fixed = HoverTrainDataset(samples, augment=False, crops_per_large_image=2, seed=3)
    a = fixed[1]["image"].clone()
    fixed.set_epoch(5)
    assert torch.equal(a, fixed[1]["image"])  # validation crops do not move between epochs
    assert torch.equal(ds[-1]["image"], ds[1]["image"])
    with pytest.raises(IndexError):
        ds[2]


def test_sample_weights_favour_rare_classes():
    def typed(name: str, classes: list[int]) -> Sample:
        inst = np.zeros((16, 16), np.int32)
        types = np.zeros((16, 16), np.uint8)
        for k, c in enumerate(classes, 1):
            inst[k, :4] = k
            types[k, :4] = c
        return Sample(name, name, np.zeros((16, 16, 3), np.uint8), inst, types)

    samples = [typed(f"c{i}", [4, 3]) for i in range(8)] + [typed("rare", [1, 4]), typed("none", [])]
    w = sample_weights(samples, num_types=5, max_weight=5.0)
    assert w.shape == (10,) and np.isclose(w.mean(), 1.0)
    # class 4 is in 9/10 samples, class 3 in 8/10, class 1 in 1/10: boosts 1, 9/8, min(9, 5)
    assert w[8] == w.max() and np.isclose(w[8] / w[0], 5.0 / 1.125)
    assert np.isclose(w[9] / w[0], 1 / 1.125)  # no nucleus: weight 1
    ds = HoverTrainDataset(samples, input_size=16, output_size=8, augment=False)
    np.testing.assert_allclose(ds.item_weights(5), w)


def test_items_do_not_depend_on_dataloader_workers():
    samples = [blob_sample("big", 400, 80, 7), blob_sample("crop", 256, 30, 8)]
    ds = HoverTrainDataset(samples, augment=True, crops_per_large_image=3, seed=5)
    ds.set_epoch(2)
    plain = list(torch.utils.data.DataLoader(ds, batch_size=2, num_workers=0))
    workers = list(torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2))
    assert len(plain) == len(workers) == 2
    for a, b in zip(plain, workers, strict=True):
        for key in ("image", "np", "hv", "tp", "has_types"):
            assert torch.equal(a[key], b[key])
    # different items differ: workers do not share one random stream
    assert not torch.equal(plain[0]["image"][0], plain[0]["image"][1])


def test_balanced_sampler_draws_rare_samples_more_and_varies_repeats():
    def typed(name: str, cls: int) -> Sample:
        inst = np.zeros((32, 32), np.int32)
        inst[10:20, 10:20] = 1
        image = np.random.default_rng(len(name) + cls).integers(0, 255, (32, 32, 3), dtype=np.uint8)
        return Sample(name, name, image, inst, (inst > 0).astype(np.uint8) * cls)

    samples = [typed(f"common{i}", 3) for i in range(9)] + [typed("rare", 1)]
    ds = HoverTrainDataset(samples, input_size=32, output_size=16, augment=True, seed=0)
    sampler = BalancedSampler(ds, num_types=5, num_samples=2000, seed=0)
    keys = list(sampler)
    assert len(keys) == len(sampler) == 2000
    rare_share = sum(k[0] == 9 for k in keys) / len(keys)
    assert 0.3 < rare_share < 0.45  # weight 5 vs 1: 5/14 = 0.36, against 0.1 unweighted
    assert keys == list(sampler)  # reproducible within an epoch
    sampler.set_epoch(1)
    assert keys != list(sampler)
    first, second = ds[(9, 0)]["image"], ds[(9, 1)]["image"]
    assert not torch.equal(first, second)  # a repeat is a new augmentation
    assert torch.equal(ds[(9, 0)]["image"], ds[9]["image"])
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4, sampler=sampler)))
    assert batch["image"].shape == (4, 3, 32, 32)


def _offset_of(item: dict, sample: Sample) -> tuple[int, int]:
    """Where in the sample the item's output crop lies (its NP target matched against the labels)."""
    target = item["np"].numpy()
    gt = (sample.inst_map > 0).astype(np.int64)
    o = target.shape[0]
    windows = np.lib.stride_tricks.sliding_window_view(gt, (o, o))
    first_rows = np.all(windows[:, :, 0, :] == target[0], axis=-1)  # cheap filter, then the full check
    candidates = zip(*np.nonzero(first_rows), strict=True)
    hits = [(int(r), int(c)) for r, c in candidates if np.array_equal(windows[r, c], target)]
    assert len(hits) == 1, hits[:5]
    return hits[0]


def test_reach_edges_supervises_a_whole_input_sized_crop_with_mirrored_context():
    sample = blob_sample("crop", 256, 40, 7)
    plain = HoverTrainDataset([sample], augment=False, seed=0)
    assert {_offset_of(plain[(0, d)], sample) for d in range(6)} == {(46, 46)}  # the centre only
    edges = HoverTrainDataset([sample], augment=False, seed=0, reach_edges=True)
    offsets = [_offset_of(edges[(0, d)], sample) for d in range(40)]
    rows, cols = zip(*offsets, strict=True)
    # output crops anywhere in the image: together they reach all four edges' bands
    assert min(rows) < 15 and max(rows) > 92 - 15 and min(cols) < 15 and max(cols) > 92 - 15
    # the engine's own edge padding: its first 256 px window of this image starts 46 px out
    model = HoVerNet(mode="fast", num_types=5, spec=ChannelSpec.scaled(0.125, "fast"))
    engine = TileInferer(model, InferenceConfig(window=256))
    spans, batch = next(engine.window_batches(sample.image))
    assert spans[0][0][0] == spans[0][1][0] == 0  # the top-left window, in padded coordinates
    mirrored = np.pad(sample.image, ((46, 46), (46, 46), (0, 0)), mode="reflect")
    np.testing.assert_array_equal(batch[0], mirrored[:256, :256])
    for draw, (r, c) in enumerate(offsets[:5]):
        image = edges[(0, draw)]["image"].numpy().transpose(1, 2, 0)
        # the window is the image mirrored by the 46 px margin, as the engine pads an edge
        np.testing.assert_array_equal(image, mirrored[r : r + 256, c : c + 256])
        # HV of a nucleus the image edge cuts points to the centre of its visible part
        hv = edges[(0, draw)]["hv"].numpy()
        np.testing.assert_allclose(hv, hv_map(sample.inst_map)[:, r : r + 164, c : c + 164], atol=1e-6)
