"""Finding slides in folders: extensions, MIRAX data folders, hidden files, order, names."""

from __future__ import annotations

from pathlib import Path

import pytest

from wsi_pipeline.errors import SlideError
from wsi_pipeline.slide import assign_names, find_slides, slide_stem


def _touch(root: Path, *names: str) -> None:
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")


def test_folder_scan(tmp_path: Path) -> None:
    _touch(
        tmp_path,
        "b.svs",
        "a.ndpi",
        "sub/c.tiff",
        "sub/d.ome.tif",
        "case.mrxs",
        "case/Slidedat.ini",
        "case/Data0001.dat",
        "case/embedded.tif",  # inside a MIRAX data folder: not a slide of its own
        "other/Slidedat.ini",
        "other/x.tif",
        "._b.svs",  # macOS resource fork
        ".hidden/e.svs",
        "notes.txt",
        "thumb.png",
    )
    found = find_slides([tmp_path])
    assert [p.relative_to(tmp_path).as_posix() for p in found] == [
        "a.ndpi",
        "b.svs",
        "case.mrxs",
        "sub/c.tiff",
        "sub/d.ome.tif",
    ]
    with_images = find_slides([tmp_path], include_images=True)
    assert tmp_path / "thumb.png" in with_images


def test_inputs_keep_their_order_and_are_deduplicated(tmp_path: Path) -> None:
    _touch(tmp_path, "z.svs", "d/a.svs", "d/b.svs")
    found = find_slides([tmp_path / "z.svs", tmp_path / "d", tmp_path / "d" / "a.svs"])
    assert [p.name for p in found] == ["z.svs", "a.svs", "b.svs"]


def test_explicit_plain_image_is_accepted(tmp_path: Path) -> None:
    _touch(tmp_path, "crop.jpg")
    assert find_slides([tmp_path / "crop.jpg"]) == [tmp_path / "crop.jpg"]


def test_errors(tmp_path: Path) -> None:
    _touch(tmp_path, "empty/readme.txt", "slide.czi")
    with pytest.raises(SlideError, match="contains no slide files"):
        find_slides([tmp_path / "empty"])
    with pytest.raises(SlideError, match="does not exist"):
        find_slides([tmp_path / "missing"])
    with pytest.raises(SlideError, match="unsupported extension"):
        find_slides([tmp_path / "slide.czi"])


def test_assign_names_are_unique_and_independent_of_order() -> None:
    paths = [Path("a/x.svs"), Path("b/x.svs"), Path("c/X.tif"), Path("y.ome.tiff")]
    names = assign_names(paths)
    assert len({n.lower() for n in names.values()}) == 4
    assert names[Path("y.ome.tiff")] == "y"
    assert all(names[p].startswith(p.name.split(".")[0] + "-") for p in paths[:3])
    assert assign_names(list(reversed(paths))) == names
    # a folder already holding a slide's results keeps its name; a taken stem gets a tag
    owners = {"x": str(Path("b/x.svs").resolve()), "y": ""}
    again = assign_names(paths, owners)
    assert again[Path("b/x.svs")] == "x" and again[Path("y.ome.tiff")].startswith("y-")
    # the folder's own spelling is kept (a rerun of CMU-1.svs finds CMU-1/, not cmu-1/)
    cmu = Path("CMU-1.svs")
    assert assign_names([cmu], {"CMU-1": str(cmu.resolve())}) == {cmu: "CMU-1"}
    assert assign_names([Path("CMU-1.svs")], {"cmu-1": ""})[Path("CMU-1.svs")].startswith("CMU-1-")
    assert slide_stem("dir/s.ome.tif") == "s" and slide_stem("s.svs") == "s"
