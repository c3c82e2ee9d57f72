"""What ships in models/: every model loads, has its card, fits the size limit; the default is pruned."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from wsi_pipeline.engine.macs import count_params
from wsi_pipeline.engine.registry import default_model_name, list_models
from wsi_pipeline.engine.weights import load_model

MODELS = Path(__file__).resolve().parents[1] / "models"


@pytest.fixture(autouse=True)
def _shipped_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WSI_PIPELINE_MODELS", raising=False)


def test_every_shipped_model_loads_runs_and_has_a_card() -> None:
    entries = list_models()
    assert entries, "models/ lists no model"
    for entry in entries:
        path = Path(entry.path)
        assert path.stat().st_size < 20e6, f"{path} is over the 20 MB limit"
        card = MODELS / f"{entry.name}.md"
        assert card.is_file(), f"{entry.name} has no model card"
        assert "not for diagnosis" in card.read_text().lower()
        model = load_model(entry.name)
        assert count_params(model) == entry.params
        with torch.no_grad():
            out = model(torch.rand(1, 3, model.input_size, model.input_size) * 255)
        assert out["np"].shape[-1] == model.output_size


def test_the_default_is_the_pruned_child_of_a_shipped_parent() -> None:
    entries = {e.name: e for e in list_models()}
    default = entries[default_model_name()]
    assert default.default
    assert default.parent in entries, "the default's parent must ship too"
    parent = entries[default.parent]
    assert default.params <= 0.3 * parent.params  # >= 70% of the parameters removed (issue 6)
    assert default.macs < parent.macs


def test_the_pruned_default_runs_the_main_job(tmp_path: Path) -> None:
    """`run` without --model uses the shipped pruned default and finds nuclei in real tissue."""
    import json

    from wsi_pipeline.cli import main
    from wsi_pipeline.slide import open_slide
    from wsi_pipeline.slide.pyramid import write_pyramid

    sample = MODELS.parent / "sample_slides" / "CMU-1-Small-Region-pyramid.tif"
    with open_slide(sample) as source:
        write_pyramid(source, tmp_path / "crop.tif", region=(1000, 1000, 492, 492))
    out = tmp_path / "out"
    argv = ["run", str(tmp_path / "crop.tif"), "--out", str(out), "--workers", "1", "--threads-per-worker", "1"]
    assert main([*argv, "--no-progress"]) == 0
    report = json.loads((out / "crop" / "report.json").read_text())
    assert report["model"]["name"] == default_model_name() == "hovernet-fast-w025-v2-imp90-edge-cal"
    assert report["model"]["params"] == 236681
    assert report["nuclei"]["total"] > 20  # a 492 px (123 µm) crop of dense tissue
