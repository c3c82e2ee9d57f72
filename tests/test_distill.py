"""Knowledge distillation: the loss, the teacher checks, and training with a teacher."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _helpers import tiny_labelled_folder

from wsi_pipeline.classes import CONSEP_CLASSES, PANNUKE_CLASSES
from wsi_pipeline.cli import main
from wsi_pipeline.engine.model import ChannelSpec, HoVerNet
from wsi_pipeline.engine.weights import load_model, save_model
from wsi_pipeline.errors import ConfigError
from wsi_pipeline.losses import distillation_loss
from wsi_pipeline.prune.distill import check_teacher


def tiny(num_types: int = 5, seed: int = 0) -> HoVerNet:
    torch.manual_seed(seed)
    return HoVerNet("fast", num_types, ChannelSpec.scaled(0.0625, "fast", round_to=4)).eval()


def test_the_loss_is_zero_against_itself_and_pulls_towards_the_teacher(torch_one_thread) -> None:
    image = torch.rand(2, 3, 256, 256) * 255
    teacher, student = tiny(seed=0), tiny(seed=1)
    with torch.no_grad():
        t_out = teacher(image)
    zero, terms = distillation_loss(t_out, t_out)
    assert float(zero) < 1e-6 and set(terms) == {"kd_np", "kd_hv", "kd_tp"}
    student.train()
    loss, _ = distillation_loss(student(image), t_out)
    assert loss.item() > 0.01
    loss.backward()
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)


def test_a_teacher_of_other_classes_or_mode_is_refused(tmp_path: Path) -> None:
    student = tiny()
    student.meta = {"classes": CONSEP_CLASSES}
    other = tiny(num_types=6)
    with pytest.raises(ConfigError, match="type channels") as info:
        check_teacher(other, student, tmp_path / "pannuke.safetensors")
    assert "pannuke.safetensors" in str(info.value) and "Fix:" in str(info.value)
    renamed = tiny()
    renamed.meta = {"classes": [dict(c, name=f"x{c['id']}") for c in CONSEP_CLASSES]}
    with pytest.raises(ConfigError, match="has classes"):
        check_teacher(renamed, student, "t.safetensors")
    original = HoVerNet("original", 5, ChannelSpec.scaled(0.0625, "original", round_to=4))
    with pytest.raises(ConfigError, match="original-mode"):
        check_teacher(original, student, "t.safetensors")
    assert PANNUKE_CLASSES != CONSEP_CLASSES


def test_train_with_a_teacher_records_it_and_refuses_another_on_resume(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tiny_labelled_folder(tmp_path / "data")
    teacher = save_model(tiny(seed=3), tmp_path / "teacher.safetensors", {"name": "teacher", "classes": CONSEP_CLASSES})
    other = save_model(tiny(seed=4), tmp_path / "other.safetensors", {"name": "other", "classes": CONSEP_CLASSES})
    out = tmp_path / "student.safetensors"
    common = [str(data), "--out", str(out), "--width", "0.0625", "--batch-size", "2", "--threads", "1",
              "--no-progress", "--epochs", "1", "--dev-split", str(tmp_path / "split.yaml")]
    (tmp_path / "split.yaml").write_text("dev_sources:\n  folder:\n    - b_1\n")
    assert main(["train", *common, "--teacher", str(teacher), "--distill-weight", "0.7"]) == 0
    meta = load_model(out).meta
    assert meta["distillation"]["teacher_name"] == "teacher" and meta["distillation"]["weight"] == 0.7
    capsys.readouterr()
    # the model exists: a new run must not overwrite it, a resumed one must keep its teacher
    assert main(["train", *common, "--teacher", str(teacher)]) == 2
    assert "never overwrites a model in place" in capsys.readouterr().err
    assert main(["train", *common, "--teacher", str(other), "--resume", "--epochs", "2"]) == 2
    err = capsys.readouterr().err
    assert "was trained with teacher" in err and "Fix:" in err and "Traceback" not in err
    pannuke = save_model(tiny(num_types=6), tmp_path / "p.safetensors", {"classes": PANNUKE_CLASSES})
    assert main(["train", *common[:2], str(tmp_path / "s2.safetensors"), *common[3:], "--teacher", str(pannuke)]) == 2
    assert "type channels" in capsys.readouterr().err
