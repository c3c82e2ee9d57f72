"""`wsi-pipeline score PRED_DIR GT_DIR [--json OUT]` on files written here and on real CoNSeP labels."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from wsi_pipeline import metrics
from wsi_pipeline.cli import main

KEYS = {"dice", "aji", "aji_plus", "dq", "sq", "pq", "f1_detection", "type_accuracy", "f1_type", "mpq", "images"}


def square_map(shape=(32, 32), boxes=((2, 2, 10, 10), (16, 16, 26, 24))) -> np.ndarray:
    inst = np.zeros(shape, np.int32)
    for label, (y0, x0, y1, x1) in enumerate(boxes, start=1):
        inst[y0:y1, x0:x1] = label
    return inst


def write(folder: Path, name: str, **arrays: np.ndarray) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.npz"
    np.savez(path, **arrays)
    return path


def test_scores_folders_and_writes_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inst = square_map()
    types = np.where(inst == 1, 1, np.where(inst == 2, 2, 0))
    write(tmp_path / "gt", "a", inst_map=inst, type_map=types)
    write(tmp_path / "pred", "a", inst_map=inst, type_map=np.where(inst > 0, 1, 0))
    write(tmp_path / "gt", "b", inst_map=inst, type_map=types)
    write(tmp_path / "pred", "b", inst_map=np.where(inst == 1, 5, 0), type_map=np.where(inst == 1, 1, 0))
    write(tmp_path / "pred", "extra", inst_map=inst)  # no GT: ignored with a warning
    out = tmp_path / "report" / "scores.json"

    code = main(["score", str(tmp_path / "pred"), str(tmp_path / "gt"), "--json", str(out)])

    assert code == 0
    assert "pq" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert set(result) >= KEYS
    assert [r["name"] for r in result["images"]] == ["a", "b"]
    assert result["images"][0]["pq"] == pytest.approx(1.0)
    assert result["images"][1]["dq"] == pytest.approx(2 / 3)
    assert set(result["f1_type"]) == {"1", "2"}
    expected = metrics.score_images(
        [
            ("a", inst, types, inst, np.where(inst > 0, 1, 0)),
            ("b", inst, types, np.where(inst == 1, 5, 0), np.where(inst == 1, 1, 0)),
        ]
    )
    assert result == json.loads(json.dumps(expected))


def test_real_consep_labels_against_themselves_and_a_degraded_copy(consep_train: Path, tmp_path: Path) -> None:
    names = ["train_1_000", "train_14_005"]
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    gt.mkdir()
    for name in names:
        shutil.copy(consep_train / "labels" / f"{name}.npz", gt / f"{name}.npz")
    with np.load(gt / f"{names[0]}.npz") as data:
        inst, types = data["inst_map"], data["type_map"]
    write(pred, names[0], inst_map=inst, type_map=types)
    dropped = np.where(inst == inst.max(), 0, inst)  # one nucleus missed
    with np.load(gt / f"{names[1]}.npz") as data:
        write(pred, names[1], inst_map=data["inst_map"], type_map=data["type_map"])
    out = tmp_path / "s.json"
    assert main(["score", str(pred), str(gt), "--json", str(out)]) == 0
    perfect = json.loads(out.read_text())
    assert perfect["pq"] == pytest.approx(1.0) and perfect["mpq"] == pytest.approx(1.0)
    assert perfect["type_accuracy"] == pytest.approx(1.0)

    write(pred, names[0], inst_map=dropped, type_map=types)
    assert main(["score", str(pred), str(gt), "--json", str(out)]) == 0
    worse = json.loads(out.read_text())
    row = next(r for r in worse["images"] if r["name"] == names[0])
    n = row["n_true"]
    assert row["n_pred"] == n - 1 and row["dq"] == pytest.approx((n - 1) / (n - 0.5))
    assert worse["detection"]["fn"] == 1


def expect_error(capsys: pytest.CaptureFixture[str], argv: list[str], *fragments: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    for fragment in fragments:
        assert fragment in err


def test_missing_inst_map_names_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write(tmp_path / "gt", "a", inst_map=square_map())
    bad = write(tmp_path / "pred", "a", labels=square_map())
    expect_error(capsys, ["score", str(tmp_path / "pred"), str(tmp_path / "gt")], str(bad), "inst_map")


def test_size_mismatch_names_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write(tmp_path / "gt", "a", inst_map=square_map())
    bad = write(tmp_path / "pred", "a", inst_map=square_map(shape=(32, 33)))
    expect_error(capsys, ["score", str(tmp_path / "pred"), str(tmp_path / "gt")], str(bad), "32x33", "32x32")


def test_ground_truth_without_prediction_names_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write(tmp_path / "gt", "a", inst_map=square_map())
    lonely = write(tmp_path / "gt", "b", inst_map=square_map())
    write(tmp_path / "pred", "a", inst_map=square_map())
    expect_error(
        capsys, ["score", str(tmp_path / "pred"), str(tmp_path / "gt")], str(lonely), "without a matching prediction"
    )


def test_unreadable_and_non_integer_maps_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write(tmp_path / "gt", "a", inst_map=square_map())
    (tmp_path / "pred").mkdir()
    broken = tmp_path / "pred" / "a.npz"
    broken.write_bytes(b"not a zip file")
    expect_error(capsys, ["score", str(tmp_path / "pred"), str(tmp_path / "gt")], str(broken), ".npz")
    write(tmp_path / "pred", "a", inst_map=square_map() + 0.5)
    expect_error(capsys, ["score", str(tmp_path / "pred"), str(tmp_path / "gt")], str(broken), "non-integer")


def test_missing_folders_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "gt").mkdir()
    expect_error(capsys, ["score", str(tmp_path / "nope"), str(tmp_path / "gt")], "nope", "folder")
    (tmp_path / "pred").mkdir()
    expect_error(capsys, ["score", str(tmp_path / "pred"), str(tmp_path / "gt")], "no .npz")
