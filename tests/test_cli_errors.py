"""User mistakes at the command line: one clear line, exit code 2, never a traceback."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest
from _helpers import one_line_error, tiny_labelled_folder

from wsi_pipeline.cli import build_parser, main

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("damage", ["garbage", "code"])
def test_train_resume_from_a_bad_checkpoint(damage: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import os

    import torch

    data = tiny_labelled_folder(tmp_path / "data")
    workdir = tmp_path / "work"
    workdir.mkdir()
    if damage == "garbage":
        (workdir / "last.pt").write_bytes(b"\x00not a checkpoint" * 100)
    else:
        class Payload:
            def __reduce__(self):
                return (os.system, ("echo this must never run",))

        torch.save({"model": Payload()}, workdir / "last.pt")
    argv = ["train", str(data), "--out", str(tmp_path / "m.safetensors"), "--workdir", str(workdir), "--resume",
            "--epochs", "1", "--width", "0.0625", "--batch-size", "2", "--threads", "1", "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and str(workdir / "last.pt") in err and "Fix:" in err
    if damage == "code":
        assert "refusing to unpickle" in err and "system" in err
    else:
        assert "not a PyTorch checkpoint" in err and "delete" in err
    assert not (tmp_path / "m.safetensors").exists()


def test_output_into_a_closed_pipe_is_not_an_error(tmp_path: Path) -> None:
    """`wsi-pipeline inspect SLIDE | head -1`: head closes the pipe early."""
    slide = REPO / "sample_slides" / "CMU-1-Small-Region.svs"
    script = (f"{sys.executable} -m wsi_pipeline inspect {slide} | head -c 1 >/dev/null; "
              "echo exit=${PIPESTATUS[0]}")
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=120)
    assert "BrokenPipeError" not in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert "exit=0" in result.stdout


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_option_of_every_command_has_help_text() -> None:
    missing = []
    for name, sub in _subparsers(build_parser()).items():
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            if not action.help:
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
    assert missing == []


def test_run_accepts_every_slide_backend() -> None:
    from wsi_pipeline.slide.opener import BACKENDS

    run = _subparsers(build_parser())["run"]
    backend = next(a for a in run._actions if "--backend" in a.option_strings)
    assert set(backend.choices) == set(BACKENDS)


def test_a_window_the_network_does_not_take_stops_the_run_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    slide = Path(__file__).resolve().parents[1] / "sample_slides" / "CMU-1-Small-Region-pyramid.tif"
    out = tmp_path / "out"
    assert main(["run", str(slide), "--out", str(out), "--window", "250", "--no-progress"]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert "window 250 px does not fit" in line and "--window 248" in line
    assert not out.exists()  # refused while planning: no out folder, no cluster
