"""Tile inference: patch-grid geometry, fast-path tolerances, and clear errors for bad input.

The geometry tests use a *probe* network: a tiny module with HoVer-Net's contract whose
outputs are known per-pixel functions of its input (including a pixel taken from the
context margin), so the stitched maps can be predicted exactly from the image alone. The
numerical tests use a real, narrow HoVer-Net on a real MoNuSeg crop.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from wsi_pipeline.engine.infer import (
    TOLERANCE_BF16,
    TOLERANCE_FP32,
    InferenceConfig,
    Maps,
    TileInferer,
    bf16_supported,
    compare_maps,
)
from wsi_pipeline.errors import ConfigError, ModelError


@pytest.fixture(autouse=True)
def _few_threads():
    """The machine is shared: keep torch to one thread in these tests."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class ProbeNet(nn.Module):
    """HoVer-Net's input/output contract with outputs we can predict pixel by pixel.

    np logit = (R - 128) / 16 on the output pixel; hv[0] = G of the pixel ``context``
    columns to the LEFT (so border outputs read mirrored context), hv[1] = B / 255;
    tp logits = RGB / 32. It records each batch size it sees.
    """

    def __init__(self, input_size: int = 256, output_size: int = 164, num_types: int | None = 3) -> None:
        super().__init__()
        self.input_size, self.output_size, self.num_types = input_size, output_size, num_types
        self.seen: list[int] = []

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        self.seen.append(x.shape[0])
        c, o = (self.input_size - self.output_size) // 2, self.output_size
        centre = x[:, :, c : c + o, c : c + o]
        left = x[:, :, c : c + o, 0:o]
        out = {
            "np": torch.stack([torch.zeros_like(centre[:, 0]), (centre[:, 0] - 128) / 16], 1),
            "hv": torch.stack([left[:, 1] / 255, centre[:, 2] / 255], 1),
        }
        if self.num_types is not None:
            out["tp"] = centre / 32
        return out


def probe_expected(image: np.ndarray, context: int) -> Maps:
    """What ProbeNet must produce over the whole image, computed without any patches."""
    f = image.astype(np.float64)
    mirrored = np.pad(image, ((context, context), (context, context), (0, 0)), mode="reflect")
    height, width = image.shape[:2]
    left_g = mirrored[context : context + height, 0:width, 1].astype(np.float64)
    logits = f / 32
    tp = np.exp(logits - logits.max(axis=2, keepdims=True))
    tp /= tp.sum(axis=2, keepdims=True)
    return Maps(
        np_prob=(1 / (1 + np.exp(-(f[..., 0] - 128) / 16))).astype(np.float32),
        hv=np.stack([left_g / 255, f[..., 2] / 255]).astype(np.float32),
        tp_prob=tp.transpose(2, 0, 1).astype(np.float32),
    )


@pytest.mark.parametrize(
    ("shape", "sizes", "batch"),
    [((200, 350), (256, 164), 4), ((164, 164), (256, 164), 1), ((97, 300), (270, 80), 3), ((47, 47), (256, 164), 2)],
)
def test_patch_grid_reproduces_a_per_pixel_function_exactly(shape, sizes, batch):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    probe = ProbeNet(*sizes)
    inferer = TileInferer(probe, InferenceConfig(batch_size=batch, channels_last=False))
    maps = inferer.infer(image)
    expected = probe_expected(image, inferer.context)

    assert maps.np_prob.shape == shape and maps.np_prob.dtype == np.float32
    assert maps.hv.shape == (2, *shape) and maps.tp_prob.shape == (3, *shape)
    np.testing.assert_allclose(maps.np_prob, expected.np_prob, atol=1e-6)
    np.testing.assert_allclose(maps.hv, expected.hv, atol=1e-6)
    np.testing.assert_allclose(maps.tp_prob, expected.tp_prob, atol=1e-6)
    # Streaming: never more than one batch in flight, every window exactly once.
    n_windows = inferer.plan(shape[0]).count * inferer.plan(shape[1]).count
    assert max(probe.seen) <= batch and sum(probe.seen) == n_windows


def test_model_without_type_branch_gives_no_tp_map():
    image = np.random.default_rng(1).integers(0, 256, (120, 130, 3), dtype=np.uint8)
    maps = TileInferer(ProbeNet(num_types=None)).infer(image)
    assert maps.tp_prob is None and maps.hv.shape == (2, 120, 130)


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (np.full((300, 300, 3), 0.5, np.float32), "scaled to 0-1"),
        (np.full((300, 300, 3), 200.0), "0-255 RGB as uint8"),
        (np.zeros((300, 300), np.uint8), "grayscale"),
        (np.zeros((300, 300, 1), np.uint8), "grayscale"),
        (np.zeros((300, 300, 3), np.uint16), "uint16"),
        (np.zeros((300, 300, 4), np.uint8), "alpha"),
        (np.zeros((3, 300, 300), np.uint8), "channels-first"),
        (np.zeros((2, 300, 300, 3), np.uint8), "one tile at a time"),
        (np.zeros((300, 20, 3), np.uint8), "too small"),
        (np.zeros((0, 0, 3), np.uint8), "too small"),
        (torch.zeros(300, 300, 3, dtype=torch.uint8), "numpy array"),
        ([[0, 0, 0]], "numpy array"),
    ],
)
def test_bad_images_raise_model_error_with_a_fix(image, message):
    inferer = TileInferer(ProbeNet())
    with pytest.raises(ModelError, match=message) as info:
        inferer.infer(image)
    assert "Fix:" in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"threads": 0}, "threads"),
        ({"bf16": "yes"}, "bf16"),
        ({"device": "tpu"}, "device"),
        ({"device": "mps"}, "not supported"),
        ({"compile": "no"}, "compile"),
    ],
)
def test_bad_config_raises_config_error(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        InferenceConfig(**kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_without_gpu_is_a_config_error():
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        TileInferer(ProbeNet(), InferenceConfig(device="cuda"))


def test_non_hovernet_model_is_a_model_error():
    with pytest.raises(ModelError, match="input_size"):
        TileInferer(nn.Conv2d(3, 2, 3))


def test_bf16_auto_follows_hardware_support():
    inferer = TileInferer(ProbeNet(), InferenceConfig(bf16="auto"))
    assert inferer.uses_bf16 == bf16_supported("cpu")
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    if " avx512_bf16" in flags or " amx_bf16" in flags:
        assert bf16_supported("cpu")


# --- a real narrow HoVer-Net on a real image -------------------------------------------------


@pytest.fixture(scope="module")
def he_tile(monuseg_train: Path) -> np.ndarray:
    """A real 40x H&E tile (MoNuSeg, 1000x1000 RGB)."""
    path = sorted((monuseg_train / "images").glob("*.tif"))[0]
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture(scope="module")
def he_crop(he_tile: np.ndarray) -> np.ndarray:
    """300x200 px of it: a 2x2 patch grid with partial last patches."""
    return np.ascontiguousarray(he_tile[350:650, 400:600])


@pytest.fixture(scope="module")
def model_factory(he_tile: np.ndarray):
    """Fresh copies of a seeded, well-conditioned width x 0.125 fast HoVer-Net with 5 types.

    A randomly initialised BN network is chaotic: it amplifies rounding ~1000x from input
    to output, so bf16 changes its outputs completely while a trained network's barely
    move. To measure the *engine* rather than that artefact, the residual branches start
    at zero (the "zero-init residual" scheme of Goyal et al. 2017) and BatchNorm statistics
    are calibrated on real H&E patches, which gives outputs of a trained model's scale
    and sensitivity (see the measured figures in wsi_pipeline/engine/infer.py).
    """
    from wsi_pipeline.engine.model import ChannelSpec, HoVerNet

    def build() -> nn.Module:
        torch.manual_seed(0)
        return HoVerNet(mode="fast", num_types=5, spec=ChannelSpec.scaled(0.125, "fast"))

    model = build()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".conv3.weight") or (".dense." in name and name.endswith(".conv2.weight")):
                param.zero_()
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.reset_running_stats()
                module.momentum = None  # cumulative average: one batch sets the statistics
        corners = [(0, 0), (0, 744), (744, 0), (744, 744)]  # away from he_crop
        patches = np.stack([he_tile[y : y + 256, x : x + 256] for y, x in corners])
        model.train()
        model(torch.from_numpy(patches).permute(0, 3, 1, 2).float())
    state = model.state_dict()

    def make() -> nn.Module:
        fresh = build()
        fresh.load_state_dict(state)
        return fresh.eval()

    return make


@pytest.fixture(scope="module")
def reference(model_factory, he_crop) -> Maps:
    """fp32 eager, contiguous NCHW: the reference every fast path is measured against."""
    return TileInferer(model_factory(), InferenceConfig(channels_last=False, batch_size=4, window=256)).infer(he_crop)


def test_real_model_maps_are_well_formed(reference, he_crop):
    h, w = he_crop.shape[:2]
    assert reference.np_prob.shape == (h, w) and reference.hv.shape == (2, h, w)
    assert reference.tp_prob.shape == (5, h, w)
    assert np.isfinite(reference.hv).all()
    assert reference.np_prob.min() >= 0 and reference.np_prob.max() <= 1
    np.testing.assert_allclose(reference.tp_prob.sum(axis=0), 1, atol=1e-5)


@pytest.mark.parametrize("batch", [1, 3])
def test_batch_size_does_not_change_results(model_factory, he_crop, reference, batch):
    config = InferenceConfig(channels_last=False, batch_size=batch, window=256)
    maps = TileInferer(model_factory(), config).infer(he_crop)
    assert not TOLERANCE_FP32.violations(compare_maps(reference, maps))


def test_channels_last_matches_fp32_eager(model_factory, he_crop, reference):
    maps = TileInferer(model_factory(), InferenceConfig(channels_last=True, window=256)).infer(he_crop)
    diff = compare_maps(reference, maps)
    assert not TOLERANCE_FP32.violations(diff), diff
    print("channels_last vs fp32 eager:", {k: round(v, 7) for k, v in diff.items()})


def test_bf16_matches_fp32_eager_within_documented_tolerance(model_factory, he_crop, reference):
    inferer = TileInferer(model_factory(), InferenceConfig(bf16=True, window=256))
    assert inferer.uses_bf16
    maps = inferer.infer(he_crop)
    diff = compare_maps(reference, maps)
    assert not TOLERANCE_BF16.violations(diff), diff
    # bf16 really ran: fp32 rounding alone stays far below this.
    assert diff["hv_max_abs"] > 1e-2, diff
    print("bf16 vs fp32 eager:", {k: round(v, 5) for k, v in diff.items()})


@pytest.mark.slow
@pytest.mark.parametrize("bf16", [False, True])
def test_compile_matches_fp32_eager(model_factory, he_crop, reference, bf16):
    t0 = time.perf_counter()
    # batch 3 over 4 patches: the padded short final batch must not leak into the maps.
    config = InferenceConfig(compile=True, batch_size=3, bf16=bf16, window=256)
    maps = TileInferer(model_factory(), config).infer(he_crop)
    diff = compare_maps(reference, maps)
    tolerance = TOLERANCE_BF16 if bf16 else TOLERANCE_FP32
    assert not tolerance.violations(diff), (diff, time.perf_counter() - t0)


# ----------------------------------------------------------------------------- windows
@pytest.mark.parametrize("window", [256, 512, 768, 1024])
def test_window_plans_cover_each_pixel_once_on_the_stride_grid(window):
    inferer = TileInferer(ProbeNet(), InferenceConfig(window=window)) if window == 256 else None
    from wsi_pipeline.engine.model import ChannelSpec, HoVerNet

    model = HoVerNet(mode="fast", num_types=None, spec=ChannelSpec.scaled(0.125, "fast"))
    inferer = TileInferer(model, InferenceConfig(window=window))
    for length in [47, 164, 165, 500, 676, 677, 1312, 1648, 2000, 3001]:
        plan = inferer.plan(length)
        assert plan.coverage >= length and plan.output <= window - 92
        assert inferer.output_for(plan.output + 92) == plan.output  # a size the network takes
        if plan.count > 1:
            assert plan.step % 8 == 0 and plan.trim >= 8  # every window on the same stride phase
        covered = np.zeros(length, int)
        for start, first, end in plan.spans():
            assert start % 8 == 0 and start <= first < end
            covered[first:end] += 1
        assert (covered == 1).all(), (length, plan)


def test_a_window_that_does_not_fit_is_refused_naming_the_valid_ones(model_factory):
    with pytest.raises(ConfigError, match=r"window 250 px does not fit.*inputs of 120, 128, 136.*--window 248"):
        TileInferer(model_factory(), InferenceConfig(window=250))


def test_windows_do_not_change_interior_predictions(he_tile):
    """The shipped default, on a real H&E tile: 256 px patches, 512 and 768 px windows and
    one whole-tile window give the same maps away from the image border (the module doc's
    measurement: only the stride phase and a window's outer 8 px matter, both handled)."""
    from wsi_pipeline.engine.weights import load_model

    image = he_tile[:600, :560]
    maps = {
        w: TileInferer(load_model("hovernet-fast-w025-imp90"), InferenceConfig(window=w, batch_size=4)).infer(image)
        for w in (256, 512, 768, 744)
    }
    inner = (slice(60, -60), slice(60, -60))
    ref = maps[256]
    for window, other in maps.items():
        a, b = ref.np_prob[inner], other.np_prob[inner]
        assert float(np.abs(a - b).mean()) < 1e-4 and float(np.abs(a - b).max()) < 2e-2, window
        assert float(np.abs(ref.hv[(slice(None), *inner)] - other.hv[(slice(None), *inner)]).mean()) < 1e-3, window
        assert ((a > 0.5) != (b > 0.5)).mean() < 1e-4, window


def test_the_report_says_when_bf16_auto_ran_in_f32():
    from wsi_pipeline.engine.infer import bf16_native_note

    note = bf16_native_note("auto", "cpu", {"openvino f32": 3}, native=False)
    assert "no native bf16" in note and "3 tile(s) ran in f32" in note
    assert "emulated" in bf16_native_note(True, "cpu", {"torch bf16": 1}, native=False)
    assert bf16_native_note("auto", "cpu", {"openvino bf16": 2}, native=True) == ""
    assert bf16_native_note(False, "cpu", {"torch f32": 2}, native=False) == ""
    # On this machine, the real probe: a native CPU needs no note.
    assert (bf16_native_note("auto", "cpu", {"openvino f32": 1}) == "") == bf16_supported("cpu")


def test_windows_on_glass_are_not_computed_and_read_as_background():
    """Only windows within ``reach`` of tissue run; every pixel near tissue is computed
    exactly as without the mask, the rest reads as background (what glass gives)."""
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (600, 700, 3), dtype=np.uint8)
    tissue = np.zeros(image.shape[:2], bool)
    tissue[20:60, 30:80] = True
    reach = 24
    probe = ProbeNet()
    inferer = TileInferer(probe, InferenceConfig(batch_size=2, channels_last=False))
    full = inferer.infer(image)
    probe.seen.clear()
    maps = inferer.infer(image, tissue, reach)

    total = inferer.plan(600).count * inferer.plan(700).count
    assert maps.windows_total == total and 0 < maps.windows_run < total and full.windows_run == total
    assert sum(probe.seen) == maps.windows_run  # the others never reached the network
    computed = np.zeros(image.shape[:2], bool)
    for (_, ya, yb), (_, xa, xb) in inferer.windows(image, tissue, reach)[0]:
        computed[ya:yb, xa:xb] = True
    near = np.zeros_like(tissue)
    near[max(20 - reach, 0) : 60 + reach, max(30 - reach, 0) : 80 + reach] = True
    assert computed[near].all() and not computed.all()
    np.testing.assert_array_equal(maps.np_prob[computed], full.np_prob[computed])
    np.testing.assert_array_equal(maps.hv[:, computed], full.hv[:, computed])
    np.testing.assert_array_equal(maps.tp_prob[:, computed], full.tp_prob[:, computed])
    glass = ~computed
    assert (maps.np_prob[glass] == 0).all() and (maps.hv[:, glass] == 0).all()
    assert (maps.tp_prob[0, glass] == 1).all() and (maps.tp_prob[1:, glass] == 0).all()

    probe.seen.clear()
    none = inferer.infer(image, np.zeros_like(tissue), reach)
    assert none.windows_run == 0 and probe.seen == [] and (none.np_prob == 0).all()
    with pytest.raises(ModelError, match="tissue mask of shape"):
        inferer.infer(image, tissue[:100], reach)
