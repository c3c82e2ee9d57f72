"""``wsi-pipeline score PRED_DIR GT_DIR [--json OUT]``: HoVer-Net metrics of saved predictions.

Each folder holds ``NAME.npz`` files with ``inst_map`` (0 = background) and
optionally ``type_map``; every ground-truth file needs a prediction of the
same name. The metric logic lives in :func:`wsi_pipeline.metrics.score_images`;
this module only reads files and reports problems by file name.
"""

from __future__ import annotations

import argparse
import logging
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from wsi_pipeline.atomic import write_json_atomic
from wsi_pipeline.errors import DataError

if TYPE_CHECKING:
    from wsi_pipeline.metrics import ScoreItem

log = logging.getLogger(__name__)

NPZ_FIX = "save each image as NAME.npz with numpy.savez(path, inst_map=..., type_map=...) (type_map optional)"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "score",
        help="score predicted instance/type maps against ground truth (Dice, AJI, PQ, F1, mPQ)",
        description="Compare PRED_DIR/NAME.npz with GT_DIR/NAME.npz for every ground-truth file: "
        "Dice, AJI, AJI+, DQ/SQ/PQ per image then averaged; detection F1, type accuracy and per-type "
        "F1 pooled over images (centroids paired within 12 px); mPQ when both sides have type_map.",
    )
    parser.add_argument(
        "pred_dir", type=Path, metavar="PRED_DIR", help="folder of predicted NAME.npz (inst_map, optional type_map)"
    )
    parser.add_argument(
        "gt_dir", type=Path, metavar="GT_DIR", help="folder of ground-truth NAME.npz (inst_map, optional type_map)"
    )
    parser.add_argument("--json", type=Path, default=None, metavar="OUT", help="write all figures as JSON here")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    pairs = match_files(args.pred_dir, args.gt_dir)
    from wsi_pipeline.metrics import score_images  # scipy-heavy: every CLI start would pay for it

    result = score_images(iter_items(pairs))
    print(format_summary(result))
    if args.json is not None:
        write_json(args.json, result)
    return 0


def match_files(pred_dir: Path, gt_dir: Path) -> list[tuple[str, Path, Path]]:
    """(name, prediction, ground truth) for every GT file; all missing predictions fail at once."""
    for label, folder in (("prediction", pred_dir), ("ground-truth", gt_dir)):
        if not folder.is_dir():
            raise DataError(folder, f"{label} folder does not exist or is not a folder", NPZ_FIX)
    gt_files = sorted(gt_dir.glob("*.npz"))
    if not gt_files:
        raise DataError(gt_dir, "holds no .npz ground-truth files", NPZ_FIX)
    missing = [g for g in gt_files if not (pred_dir / g.name).is_file()]
    if missing:
        shown = ", ".join(g.name for g in missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise DataError(
            missing[0],
            f"ground truth without a matching prediction in {pred_dir} ({len(missing)} file(s): {shown})",
            "predict every ground-truth image, or score against a ground-truth folder holding only the ones you have",
        )
    extra = sorted({p.name for p in pred_dir.glob("*.npz")} - {g.name for g in gt_files})
    if extra:
        log.warning("%d prediction(s) without ground truth ignored (e.g. %s)", len(extra), extra[0])
    return [(g.stem, pred_dir / g.name, g) for g in gt_files]


def iter_items(pairs: list[tuple[str, Path, Path]]) -> Iterator[ScoreItem]:
    """Load one image pair at a time, so memory stays that of one image."""
    for name, pred_path, gt_path in pairs:
        true_inst, true_type = load_maps(gt_path)
        pred_inst, pred_type = load_maps(pred_path)
        if true_inst.shape != pred_inst.shape:
            raise DataError(
                pred_path,
                f"prediction is {pred_inst.shape[0]}x{pred_inst.shape[1]} but its ground truth {gt_path} is "
                f"{true_inst.shape[0]}x{true_inst.shape[1]}",
                "predict at the ground truth's resolution and extent",
            )
        yield name, true_inst, true_type, pred_inst, pred_type


def load_maps(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """``inst_map`` (and ``type_map`` when present) from one .npz, checked."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise DataError(path, f"cannot be read as a .npz file ({exc})", NPZ_FIX) from exc
    if "inst_map" not in arrays:
        found = ", ".join(sorted(arrays)) or "nothing"
        raise DataError(path, f"has no 'inst_map' array (found: {found})", NPZ_FIX)
    inst = _label_array(path, "inst_map", arrays["inst_map"])
    type_map = arrays.get("type_map")
    if type_map is not None:
        type_map = _label_array(path, "type_map", type_map)
        if type_map.shape != inst.shape:
            raise DataError(path, f"type_map is {type_map.shape} but inst_map is {inst.shape}", NPZ_FIX)
    return inst, type_map


def _label_array(path: Path, key: str, arr: np.ndarray) -> np.ndarray:
    """A 2-D array of non-negative integers (integral floats accepted, as MATLAB exports them)."""
    if arr.ndim != 2:
        raise DataError(path, f"{key} must be 2-D (H, W), got shape {arr.shape}", NPZ_FIX)
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or not np.array_equal(arr, np.round(arr)):
            raise DataError(path, f"{key} holds non-integer values", NPZ_FIX)
    elif arr.dtype.kind not in "iub":
        raise DataError(path, f"{key} has dtype {arr.dtype}, expected integers", NPZ_FIX)
    arr = arr.astype(np.int64)
    if arr.size and arr.min() < 0:
        raise DataError(path, f"{key} holds negative values (0 is background, labels are > 0)", NPZ_FIX)
    return arr


def format_summary(result: dict[str, Any]) -> str:
    """A few aligned lines for the terminal; the JSON holds everything."""

    def fmt(v: Any) -> str:
        return "n/a" if v is None else f"{v:.4f}"

    keys = ("dice", "aji", "aji_plus", "dq", "sq", "pq", "f1_detection", "type_accuracy", "mpq")
    lines = [f"images: {result['n_images']}"]
    lines += [f"{k:>14}: {fmt(result[k])}" for k in keys]
    if result.get("f1_type"):
        lines.append("       f1_type: " + ", ".join(f"{k}={fmt(v)}" for k, v in result["f1_type"].items()))
    return "\n".join(lines)


def write_json(path: Path, result: dict[str, Any]) -> None:
    """Write through a temporary name then rename, so a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        write_json_atomic(path, result)
    except OSError as exc:
        raise DataError(path, f"cannot write the JSON report ({exc})", "choose a writable location") from exc
    print(f"wrote {path}", file=sys.stderr)
