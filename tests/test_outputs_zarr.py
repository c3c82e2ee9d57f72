"""The OME-Zarr writer: a real CoNSeP mosaic written tile by tile, read back by zarr,
ome-zarr-py and ome-zarr-models (NGFF 0.5).

The driver below does what the stitcher promises the store: every core is written once
with only the nuclei it owns (centroid inside), and the parts of those nuclei that spill
into neighbouring cores arrive later through ``merge``. Done right, the label image is
the mosaic's ground truth, pixel for pixel.
"""

from __future__ import annotations

import json
import random
import uuid
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import zarr
from _helpers import ArrayLabels
from skimage.segmentation import relabel_sequential

from wsi_pipeline.classes import CONSEP_CLASSES
from wsi_pipeline.engine.postproc import describe_nuclei
from wsi_pipeline.errors import DataError
from wsi_pipeline.nuclei import Nucleus
from wsi_pipeline.outputs.geojson import GeoJSONWriter
from wsi_pipeline.outputs.zarr_store import CLASS_LABELS, LABELS, TABLE, UNTYPED_VALUE, NucleiZarr, pyramid_levels

MPP = 0.25
SCALE = 0.25 / 0.2456  # level-0 px per inference px
CROPS = (("train_8_000", "train_23_008"), ("train_10_008", "train_18_000"))
CORE = 128
CHUNK = 64  # a divisor of the core: every core write is chunk-aligned
SHAPE = (576, 640)  # the mosaic (512 x 512) plus empty slide around it


@pytest.fixture(scope="module")
def mosaic(consep_train: Path) -> tuple[np.ndarray, list[Nucleus]]:
    """Instance labels of a 2 x 2 mosaic of CoNSeP crops (ids 1..N) and its nuclei."""
    rows_inst, rows_type = [], []
    for row in CROPS:
        pairs = [np.load(consep_train / "labels" / f"{name}.npz") for name in row]
        rows_inst.append(np.hstack([p["inst_map"].astype(np.int64) for p in pairs]))
        rows_type.append(np.hstack([p["type_map"].astype(np.int64) for p in pairs]))
    inst_crops = np.vstack(rows_inst)
    # Ids of different crops must differ: offset each crop's labels before relabelling.
    offsets = np.zeros_like(inst_crops)
    for k, (r, c) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        offsets[r * 256 : (r + 1) * 256, c * 256 : (c + 1) * 256] = k * 100_000
    inst = relabel_sequential(np.where(inst_crops > 0, inst_crops + offsets, 0))[0].astype(np.int32)
    types = np.vstack(rows_type)
    tp = np.stack([types == c for c in range(len(CONSEP_CLASSES) + 1)]).astype(np.float32)
    nuclei = []
    for n in describe_nuclei(inst, (inst > 0).astype(np.float32), tp):
        placed = n.placed(0, 0, SCALE, SCALE, MPP, label=n.label)
        nuclei.append(replace(placed, uuid=str(uuid.uuid5(uuid.NAMESPACE_URL, f"mosaic:{n.label}"))))
    full = np.zeros(SHAPE, dtype=np.int32)
    full[:512, :512] = inst
    return full, nuclei


def write_like_the_stitcher(path: Path, labels: np.ndarray, nuclei: list[Nucleus], **kwargs) -> NucleiZarr:
    """Cores in a shuffled order with owned nuclei only, then the spill via merge()."""
    store = NucleiZarr(path, labels.shape, CHUNK, CONSEP_CLASSES, MPP, **kwargs)
    centroid_px = {n.label: (n.centroid[0] / SCALE, n.centroid[1] / SCALE) for n in nuclei}
    cores = [(v0, u0) for v0 in range(0, labels.shape[0], CORE) for u0 in range(0, labels.shape[1], CORE)]
    rng = random.Random(5)
    rng.shuffle(cores)
    spill = []
    for v0, u0 in cores:
        core = labels[v0 : v0 + CORE, u0 : u0 + CORE]
        owned = [i for i, (x, y) in centroid_px.items() if u0 <= x < u0 + CORE and v0 <= y < v0 + CORE]
        store.write_core(u0, v0, np.where(np.isin(core, owned), core, 0))
        for i in owned:
            ys, xs = np.nonzero(labels == i)
            y0, x0 = ys.min(), xs.min()
            patch = np.where(labels[y0 : ys.max() + 1, x0 : xs.max() + 1] == i, i, 0).astype(np.int32)
            spill.append((int(x0), int(y0), patch))
    rng.shuffle(spill)
    for u0, v0, patch in spill:
        store.merge(u0, v0, patch)
    for n in nuclei:
        store.add(n)
    return store


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory, mosaic) -> tuple[Path, NucleiZarr]:
    labels, nuclei = mosaic
    path = tmp_path_factory.mktemp("zarr") / "slide.zarr"
    store = write_like_the_stitcher(path, labels, nuclei, table_chunk=100)
    store.close()
    return path, store


def test_labels_table_and_pyramid_read_back(written, mosaic) -> None:
    path, store = written
    labels, nuclei = mosaic
    root = zarr.open_group(path, mode="r")
    levels = pyramid_levels(SHAPE, CHUNK)
    assert levels == store.levels == 5  # 640 -> 320 -> 160 -> 80 -> 40 <= 64
    types = np.zeros(len(nuclei) + 1, dtype=np.int64)
    types[[n.label for n in nuclei]] = [n.type for n in nuclei]
    for level in range(levels):
        instance = root[f"labels/{LABELS}/{level}"]
        assert instance.dtype == np.int32
        expected = labels[:: 2**level, :: 2**level]
        assert np.array_equal(instance[:], expected)  # nearest: values kept, never averaged
        classes = root[f"labels/{CLASS_LABELS}/{level}"][:]
        assert np.array_equal(classes, np.where(expected > 0, types[expected], 0))
    table = root[TABLE]
    ids = table["label_id"][:]
    assert table.attrs["count"] == len(nuclei)
    assert np.array_equal(np.sort(ids), np.arange(1, len(nuclei) + 1))
    assert set(np.unique(labels)) - {0} == set(ids.tolist())
    by_id = {n.label: n for n in nuclei}
    assert np.array_equal(table["type"][:], [by_id[i].type for i in ids])
    assert np.allclose(table["centroid"][:], [by_id[i].centroid for i in ids])
    assert np.allclose(table["bbox"][:], [by_id[i].bbox for i in ids])
    assert np.allclose(table["area"][:], [by_id[i].area_um2 for i in ids], rtol=1e-6)
    assert np.allclose(table["type_prob"][:], [by_id[i].type_prob for i in ids], rtol=1e-6)
    assert table["centroid"].shape == (len(nuclei), 2) and table["bbox"].shape == (len(nuclei), 4)


def test_label_ids_table_ids_and_features_agree(written, mosaic, tmp_path: Path) -> None:
    path, _ = written
    _, nuclei = mosaic
    writer = GeoJSONWriter(tmp_path / "slide.geojson.gz", CONSEP_CLASSES, MPP)
    for n in nuclei:
        writer.add(n)
    features = writer.close()
    root = zarr.open_group(path, mode="r")
    label_ids = set(np.unique(root[f"labels/{LABELS}/0"][:]).tolist()) - {0}
    table_ids = set(root[f"{TABLE}/label_id"][:].tolist())
    assert label_ids == table_ids and len(table_ids) == features == len(nuclei)


def test_empty_chunks_are_never_stored(written) -> None:
    """Only chunks with labels exist on disk: background costs nothing."""
    path, _ = written
    stored = {
        p.relative_to(path / "labels" / LABELS / "0" / "c") for p in (path / "labels" / LABELS / "0").rglob("c/*/*")
    }
    rows, cols = {int(p.parts[0]) for p in stored}, {int(p.parts[1]) for p in stored}
    assert stored and max(rows) < 512 // CHUNK and max(cols) < 512 // CHUNK


def test_ome_zarr_py_reads_both_label_images(written, mosaic) -> None:
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    path, store = written
    labels, _ = mosaic
    nodes = {node.metadata.get("name"): node for node in Reader(parse_url(str(path / "labels")))()}
    assert {LABELS, CLASS_LABELS} <= set(nodes)
    instance = nodes[LABELS]
    assert len(instance.data) == store.levels
    assert np.array_equal(np.asarray(instance.data[0]), labels)
    assert np.array_equal(np.asarray(instance.data[2]), labels[::4, ::4])
    scales = [t[0]["scale"] for t in instance.metadata["coordinateTransformations"]]
    assert scales == [[MPP * 2**k, MPP * 2**k] for k in range(store.levels)]
    assert [a["name"] for a in instance.metadata["axes"]] == ["y", "x"]
    colors = nodes[CLASS_LABELS].metadata["color"]
    for cls in CONSEP_CLASSES:
        assert colors[cls["id"]] == pytest.approx([v / 255 for v in (*cls["color"], 255)])
    assert colors[0][3] == 0  # background transparent
    assert nodes[CLASS_LABELS].metadata["properties"][3]["class"] == "epithelial"


def test_metadata_is_valid_ngff_0_5(written) -> None:
    """ome-zarr-models' NGFF 0.5 validation, plus the spec's rules it does not check."""
    from ome_zarr_models.v05.labels import Labels

    path, store = written
    root = zarr.open_group(path, mode="r")
    Labels.from_zarr(root["labels"])  # raises on invalid metadata
    assert root.attrs["ome"]["version"] == "0.5"
    meta = json.loads((path / "labels" / "zarr.json").read_text())
    assert meta["attributes"]["ome"] == {"version": "0.5", "labels": [LABELS, CLASS_LABELS]}
    for name in (LABELS, CLASS_LABELS):
        ome = json.loads((path / "labels" / name / "zarr.json").read_text())["attributes"]["ome"]
        assert ome["version"] == "0.5"
        (multiscale,) = ome["multiscales"]
        axes = [a["name"] for a in multiscale["axes"]]
        assert all(a["type"] == "space" and a["unit"] == "micrometer" for a in multiscale["axes"])
        sizes = []
        for dataset in multiscale["datasets"]:
            array = root[f"labels/{name}/{dataset['path']}"]
            assert list(array.metadata.dimension_names) == axes
            assert np.issubdtype(array.dtype, np.integer)
            (scale,) = [t for t in dataset["coordinateTransformations"] if t["type"] == "scale"]
            assert len(scale["scale"]) == len(axes)
            sizes.append(array.shape[0] * array.shape[1])
        assert sizes == sorted(sizes, reverse=True)  # largest first
        image_label = ome["image-label"]
        values = [c["label-value"] for c in image_label["colors"]]
        assert len(values) == len(set(values)) and all(isinstance(v, int) for v in values)
        assert all(len(c["rgba"]) == 4 and all(0 <= v <= 255 for v in c["rgba"]) for c in image_label["colors"])
        if "properties" in image_label:
            assert sorted(p["label-value"] for p in image_label["properties"]) == sorted(values)
    class_values = [
        c["label-value"]
        for c in json.loads((path / "labels" / CLASS_LABELS / "zarr.json").read_text())["attributes"]["ome"][
            "image-label"
        ]["colors"]
    ]
    assert class_values == [0, 1, 2, 3, 4, UNTYPED_VALUE]


def test_merge_fills_background_only_and_write_core_overwrites(tmp_path: Path) -> None:
    store = NucleiZarr(tmp_path / "m.zarr", (100, 130), 32, CONSEP_CLASSES, MPP)
    core = np.zeros((32, 32), dtype=np.int32)
    core[4:10, 4:10] = 1
    store.write_core(32, 0, core)
    patch = np.full((10, 10), 2, dtype=np.int32)
    patch[0, 0] = 0
    store.merge(30, 2, patch)  # overlaps nucleus 1 and crosses into the never-written core at x < 32
    level0 = zarr.open_group(tmp_path / "m.zarr", mode="r")[f"labels/{LABELS}/0"]
    region = level0[0:14, 28:44]
    assert np.all(region[4:10, 8:14] == 1)  # nucleus 1 kept where the spill overlapped it
    assert region[2, 2] == 0  # the patch's own background stays background
    expected = np.zeros((100, 130), dtype=np.int32)
    expected[4:10, 36:42] = 1
    sub = expected[2:12, 30:40]
    sub[(patch > 0) & (sub == 0)] = 2
    assert np.array_equal(level0[:], expected)
    # A core write replaces its whole region, zeros included.
    store.write_core(32, 0, np.zeros((32, 32), dtype=np.int32))
    expected[0:32, 32:64] = 0
    assert np.array_equal(level0[:], expected)
    # Patches are clipped at the slide's edge.
    store.merge(125, 95, np.full((10, 10), 3, dtype=np.int32))
    assert np.all(level0[95:100, 125:130] == 3)
    store.close()
    level1 = zarr.open_group(tmp_path / "m.zarr", mode="r")[f"labels/{LABELS}/1"][:]
    assert np.array_equal(level1, level0[:][::2, ::2])  # the merged-only chunks are in the pyramid too


def test_table_rows_reach_the_disk_in_chunks(tmp_path: Path, mosaic) -> None:
    _, nuclei = mosaic
    store = NucleiZarr(tmp_path / "t.zarr", SHAPE, CHUNK, CONSEP_CLASSES, MPP, table_chunk=16)
    for n in nuclei[:40]:
        store.add(n)
    ids = zarr.open_group(tmp_path / "t.zarr", mode="r")[f"{TABLE}/label_id"]
    assert ids.shape == (32,) and ids.chunks == (16,)  # two full buffers flushed, 8 rows pending
    store.close()
    assert zarr.open_group(tmp_path / "t.zarr", mode="r")[f"{TABLE}/label_id"].shape == (40,)


def test_untyped_nuclei_get_their_own_class_value(tmp_path: Path, mosaic) -> None:
    _, nuclei = mosaic
    store = NucleiZarr(tmp_path / "u.zarr", (40, 40), 16, CONSEP_CLASSES, MPP)
    labels = np.zeros((40, 40), dtype=np.int32)
    labels[5:9, 5:9], labels[20:25, 20:25] = 1, 2
    labels[30:33, 30:33] = 7  # a label without a table row: no class to show
    store.write_core(0, 0, labels)
    first, second = nuclei[0], nuclei[1]
    store.add(Nucleus(**{**first.__dict__, "label": 1, "type": 0}))
    store.add(Nucleus(**{**second.__dict__, "label": 2, "type": 3}))
    store.close()
    classes = zarr.open_group(tmp_path / "u.zarr", mode="r")[f"labels/{CLASS_LABELS}/0"][:]
    assert classes[6, 6] == UNTYPED_VALUE and classes[22, 22] == 3 and classes[0, 0] == classes[31, 31] == 0


def test_existing_output_is_not_overwritten(tmp_path: Path) -> None:
    (tmp_path / "x.zarr").mkdir()
    with pytest.raises(DataError, match="already exists"):
        NucleiZarr(tmp_path / "x.zarr", (10, 10), 8, CONSEP_CLASSES, MPP)


def test_a_slide_without_nuclei_closes_cleanly(tmp_path: Path) -> None:
    store = NucleiZarr(tmp_path / "e.zarr", (300, 200), 64, CONSEP_CLASSES, MPP)
    store.close()
    root = zarr.open_group(tmp_path / "e.zarr", mode="r")
    assert root[f"{TABLE}/label_id"].shape == (0,)
    assert not root[f"labels/{LABELS}/2"][:].any()


def test_the_real_stitcher_feeds_both_outputs(tmp_path: Path) -> None:
    """End to end below the scheduler: a pyramidal TIFF of a synthetic crowded field of
    typed nuclei (no data download needed), tiles run by the worker with ground-truth maps
    (a real alternative engine), results stitched in a shuffled order into the Zarr store
    and the GeoJSON: label ids = table ids = Features."""
    from wsi_pipeline.data.gt_maps import GroundTruthMaps
    from wsi_pipeline.metrics import pq
    from wsi_pipeline.slide._image import ArraySlide
    from wsi_pipeline.slide.base import SlideSpec
    from wsi_pipeline.slide.pyramid import write_pyramid
    from wsi_pipeline.slide.synthetic import synthetic_nuclei
    from wsi_pipeline.stitch import Stitcher
    from wsi_pipeline.tiling import tile_grid
    from wsi_pipeline.worker import TileTask, process_tile

    image, labels, types = synthetic_nuclei(
        512, 512, MPP, seed=3, num_types=len(CONSEP_CLASSES), spacing_um=5.5, radius_um=(2.0, 3.5)
    )
    slide = tmp_path / "mosaic.tif"
    write_pyramid(ArraySlide(image, mpp=MPP), slide)
    tiles = tile_grid(512, 512, MPP, MPP, CORE, 96)
    engine = GroundTruthMaps(labels, types, num_types=len(CONSEP_CLASSES) + 1)
    results = [process_tile(TileTask(SlideSpec(str(slide)), t, "", MPP), engine) for t in tiles]
    random.Random(3).shuffle(results)

    store = NucleiZarr(tmp_path / "mosaic.zarr", (512, 512), CHUNK, CONSEP_CLASSES, MPP)
    geojson = GeoJSONWriter(tmp_path / "mosaic.geojson.gz", CONSEP_CLASSES, MPP)
    stitcher = Stitcher(tiles, store, [geojson, store], "mosaic", "checksum")
    for result in results:
        stitcher.add(result)
    stats = stitcher.finish()
    features = geojson.close()
    store.close()

    root = zarr.open_group(tmp_path / "mosaic.zarr", mode="r")
    written = root[f"labels/{LABELS}/0"][:]
    label_ids = set(np.unique(written).tolist()) - {0}
    table_ids = root[f"{TABLE}/label_id"][:]
    assert label_ids == set(table_ids.tolist()) == set(range(1, stats.nuclei + 1))
    assert len(table_ids) == features == stats.nuclei > 400
    # Pixel for pixel what the LabelSink contract defines (write_core overwrites, merge
    # fills background), replayed on a numpy array from a second stitcher.
    reference = ArrayLabels((512, 512))
    replay = Stitcher(tiles, reference, [], "mosaic", "checksum")
    for result in results:
        replay.add(result)
    replay.finish()
    assert np.array_equal(written, reference.array)
    # and the nuclei are the annotated ones (HoVer post-processing of ground-truth maps)
    assert pq(labels, written)[2] > 0.85
    # Each nucleus' class in the class image is its table type.
    lookup = np.zeros(stats.nuclei + 1, dtype=np.int64)
    lookup[table_ids] = root[f"{TABLE}/type"][:]
    classes = root[f"labels/{CLASS_LABELS}/0"][:]
    assert np.array_equal(classes[written > 0], np.where(lookup == 0, UNTYPED_VALUE, lookup)[written[written > 0]])
