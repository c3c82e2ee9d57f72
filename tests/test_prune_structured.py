"""Structured (channel) pruning of HoVer-Net: coupling, equivalence, ratios, checkpoints.

Coupling is checked against a hand-written list of HoVer-Net's channel groups, written
from the architecture (not from Torch-Pruning nor from ``ChannelSpec``), so a library
upgrade that mis-traces a skip connection or a concatenation fails here.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from wsi_pipeline.engine.infer import InferenceConfig, TileInferer
from wsi_pipeline.engine.macs import count_params
from wsi_pipeline.engine.model import ChannelSpec, HoVerNet
from wsi_pipeline.engine.weights import load_model, save_model
from wsi_pipeline.errors import ModelError
from wsi_pipeline.prune.importance import CRITERIA, bn_scale, l1_norm
from wsi_pipeline.prune.structured import STRIDED_1X1_MIN_INPUT, PruningGraph, prune_channels

torch.set_num_threads(1)

BRANCHES = ("tp", "np", "hv")
ENCODER_UNITS = {"d0": 3, "d1": 4, "d2": 6, "d3": 3}
DENSE_UNITS = {"u3": 8, "u2": 4}


def hand_written_groups() -> set[tuple[frozenset, frozenset, frozenset]]:
    """(producing convs, BatchNorms, consuming convs) of every coupled channel set of HoVer-Net fast."""
    groups = set()

    def add(producers: set[str], bns: set[str], consumers: set[str]) -> None:
        groups.add((frozenset(producers), frozenset(bns), frozenset(consumers)))

    add({"conv0./"}, {"conv0.bn"}, {"d0.shortcut", "d0.units.0.conv1"})
    for block, units in ENCODER_UNITS.items():
        for i in range(units):
            unit = f"{block}.units.{i}"
            add({f"{unit}.conv1"}, {f"{unit}.conv1/bn"}, {f"{unit}.conv2"})
            add({f"{unit}.conv2"}, {f"{unit}.conv2/bn"}, {f"{unit}.conv3"})
    # Residual streams: the units' conv3 and the shortcut are summed, the next unit's preact
    # BN and conv1 read the sum, blk_bna normalises it, the next block reads blk_bna's output;
    # the decoder adds upsample(conv_bot) to d2, each u3 output to d1, each u2 output to d0.
    add(
        {
            "d0.units.0.conv3",
            "d0.units.1.conv3",
            "d0.units.2.conv3",
            "d0.shortcut",
            "decoder.tp.u2.convf",
            "decoder.np.u2.convf",
            "decoder.hv.u2.convf",
        },
        {"d0.units.1.preact/bn", "d0.units.2.preact/bn", "d0.blk_bna.bn"},
        {
            "d0.units.1.conv1",
            "d0.units.2.conv1",
            "d1.shortcut",
            "d1.units.0.conv1",
            "decoder.tp.u1.conva",
            "decoder.np.u1.conva",
            "decoder.hv.u1.conva",
        },
    )
    add(
        {
            "d1.units.0.conv3",
            "d1.units.1.conv3",
            "d1.units.2.conv3",
            "d1.units.3.conv3",
            "d1.shortcut",
            "decoder.tp.u3.convf",
            "decoder.np.u3.convf",
            "decoder.hv.u3.convf",
        },
        {"d1.units.1.preact/bn", "d1.units.2.preact/bn", "d1.units.3.preact/bn", "d1.blk_bna.bn"},
        {
            "d1.units.1.conv1",
            "d1.units.2.conv1",
            "d1.units.3.conv1",
            "d2.shortcut",
            "d2.units.0.conv1",
            "decoder.tp.u2.conva",
            "decoder.np.u2.conva",
            "decoder.hv.u2.conva",
        },
    )
    add(
        {
            "d2.units.0.conv3",
            "d2.units.1.conv3",
            "d2.units.2.conv3",
            "d2.units.3.conv3",
            "d2.units.4.conv3",
            "d2.units.5.conv3",
            "d2.shortcut",
            "conv_bot",
        },
        {
            "d2.units.1.preact/bn",
            "d2.units.2.preact/bn",
            "d2.units.3.preact/bn",
            "d2.units.4.preact/bn",
            "d2.units.5.preact/bn",
            "d2.blk_bna.bn",
        },
        {
            "d2.units.1.conv1",
            "d2.units.2.conv1",
            "d2.units.3.conv1",
            "d2.units.4.conv1",
            "d2.units.5.conv1",
            "d3.shortcut",
            "d3.units.0.conv1",
            "decoder.tp.u3.conva",
            "decoder.np.u3.conva",
            "decoder.hv.u3.conva",
        },
    )
    add(
        {"d3.units.0.conv3", "d3.units.1.conv3", "d3.units.2.conv3", "d3.shortcut"},
        {"d3.units.1.preact/bn", "d3.units.2.preact/bn", "d3.blk_bna.bn"},
        {"d3.units.1.conv1", "d3.units.2.conv1", "conv_bot"},
    )
    # Dense blocks: a channel entering the concatenation (conva's, or unit k's growth) is read
    # by every later unit's preact BN and conv1, by blk_bna and by convf.
    for branch in BRANCHES:
        for level, units in DENSE_UNITS.items():
            p = f"decoder.{branch}.{level}"

            def readers(first: int, p: str = p, units: int = units) -> tuple[set[str], set[str]]:
                bns = {f"{p}.dense.units.{j}.preact_bna/bn" for j in range(first, units)} | {f"{p}.dense.blk_bna.bn"}
                convs = {f"{p}.dense.units.{j}.conv1" for j in range(first, units)} | {f"{p}.convf"}
                return bns, convs

            add({f"{p}.conva"}, *readers(0))
            for i in range(units):
                unit = f"{p}.dense.units.{i}"
                add({f"{unit}.conv1"}, {f"{unit}.conv1/bn"}, {f"{unit}.conv2"})
                add({f"{unit}.conv2"}, *readers(i + 1))
        add({f"decoder.{branch}.u1.conva"}, {f"decoder.{branch}.u0.bn"}, {f"decoder.{branch}.u0.conv"})
    return groups


def _randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics and affines, so zeroed channels are not accidentally inert."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(0.5 + torch.rand(n, generator=g))
                m.bias.copy_(0.4 * torch.rand(n, generator=g) - 0.2)
                m.running_mean.copy_(0.2 * torch.rand(n, generator=g) - 0.1)
                m.running_var.copy_(0.5 + 1.5 * torch.rand(n, generator=g))
    return model


@pytest.fixture(scope="module")
def tiny() -> HoVerNet:
    torch.manual_seed(0)
    return _randomise_bn(HoVerNet("fast", 5, ChannelSpec.scaled(0.0625))).eval()


@pytest.fixture(scope="module")
def small_grouped() -> HoVerNet:
    """Width x0.125 with one branch's u2 dense growth at 16, so grouped conv outputs can be pruned too."""
    base = ChannelSpec.scaled(0.125)
    wide = {f"decoder.np.u2.dense.units.{i}.conv2": 16 for i in range(4)}
    torch.manual_seed(1)
    return _randomise_bn(HoVerNet("fast", 5, base.with_widths(wide)), seed=1).eval()


def test_library_groups_match_hand_written_oracle(tiny: HoVerNet) -> None:
    graph = PruningGraph(tiny)
    library = {(g.producers, g.bns, g.consumers) for g in graph.groups}
    oracle = hand_written_groups()
    assert len(graph.groups) == len(library) == 118
    assert library - oracle == set(), "groups Torch-Pruning found that the oracle lacks"
    assert oracle - library == set(), "oracle groups Torch-Pruning did not find"
    heads = {f"decoder.{b}.u0.conv" for b in BRANCHES}
    assert all(not (g.producers & heads) for g in graph.groups)  # heads are never pruned


def test_oracle_residual_streams_are_the_specs_coupled_groups(tiny: HoVerNet) -> None:
    producer_sets = {p for p, _, _ in hand_written_groups()}
    for group in tiny.spec.coupled_groups():
        assert frozenset(group) in producer_sets


def _zeroed_reference(model: HoVerNet, removed: dict[str, list[int]]) -> HoVerNet:
    """The unpruned model with the removed channels' producers and BatchNorms zeroed."""
    reference = _randomise_bn(HoVerNet("fast", 5, model.spec))
    reference.load_state_dict(model.state_dict())
    graph = PruningGraph(reference)
    modules = dict(reference.named_modules())
    with torch.no_grad():
        for root, idxs in removed.items():
            gone = set(idxs)
            for member in graph.by_root[root].members:
                sel = [i for i, r in zip(member.idxs, member.root_idxs, strict=True) if r in gone]
                if member.kind == "conv_out":
                    modules[member.module].weight[sel] = 0.0
                elif member.kind == "bn":
                    modules[member.module].weight[sel] = 0.0
                    modules[member.module].bias[sel] = 0.0
    return reference.eval()


@pytest.mark.parametrize(("criterion", "global_ranking"), [("l1", False), ("slimming", True)])
def test_zeroing_a_channel_set_equals_removing_it(
    small_grouped: HoVerNet, criterion: str, global_ranking: bool
) -> None:
    c = CRITERIA[criterion]
    result = prune_channels(
        small_grouped, c.scorer, 0.5, global_ranking=global_ranking, normalize=c.normalize, round_to=4
    )
    graph = PruningGraph(small_grouped)
    grouped_roots = {g.root for g in graph.groups if g.conv_groups == 4}
    pruned_grouped = grouped_roots & set(result.removed)
    assert any(r.endswith("conv1") for r in pruned_grouped), "no grouped-conv input was pruned"
    assert any(r.endswith("conv2") for r in pruned_grouped), "no grouped-conv output was pruned"
    assert any(len(graph.by_root[r].producers) > 3 for r in result.removed), "no residual stream was pruned"

    reference = _zeroed_reference(small_grouped, result.removed)
    x = torch.rand(2, 3, 120, 120, generator=torch.Generator().manual_seed(2)) * 255
    with torch.no_grad():
        got, expected = result.model.eval()(x), reference(x)
        untouched = small_grouped(x)
    for key in expected:
        scale = expected[key].abs().max()
        torch.testing.assert_close(got[key], expected[key], atol=2e-5 * float(scale), rtol=1e-4)
        assert not torch.allclose(untouched[key], expected[key])  # the zeroed channels did matter
    for name in result.model.spec.grouped_convs():
        conv1 = name[: -len("conv2")] + "conv1"
        assert result.model.spec[name] % 4 == 0 and result.model.spec[conv1] % 4 == 0
    assert small_grouped.spec == ChannelSpec.from_state_dict(small_grouped.state_dict())  # parent untouched


@pytest.mark.parametrize(("ratio", "global_ranking"), [(0.5, False), (0.7, True)])
def test_parameter_ratio_is_honoured_within_one_percent(ratio: float, global_ranking: bool) -> None:
    """Quarter-width model (the real parent's architecture), round_to=8: |achieved - ratio| <= 0.01."""
    torch.manual_seed(0)
    parent = HoVerNet("fast", 5, ChannelSpec.scaled(0.25)).eval()
    before = count_params(parent)
    result = prune_channels(parent, l1_norm, ratio, global_ranking=global_ranking, round_to=8)
    assert result.params_after == count_params(result.model)
    assert abs((1 - count_params(result.model) / before) - ratio) <= 0.01
    for name, width in result.model.spec.widths.items():
        if width != parent.spec[name]:
            assert width % 8 == 0, f"{name}={width} is not a multiple of round_to"
    for branch in BRANCHES:
        head = f"decoder.{branch}.u0.conv"
        assert dict(result.model.named_modules())[head].out_channels == dict(parent.named_modules())[head].out_channels


def test_max_layer_ratio_and_strided_shortcut_floor(tiny: HoVerNet) -> None:
    result = prune_channels(tiny, bn_scale, 0.6, global_ranking=True, normalize=False, round_to=4, max_layer_ratio=0.5)
    for name, width in result.model.spec.widths.items():
        assert width >= math.ceil(tiny.spec[name] * 0.5), name
    deep = prune_channels(tiny, l1_norm, 0.9, round_to=4, max_layer_ratio=0.95)
    for block in ("d0", "d1", "d2"):  # read by the next block's stride-2 1x1 shortcut
        assert deep.model.spec[f"{block}.shortcut"] >= min(STRIDED_1X1_MIN_INPUT, tiny.spec[f"{block}.shortcut"])


def test_pruned_model_saves_loads_and_runs_in_the_engine(tiny: HoVerNet, tmp_path, consep_train) -> None:
    result = prune_channels(tiny, l1_norm, 0.4, round_to=4)
    lineage = {"parent": "tiny", "method": "l1", "ratio": 0.4, "schedule": "oneshot", "steps": 1}
    path = save_model(result.model, tmp_path / "pruned", {"name": "pruned", "lineage": lineage})
    loaded = load_model(path)
    assert loaded.spec == result.model.spec != tiny.spec
    assert loaded.meta["lineage"]["parent"] == "tiny"
    assert count_params(loaded) == result.params_after
    image = np.asarray(Image.open(sorted((consep_train / "images").glob("*.jpg"))[0]).convert("RGB"))
    config = InferenceConfig(batch_size=2)
    maps = TileInferer(loaded, config).infer(image)
    again = TileInferer(result.model, config).infer(image)
    assert maps.np_prob.shape == image.shape[:2] and maps.tp_prob.shape[0] == 5
    np.testing.assert_allclose(maps.np_prob, again.np_prob, atol=1e-5)


def test_grouped_conv_as_wide_as_its_groups_is_refused() -> None:
    spec = ChannelSpec.scaled(0.0625).with_widths({"decoder.np.u2.dense.units.0.conv2": 4})
    with pytest.raises(ModelError, match="depthwise"):
        PruningGraph(HoVerNet("fast", 5, spec))


def test_bad_ratio_is_a_model_error(tiny: HoVerNet) -> None:
    with pytest.raises(ModelError, match="ratio"):
        prune_channels(tiny, l1_norm, 1.0)
