"""Bad input: each raises SlideError naming the file, the problem and the fix.

The damaged files are made here from the real slides, the way they occur in practice:
an interrupted copy, an error page saved under a slide's name, flipped bytes.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from wsi_pipeline.errors import ConfigError, SlideError
from wsi_pipeline.slide import open_slide

SAMPLES = Path(__file__).resolve().parents[1] / "sample_slides"
SVS = SAMPLES / "CMU-1-Small-Region.svs"
PYRAMID = SAMPLES / "CMU-1-Small-Region-pyramid.tif"
BACKENDS = ["auto", "openslide", "tiffslide"]


def _raises(path: Path, problem: str, fix: str, backend: str = "auto", **kwargs) -> SlideError:
    with pytest.raises(SlideError) as info, open_slide(path, backend, **kwargs) as slide:
        slide.thumbnail(1.0)
        slide.read_region_at(0, 0, slide.width, slide.height, slide.mpp_x)
    error = info.value
    assert error.path == str(path)
    assert problem in error.problem, error.problem
    assert error.fix and fix in error.fix, error.fix
    assert str(path) in str(error)
    return error


@pytest.mark.parametrize("backend", BACKENDS)
def test_missing_file(tmp_path: Path, backend: str) -> None:
    _raises(tmp_path / "nope.svs", "does not exist", "check the path", backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_directory_given_as_slide(tmp_path: Path, backend: str) -> None:
    folder = tmp_path / "slide.svs"
    folder.mkdir()
    _raises(folder, "is a folder", "give the folder to", backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_file(tmp_path: Path, backend: str) -> None:
    empty = tmp_path / "empty.svs"
    empty.touch()
    _raises(empty, "is empty (0 bytes)", "copy the slide again", backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("source", "fraction"),
    [(SVS, f) for f in (0.002, 0.5, 0.999)] + [(PYRAMID, f) for f in (0.3, 0.9, 0.9999)],
    ids=lambda value: value.suffix.lstrip(".") if isinstance(value, Path) else str(value),
)
def test_truncated_slide(tmp_path: Path, backend: str, source: Path, fraction: float) -> None:
    """An interrupted copy of the Aperio slide or of the pyramidal TIFF, cut at its start, middle or end."""
    data = source.read_bytes()
    cut = tmp_path / f"cut{source.suffix}"
    cut.write_bytes(data[: int(len(data) * fraction)])
    _raises(cut, "is truncated", "copy the slide again", backend)


@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
def test_corrupted_tile_data_fails_on_read(tmp_path: Path, backend: str) -> None:
    data = bytearray(PYRAMID.read_bytes())
    start = len(data) // 3
    for i in range(start, start + 20_000, 7):
        data[i] ^= 0xFF
    bad = tmp_path / "corrupt.tif"
    bad.write_bytes(bytes(data))
    _raises(bad, "could not be read at level", "truncated or corrupt", backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_image_with_a_slide_extension(tmp_path: Path, backend: str) -> None:
    page = tmp_path / "download.svs"
    page.write_text("<html><body>403 Forbidden</body></html>")
    _raises(page, "is not a TIFF-based image", "download or export the slide again", backend)


def test_non_image_with_a_vendor_extension_openslide_alone_reads(tmp_path: Path) -> None:
    fake = tmp_path / "slide.mrxs"
    fake.write_text("not a mirax slide")
    _raises(fake, "could not be opened as a slide", "convert it to a pyramidal TIFF")


def test_slide_without_mpp_and_no_override(monuseg_train: Path) -> None:
    tile = sorted((monuseg_train / "images").glob("*.tif"))[0]  # a real TIFF without resolution tags
    _raises(tile, "has no µm/px", "--mpp")
    with open_slide(tile, mpp=0.25) as slide:
        assert slide.mpp_x == 0.25 and slide.backend == "tiffslide"
    with open_slide(tile, require_mpp=False) as slide:
        assert not slide.has_mpp
        with pytest.raises(SlideError, match="--mpp"):
            slide.read(0, 0, 10, 10, mpp=0.5)


@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
def test_tiled_tiff_without_resolution(tmp_path: Path, backend: str) -> None:
    import numpy as np
    import tifffile

    path = tmp_path / "nores.tif"
    tifffile.imwrite(path, np.full((512, 512, 3), 200, np.uint8), tile=(256, 256), compression="jpeg")
    _raises(path, "has no µm/px", "--mpp", backend=backend)
    with open_slide(path, backend, mpp=0.5) as slide:
        assert slide.read(0, 0, 512, 512, mpp=1.0).shape == (256, 256, 3)


def test_screen_resolution_tags_do_not_count_as_mpp(tmp_path: Path) -> None:
    import numpy as np
    import tifffile

    path = tmp_path / "export.tif"
    tifffile.imwrite(path, np.zeros((64, 64, 3), np.uint8), resolution=(72, 72), resolutionunit="INCH")
    _raises(path, "has no µm/px", "--mpp", backend="tiffslide")


@pytest.mark.parametrize("name", ["slide.czi", "notes.txt", "noextension"])
def test_unsupported_extension(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(b"data")
    _raises(path, "unsupported extension", "convert other formats")


def test_bad_options_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="unknown slide backend"):
        open_slide(SVS, "bioformats")
    with pytest.raises(ConfigError, match="positive"):
        open_slide(SVS, mpp=-1.0)


def test_project_errors_survive_pickling_across_processes() -> None:
    """Dask sends a worker's exception back pickled: the message and its parts must survive."""
    import pickle

    from wsi_pipeline.errors import SlideError

    err = SlideError("/data/a.svs", "cannot be read", "pass --mpp")
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is SlideError and str(back) == str(err) and back.fix == "pass --mpp"
