"""HoVer-Net's input/output geometry as plain arithmetic, without torch.

What a window may be and what it predicts depends only on the mode (the decoder's kernel
size and the stem's padding), not on the weights. Keeping it here, free of torch, lets a
process that runs a converted model (OpenVINO) or only plans a run size its windows and
margins without importing torch, which costs seconds at every start.
"""

from __future__ import annotations

from dataclasses import dataclass

from wsi_pipeline.errors import ModelError

__all__ = ["MODES", "ModeInfo", "NetGeometry", "output_side", "output_size_for"]


@dataclass(frozen=True)
class ModeInfo:
    """What distinguishes the two official modes."""

    ksize: int
    stem_padding: int
    input_size: int
    output_size: int


MODES: dict[str, ModeInfo] = {
    "fast": ModeInfo(ksize=3, stem_padding=3, input_size=256, output_size=164),
    "original": ModeInfo(ksize=5, stem_padding=0, input_size=270, output_size=80),
}


def output_side(mode: str, input_size: int) -> int | None:
    """Output side for an input side, or None where the input does not fit the network.

    After the 7x7 stem the side must divide by 8 so that the upsampled decoder
    features line up with the encoder's; each valid decoder conv then trims a
    constant border, so the output is the input minus a fixed margin.
    """
    info = MODES[mode]
    side = input_size + 2 * info.stem_padding - 6
    shrink = info.ksize - 1
    u3 = side // 4 - 9 * shrink  # conva + 8 dense units, each a valid conv
    u2 = 2 * u3 - 5 * shrink  # conva + 4 dense units
    if side <= 0 or side % 8 or u2 < 1:
        return None
    return 2 * u2


def output_size_for(mode: str, input_size: int) -> int:
    """Output side for an input side, or a :class:`ModelError` naming the sides that fit."""
    out = output_side(mode, input_size)
    if out is None:
        offset = MODES[mode].input_size % 8
        minimum = next(n for n in range(8 + offset, 4096, 8) if output_side(mode, n))
        raise ModelError(
            None,
            f"input size {input_size} does not fit HoVer-Net {mode} mode",
            f"use a size >= {minimum} with (size - {offset}) divisible by 8 (default {MODES[mode].input_size})",
        )
    return out


@dataclass(frozen=True)
class NetGeometry:
    """The sizes a HoVer-Net of ``mode`` takes and gives, and its type count: what the
    engine's window planning and the tile margin need of a model (a loaded ``HoVerNet``
    has the same attributes)."""

    mode: str
    num_types: int | None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ModelError(None, f"unknown HoVer-Net mode {self.mode!r}", f"use one of {sorted(MODES)}")

    @property
    def input_size(self) -> int:
        return MODES[self.mode].input_size

    @property
    def output_size(self) -> int:
        return MODES[self.mode].output_size

    def output_size_for(self, input_size: int) -> int:
        """Output side for an input side (see :func:`output_size_for`)."""
        return output_size_for(self.mode, input_size)
