"""The OME-Zarr writer: a real CoNSeP mosaic written tile by tile, read back by zarr,
ome-zarr-py and ome-zarr-models (NGFF 0.5), in both layouts: labels only (the root is
the labels group) and with the image (the root is the image, the labels in its
``labels`` group). Either way the root is what viewers open.

The driver below does what the stitcher promises the store: every core is written once
with only the nuclei it owns (centroid inside), and the parts of those nuclei that spill
into neighbouring cores arrive later through ``merge``. Done right, the label image is
the mosaic's ground truth, pixel for pixel.
"""

from __future__ import annotations

import gzip
import json
import random
import uuid
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import zarr
from _helpers import ArrayLabels
from PIL import Image
from skimage.segmentation import relabel_sequential

from wsi_pipeline.classes import CONSEP_CLASSES
from wsi_pipeline.engine.postproc import describe_nuclei
from wsi_pipeline.errors import DataError
from wsi_pipeline.nuclei import Nucleus
from wsi_pipeline.outputs.geojson import GeoJSONWriter
from wsi_pipeline.outputs.parquet import NucleiParquet
from wsi_pipeline.outputs.zarr_store import (
    CLASS_LABELS,
    IMAGE_FILL,
    LABELS,
    UNTYPED_VALUE,
    NucleiZarr,
    label_paths,
    pyramid_levels,
)

MPP = 0.25
SCALE = 0.25 / 0.2456  # level-0 px per inference px
CROPS = (("train_8_000", "train_23_008"), ("train_10_008", "train_18_000"))
CORE = 128
CHUNK = 64  # a divisor of the core: every core write is chunk-aligned
SHAPE = (576, 640)  # the mosaic (512 x 512) plus empty slide around it


@pytest.fixture(scope="module")
def rgb(consep_train: Path) -> np.ndarray:
    """The mosaic's RGB image (512 x 512), the crops' own pixels."""
    rows = [np.hstack([np.asarray(Image.open(consep_train / "images" / f"{n}.jpg").convert("RGB")) for n in row])
            for row in CROPS]
    return np.vstack(rows)


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


def _write_mosaic(folder: Path, mosaic, rgb: np.ndarray, image: bool) -> tuple[Path, NucleiZarr]:
    """The mosaic written like the stitcher does, plus its GeoJSON."""
    labels, nuclei = mosaic
    path = folder / "slide.zarr"
    store = write_like_the_stitcher(path, labels, nuclei, image=image)
    if image:
        for v0 in range(0, 512, CORE):  # the image is read core by core, like the run does
            for u0 in range(0, 512, CORE):
                store.write_image(u0, v0, rgb[v0 : v0 + CORE, u0 : u0 + CORE])
    store.close()
    geojson = GeoJSONWriter(folder / "slide.geojson.gz", CONSEP_CLASSES, MPP, slide_mpp=(MPP / SCALE,) * 2)
    for n in nuclei:
        geojson.add(n)
    geojson.close()
    return path, store


@pytest.fixture(scope="module")
def labels_only(tmp_path_factory: pytest.TempPathFactory, mosaic, rgb) -> tuple[Path, NucleiZarr]:
    return _write_mosaic(tmp_path_factory.mktemp("zarr"), mosaic, rgb, image=False)


@pytest.fixture(scope="module")
def with_image(tmp_path_factory: pytest.TempPathFactory, mosaic, rgb) -> tuple[Path, NucleiZarr]:
    return _write_mosaic(tmp_path_factory.mktemp("zarr_image"), mosaic, rgb, image=True)


@pytest.fixture(params=["labels_only", "with_image"])
def written(request: pytest.FixtureRequest) -> tuple[Path, NucleiZarr]:
    """Both layouts: every test below holds for each."""
    return request.getfixturevalue(request.param)


def _paths(store: NucleiZarr) -> tuple[str, str]:
    return label_paths(store.has_image)


def test_labels_and_pyramid_read_back(written, mosaic) -> None:
    path, store = written
    labels, nuclei = mosaic
    instance_path, class_path = _paths(store)
    root = zarr.open_group(path, mode="r")
    levels = pyramid_levels(SHAPE, CHUNK)
    assert levels == store.levels == 5  # 640 -> 320 -> 160 -> 80 -> 40 <= 64
    assert root.attrs["wsi_pipeline"]["labels"] == instance_path
    types = np.zeros(len(nuclei) + 1, dtype=np.int64)
    types[[n.label for n in nuclei]] = [n.type for n in nuclei]
    for level in range(levels):
        instance = root[f"{instance_path}/{level}"]
        assert instance.dtype == np.int32
        expected = labels[:: 2**level, :: 2**level]
        assert np.array_equal(instance[:], expected)  # nearest: values kept, never averaged
        classes = root[f"{class_path}/{level}"][:]
        assert np.array_equal(classes, np.where(expected > 0, np.where(types == 0, UNTYPED_VALUE, types)[expected], 0))


def test_ome_zarr_py_reads_the_root_and_its_labels_are_the_geojson_ids(written, mosaic) -> None:
    """ome-zarr-py's Reader, given the store itself, finds the label images (and the
    image when there is one); the label values are the GeoJSON's label ids, as GDAL reads them."""
    import pyogrio
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    path, store = written
    labels, _ = mosaic
    nodes = {node.metadata.get("name"): node for node in Reader(parse_url(str(path)))() if node.data}
    assert {LABELS, CLASS_LABELS} <= set(nodes)
    if store.has_image:
        assert "image" in nodes and len(nodes["image"].data) == store.levels
    instance = nodes[LABELS]
    assert len(instance.data) == store.levels
    assert np.array_equal(np.asarray(instance.data[0]), labels)
    assert np.array_equal(np.asarray(instance.data[2]), labels[::4, ::4])
    scales = [t[0]["scale"] for t in instance.metadata["coordinateTransformations"]]
    assert scales == [[MPP * 2**k, MPP * 2**k] for k in range(store.levels)]
    assert [a["name"] for a in instance.metadata["axes"]] == ["y", "x"]
    _, _, _, fields = pyogrio.raw.read(f"/vsigzip/{path.parent / 'slide.geojson.gz'}", columns=["label_id"])
    values = np.unique(np.asarray(instance.data[0]))
    assert values[values > 0].tolist() == sorted(fields[0].tolist())
    colors = nodes[CLASS_LABELS].metadata["color"]
    for cls in CONSEP_CLASSES:
        assert colors[cls["id"]] == pytest.approx([v / 255 for v in (*cls["color"], 255)])
    assert colors[0][3] == 0  # background transparent
    assert nodes[CLASS_LABELS].metadata["properties"][3]["class"] == "epithelial"


def test_ome_zarr_models_validates_the_root(written) -> None:
    """ome-zarr-models accepts the store as a whole (an Image with labels, or a Labels
    group), plus the spec's rules it does not check."""
    from ome_zarr_models.v05.image import Image as NgffImage
    from ome_zarr_models.v05.labels import Labels

    path, store = written
    root = zarr.open_group(path, mode="r")
    if store.has_image:
        model = NgffImage.from_zarr(root)  # raises on invalid metadata, labels group included
        label_group = root["labels"]
        image_levels = len(model.ome_attributes.multiscales[0].datasets)
    else:
        Labels.from_zarr(root)
        label_group = root
        image_levels = None
    assert label_group.attrs["ome"] == {"version": "0.5", "labels": [LABELS, CLASS_LABELS]}
    for name in (LABELS, CLASS_LABELS):
        ome = json.loads((Path(label_group.store.root) / label_group.path / name / "zarr.json").read_text())
        ome = ome["attributes"]["ome"]
        assert ome["version"] == "0.5"
        (multiscale,) = ome["multiscales"]
        axes = [a["name"] for a in multiscale["axes"]]
        assert all(a["type"] == "space" and a["unit"] == "micrometer" for a in multiscale["axes"])
        sizes = []
        for dataset in multiscale["datasets"]:
            array = label_group[f"{name}/{dataset['path']}"]
            assert list(array.metadata.dimension_names) == axes
            assert np.issubdtype(array.dtype, np.integer)
            (scale,) = [t for t in dataset["coordinateTransformations"] if t["type"] == "scale"]
            assert len(scale["scale"]) == len(axes)
            sizes.append(array.shape[0] * array.shape[1])
        assert sizes == sorted(sizes, reverse=True)  # largest first
        if image_levels is not None:  # NGFF: the labels of an image have as many levels as it
            assert len(multiscale["datasets"]) == image_levels
            assert ome["image-label"]["source"] == {"image": "../../"}
        image_label = ome["image-label"]
        assert image_label["version"] == "0.5"
        values = [c["label-value"] for c in image_label.get("colors", [])]
        assert len(values) == len(set(values)) and all(isinstance(v, int) for v in values)
        assert all(len(c["rgba"]) == 4 and all(0 <= v <= 255 for v in c["rgba"]) for c in image_label.get("colors", []))
        if "properties" in image_label:
            assert sorted(p["label-value"] for p in image_label["properties"]) == sorted(values)


def test_every_label_is_visible_in_napari(written) -> None:
    """napari draws a label value transparent when ``colors`` exists and omits it. So the
    instance image lists no colours (napari cycles its own), and the class image lists
    one, opaque, for every value it holds."""
    path, store = written
    instance_path, class_path = _paths(store)
    root = zarr.open_group(path, mode="r")
    instance_meta = root[instance_path].attrs["ome"]["image-label"]
    assert "colors" not in instance_meta
    class_meta = root[class_path].attrs["ome"]["image-label"]
    rgba = {c["label-value"]: c["rgba"] for c in class_meta["colors"]}
    present = set(np.unique(root[f"{class_path}/0"][:]).tolist())
    assert present - {0} and present <= set(rgba)
    assert all(rgba[v][3] == 255 for v in present - {0}) and rgba[0][3] == 0
    assert sorted(rgba) == [0, 1, 2, 3, 4, UNTYPED_VALUE]


def test_the_image_sits_beside_the_labels_at_the_same_resolution(with_image, rgb) -> None:
    """With the image: RGB (c, y, x) levels of 2 x 2 means whose translations put each
    pixel's centre where its 4 parents' centres average; white where nothing was read."""
    path, store = with_image
    root = zarr.open_group(path, mode="r")
    level0 = root["0"]
    assert level0.shape == (3, *SHAPE) and level0.dtype == np.uint8
    assert list(level0.metadata.dimension_names) == ["c", "y", "x"]
    assert np.array_equal(np.moveaxis(level0[:, :512, :512], 0, 2), rgb)
    assert (level0[:, 512:, :] == IMAGE_FILL).all()  # never read: the white fill, no chunks stored
    expected = rgb.reshape(256, 2, 256, 2, 3).astype(np.float64).mean(axis=(1, 3))
    assert np.abs(np.moveaxis(root["1"][:, :256, :256], 0, 2) - expected).max() <= 0.5 + 1e-9
    datasets = root.attrs["ome"]["multiscales"][0]["datasets"]
    assert len(datasets) == store.levels == len(root[f"labels/{LABELS}"].attrs["ome"]["multiscales"][0]["datasets"])
    for level, dataset in enumerate(datasets):
        scale, *shift = dataset["coordinateTransformations"]
        assert scale["scale"] == [1.0, MPP * 2**level, MPP * 2**level]
        offset = (2**level - 1) / 2 * MPP
        assert (shift[0]["translation"] if shift else [0.0, 0.0, 0.0]) == [0.0, offset, offset]
    channels = root.attrs["ome"]["omero"]["channels"]
    assert [c["color"] for c in channels] == ["FF0000", "00FF00", "0000FF"]


def test_empty_chunks_are_never_stored(written) -> None:
    """Only chunks with labels exist on disk: background costs nothing."""
    path, store = written
    level0 = path / _paths(store)[0] / "0"
    stored = {p.relative_to(level0 / "c") for p in level0.rglob("c/*/*")}
    rows, cols = {int(p.parts[0]) for p in stored}, {int(p.parts[1]) for p in stored}
    assert stored and max(rows) < 512 // CHUNK and max(cols) < 512 // CHUNK


def test_merge_fills_background_only_and_write_core_overwrites(tmp_path: Path) -> None:
    store = NucleiZarr(tmp_path / "m.zarr", (100, 130), 32, CONSEP_CLASSES, MPP)
    core = np.zeros((32, 32), dtype=np.int32)
    core[4:10, 4:10] = 1
    store.write_core(32, 0, core)
    patch = np.full((10, 10), 2, dtype=np.int32)
    patch[0, 0] = 0
    store.merge(30, 2, patch)  # overlaps nucleus 1 and crosses into the never-written core at x < 32
    level0 = zarr.open_group(tmp_path / "m.zarr", mode="r")[f"{LABELS}/0"]
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
    level1 = zarr.open_group(tmp_path / "m.zarr", mode="r")[f"{LABELS}/1"][:]
    assert np.array_equal(level1, level0[:][::2, ::2])  # the merged-only chunks are in the pyramid too


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
    classes = zarr.open_group(tmp_path / "u.zarr", mode="r")[f"{CLASS_LABELS}/0"][:]
    assert classes[6, 6] == UNTYPED_VALUE and classes[22, 22] == 3 and classes[0, 0] == classes[31, 31] == 0


def test_existing_output_is_not_overwritten(tmp_path: Path) -> None:
    (tmp_path / "x.zarr").mkdir()
    with pytest.raises(DataError, match="already exists"):
        NucleiZarr(tmp_path / "x.zarr", (10, 10), 8, CONSEP_CLASSES, MPP)


@pytest.mark.parametrize("image", [False, True])
def test_a_slide_without_nuclei_closes_cleanly(tmp_path: Path, image: bool) -> None:
    store = NucleiZarr(tmp_path / "e.zarr", (300, 200), 64, CONSEP_CLASSES, MPP, image=image)
    store.close()  # validated by ome-zarr-models on close
    root = zarr.open_group(tmp_path / "e.zarr", mode="r")
    assert store.count == 0
    assert not root[f"{label_paths(image)[0]}/2"][:].any()
    if image:
        assert (root["2"][:] == IMAGE_FILL).all()


def test_the_real_stitcher_feeds_both_outputs(tmp_path: Path) -> None:
    """End to end below the scheduler: a pyramidal TIFF of a synthetic crowded field of
    typed nuclei (no data download needed), tiles run by the worker with ground-truth maps
    (a real alternative engine), results stitched in a shuffled order into the Zarr store,
    the GeoParquet table and the GeoJSON: label ids = table ids = Features."""
    import geopandas

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
    geojson = GeoJSONWriter(tmp_path / "mosaic.geojson.gz", CONSEP_CLASSES, MPP, slide_mpp=(MPP, MPP))
    table = NucleiParquet(tmp_path / "mosaic.nuclei.parquet", CONSEP_CLASSES, MPP, (MPP, MPP), batch=100)
    stitcher = Stitcher(tiles, store, [geojson, table, store], "mosaic", "checksum")
    for result in results:
        stitcher.add(result)
    stats = stitcher.finish()
    features = geojson.close()
    table.close()
    store.close()

    root = zarr.open_group(tmp_path / "mosaic.zarr", mode="r")
    written = root[f"{LABELS}/0"][:]
    label_ids = set(np.unique(written).tolist()) - {0}
    rows = geopandas.read_parquet(tmp_path / "mosaic.nuclei.parquet")
    table_ids = rows["label_id"].to_numpy()
    assert label_ids == set(table_ids.tolist()) == set(range(1, stats.nuclei + 1))
    assert len(table_ids) == features == stats.nuclei > 400
    with gzip.open(tmp_path / "mosaic.geojson.gz", "rt", encoding="utf-8") as f:
        assert [feature["id"] for feature in json.load(f)["features"]] == rows["id"].tolist()
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
    lookup[table_ids] = rows["class_id"].to_numpy()
    classes = root[f"{CLASS_LABELS}/0"][:]
    assert np.array_equal(classes[written > 0], np.where(lookup == 0, UNTYPED_VALUE, lookup)[written[written > 0]])
