"""Checkpoint formats: official release, TIAToolbox, ours; and the errors users get."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.utils.prune

from wsi_pipeline.engine.model import ChannelSpec, HoVerNet
from wsi_pipeline.engine.weights import load_model, read_state_dict, save_model
from wsi_pipeline.errors import ModelError

torch.set_num_threads(1)

OFFICIAL = json.loads((Path(__file__).parent / "fixtures" / "hovernet_official_keys.json").read_text())


def _official_state_dict(mode: str) -> dict[str, torch.Tensor]:
    """A state dict as the official release ships it: the fixture's keys and shapes, no BN counters."""
    out = {}
    for i, (key, shape) in enumerate(OFFICIAL[mode]["state_dict"].items()):
        if not key.endswith("num_batches_tracked"):  # distinct, cheap values: a mix-up cannot pass
            out[key] = torch.arange(math.prod(shape), dtype=torch.float32).reshape(shape) / (i + 1)
    return out


def _narrow(num_types: int | None = 5, spec: ChannelSpec | None = None) -> HoVerNet:
    spec = spec or ChannelSpec.scaled(0.0625, round_to=4)
    model = HoVerNet("fast", num_types, spec).eval()
    with torch.no_grad():  # non-trivial BN statistics, so a wrong load cannot go unnoticed
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model


def _same_weights(a: HoVerNet, b: HoVerNet) -> None:
    state_a, state_b = a.state_dict(), b.state_dict()
    assert list(state_a) == list(state_b)
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)


def _same_outputs(a: HoVerNet, b: HoVerNet) -> None:
    x = torch.rand(1, 3, 96, 96, generator=torch.Generator().manual_seed(0)) * 255
    with torch.no_grad():
        out_a, out_b = a(x), b(x)
    assert list(out_a) == list(out_b)
    for key in out_a:
        torch.testing.assert_close(out_b[key], out_a[key], rtol=0, atol=0)


# -- the public formats ---------------------------------------------------------------------------
def test_official_release_format_loads_strictly(tmp_path: Path) -> None:
    state_dict = _official_state_dict("fast")
    path = tmp_path / "hovernet_fast_pannuke_type_tf2pytorch.tar"
    torch.save({"desc": {f"module.{k}": v for k, v in state_dict.items()}}, path)
    model = load_model(path)
    assert isinstance(model, HoVerNet) and not model.training
    assert (model.mode, model.num_types, model.spec) == ("fast", 6, ChannelSpec.full("fast"))
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state_dict.items())
    assert model.meta["format"] == "official"
    assert model.meta["mpp"] == 0.25
    assert [c["name"] for c in model.meta["classes"]] == [
        "neoplastic", "inflammatory", "connective", "dead", "epithelial"
    ]  # fmt: skip
    assert model.meta["name"] == "hovernet_fast_pannuke_type_tf2pytorch"


@pytest.mark.slow
def test_official_original_mode_loads_strictly(tmp_path: Path) -> None:
    path = tmp_path / "hovernet_original_consep_type_tf2pytorch.tar"
    torch.save({"desc": _official_state_dict("original")}, path)
    model = load_model(path)
    assert (model.mode, model.num_types, model.output_size) == ("original", 6, 80)


def test_tiatoolbox_bare_state_dict_loads(tmp_path: Path) -> None:
    source = _narrow(num_types=5)
    path = tmp_path / "hovernet_fast-consep.pth"
    torch.save(source.state_dict(), path)
    model = load_model(path)
    _same_weights(source, model)
    assert model.spec == source.spec and not model.training
    assert model.meta["format"] == "bare"
    assert [c["name"] for c in model.meta["classes"]] == ["other", "inflammatory", "epithelial", "spindle-shaped"]
    # Constants some exports leave out are filled in: the all-ones unpool matrix, BN counters.
    bare = {k: v for k, v in source.state_dict().items() if "unpool_mat" not in k and "num_batches" not in k}
    torch.save(bare, path)
    _same_weights(source, load_model(path))


def test_legacy_defaults_follow_the_number_of_types(tmp_path: Path) -> None:
    path = tmp_path / "three.pth"
    torch.save(_narrow(num_types=3).state_dict(), path)
    meta = load_model(path).meta
    assert [c["id"] for c in meta["classes"]] == [1, 2]
    assert all("2" in c["name"] or "1" in c["name"] for c in meta["classes"])
    torch.save(_narrow(num_types=None).state_dict(), path)
    model = load_model(path)
    assert model.num_types is None and model.meta["classes"] == []


# -- our format -----------------------------------------------------------------------------------
def test_our_format_round_trips_an_odd_pruned_spec(tmp_path: Path) -> None:
    spec = ChannelSpec.scaled(0.125, round_to=4).with_widths(
        {"decoder.np.u3.dense.units.5.conv2": 12, "d1.units.1.conv2": 9, "decoder.hv.u1.conva": 5}
    )
    source = _narrow(num_types=5, spec=spec)
    meta = {
        "name": "tiny-consep",
        "classes": [{"id": i, "name": f"c{i}", "color": [i, 2 * i, 3 * i]} for i in range(1, 5)],
        "mpp": 0.5,
        "training": {"datasets": ["consep/train"], "epochs": 3},
        "lineage": [{"step": "prune", "method": "l1", "ratio": 0.5, "parent": "tiny.safetensors"}],
        "metrics": {"dev": {"pq": 0.41}},
    }
    written = save_model(source, tmp_path / "tiny-consep", meta)
    assert written == tmp_path / "tiny-consep.safetensors"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-consep.safetensors"]  # one file, no leftovers

    model = load_model(written)
    _same_outputs(source, model)
    assert model.spec == spec and model.num_types == 5
    for key, value in meta.items():
        assert model.meta[key] == value
    assert model.meta["format"] == "wsi_pipeline"
    assert ChannelSpec.from_dict(model.meta["spec"]) == spec

    state_dict, stored = read_state_dict(written)
    assert stored["spec"] == spec.to_dict() and stored["format_version"] == 1
    assert set(state_dict) == set(source.state_dict())


def test_save_describes_a_model_narrowed_in_place(tmp_path: Path) -> None:
    model = _narrow(num_types=None)
    stale = model.spec
    conv = model.decoder["np"].u1.conva
    conv.weight = torch.nn.Parameter(conv.weight[:3].clone())  # what a pruner does to out-channels
    head = model.decoder["np"].u0
    bn = head.bn
    bn.weight, bn.bias = torch.nn.Parameter(bn.weight[:3].clone()), torch.nn.Parameter(bn.bias[:3].clone())
    bn.running_mean, bn.running_var = bn.running_mean[:3].clone(), bn.running_var[:3].clone()
    head.conv.weight = torch.nn.Parameter(head.conv.weight[:, :3].clone())
    loaded = load_model(save_model(model, tmp_path / "narrowed.safetensors", {"name": "n"}))
    assert loaded.spec != stale and loaded.spec["decoder.np.u1.conva"] == 3


def test_save_refuses_bad_metadata_and_masks(tmp_path: Path) -> None:
    model = _narrow(num_types=5)
    with pytest.raises(ModelError, match="JSON-serialisable"):
        save_model(model, tmp_path / "m", {"when": object()})
    with pytest.raises(ModelError, match="4 foreground classes"):
        save_model(model, tmp_path / "m", {"classes": [{"id": 1, "name": "a", "color": [0, 0, 0]}]})
    torch.nn.utils.prune.l1_unstructured(model.conv_bot, "weight", amount=0.5)
    with pytest.raises(ModelError, match="prune.remove"):
        save_model(model, tmp_path / "m", {})
    assert not list(tmp_path.iterdir())


def test_public_api_is_exported() -> None:
    from wsi_pipeline import load_model as exported

    assert exported is load_model


# -- what users get wrong -------------------------------------------------------------------------
def test_missing_path_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="no such checkpoint file") as info:
        load_model(tmp_path / "nope.safetensors")
    assert str(tmp_path / "nope.safetensors") in str(info.value) and "Fix:" in str(info.value)
    with pytest.raises(ModelError, match="is a directory"):
        load_model(tmp_path)


def test_another_architecture_lists_keys(tmp_path: Path) -> None:
    other = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.Linear(8, 2))
    path = tmp_path / "resnet.pth"
    torch.save(other.state_dict(), path)
    with pytest.raises(ModelError, match="not a HoVer-Net state dict") as info:
        load_model(path)
    message = str(info.value)
    assert str(path) in message
    assert "missing keys: conv0./.weight" in message and "unexpected keys: 0.weight" in message


def test_mis_shaped_and_missing_keys_are_listed(tmp_path: Path) -> None:
    state_dict = _narrow(num_types=5).state_dict()
    state_dict["d2.units.3.conv2/bn.running_var"] = torch.ones(3)
    del state_dict["decoder.hv.u0.bn.bias"]
    path = tmp_path / "broken.pth"
    torch.save({"desc": state_dict}, path)
    with pytest.raises(ModelError) as info:
        load_model(path)
    message = str(info.value)
    assert "missing keys: decoder.hv.u0.bn.bias" in message
    assert "mis-shaped: d2.units.3.conv2/bn.running_var (3,) (model: (16,))" in message


class NotWeights:
    """An arbitrary class: unpickling it would import and run project code."""

    def __init__(self) -> None:
        self.value = 1


def test_pickles_of_objects_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    torch.save({"desc": NotWeights()}, path)
    with pytest.raises(ModelError, match="refusing to unpickle") as info:
        load_model(path)
    assert str(path) in str(info.value)
    torch.save(NotWeights(), path)
    with pytest.raises(ModelError, match="NotWeights"):
        load_model(path)


class RunsACommand:
    """What a malicious checkpoint holds: a pickle that calls os.system when loaded."""

    def __reduce__(self):
        return (os.system, ("echo this must never run",))


def test_a_pickle_that_would_run_code_is_named_and_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"desc": {"conv0.weight": torch.zeros(1)}, "payload": RunsACommand()}, path)
    with pytest.raises(ModelError, match=r"refusing to unpickle .*arbitrary code") as info:
        load_model(path)
    assert "system" in str(info.value) and str(path) in str(info.value) and "Fix:" in str(info.value)


def test_non_checkpoints_are_model_errors(tmp_path: Path) -> None:
    path = tmp_path / "notes.pth"
    path.write_text("not a checkpoint at all")
    with pytest.raises(ModelError, match="not a PyTorch checkpoint"):
        load_model(path)
    torch.save({"epoch": 3, "lr": 0.1}, path)
    with pytest.raises(ModelError, match="holds no state dict"):
        load_model(path)
    path = tmp_path / "cut.safetensors"
    data = save_model(_narrow(), tmp_path / "whole", {}).read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="safetensors"):
        load_model(path)


# -- the header alone (what a torch-free driver or OpenVINO worker reads) -------------------------
def test_the_header_describes_the_shipped_default_as_loading_it_does() -> None:
    from wsi_pipeline.engine.header import describe_file
    from wsi_pipeline.engine.macs import count_params, model_macs
    from wsi_pipeline.engine.registry import resolve_model
    from wsi_pipeline.engine.weights import model_postproc

    path = resolve_model(None)
    described, loaded = describe_file(path), load_model(path)
    assert described is not None
    assert (described.params, described.macs) == (count_params(loaded), model_macs(loaded))
    assert (described.input_size, described.output_size, described.num_types, described.mode) == (
        loaded.input_size, loaded.output_size, loaded.num_types, loaded.mode)
    assert all(described.output_size_for(n) == loaded.output_size_for(n) for n in (256, 512, 768, 1024))
    assert described.postproc == model_postproc(loaded)
    assert described.meta == loaded.meta


def _resave_header(path: Path, change) -> None:
    """Rewrite a checkpoint's JSON metadata in place (the tensors untouched)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        header = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    meta = json.loads(header["wsi_pipeline"])
    change(meta)
    header["wsi_pipeline"] = json.dumps(meta)
    save_file(tensors, str(path), metadata=header)


def test_the_header_vouches_only_for_what_its_tensors_confirm(tmp_path: Path) -> None:
    """Anything the header cannot confirm from the tensors' shapes is left to a full load
    (``None``): a legacy pickle, missing recorded counts, counts or widths the tensors
    contradict. Metadata that is unreadable or too new is refused as loading refuses it."""
    from wsi_pipeline.engine.header import describe_file
    from wsi_pipeline.engine.macs import count_macs, count_params

    model = _narrow()
    counts = {"params": count_params(model), "macs": count_macs(model)}
    good = save_model(model, tmp_path / "good", counts)
    assert describe_file(good) is not None and describe_file(good).params == counts["params"]
    assert describe_file(save_model(model, tmp_path / "no-counts", {})) is None
    torch.save(model.state_dict(), tmp_path / "legacy.pth")
    assert describe_file(tmp_path / "legacy.pth") is None

    def widen(meta: dict) -> None:
        name = next(iter(meta["spec"]["widths"]))
        meta["spec"]["widths"][name] += 4

    for name, change in {
        "wrong-params": lambda meta: meta.update(params=meta["params"] + 1),
        "wrong-width": widen,
        "wrong-types": lambda meta: meta.update(num_types=3),
    }.items():
        path = save_model(model, tmp_path / name, counts)
        _resave_header(path, change)
        assert describe_file(path) is None, name
    newer = save_model(model, tmp_path / "newer", counts)
    _resave_header(newer, lambda meta: meta.update(format_version=99))
    with pytest.raises(ModelError, match="newer than this wsi_pipeline reads"):
        describe_file(newer)
