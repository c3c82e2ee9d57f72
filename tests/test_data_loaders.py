"""Dataset loaders on files made in tmp_path: every format, auto-detection and bad input."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from wsi_pipeline.data import CONSEP_CLASSES, PANNUKE_CLASSES, LazySamples, detect_format, load_dataset, split_dev
from wsi_pipeline.data.monuseg_xml import rasterise, read_polygons
from wsi_pipeline.errors import ConfigError, DataError


def write_png(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)


def labelled(size: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
    inst = np.zeros((size, size), np.int32)
    inst[2:8, 2:8] = 1
    inst[10:20, 12:18] = 2
    types = np.zeros((size, size), np.uint8)
    types[inst == 1] = 1
    types[inst == 2] = 4
    return image, inst, types


def make_folder(root: Path, names: list[str], with_types: bool = True, suffix: str = ".png") -> Path:
    for k, name in enumerate(names):
        image, inst, types = labelled(seed=k)
        write_png(root / "images" / f"{name}{suffix}", image)
        (root / "labels").mkdir(parents=True, exist_ok=True)
        arrays = {"inst_map": inst.astype(np.uint16)}
        if with_types:
            arrays["type_map"] = types
        np.savez(root / "labels" / f"{name}.npz", **arrays)
    return root


# ---- folder format ---------------------------------------------------------------------


def test_folder_loads_pairs_with_consep_classes(tmp_path):
    root = make_folder(tmp_path / "ds", ["train_3_000", "train_3_001", "train_4_000"])
    ds = load_dataset(root)
    assert ds.format == "folder" and ds.has_types and ds.mpp == 0.25
    assert ds.classes == CONSEP_CLASSES and ds.num_types == 5
    assert [s.name for s in ds.samples] == ["train_3_000", "train_3_001", "train_4_000"]
    assert [s.source for s in ds.samples] == ["consep:train_3", "consep:train_3", "consep:train_4"]
    s = ds.samples[0]
    np.testing.assert_array_equal(s.image, labelled(seed=0)[0])  # PNG is lossless
    assert s.image.dtype == np.uint8 and s.inst_map.dtype == np.int32 and s.type_map.dtype == np.uint8
    assert set(np.unique(s.inst_map)) == {0, 1, 2} and ds.empty == []


def test_folder_without_types_and_with_dataset_json(tmp_path):
    root = make_folder(tmp_path / "plain", ["a", "b"], with_types=False)
    ds = load_dataset(root)
    assert not ds.has_types and ds.classes == [] and ds.num_types == 0
    assert all(s.type_map is None for s in ds.samples)

    root = make_folder(tmp_path / "named", ["a"])
    classes = [{"id": i, "name": f"c{i}", "color": [i, 2 * i, 3 * i]} for i in range(1, 7)]
    (root / "dataset.json").write_text(json.dumps({"classes": classes, "mpp": 0.5}))
    ds = load_dataset(root)
    assert [c["name"] for c in ds.classes] == [f"c{i}" for i in range(1, 7)] and ds.mpp == 0.5
    assert ds.classes[1]["color"] == (2, 4, 6)


def test_folder_counts_empty_label_maps(tmp_path, caplog):
    root = make_folder(tmp_path / "ds", ["a", "b"])
    np.savez(root / "labels" / "b.npz", inst_map=np.zeros((32, 32), np.int32), type_map=np.zeros((32, 32), np.uint8))
    with caplog.at_level(logging.WARNING):
        ds = load_dataset(root)
    assert len(ds) == 2 and ds.empty == ["b"]
    assert "1 sample(s) have empty label maps" in caplog.text and "b" in caplog.text


def test_images_without_labels_fail_or_are_skipped_by_name(tmp_path, caplog):
    root = make_folder(tmp_path / "ds", ["a", "b", "c"])
    (root / "labels" / "b.npz").unlink()
    (root / "labels" / "c.npz").unlink()
    with pytest.raises(DataError, match=r"2 images without a label: b, c"):
        load_dataset(root)
    with caplog.at_level(logging.WARNING):
        ds = load_dataset(root, allow_unpaired=True)
    assert [s.name for s in ds.samples] == ["a"]
    assert "skipping 2 images without a label: b, c" in caplog.text


def test_no_usable_pairs_is_an_error_naming_the_layout(tmp_path):
    root = make_folder(tmp_path / "ds", ["a"])
    (root / "labels" / "a.npz").rename(root / "labels" / "other.npz")
    with pytest.raises(DataError, match=r"no image has a label: expected images/NAME"):
        load_dataset(root, allow_unpaired=True)


def test_label_of_another_size_is_refused(tmp_path):
    root = make_folder(tmp_path / "ds", ["a"])
    np.savez(root / "labels" / "a.npz", inst_map=np.zeros((30, 32), np.int32))
    with pytest.raises(DataError, match=r"a\.npz: inst_map is 32x30 but its image is 32x32"):
        load_dataset(root)


def test_unreadable_image_and_label_are_refused(tmp_path):
    root = make_folder(tmp_path / "ds", ["a"])
    (root / "images" / "a.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"a\.png: cannot be read as an image"):
        load_dataset(root)
    root = make_folder(tmp_path / "ds2", ["a"])
    (root / "labels" / "a.npz").write_bytes(b"junk")
    with pytest.raises(DataError, match=r"a\.npz: cannot be read as \.npz"):
        load_dataset(root)
    root = make_folder(tmp_path / "ds3", ["a"])
    np.savez(root / "labels" / "a.npz", labels=np.zeros((32, 32), np.int32))
    with pytest.raises(DataError, match=r"has no 'inst_map' array \(found \['labels'\]\)"):
        load_dataset(root)


def test_mixed_type_maps_and_bad_values_are_refused(tmp_path):
    root = make_folder(tmp_path / "ds", ["a", "b"])
    np.savez(root / "labels" / "b.npz", inst_map=labelled()[1])
    with pytest.raises(DataError, match="1 do not"):
        load_dataset(root)
    root = make_folder(tmp_path / "neg", ["a"])
    np.savez(root / "labels" / "a.npz", inst_map=-np.ones((32, 32), np.int32))
    with pytest.raises(DataError, match="negative"):
        load_dataset(root)


def test_wrong_layout_and_unknown_format(tmp_path):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=r"not a dataset folder of a known layout \(found notes\.txt\).*images/"):
        load_dataset(tmp_path / "junk")
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(tmp_path / "missing")
    with pytest.raises(DataError, match="expected subfolders images/ and labels/"):
        load_dataset(tmp_path / "junk", fmt="folder")
    with pytest.raises(ConfigError, match="unknown dataset format 'zip'"):
        load_dataset(tmp_path / "junk", fmt="zip")


# ---- CoNSeP .mat ------------------------------------------------------------------------


def make_consep(root: Path, raw_types: bool = True, type_map: bool = True) -> Path:
    for k, name in enumerate(["train_1", "train_2"]):
        image, inst, _ = labelled(seed=k)
        rgba = np.dstack([image, np.full(image.shape[:2], 255, np.uint8)])  # the release's PNGs are RGBA
        write_png(root / "Images" / f"{name}.png", rgba)
        inst_type = np.array([[2], [7 if raw_types else 4]], dtype=np.float64)
        lut = np.concatenate([[0], inst_type[:, 0]])
        content = {
            "inst_map": inst.astype(np.float64),
            "inst_type": inst_type,
            "inst_centroid": np.array([[4.5, 4.5], [14.5, 14.5]]),
        }
        if type_map:
            content["type_map"] = lut[inst].astype(np.float64)
        (root / "Labels").mkdir(parents=True, exist_ok=True)
        scipy.io.savemat(root / "Labels" / f"{name}.mat", content)
    return root


def test_consep_mat_merges_the_7_release_classes(tmp_path):
    root = make_consep(tmp_path / "Train")
    assert detect_format(root) == "consep_mat"
    ds = load_dataset(root)
    assert ds.format == "consep_mat" and ds.classes == CONSEP_CLASSES
    s = ds.samples[0]
    assert s.source == "consep:train_1" and s.image.shape == (32, 32, 3)
    assert s.type_map[inst_pixel(s.inst_map, 1)] == 2  # inflammatory stays 2
    assert s.type_map[inst_pixel(s.inst_map, 2)] == 4  # endothelial (7) -> spindle-shaped (4)


def inst_pixel(inst: np.ndarray, k: int) -> tuple[int, int]:
    r, c = np.argwhere(inst == k)[0]
    return int(r), int(c)


def test_consep_mat_rebuilds_type_map_from_inst_type(tmp_path):
    ds = load_dataset(make_consep(tmp_path / "Test", raw_types=False, type_map=False))
    s = ds.samples[1]
    assert ds.has_types and s.type_map[inst_pixel(s.inst_map, 2)] == 4 and s.type_map[0, 0] == 0


# ---- PanNuke ------------------------------------------------------------------------------


def pannuke_arrays(n: int, empty_index: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    images = np.random.default_rng(0).uniform(0, 255, (n, 24, 24, 3))  # float64, like the release
    masks = np.zeros((n, 24, 24, 6))
    for i in range(n):
        if i == empty_index:
            continue
        masks[i, 2:6, 2:6, 0] = 5  # neoplastic, id 5
        masks[i, 10:14, 10:14, 1] = 5  # inflammatory reusing id 5
        masks[i, 16:20, 2:6, 4] = 9  # epithelial
    masks[..., 5] = (masks[..., :5].sum(-1) == 0).astype(float)
    return images, masks


def test_pannuke_release_layout_is_lazy_and_split_by_fold(tmp_path, caplog):
    root = tmp_path / "pannuke"
    for fold, n in (("1", 3), ("2", 2)):
        images, masks = pannuke_arrays(n, empty_index=1 if fold == "1" else None)
        (root / f"Fold {fold}" / "images" / f"fold{fold}").mkdir(parents=True)
        (root / f"Fold {fold}" / "masks" / f"fold{fold}").mkdir(parents=True)
        np.save(root / f"Fold {fold}" / "images" / f"fold{fold}" / "images.npy", images)
        np.save(root / f"Fold {fold}" / "masks" / f"fold{fold}" / "masks.npy", masks)
    assert detect_format(root) == "pannuke"
    with caplog.at_level(logging.WARNING):
        ds = load_dataset(root)
    assert ds.format == "pannuke" and ds.classes == PANNUKE_CLASSES and ds.num_types == 6
    assert isinstance(ds.samples, LazySamples) and len(ds) == 5
    assert ds.samples.names[:2] == ["fold1_00000", "fold1_00001"] and ds.empty == ["fold1_00001"]
    assert "1 PanNuke image(s) have no nucleus" in caplog.text
    s = ds.samples[0]
    assert s.image.dtype == np.uint8 and s.image.shape == (24, 24, 3)
    assert len(np.unique(s.inst_map)) == 4  # ids renumbered across channels: 1, 2, 3 + background
    assert s.type_map[3, 3] == 1 and s.type_map[11, 11] == 2 and s.type_map[17, 3] == 5
    assert s.inst_map[3, 3] != s.inst_map[11, 11]
    train, dev = split_dev(ds.samples, {"pannuke:fold2"})
    assert isinstance(dev, LazySamples) and [x.name for x in dev] == ["fold2_00000", "fold2_00001"]
    assert len(train) == 3 and train[0].name == "fold1_00000"


def test_pannuke_flat_layout_and_mismatch(tmp_path):
    images, masks = pannuke_arrays(2)
    np.save(tmp_path / "images.npy", images)
    np.save(tmp_path / "masks.npy", masks[:1])
    with pytest.raises(DataError, match=r"do not match images"):
        load_dataset(tmp_path)
    np.save(tmp_path / "masks.npy", masks)
    ds = load_dataset(tmp_path, fmt="pannuke")
    assert len(ds) == 2 and ds.samples[1].source == ds.samples[0].source


# ---- MoNuSeg XML ---------------------------------------------------------------------------


def region_xml(rid: int, points: list[tuple[int, int]]) -> str:
    vertices = "".join(f'<Vertex X="{x}" Y="{y}"/>' for x, y in points)
    return f'<Region Id="{rid}"><Vertices>{vertices}</Vertices></Region>'


XML = (
    '<Annotations MicronsPerPixel="0.252700"><Annotation Id="1"><Regions>'
    + region_xml(1, [(2, 3), (8, 3), (8, 6), (2, 6)])
    + region_xml(2, [(5, 5), (6, 5)])
    + region_xml(3, [(7, 5), (12, 5), (12, 10), (7, 10)])
    + "</Regions></Annotation></Annotations>"
)


def test_monuseg_xml_rasterises_polygons_in_order(tmp_path, caplog):
    root = tmp_path / "monuseg"
    write_png(root / "images" / "TCGA-AA-0000-01Z-00-DX1.png", labelled(16)[0])
    (root / "annotations").mkdir()
    (root / "annotations" / "TCGA-AA-0000-01Z-00-DX1.xml").write_text(XML)
    assert detect_format(root) == "monuseg_xml"
    with caplog.at_level(logging.WARNING):
        ds = load_dataset(root)
    assert "skipped 1 region(s) with fewer than 3 vertices" in caplog.text
    inst = ds.samples[0].inst_map
    assert not ds.has_types and ds.samples[0].source == "TCGA-AA-0000-01Z-00-DX1"
    expected = np.zeros((16, 16), np.int32)
    expected[3:7, 2:9] = 1  # pixel centres inside or on the edges of x 2..8, y 3..6
    expected[5:11, 7:13] = 2  # the later region wins where they overlap
    np.testing.assert_array_equal(inst, expected)


def test_monuseg_xml_errors(tmp_path):
    bad = tmp_path / "bad.xml"
    bad.write_text("<Annotations><Region>")
    with pytest.raises(DataError, match="cannot be parsed as XML"):
        read_polygons(bad)
    assert rasterise([], (4, 4)).sum() == 0
