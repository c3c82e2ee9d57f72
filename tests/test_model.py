"""HoVer-Net architecture: official key list, output sizes, channel specs, MAC counts.

Full-width models are only built on the ``meta`` device (shapes, no memory, no
arithmetic); forwards run on narrow models so the suite stays fast.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from wsi_pipeline.engine.macs import count_macs, count_params, model_macs
from wsi_pipeline.engine.model import ChannelSpec, HoVerNet, TFSamePad
from wsi_pipeline.errors import ModelError

torch.set_num_threads(1)

OFFICIAL = json.loads((Path(__file__).parent / "fixtures" / "hovernet_official_keys.json").read_text())
OFFICIAL_PARAMS = {"fast": 37_639_626, "original": 54_744_522}


def _shapes(model: nn.Module) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in model.state_dict().items()}


def _narrow(mode: str = "fast", num_types: int | None = 5) -> HoVerNet:
    return HoVerNet(mode, num_types, ChannelSpec.scaled(0.0625, mode, round_to=4)).eval()


def _meta_forward(model: HoVerNet, height: int, width: int | None = None) -> dict[str, tuple[int, ...]]:
    """Run the real forward on shape-only tensors: output shapes of any width at no cost."""
    x = torch.empty(1, 3, height, width or height, device="meta")
    with torch.no_grad():
        return {k: tuple(v.shape) for k, v in model(x).items()}


def _rgb(size: int, batch: int = 1) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0)) * 255


@pytest.fixture(scope="module")
def narrow_fast() -> HoVerNet:
    return _narrow("fast")


# -- the official module tree ----------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["fast", "original"])
def test_state_dict_equals_official_key_list(mode: str) -> None:
    with torch.device("meta"):
        model = HoVerNet(mode, num_types=OFFICIAL[mode]["nr_types"])
    official = OFFICIAL[mode]["state_dict"]
    ours = _shapes(model)
    assert list(ours) == list(official)  # same names, same order
    assert ours == official
    assert count_params(model) == OFFICIAL[mode]["num_params"] == OFFICIAL_PARAMS[mode]
    assert (model.input_size, model.output_size) == (OFFICIAL[mode]["input_size"], OFFICIAL[mode]["output_size"])


def test_named_keys_from_the_issue_exist() -> None:
    with torch.device("meta"):
        keys = set(HoVerNet("fast", 6).state_dict())
    for key in [
        "conv0./.weight",
        "d1.units.2.conv1/bn.weight",
        "d0.units.1.preact/bn.weight",
        "d2.shortcut.weight",
        "d3.blk_bna.bn.bias",
        "decoder.np.u3.dense.units.0.conv2.weight",
        "decoder.hv.u2.dense.units.3.preact_bna/bn.running_var",
        "upsample2x.unpool_mat",
    ]:
        assert key in keys
    assert "d0.units.0.preact/bn.weight" not in keys  # the first unit has no pre-activation


def test_without_types_there_is_no_tp_branch() -> None:
    with torch.device("meta"):
        model = HoVerNet("fast", num_types=None)
    expected = {k: v for k, v in OFFICIAL["fast"]["state_dict"].items() if not k.startswith("decoder.tp.")}
    assert _shapes(model) == expected
    assert model.spec.branches == ("np", "hv")


# -- forward ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("mode", "size", "out"), [("fast", 256, 164), ("original", 270, 80)])
def test_full_width_forward_output_sizes(mode: str, size: int, out: int) -> None:
    with torch.device("meta"):
        with_types, without = HoVerNet(mode, 6), HoVerNet(mode, None)
    assert _meta_forward(with_types, size) == {"tp": (1, 6, out, out), "np": (1, 2, out, out), "hv": (1, 2, out, out)}
    assert _meta_forward(without, size) == {"np": (1, 2, out, out), "hv": (1, 2, out, out)}


def test_narrow_forwards_compute(narrow_fast: HoVerNet) -> None:
    with torch.no_grad():
        fast = narrow_fast(_rgb(96))
        original = _narrow("original", num_types=None)(_rgb(198))  # the smallest original input
    assert list(fast) == ["tp", "np", "hv"] and fast["tp"].shape == (1, 5, 4, 4)
    assert list(original) == ["np", "hv"] and original["hv"].shape == (1, 2, 8, 8)
    assert all(torch.isfinite(v).all() and v.std() > 0 for v in [*fast.values(), *original.values()])


def test_other_input_sizes_follow_the_fixed_margin(narrow_fast: HoVerNet) -> None:
    assert narrow_fast.output_size_for(256) == 164
    assert narrow_fast.output_size_for(512) == 420
    with torch.device("meta"):
        original = HoVerNet("original", 6)
    assert original.output_size_for(270) == 80
    assert original.output_size_for(526) == 336
    with pytest.raises(ModelError, match="divisible by 8"):
        narrow_fast.output_size_for(250)
    with pytest.raises(ModelError, match=r"size >= 198"):
        original.output_size_for(190)
    with torch.device("meta"):
        shapes_only = _narrow("fast")
    assert _meta_forward(shapes_only, 128, 96)["np"] == (1, 2, 36, 4)  # H and W are independent


def test_bad_input_is_a_model_error(narrow_fast: HoVerNet) -> None:
    with pytest.raises(ModelError, match="RGB"):
        narrow_fast(torch.zeros(1, 1, 256, 256))
    with pytest.raises(ModelError, match="does not fit"):
        narrow_fast(torch.zeros(1, 3, 250, 250))


def test_channels_last_gives_the_same_output(narrow_fast: HoVerNet) -> None:
    x = _rgb(96)
    channels_last = _narrow("fast").to(memory_format=torch.channels_last)
    channels_last.load_state_dict(narrow_fast.state_dict())
    with torch.no_grad():
        expected = narrow_fast(x)["hv"]
        got = channels_last(x.to(memory_format=torch.channels_last))["hv"]
    # Random, un-normalised weights give outputs in the thousands: compare relative to their scale.
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_trains_under_bfloat16_autocast() -> None:
    model = _narrow("fast").train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(_rgb(96, batch=2))
    assert out["np"].shape == (2, 2, 4, 4)
    sum(v.float().square().mean() for v in out.values()).backward()
    grad = model.conv0.get_submodule("/").weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_tf_same_padding_puts_the_odd_pixel_last() -> None:
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    padded = TFSamePad(3, 2)(x)  # pad 1 in total: none before, one after (TensorFlow SAME)
    assert padded.shape == (1, 1, 5, 5)
    assert torch.equal(padded[0, 0, :4, :4], x[0, 0])
    assert padded[0, 0, 4].abs().sum() == 0 and padded[0, 0, :, 4].abs().sum() == 0


# -- channel spec -----------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["fast", "original"])
def test_spec_read_back_from_full_weights(mode: str) -> None:
    with torch.device("meta"):
        model = HoVerNet(mode, 6)
    assert ChannelSpec.from_state_dict(model.state_dict()) == ChannelSpec.full(mode)


def test_scaled_quarter_width_size() -> None:
    with torch.device("meta"):
        model = HoVerNet("fast", 5, ChannelSpec.scaled(0.25))
    assert count_params(model) == 2_369_641
    assert count_macs(model) == 9_426_751_232
    assert model.spec["decoder.tp.u3.dense.units.7.conv2"] == 8  # growth 32 x 0.25


def test_spec_round_trips_through_json() -> None:
    spec = ChannelSpec.scaled(0.5, "original")
    again = ChannelSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec and again.mode == "original"
    assert again != ChannelSpec.full("original")


def test_every_conv_width_is_settable_on_its_own() -> None:
    # Odd, pruned-looking widths: one branch's dense unit, one encoder bottleneck, one branch's u1.
    spec = ChannelSpec.scaled(0.125, round_to=4).with_widths(
        {
            "decoder.np.u3.dense.units.3.conv2": 12,
            "decoder.hv.u2.dense.units.0.conv1": 20,
            "d2.units.4.conv1": 7,
            "decoder.tp.u1.conva": 3,
            "conv0./": 5,
        }
    )
    model = HoVerNet("fast", 4, spec).eval()
    assert model.decoder["np"].u3.convf.in_channels == spec.inputs["decoder.np.u3.convf"]
    assert model.decoder["hv"].u3.convf.in_channels != model.decoder["np"].u3.convf.in_channels
    assert ChannelSpec.from_state_dict(model.state_dict()) == spec
    assert _meta_forward(model.to("meta"), 96)["tp"] == (1, 4, 4, 4)  # every conv's input width fits


def test_rebuilt_model_owns_its_weights(narrow_fast: HoVerNet) -> None:
    rebuilt = HoVerNet.from_state_dict(narrow_fast.state_dict())
    assert all(p.requires_grad for p in rebuilt.parameters())
    with torch.no_grad():
        rebuilt.conv_bot.weight.add_(1.0)  # fine-tuning a child must not touch its parent
    assert not torch.equal(rebuilt.conv_bot.weight, narrow_fast.conv_bot.weight)


def test_coupled_widths_must_stay_equal() -> None:
    spec = ChannelSpec.scaled(0.25)
    with pytest.raises(ModelError, match="d1.shortcut"):
        spec.with_widths({"decoder.np.u3.convf": 96})  # added to d1's output
    with pytest.raises(ModelError, match="conv_bot"):
        spec.with_widths({"conv_bot": 200})  # added to d2's output
    group = next(g for g in spec.coupled_groups() if "d1.shortcut" in g)
    assert {"decoder.tp.u3.convf", "decoder.np.u3.convf", "decoder.hv.u3.convf"} <= set(group)
    narrower = spec.with_widths(dict.fromkeys(group, 96))
    assert narrower.inputs["d2.units.0.conv1"] == 96


def test_grouped_conv_widths_divide_by_four() -> None:
    spec = ChannelSpec.scaled(0.25)
    with pytest.raises(ModelError, match="divide by 4"):
        spec.with_widths({"decoder.hv.u2.dense.units.1.conv2": 6})
    with pytest.raises(ModelError, match="divide by 4"):
        spec.with_widths({"decoder.hv.u2.dense.units.1.conv1": 30})
    assert ChannelSpec.scaled(0.1, round_to=1)["decoder.np.u3.dense.units.0.conv2"] % 4 == 0


def test_bad_specs_are_model_errors() -> None:
    widths = ChannelSpec.full().to_dict()["widths"]
    del widths["d3.units.1.conv2"]
    with pytest.raises(ModelError, match=r"missing d3\.units\.1\.conv2"):
        ChannelSpec("fast", widths)
    with pytest.raises(ModelError, match="unknown HoVer-Net mode"):
        ChannelSpec.full("turbo")
    with pytest.raises(ModelError, match="mode 'fast' but the model is built in mode 'original'"):
        HoVerNet("original", 6, ChannelSpec.scaled(0.25))
    with pytest.raises(ModelError, match="no decoder branch"):
        HoVerNet("fast", 6, ChannelSpec.full(branches=("np", "hv")))
    with pytest.raises(ModelError, match="mapping with 'mode' and 'widths'"):
        ChannelSpec.from_dict({"widths": {}})


def test_torch_pruning_result_is_rebuilt_from_its_weights() -> None:
    tp = pytest.importorskip("torch_pruning")
    model = _narrow("fast", num_types=5)
    x = _rgb(96)
    heads = [branch.u0.conv for branch in model.decoder.values()]
    pruner = tp.pruner.MetaPruner(
        model,
        x,
        importance=tp.importance.MagnitudeImportance(p=1),
        pruning_ratio=0.5,
        ignored_layers=heads,
        round_to=4,
    )
    before = count_params(model)
    pruner.step()
    assert count_params(model) < before / 2
    rebuilt = HoVerNet.from_state_dict(model.state_dict()).eval()
    assert rebuilt.spec == ChannelSpec.from_state_dict(model.state_dict())
    with torch.no_grad():
        expected, got = model(x), rebuilt(x)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key])


# -- MACs -----------------------------------------------------------------------------------------
def test_macs_hand_computed() -> None:
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),  # 8x10x10 outputs x (3*3*3) = 21,600
        nn.Conv2d(8, 8, 3, padding=1, groups=4),  # 8x10x10 x (2*3*3) = 14,400
        nn.Flatten(),
        nn.Linear(800, 10),  # 10 x 800 = 8,000
    )
    assert count_macs(net, 10) == 21_600 + 14_400 + 8_000
    assert count_macs(net, (10, 10)) == 44_000
    assert count_params(net) == (3 * 9 * 8 + 8) + (2 * 9 * 8 + 8) + (800 * 10 + 10)
    with pytest.raises(ModelError, match="input_size"):
        count_macs(net)


def test_full_model_macs_are_counted_on_meta() -> None:
    with torch.device("meta"):
        fast = HoVerNet("fast", 6)
    macs = count_macs(fast)
    assert 140e9 < macs < 160e9  # ~149 GMAC per 256x256 patch
    assert not list(fast.decoder["np"].u0.conv._forward_hooks)  # hooks removed


def test_recorded_macs_are_used_only_while_the_widths_match() -> None:
    net = HoVerNet("fast", num_types=None, spec=ChannelSpec.full("fast").scaled(0.125))
    counted = count_macs(net)
    net.meta = {"params": str(count_params(net)), "macs": "123"}
    assert model_macs(net) == 123
    net.meta = {"params": str(count_params(net) + 1), "macs": "123"}  # another architecture's record
    assert model_macs(net) == counted
    net.meta = {"params": "many", "macs": "123"}
    assert model_macs(net) == counted


def test_loading_the_default_model_and_preparing_a_run_stay_off_torch_dynamo() -> None:
    """A run's driver and workers load the model from a file (built on the meta device) and
    report its MACs; neither may import ``torch._dynamo``, which cost every process 1.5-2.4 s
    of its start (the random init on meta, and the MAC count's meta forward, pulled it in).
    A fresh interpreter, since this test session may have imported it already."""
    code = (
        "import sys\n"
        "from wsi_pipeline.batch.plan import prepare_model\n"
        "from wsi_pipeline.config import RunConfig\n"
        "from wsi_pipeline.engine.weights import load_model\n"
        "info = prepare_model(RunConfig())\n"
        "model = load_model(info.path)\n"
        "assert info.macs > 0 and info.params > 0\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "False", out.stdout + out.stderr
