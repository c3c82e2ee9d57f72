"""Run a model over labelled images and score it with the project's metrics.

One function serves the `evaluate` command, the per-epoch dev metrics of
training and the pruning study, so every number the project reports comes from
the same inference, post-processing and metric code.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from wsi_pipeline.data import Sample
from wsi_pipeline.engine.infer import InferenceConfig, TileInferer
from wsi_pipeline.engine.postproc import DEFAULT_MAP_MPP, PostprocConfig, PostprocResult, postprocess
from wsi_pipeline.engine.weights import model_postproc
from wsi_pipeline.metrics import score_images


def type_map_from(result: PostprocResult, shape: tuple[int, int]) -> np.ndarray:
    """Paint each predicted nucleus with its voted type (0 stays background)."""
    lut = np.zeros(len(result.nuclei) + 1, dtype=np.int32)
    for nucleus in result.nuclei:
        lut[nucleus.label] = nucleus.type
    inst = result.inst_map
    if inst.shape != shape:
        raise ValueError(f"instance map {inst.shape} does not match image {shape}")
    return lut[inst]


def predict_samples(
    model: torch.nn.Module,
    samples: Iterable[Sample],
    infer_config: InferenceConfig | None = None,
    postproc_config: PostprocConfig | None = None,
    *,
    progress: bool = False,
    inferer: TileInferer | None = None,
) -> Iterable[tuple[Sample, np.ndarray, np.ndarray | None]]:
    """Yield (sample, predicted inst map, predicted type map or None) per image.

    Without ``postproc_config`` the model's own post-processing is used (its metadata's,
    or the defaults); the maps are at the model's µm/px. ``inferer``: an engine built
    beforehand (e.g. with a quantised runtime, ``benchmarks/int8.py``) instead of one
    from ``infer_config``.
    """
    inferer = inferer or TileInferer(model, infer_config or InferenceConfig())
    config = postproc_config or model_postproc(model)
    mpp = float((getattr(model, "meta", None) or {}).get("mpp") or DEFAULT_MAP_MPP)
    samples = list(samples)
    for sample in tqdm(samples, desc="evaluate", unit="img", disable=not progress):
        maps = inferer.infer(sample.image)
        result = postprocess(maps.np_prob, maps.hv, maps.tp_prob, config=config, mpp=mpp)
        pred_type = type_map_from(result, result.inst_map.shape) if maps.tp_prob is not None else None
        yield sample, result.inst_map, pred_type


def evaluate_samples(
    model: torch.nn.Module,
    samples: Sequence[Sample],
    infer_config: InferenceConfig | None = None,
    postproc_config: PostprocConfig | None = None,
    *,
    save_pred_dir: str | Path | None = None,
    progress: bool = False,
    inferer: TileInferer | None = None,
) -> dict[str, Any]:
    """Predict every sample, optionally save `NAME.npz` predictions, and score them.

    The returned dict has the keys of `wsi-pipeline score` plus `seconds`.
    """
    if save_pred_dir is not None:
        save_pred_dir = Path(save_pred_dir)
        save_pred_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    items = []
    for sample, pred_inst, pred_type in predict_samples(
        model, samples, infer_config, postproc_config, progress=progress, inferer=inferer
    ):
        if save_pred_dir is not None:
            arrays: dict[str, np.ndarray] = {"inst_map": pred_inst.astype(np.int32)}
            if pred_type is not None:
                arrays["type_map"] = pred_type.astype(np.uint8)
            np.savez_compressed(save_pred_dir / f"{sample.name}.npz", **arrays)
        true_type = sample.type_map if pred_type is not None else None
        items.append((sample.name, sample.inst_map, true_type, pred_inst, pred_type if true_type is not None else None))
    scores = score_images(items)
    scores["seconds"] = round(time.perf_counter() - start, 3)
    return scores
