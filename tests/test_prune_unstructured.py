"""Unstructured magnitude pruning: exact sparsity layer-wise and globally, masks, sparse storage."""

from __future__ import annotations

import pytest
import torch

from wsi_pipeline.engine.model import ChannelSpec, HoVerNet
from wsi_pipeline.errors import ModelError
from wsi_pipeline.prune.unstructured import (
    apply_masks,
    dense_state_dict,
    magnitude_masks,
    mask_hook,
    prunable_weights,
    sparse_state_dict,
    sparsity,
    storage_sizes,
)

torch.set_num_threads(1)


@pytest.fixture()
def tiny() -> HoVerNet:
    torch.manual_seed(0)
    return HoVerNet("fast", 5, ChannelSpec.scaled(0.0625)).eval()


@pytest.mark.parametrize("ratio", [0.5, 0.9375])
def test_layer_wise_masks_reach_the_ratio_in_every_layer(tiny: HoVerNet, ratio: float) -> None:
    masks = magnitude_masks(tiny, ratio, "layer")
    apply_masks(tiny, masks)
    stats = sparsity(tiny)
    for name, value in stats["per_layer"].items():
        n = prunable_weights(tiny)[name].numel()
        assert value == pytest.approx(round(ratio * n) / n), name
    assert stats["prunable"] == pytest.approx(ratio, abs=1e-3)
    assert stats["overall"] < stats["prunable"]  # BatchNorms, biases and heads stay dense
    assert all(not name.endswith("u0.conv.weight") for name in masks)


@pytest.mark.parametrize("ratio", [0.75, 0.95])
def test_global_masks_use_one_threshold(tiny: HoVerNet, ratio: float) -> None:
    weights = {n: w.detach().abs().clone() for n, w in prunable_weights(tiny).items()}
    masks = magnitude_masks(tiny, ratio, "global")
    kept = torch.cat([weights[n][masks[n]] for n in masks])
    dropped = torch.cat([weights[n][~masks[n]] for n in masks])
    assert kept.min() >= dropped.max()
    total = sum(w.numel() for w in weights.values())
    assert int(dropped.numel()) == round(ratio * total)
    per_layer = [float((~m).float().mean()) for m in masks.values()]
    assert max(per_layer) - min(per_layer) > 0.1  # network-wide: layers end up unequally sparse


def test_masks_survive_an_optimiser_step(tiny: HoVerNet) -> None:
    masks = magnitude_masks(tiny, 0.8, "global")
    apply_masks(tiny, masks)
    tiny.train()
    opt = torch.optim.AdamW(tiny.parameters(), lr=1e-2)
    out = tiny(torch.rand(1, 3, 96, 96) * 255)
    sum(v.square().mean() for v in out.values()).backward()
    opt.step()
    params = dict(tiny.named_parameters())
    assert any(bool((params[n][~m] != 0).any()) for n, m in masks.items())  # the step revived zeros...
    mask_hook(masks)(tiny)
    assert sparsity(tiny)["prunable"] == pytest.approx(0.8, abs=1e-4)  # ...and the hook re-zeroes them


def test_sparse_storage_round_trips_and_is_smaller(tiny: HoVerNet) -> None:
    apply_masks(tiny, magnitude_masks(tiny, 0.9, "global"))
    state = tiny.state_dict()
    restored = dense_state_dict(sparse_state_dict(state))
    assert set(restored) == set(state)
    for key, value in state.items():
        assert torch.equal(restored[key], value), key
    sizes = storage_sizes(tiny, {"name": "tiny"})
    assert sizes["sparse"] < 0.4 * sizes["dense"]  # tiny model: dense BatchNorm statistics weigh in
    assert sizes["dense_gzip"] < sizes["dense"]


def test_bad_inputs_are_model_errors(tiny: HoVerNet) -> None:
    with pytest.raises(ModelError, match="sparsity"):
        magnitude_masks(tiny, 1.0)
    with pytest.raises(ModelError, match="scope"):
        magnitude_masks(tiny, 0.5, "per-channel")  # type: ignore[arg-type]
    with pytest.raises(ModelError, match="does not fit"):
        apply_masks(tiny, {"conv0./.weight": torch.ones(1, dtype=torch.bool)})
