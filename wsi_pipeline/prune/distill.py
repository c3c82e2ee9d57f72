"""Knowledge distillation: a pruned student learns from a bigger teacher's outputs.

A pruned HoVer-Net fine-tuned on the ground truth alone recovers slowly on a small data
set; the teacher's soft NP/HV/TP maps carry more signal per image (border uncertainty,
class similarities, class targets for instance-only images). The loss is
:func:`wsi_pipeline.losses.distillation_loss`; the training loop (``fit(teacher=...)``)
mixes it with the ground-truth loss. This module checks that a teacher can teach a student
before hours are spent: same mode (so the outputs cover the same pixels), same classes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from wsi_pipeline.errors import ConfigError


def _classes(model: nn.Module) -> list[tuple[int, str]]:
    meta = getattr(model, "meta", None) or {}
    return [(int(c["id"]), str(c["name"])) for c in meta.get("classes", [])]


def check_teacher(teacher: nn.Module, student: nn.Module, teacher_path: str | Path) -> None:
    """Refuse a teacher whose outputs the student cannot be trained to match."""
    fix = "distil from a teacher trained on the same classes and in the same mode (fast/original) as the student"
    if getattr(teacher, "mode", None) != getattr(student, "mode", None):
        raise ConfigError(teacher_path, f"is a {teacher.mode}-mode HoVer-Net and the student {student.mode}-mode "
                          "(their outputs cover different pixels)", fix)
    if (teacher.input_size, teacher.output_size) != (student.input_size, student.output_size):
        raise ConfigError(teacher_path, "maps another input size to another output size than the student", fix)
    t_types, s_types = getattr(teacher, "num_types", None), getattr(student, "num_types", None)
    if t_types != s_types:
        raise ConfigError(teacher_path, f"predicts {t_types} type channels, the student {s_types}", fix)
    t_classes, s_classes = _classes(teacher), _classes(student)
    if t_classes and s_classes and t_classes != s_classes:
        raise ConfigError(teacher_path, f"has classes {t_classes}, the student {s_classes}", fix)


def teacher_record(teacher_path: str | Path, checksum: str, meta: dict[str, Any], weight: float,
                   temperature: float) -> dict[str, Any]:
    """What a distilled model's lineage says about its teacher (and a resumed run checks)."""
    return {"teacher": str(teacher_path), "teacher_name": meta.get("name"), "teacher_sha256": checksum,
            "weight": weight, "temperature": temperature}
