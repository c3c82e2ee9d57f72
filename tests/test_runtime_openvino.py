# ruff: noqa: F811  (pytest fixtures imported from test_infer are used as arguments)
"""The OpenVINO runtime: matches torch, caches its conversion, survives a corrupt cache,
falls back to torch for a model it cannot convert.

Marked ``openvino`` and run by ``make test`` in a pytest process of their own: with the
``openvino`` library loaded into the same process, later torch tests (bf16 convolutions)
crashed the suite with a segmentation fault. The product never mixes them in one process
for inference (a worker runs one runtime), and the main suite never imports openvino.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_infer import (  # noqa: F401  (the shared fixtures: same real crop, model and reference)
    ProbeNet,
    _few_threads,
    he_crop,
    he_tile,
    model_factory,
    probe_expected,
    reference,
)

from wsi_pipeline.engine.infer import TOLERANCE_BF16, TOLERANCE_FP32, InferenceConfig, TileInferer, compare_maps

pytestmark = pytest.mark.openvino

# ----------------------------------------------------------------------------- OpenVINO
pytest.importorskip("openvino", reason="OpenVINO is not installed (pip install openvino)")


@pytest.fixture()
def ov_cache(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("WSI_PIPELINE_CACHE", str(folder))
    return folder / "openvino"


def test_openvino_matches_torch_fp32_and_caches_the_conversion(model_factory, he_crop, reference, ov_cache):
    first = TileInferer(model_factory(), InferenceConfig(runtime="openvino", window=256))
    assert first.runtime.name == "openvino" and first.runtime.precision == "f32"
    assert not first.runtime.converted_from_cache
    diff = compare_maps(reference, first.infer(he_crop))
    assert not TOLERANCE_FP32.violations(diff), diff
    assert len(list(ov_cache.glob("*.xml"))) == 1
    again = TileInferer(model_factory(), InferenceConfig(runtime="auto", window=256))
    assert again.runtime.name == "openvino" and again.runtime.converted_from_cache
    assert not TOLERANCE_FP32.violations(compare_maps(reference, again.infer(he_crop)))


def test_the_converting_process_computes_exactly_what_the_cache_gives_later(model_factory, he_crop, ov_cache):
    """A slide's results must not depend on which run converted the model: the in-memory
    conversion and the IR read back from disk differed in the last bits (seen as a few
    nuclei's probabilities changing between the first and later runs of one slide)."""
    first = TileInferer(model_factory(), InferenceConfig(runtime="openvino", bf16=True, window=256))
    assert not first.runtime.converted_from_cache
    later = TileInferer(model_factory(), InferenceConfig(runtime="openvino", bf16=True, window=256))
    assert later.runtime.converted_from_cache
    a, b = first.infer(he_crop), later.infer(he_crop)
    np.testing.assert_array_equal(a.np_prob, b.np_prob)
    np.testing.assert_array_equal(a.hv, b.hv)
    np.testing.assert_array_equal(a.tp_prob, b.tp_prob)


def test_openvino_bf16_within_the_bf16_tolerance(model_factory, he_crop, reference, ov_cache):
    inferer = TileInferer(model_factory(), InferenceConfig(runtime="openvino", bf16=True, window=256))
    assert inferer.runtime.precision == "bf16"
    diff = compare_maps(reference, inferer.infer(he_crop))
    assert not TOLERANCE_BF16.violations(diff), diff


@pytest.mark.parametrize("bf16", [False, True], ids=["f32", "bf16"])
def test_two_streams_compute_what_one_stream_computes(model_factory, he_crop, reference, ov_cache, bf16):
    """Streams only change which core runs a window: the maps stay within the precision's
    tolerance of torch, and every window of the tile is placed where it belongs (a window
    mixed up between the async requests would move nuclei by hundreds of pixels)."""
    tolerance = TOLERANCE_BF16 if bf16 else TOLERANCE_FP32
    one = TileInferer(model_factory(), InferenceConfig(runtime="openvino", bf16=bf16, window=256, threads=2))
    two = TileInferer(model_factory(), InferenceConfig(runtime="openvino", bf16=bf16, window=256, threads=2,
                                                       streams=2, batch_size=3))
    assert two.runtime.streams == 2 and one.runtime.streams == 1
    a, b = one.infer(he_crop), two.infer(he_crop)
    assert a.windows_run == b.windows_run > 2
    assert not tolerance.violations(compare_maps(reference, b)), compare_maps(reference, b)
    assert not tolerance.violations(compare_maps(a, b)), compare_maps(a, b)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_corrupt_conversion_cache_is_rebuilt_not_fatal(model_factory, he_crop, reference, ov_cache, damage, caplog):
    TileInferer(model_factory(), InferenceConfig(runtime="openvino", window=256))
    (xml,) = ov_cache.glob("*.xml")
    if damage == "truncated":
        xml.write_bytes(xml.read_bytes()[: len(xml.read_bytes()) // 3])
    else:
        xml.with_suffix(".bin").write_bytes(b"not a model")
        xml.write_text("<net>garbage</")
    inferer = TileInferer(model_factory(), InferenceConfig(runtime="openvino", window=256))
    assert inferer.runtime.name == "openvino" and not inferer.runtime.converted_from_cache
    assert "unreadable" in caplog.text
    assert not TOLERANCE_FP32.violations(compare_maps(reference, inferer.infer(he_crop)))
    assert TileInferer(model_factory(), InferenceConfig(runtime="openvino", window=256)).runtime.converted_from_cache


class Untraceable(ProbeNet):
    """A HoVer-Net-shaped module whose forward leaves torch for numpy: no graph to convert."""

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = super().forward(x)
        out["np"] = torch.from_numpy(out["np"].detach().numpy().copy())
        return out


def test_a_model_openvino_cannot_convert_falls_back_to_torch_with_one_warning(ov_cache):
    image = np.random.default_rng(2).integers(0, 256, (200, 200, 3), dtype=np.uint8)
    with pytest.warns(RuntimeWarning, match=r"OpenVINO cannot convert model my-probe .*running it with torch"):
        inferer = TileInferer(Untraceable(), InferenceConfig(runtime="auto"), label="my-probe")
    assert inferer.runtime.name == "torch"
    np.testing.assert_allclose(inferer.infer(image).np_prob, probe_expected(image, inferer.context).np_prob, atol=1e-6)




# ----------------------------------------------------------------------------- without torch
def _saved(model, path: Path) -> Path:
    """``model`` written as a checkpoint of ours with the counts training records."""
    from wsi_pipeline.engine.macs import count_macs, count_params
    from wsi_pipeline.engine.weights import save_model

    return save_model(model, path, {"name": path.stem, "params": count_params(model), "macs": count_macs(model)})


_TORCH_FREE_RUN = """
import json, sys
import numpy as np
from wsi_pipeline.batch.plan import prepare_model
from wsi_pipeline.config import RunConfig
from wsi_pipeline.engine.settings import InferenceConfig
from wsi_pipeline.worker import get_inferer

model, crop, out = sys.argv[1:4]
info = prepare_model(RunConfig(model=model, window=256))
inferer = get_inferer(str(info.path), InferenceConfig(runtime="auto", window=256))
maps = inferer.infer(np.load(crop))
np.savez(out, np_prob=maps.np_prob, hv=maps.hv, tp_prob=maps.tp_prob)
print(json.dumps({"torch": "torch" in sys.modules, "runtime": inferer.runtime.name,
                  "cached": inferer.runtime.converted_from_cache, "params": info.params, "macs": info.macs,
                  "margin": info.margin, "window": info.window, "checksum": info.checksum}))
"""


def test_a_cached_conversion_plans_and_runs_without_torch(model_factory, he_crop, tmp_path, ov_cache):
    """The driver's model check and an OpenVINO worker whose model's conversion is cached read
    only the checkpoint's header and the cached graph (torch costs seconds at every start),
    and compute exactly what the process that converted it computed."""
    import json
    import os
    import subprocess
    import sys

    from wsi_pipeline.batch.plan import prepare_model
    from wsi_pipeline.config import RunConfig, file_checksum
    from wsi_pipeline.engine.header import describe_file
    from wsi_pipeline.engine.macs import count_params, model_macs
    from wsi_pipeline.engine.weights import load_model

    path = _saved(model_factory(), tmp_path / "tiny.safetensors")
    converting = TileInferer(describe_file(path), InferenceConfig(runtime="openvino", window=256))
    assert converting.runtime.name == "openvino" and not converting.runtime.converted_from_cache
    expected = converting.infer(he_crop)
    np.save(tmp_path / "crop.npy", he_crop)
    done = subprocess.run(
        [sys.executable, "-c", _TORCH_FREE_RUN, str(path), str(tmp_path / "crop.npy"), str(tmp_path / "maps.npz")],
        capture_output=True, text=True, env={**os.environ, "WSI_PIPELINE_CACHE": str(ov_cache.parent)}, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    facts = json.loads(done.stdout.strip().splitlines()[-1])
    assert facts["torch"] is False and facts["runtime"] == "openvino" and facts["cached"] is True
    got = np.load(tmp_path / "maps.npz")
    for name in ("np_prob", "hv", "tp_prob"):
        np.testing.assert_array_equal(got[name], getattr(expected, name))
    # The header gives the driver what loading the network gives it.
    loaded = load_model(path)
    torch_info = prepare_model(RunConfig(model=str(path), window=256))  # this process has torch: same answer
    assert (facts["params"], facts["macs"]) == (count_params(loaded), model_macs(loaded))
    assert (facts["margin"], facts["window"]) == (torch_info.margin, torch_info.window) == (120, 256)
    assert facts["checksum"] == file_checksum(path)


def test_a_changed_checkpoint_never_gets_the_old_conversion(model_factory, he_crop, tmp_path, ov_cache):
    """The cache is keyed by the file's bytes: weights re-saved under the same name are
    converted again, and compute what the new weights compute."""
    from wsi_pipeline.engine.header import describe_file
    from wsi_pipeline.engine.infer import InferenceConfig as Config
    from wsi_pipeline.engine.weights import load_model

    path = _saved(model_factory(), tmp_path / "tiny.safetensors")
    TileInferer(describe_file(path), Config(runtime="openvino", window=256))
    changed = model_factory()
    with torch.no_grad():
        changed.decoder["np"].u0.conv.weight.mul_(-1.0)  # the nuclei map turned inside out
    _saved(changed, path)
    again = TileInferer(describe_file(path), Config(runtime="openvino", window=256))
    assert not again.runtime.converted_from_cache
    reference_new = TileInferer(load_model(path), Config(runtime="torch", window=256)).infer(he_crop)
    assert not TOLERANCE_FP32.violations(compare_maps(reference_new, again.infer(he_crop)))
    assert len(list(ov_cache.glob("*.xml"))) == 2
