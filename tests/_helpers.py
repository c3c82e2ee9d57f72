"""Test doubles shared by several test modules (importable because pytest puts tests/ on sys.path)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np


class ArrayLabels:
    """The ``LabelSink`` protocol on a numpy array, implementing its two documented rules:
    ``write_core`` overwrites, ``merge`` fills only empty pixels.

    Tests compare real sinks (the Zarr store) against it and feed it to the stitcher
    where a plain in-memory label image is all they need.
    """

    def __init__(self, shape: tuple[int, int]) -> None:
        self.array = np.zeros(shape, dtype=np.int32)

    def write_core(self, u0: int, v0: int, labels: np.ndarray) -> None:
        self.array[v0 : v0 + labels.shape[0], u0 : u0 + labels.shape[1]] = labels

    def merge(self, u0: int, v0: int, labels: np.ndarray) -> None:
        region = self.array[v0 : v0 + labels.shape[0], u0 : u0 + labels.shape[1]]
        fill = (labels > 0) & (region == 0)
        region[fill] = labels[fill]


def plumbing_model(path: Path, slide: Path) -> Path:
    """A tiny random HoVer-Net whose NP bias is set so that about half the pixels of
    ``slide`` read as nucleus: random weights alone often find no nucleus or only one
    blob, and the pipeline tests need nuclei to count, not good ones."""
    import torch

    from wsi_pipeline.classes import CONSEP_CLASSES
    from wsi_pipeline.engine.model import ChannelSpec, HoVerNet
    from wsi_pipeline.engine.weights import save_model
    from wsi_pipeline.slide import open_slide

    torch.manual_seed(1)
    model = HoVerNet("fast", 5, ChannelSpec.scaled(0.0625, "fast", round_to=4)).eval()
    with open_slide(slide) as s:
        patch = torch.from_numpy(s.read_region_at(0, 0, 256, 256, 0.25)).permute(2, 0, 1)[None].float()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            logits = model(patch)["np"][0]
            model.decoder.np.u0.conv.bias[1] -= (logits[1] - logits[0]).median()
    finally:
        torch.set_num_threads(threads)
    return save_model(model, path, meta={"name": "plumbing", "classes": CONSEP_CLASSES, "mpp": 0.25})


def tiny_labelled_folder(root: Path) -> Path:
    """Two 256 px images with a few disc-shaped nuclei, in the images/ + labels/ layout."""
    import cv2

    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for name in ("a_1", "b_1"):
        image = np.full((256, 256, 3), 230, np.uint8)
        inst = np.zeros((256, 256), np.int32)
        for label in range(1, 6):
            y, x = rng.integers(20, 236, 2)
            cv2.circle(inst, (int(x), int(y)), 7, label, -1)
        image[inst > 0] = (90, 40, 140)
        cv2.imwrite(str(root / "images" / f"{name}.png"), image[..., ::-1])
        np.savez(root / "labels" / f"{name}.npz", inst_map=inst, type_map=(inst > 0).astype(np.uint8) * 2)
    return root


def one_line_error(stderr: str) -> str:
    """The user-facing error of a CLI run: exactly one 'error:' line and no traceback."""
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    return errors[0]


def content(folder: Path, name: str) -> dict[str, object]:
    """A slide's results without timings: GeoJSON features and the Zarr label images."""
    import zarr

    with gzip.open(folder / f"{name}.geojson.gz", "rt", encoding="utf-8") as f:
        features = json.load(f)["features"]
    store = zarr.open_group(folder / f"{name}.zarr", mode="r")
    return {
        "features": features,
        "labels": np.asarray(store["nuclei/0"][:]),
        "classes": np.asarray(store["nuclei_class/0"][:]),
    }


def assert_same_results(a: Path, b: Path, name: str) -> None:
    """Two runs' results of slide ``name`` (in folders ``a`` and ``b``) are identical."""
    left, right = content(a, name), content(b, name)
    if left["features"] != right["features"]:
        pairs = list(zip(left["features"], right["features"], strict=False))
        differing = [(i, x, y) for i, (x, y) in enumerate(pairs) if x != y]
        detail = ""
        if differing:
            i, x, y = differing[0]
            keys = [k for k in x if x.get(k) != y.get(k)]
            detail = f"; first at feature {i}, keys {keys}: {str(x)[:400]} != {str(y)[:400]}"
        raise AssertionError(
            f"{name}: {len(left['features'])} vs {len(right['features'])} features, {len(differing)} differ{detail}"
        )
    np.testing.assert_array_equal(left["labels"], right["labels"])
    np.testing.assert_array_equal(left["classes"], right["classes"])
