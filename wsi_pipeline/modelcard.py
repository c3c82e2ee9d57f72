"""Model cards: what a shipped model is, how it was made, and how well it does.

A card is generated from the checkpoint's own metadata plus the evaluation JSON
files of `wsi-pipeline evaluate`, so its figures can always be reproduced by the
commands it prints, never typed in by hand.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from wsi_pipeline.engine.weights import read_metadata

_METRICS = ("dice", "aji", "aji_plus", "dq", "sq", "pq", "f1_detection", "type_accuracy", "mpq")


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _metrics_table(evals: dict[str, dict[str, Any]], classes: list[dict[str, Any]]) -> list[str]:
    names = list(evals)
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for key in (*_METRICS, "n_images"):
        lines.append(f"| {key} | " + " | ".join(_fmt(evals[n].get(key)) for n in names) + " |")
    for c in classes:
        cid = str(c["id"])
        row = [_fmt((evals[n].get("f1_type") or {}).get(cid)) for n in names]
        lines.append(f"| F1 {c['name']} | " + " | ".join(row) + " |")
    for c in classes:
        cid = str(c["id"])
        row = [_fmt((evals[n].get("pq_per_type") or {}).get(cid)) for n in names]
        lines.append(f"| PQ {c['name']} | " + " | ".join(row) + " |")
    return lines


def _trained_on(training: dict[str, Any], hw: dict[str, Any]) -> str:
    where = (
        f"one {hw['gpu']} GPU ({hw.get('cpu_count')} CPU cores for data loading)"
        if hw.get("gpu")
        else f"{hw.get('cpu_count')} CPU cores ({hw.get('processor')})"
    )
    start = "from scratch (no ImageNet weights are available here)"
    if training.get("init"):
        start = f"from {training['init']}"
    return f"- Trained {start} on {where}, torch {hw.get('torch')}; started {training.get('started')}."


def _postproc_section(meta: dict) -> list[str]:
    """The post-processing the model carries (what `run` and `evaluate` apply with it)."""
    values = meta.get("postproc")
    if not values:
        return ["", "## Post-processing", "- The HoVer-Net defaults (no calibrated values in its metadata)."]
    lines = ["", "## Post-processing (carried in the model's metadata)", "", "| parameter | value |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in values.items()]
    calibration = meta.get("postproc_calibration") or {}
    if calibration:
        lines += ["", f"Calibrated on the dev split's predicted maps by `{calibration.get('script')}` "
                  f"(from `{calibration.get('from')}`): pooled dev PQ {calibration.get('baseline_pooled_pq', 0):.4f} "
                  f"with the defaults -> {calibration.get('pooled_pq', 0):.4f}. The dev split chose these values, so "
                  "its figures below are optimistic; the independent evaluation on other splits is the check."]
    return lines


def render_card(model_path: Path, evaluations: dict[str, Path], *, extra: str = "") -> str:
    """Markdown card for ``model_path``; ``evaluations`` maps a label to an `evaluate --json` file."""
    meta = read_metadata(model_path)
    name = meta.get("name", model_path.stem)
    classes = meta.get("classes", [])
    training = meta.get("training", {})
    lineage = meta.get("lineage") or {}
    evals = {label: json.loads(Path(p).read_text()) for label, p in evaluations.items()}
    spec = meta.get("spec", {})
    lines = [
        f"# Model card: {name}",
        "",
        "**Research use only. Not for diagnosis.**",
        "",
        meta.get("description", ""),
        "",
        "## Architecture",
        f"- HoVer-Net, `{spec.get('mode', meta.get('mode', 'fast'))}` mode, official module tree "
        f"(loads with `load_model`), {meta.get('num_types', len(classes) + 1)} type channels.",
        f"- Parameters: {meta.get('params', 'n/a'):,}; MACs per {256 if spec.get('mode', 'fast') == 'fast' else 270}² "
        f"patch: {meta.get('macs', 0) / 1e9:.2f} G.",
        f"- Input resolution: {meta.get('mpp')} µm/px. Classes: "
        + ", ".join(f"{c['id']} {c['name']} {tuple(c['color'])}" for c in classes),
        f"- File: `{model_path.name}` (safetensors, metadata in its header).",
    ]
    if lineage.get("kind") == "structured":
        lines.append(
            f"- Structurally pruned from `{lineage.get('parent')}` ({lineage.get('parent_params', 0):,} parameters, "
            f"{lineage.get('parent_macs', 0) / 1e9:.2f} GMAC): {lineage.get('achieved_ratio', 0):.1%} of the "
            f"parameters removed by {lineage.get('method')} ({lineage.get('criterion')}, "
            f"{'network-wide' if lineage.get('global') else 'per-layer'} ranking, {lineage.get('schedule')}); "
            "a physically smaller dense network, every conv width in the checkpoint's channel spec."
        )
    elif training.get("config") and not training.get("init"):
        cfg = training["config"]
        lines.append(f"- Width multiplier: {cfg.get('width')} of the full 37.6 M-parameter HoVer-Net.")
    if lineage:
        lines += ["", "## Lineage", "```json", json.dumps(lineage, indent=1), "```"]
    if training:
        hw = training.get("hardware", {})
        lines += [
            "",
            "## Training",
            f"- Data: {', '.join(training.get('datasets', []))} ({training.get('train_images')} training images; "
            f"dev split: {training.get('dev_images')} images from held-out source tiles "
            f"{', '.join(training.get('dev_sources', []))}).",
            _trained_on(training, hw),
            f"- Best epoch: {training.get('best_epoch', 'n/a')}; training minutes at that point: "
            f"{training.get('train_minutes', 'n/a')}.",
            "- Options:",
            "```json",
            json.dumps(training.get("config", {}), indent=1),
            "```",
        ]
    if meta.get("distillation"):
        lines += ["", "## Distillation", "```json", json.dumps(meta["distillation"], indent=1), "```"]
    lines += _postproc_section(meta)
    if evals:
        lines += ["", "## Dev-split metrics (`wsi-pipeline evaluate`, fp32)", ""]
        lines += _metrics_table(evals, classes)
        lines += ["", "Reproduce with:", "```bash"]
        for label, ev in evals.items():
            lines.append(
                f"wsi-pipeline evaluate {ev.get('dataset')} --model {name} --dev-split configs/dev_split.yaml"
                f"  # {label}"
            )
        lines.append("```")
    lines += [
        "",
        "## Data and licences",
        "- CoNSeP (Graham et al., HoVer-Net, Medical Image Analysis 2019), released by TIA Warwick for research use.",
        "- MoNuSeg 2018 (Kumar et al., IEEE TMI 2017/2020), CC BY-NC-SA 4.0.",
        "- These weights were trained on those data and inherit their research-only, non-commercial terms.",
        "",
        "## Limitations",
        "- Trained on a few hundred 256² crops from 34 source tiles, for hours of CPU (or minutes of GPU) rather",
        "  than the GPU-days of the published HoVer-Net; expect lower accuracy than the paper and poor transfer to",
        "  other stains, scanners and organs. Not validated for any clinical purpose.",
    ]
    if extra:
        lines += ["", extra]
    return "\n".join(lines) + "\n"
