"""HoVer-Net (Graham et al., 2019) with a per-layer channel spec.

The module tree reproduces the official PyTorch release (vqdang/hover_net) name
for name and shape for shape, including its unusual module names (``conv0./``,
``conv1/bn``, ``preact_bna/bn``), so the public checkpoints and TIAToolbox's
load with ``strict=True`` and nothing has to be renamed on the way in.

Every conv's output width comes from a :class:`ChannelSpec`, so a channel-pruned
network is this same class built from a spec (which can be read back from the
pruned weights alone) rather than a separate hand-edited architecture.

Both modes of the official release are supported:

* ``fast``: 256x256 input -> 164x164 output, decoder kernels 3, padded stem;
* ``original``: 270x270 input -> 80x80 output, decoder kernels 5, valid stem.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wsi_pipeline.engine.geometry import MODES, ModeInfo, output_size_for
from wsi_pipeline.errors import ModelError

__all__ = [
    "BRANCHES",
    "DENSE_GROUPS",
    "MODES",
    "ModeInfo",
    "ChannelSpec",
    "HoVerNet",
    "load_state_dict_checked",
]

BRANCHES: tuple[str, ...] = ("tp", "np", "hv")
"""Decoder branches in the official order (``tp`` only when types are predicted)."""

DENSE_GROUPS = 4
"""Groups of the dense units' second conv: both its widths must divide by it."""


# (block name, units, stride of the first unit, bottleneck width); output = 4 x bottleneck.
_ENCODER: tuple[tuple[str, int, int, int], ...] = (
    ("d0", 3, 1, 64),
    ("d1", 4, 2, 128),
    ("d2", 6, 2, 256),
    ("d3", 3, 2, 512),
)
_EXPANSION = 4
_STEM = "conv0./"
_BOTTLENECK = "conv_bot"
# Decoder levels with a dense block: (level, units, conva width, unit conv1, unit growth, convf).
_DENSE_LEVELS: tuple[tuple[str, int, int, int, int, int], ...] = (
    ("u3", 8, 256, 128, 32, 512),
    ("u2", 4, 128, 128, 32, 256),
)
_U1_WIDTH = 64
# Which encoder output each decoder level's result is added to (hence coupled with).
_SKIP_OF_LEVEL = {"u3": "d1", "u2": "d0"}


def _encoder_names() -> list[str]:
    names = [_STEM]
    for block, units, _stride, _width in _ENCODER:
        for i in range(units):
            names += [f"{block}.units.{i}.conv1", f"{block}.units.{i}.conv2", f"{block}.units.{i}.conv3"]
        names.append(f"{block}.shortcut")
    names.append(_BOTTLENECK)
    return names


def _branch_names(branch: str) -> list[str]:
    prefix = f"decoder.{branch}"
    names = []
    for level, units, *_ in _DENSE_LEVELS:
        names.append(f"{prefix}.{level}.conva")
        for i in range(units):
            names += [f"{prefix}.{level}.dense.units.{i}.conv1", f"{prefix}.{level}.dense.units.{i}.conv2"]
        names.append(f"{prefix}.{level}.convf")
    names.append(f"{prefix}.u1.conva")
    return names


def _full_widths(branches: Iterable[str]) -> dict[str, int]:
    widths = {_STEM: 64}
    for block, units, _stride, width in _ENCODER:
        for i in range(units):
            widths[f"{block}.units.{i}.conv1"] = width
            widths[f"{block}.units.{i}.conv2"] = width
            widths[f"{block}.units.{i}.conv3"] = width * _EXPANSION
        widths[f"{block}.shortcut"] = width * _EXPANSION
    widths[_BOTTLENECK] = 1024
    for branch in branches:
        prefix = f"decoder.{branch}"
        for level, units, conva, conv1, growth, convf in _DENSE_LEVELS:
            widths[f"{prefix}.{level}.conva"] = conva
            for i in range(units):
                widths[f"{prefix}.{level}.dense.units.{i}.conv1"] = conv1
                widths[f"{prefix}.{level}.dense.units.{i}.conv2"] = growth
            widths[f"{prefix}.{level}.convf"] = convf
        widths[f"{prefix}.u1.conva"] = _U1_WIDTH
    return widths


def _first(items: list[str], n: int = 5) -> str:
    shown = ", ".join(items[:n])
    return shown + (f" ... ({len(items)} in all)" if len(items) > n else "")


class ChannelSpec:
    """The output width of every conv of a HoVer-Net, keyed by module name.

    Input widths are not stored: they follow from the structure (a residual
    unit's input is its block's width, a dense unit's input is the block input
    plus the growth of the units before it...) and are available as
    ``spec.inputs``. Each conv's width can be set on its own, which is what
    structured pruning needs (decoder branches and dense units are pruned
    independently); only widths the structure ties together must be equal:

    * every conv feeding a residual sum of block ``dK`` (its units' ``conv3``
      and ``shortcut``), plus the decoder convs added to ``dK``'s output
      (``conv_bot`` to d2, each branch's ``u3.convf`` to d1 and ``u2.convf`` to d0);
    * the grouped dense-unit ``conv2`` (groups=4): its input (``conv1``) and
      output widths divide by 4.

    The output heads (``decoder.*.u0.conv``) are not part of the spec: their
    widths are the task (2 for NP and HV, the number of types for TP).
    """

    def __init__(self, mode: str, widths: Mapping[str, int]) -> None:
        if mode not in MODES:
            raise ModelError(None, f"unknown HoVer-Net mode {mode!r}", f"use one of {sorted(MODES)}")
        self.mode = mode
        self.widths: dict[str, int] = {}
        for name, width in widths.items():
            if isinstance(width, bool) or not isinstance(width, int) or width < 1:
                raise ModelError(None, f"channel spec: width of {name!r} is {width!r}", "use an integer >= 1")
            self.widths[str(name)] = int(width)
        self.branches = tuple(b for b in BRANCHES if f"decoder.{b}.u1.conva" in self.widths)
        self._validate()
        self.inputs = self._derive_inputs()

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def full(cls, mode: str = "fast", branches: Iterable[str] = BRANCHES) -> ChannelSpec:
        """The official widths (Preact-ResNet50 encoder, 3 full decoders)."""
        return cls(mode, _full_widths(branches))

    @classmethod
    def scaled(
        cls, width: float, mode: str = "fast", round_to: int = 8, branches: Iterable[str] = BRANCHES
    ) -> ChannelSpec:
        """Every official width times ``width``, rounded to a multiple of ``round_to``.

        Grouped-conv widths round to a common multiple of ``round_to`` and the
        group count, so the spec is always valid. Coupled widths stay equal
        because they share the same official width.
        """
        if not width > 0:
            raise ModelError(None, f"width multiplier {width!r} must be > 0", "use e.g. 0.25 or 0.5")
        if round_to < 1:
            raise ModelError(None, f"round_to={round_to!r} must be >= 1", "use e.g. 8")
        grouped_q = math.lcm(round_to, DENSE_GROUPS)
        widths = {}
        for name, full in _full_widths(branches).items():
            q = grouped_q if ".dense.units." in name else round_to
            widths[name] = max(q, round(full * width / q) * q)
        return cls(mode, widths)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ChannelSpec:
        """Inverse of :meth:`to_dict` (validated)."""
        if not isinstance(data, Mapping) or "mode" not in data or not isinstance(data.get("widths"), Mapping):
            raise ModelError(
                None, "a channel spec must be a mapping with 'mode' and 'widths'", "use ChannelSpec.to_dict()"
            )
        return cls(str(data["mode"]), data["widths"])

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, Tensor]) -> ChannelSpec:
        """Read every width from the conv weight shapes.

        This is how a model pruned physically (Torch-Pruning makes its convs
        narrower in place) is described and rebuilt from its weights alone.
        The mode comes from the decoder kernel size.
        """
        branches = tuple(b for b in BRANCHES if f"decoder.{b}.u0.conv.weight" in state_dict)
        probe = "decoder.np.u3.conva.weight"
        if "np" not in branches or "hv" not in branches or probe not in state_dict:
            raise ModelError(None, _not_hovernet_message(state_dict), _NOT_HOVERNET_FIX)
        ksize = state_dict[probe].shape[-1]
        modes = [m for m, info in MODES.items() if info.ksize == ksize]
        if not modes:
            raise ModelError(
                None,
                f"decoder kernel size {ksize} matches no HoVer-Net mode (fast: 3, original: 5)",
                _NOT_HOVERNET_FIX,
            )
        names = _encoder_names() + [n for b in branches for n in _branch_names(b)]
        if any(f"{n}.weight" not in state_dict for n in names):
            raise ModelError(None, _not_hovernet_message(state_dict), _NOT_HOVERNET_FIX)
        bad = [n for n in names if state_dict[f"{n}.weight"].ndim != 4]
        if bad:
            raise ModelError(None, f"these weights are not 4-D conv kernels: {_first(bad)}", _NOT_HOVERNET_FIX)
        return cls(modes[0], {n: int(state_dict[f"{n}.weight"].shape[0]) for n in names})

    # -- use ------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form, stored in our checkpoints."""
        return {"mode": self.mode, "widths": dict(self.widths)}

    def __getitem__(self, name: str) -> int:
        return self.widths[name]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ChannelSpec):
            return NotImplemented
        return self.mode == other.mode and self.widths == other.widths

    __hash__ = None  # type: ignore[assignment]  # compared by value, never hashed

    def __repr__(self) -> str:
        return f"ChannelSpec(mode={self.mode!r}, branches={self.branches}, convs={len(self.widths)})"

    def with_widths(self, updates: Mapping[str, int]) -> ChannelSpec:
        """A copy with some widths changed (validated: coupled ones must change together)."""
        unknown = [n for n in updates if n not in self.widths]
        if unknown:
            raise ModelError(None, f"channel spec has no conv named {_first(unknown)}")
        return ChannelSpec(self.mode, {**self.widths, **updates})

    def select_branches(self, branches: Iterable[str]) -> ChannelSpec:
        """This spec restricted to some decoder branches (e.g. without ``tp``)."""
        wanted = tuple(branches)
        lacking = [b for b in wanted if b not in self.branches]
        if lacking:
            raise ModelError(
                None,
                f"channel spec has no decoder branch {lacking} (it has {list(self.branches)})",
                "build the spec with that branch (ChannelSpec.full/scaled include tp, np and hv)",
            )
        dropped = tuple(f"decoder.{b}." for b in self.branches if b not in wanted)
        return ChannelSpec(self.mode, {n: w for n, w in self.widths.items() if not n.startswith(dropped)})

    def coupled_groups(self) -> list[list[str]]:
        """Conv names whose output widths must stay equal (pruned together)."""
        groups = []
        for block, units, _stride, _width in _ENCODER:
            group = [f"{block}.units.{i}.conv3" for i in range(units)] + [f"{block}.shortcut"]
            if block == "d2":
                group.append(_BOTTLENECK)
            for level, skip in _SKIP_OF_LEVEL.items():
                if skip == block:
                    group += [f"decoder.{b}.{level}.convf" for b in self.branches]
            groups.append(group)
        return groups

    def grouped_convs(self) -> list[str]:
        """Names of the grouped convs (groups=4): input and output widths divide by 4."""
        return [n for n in self.widths if ".dense.units." in n and n.endswith(".conv2")]

    # -- internals ------------------------------------------------------------------------------
    def _validate(self) -> None:
        if "np" not in self.branches or "hv" not in self.branches:
            raise ModelError(None, f"channel spec needs the np and hv branches, has {list(self.branches)}")
        expected = _encoder_names() + [n for b in self.branches for n in _branch_names(b)]
        missing = [n for n in expected if n not in self.widths]
        unexpected = sorted(set(self.widths) - set(expected))
        if missing or unexpected:
            parts = []
            if missing:
                parts.append(f"missing {_first(missing)}")
            if unexpected:
                parts.append(f"unexpected {_first(unexpected)}")
            raise ModelError(None, "channel spec does not fit HoVer-Net: " + "; ".join(parts))
        for group in self.coupled_groups():
            if len({self.widths[n] for n in group}) > 1:
                detail = ", ".join(f"{n}={self.widths[n]}" for n in group)
                raise ModelError(
                    None,
                    f"channel spec: widths added together must be equal: {detail}",
                    "prune coupled convs together (ChannelSpec.coupled_groups())",
                )
        for conv2 in self.grouped_convs():
            conv1 = conv2[: -len("conv2")] + "conv1"
            for name in (conv1, conv2):
                if self.widths[name] % DENSE_GROUPS:
                    raise ModelError(
                        None,
                        f"channel spec: {name}={self.widths[name]} feeds or is a grouped conv "
                        f"(groups={DENSE_GROUPS}) and must divide by {DENSE_GROUPS}",
                        f"prune it in multiples of {DENSE_GROUPS}",
                    )

    def _derive_inputs(self) -> dict[str, int]:
        """Input width of every conv (spec convs plus the heads ``decoder.*.u0.conv``)."""
        w = self.widths
        inputs = {_STEM: 3}
        block_in = w[_STEM]
        block_out: dict[str, int] = {}
        for block, units, _stride, _width in _ENCODER:
            out = w[f"{block}.shortcut"]
            inputs[f"{block}.shortcut"] = block_in
            for i in range(units):
                unit = f"{block}.units.{i}"
                inputs[f"{unit}.conv1"] = block_in if i == 0 else out
                inputs[f"{unit}.conv2"] = w[f"{unit}.conv1"]
                inputs[f"{unit}.conv3"] = w[f"{unit}.conv2"]
            block_out[block] = block_in = out
        inputs[_BOTTLENECK] = block_out["d3"]
        level_input = {"u3": block_out["d2"], "u2": block_out["d1"]}
        for branch in self.branches:
            prefix = f"decoder.{branch}"
            for level, units, *_ in _DENSE_LEVELS:
                inputs[f"{prefix}.{level}.conva"] = level_input[level]
                width = w[f"{prefix}.{level}.conva"]
                for i in range(units):
                    unit = f"{prefix}.{level}.dense.units.{i}"
                    inputs[f"{unit}.conv1"] = width
                    inputs[f"{unit}.conv2"] = w[f"{unit}.conv1"]
                    width += w[f"{unit}.conv2"]
                inputs[f"{prefix}.{level}.convf"] = width
            inputs[f"{prefix}.u1.conva"] = block_out["d0"]
            inputs[f"{prefix}.u0.conv"] = w[f"{prefix}.u1.conva"]
        return inputs


_NOT_HOVERNET_FIX = (
    "pass a HoVer-Net checkpoint: the official release ({'desc': state_dict}), "
    "a TIAToolbox hovernet state dict, or a .safetensors file saved by wsi_pipeline"
)


def _mismatch(expected: Mapping[str, Tensor], given: Mapping[str, Tensor]) -> list[str]:
    """The first missing, unexpected and mis-shaped keys, as message parts (empty when all fit)."""
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    misshaped = [
        f"{k} {tuple(given[k].shape)} (model: {tuple(expected[k].shape)})"
        for k in expected
        if k in given and tuple(given[k].shape) != tuple(expected[k].shape)
    ]
    parts = []
    if missing:
        parts.append(f"missing keys: {_first(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {_first(unexpected)}")
    if misshaped:
        parts.append(f"mis-shaped: {_first(misshaped)}")
    return parts


def _not_hovernet_message(state_dict: Mapping[str, Tensor]) -> str:
    """Keys compared with a full-width reference: says what about the file is not HoVer-Net."""
    head = state_dict.get("decoder.tp.u0.conv.weight")
    num_types = int(head.shape[0]) if head is not None and head.ndim == 4 else 6
    with torch.device("meta"):
        reference = HoVerNet("fast", num_types).state_dict()
    parts = [k for k in _mismatch(reference, state_dict) if not k.startswith("mis-shaped")]
    return "; ".join(["not a HoVer-Net state dict", *parts])


def load_state_dict_checked(
    model: nn.Module, state_dict: Mapping[str, Tensor], assign: bool = False, copy: bool = True
) -> None:
    """``load_state_dict(strict=True)`` with an error that lists what does not fit.

    Two constants that some public checkpoints lack are filled in rather than
    reported: BatchNorm ``num_batches_tracked`` counters (the official
    checkpoints were converted from TensorFlow and never had them; they only
    matter for momentum-free BatchNorm, which HoVer-Net does not use) and the
    all-ones ``upsample2x.unpool_mat``.

    ``assign=True`` makes the model take the given tensors (cast to its
    dtypes) as its own, so a model built on the ``meta`` device is loaded
    without allocating or initialising weights that are about to be replaced;
    with ``copy=False`` too, no tensor is copied (only for tensors nobody else
    holds, e.g. fresh from a file: the model and the caller would share them).
    """
    expected = model.state_dict()
    given = dict(state_dict)
    for key, value in expected.items():
        if key not in given and key.endswith("num_batches_tracked"):
            given[key] = torch.zeros((), dtype=value.dtype)
        elif key not in given and key.endswith("unpool_mat"):
            given[key] = torch.ones(value.shape, dtype=value.dtype)
    parts = _mismatch(expected, given)
    if parts:
        raise ModelError(None, "weights do not fit the architecture: " + "; ".join(parts), _NOT_HOVERNET_FIX)
    if assign:
        given = {k: v.detach().to(dtype=expected[k].dtype, device="cpu", copy=copy) for k, v in given.items()}
    model.load_state_dict(given, strict=True, assign=assign)


# ---------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------
def _conv(c_in: int, c_out: int, k: int, stride: int = 1, padding: int = 0, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, k, stride=stride, padding=padding, groups=groups, bias=False)


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=1e-5)


def _center_crop(x: Tensor, height: int, width: int) -> Tensor:
    """Centre crop to ``height x width`` (as the official ``crop_op``: an odd extra pixel at the end)."""
    top = (x.shape[-2] - height) // 2
    left = (x.shape[-1] - width) // 2
    return x[..., top : top + height, left : left + width]


class TFSamePad(nn.Module):
    """TensorFlow ``SAME`` padding for a strided conv: the odd pixel goes bottom/right.

    Only the stride-2 encoder convs need it; stride-1 convs use symmetric
    ``padding=k//2``, which is the same thing.
    """

    def __init__(self, ksize: int, stride: int) -> None:
        super().__init__()
        self.ksize = ksize
        self.stride = stride

    def _pad(self, side: int) -> tuple[int, int]:
        rem = side % self.stride
        pad = max(self.ksize - (self.stride if rem == 0 else rem), 0)
        return pad // 2, pad - pad // 2

    def forward(self, x: Tensor) -> Tensor:
        return F.pad(x, self._pad(x.shape[-1]) + self._pad(x.shape[-2]))


class ResidualBlock(nn.Module):
    """Pre-activation bottleneck block: ``units.N.{preact/bn, conv1, conv1/bn, conv2, conv2/bn, conv3}``.

    The first unit has no pre-activation (the previous block's ``blk_bna``
    already applied BN+ReLU); the block ends with ``blk_bna``.
    """

    def __init__(self, name: str, spec: ChannelSpec, units: int, stride: int) -> None:
        super().__init__()
        w, inputs = spec.widths, spec.inputs
        out = w[f"{name}.shortcut"]
        self.units = nn.ModuleList()
        for i in range(units):
            unit = f"{name}.units.{i}"
            s = stride if i == 0 else 1
            c1, c2 = w[f"{unit}.conv1"], w[f"{unit}.conv2"]
            layers: list[tuple[str, nn.Module]] = []
            if i > 0:
                layers += [("preact/bn", _bn(out)), ("preact/relu", nn.ReLU(inplace=True))]
            layers += [
                ("conv1", _conv(inputs[f"{unit}.conv1"], c1, 1)),
                ("conv1/bn", _bn(c1)),
                ("conv1/relu", nn.ReLU(inplace=True)),
            ]
            if s == 1:
                layers.append(("conv2", _conv(c1, c2, 3, padding=1)))
            else:
                layers += [("conv2/pad", TFSamePad(3, s)), ("conv2", _conv(c1, c2, 3, stride=s))]
            layers += [
                ("conv2/bn", _bn(c2)),
                ("conv2/relu", nn.ReLU(inplace=True)),
                ("conv3", _conv(c2, w[f"{unit}.conv3"], 1)),
            ]
            self.units.append(nn.Sequential(OrderedDict(layers)))
        # Always present: the official block drops it only when in == out and stride 1, never the case.
        self.shortcut = _conv(inputs[f"{name}.shortcut"], out, 1, stride=stride)
        self.blk_bna = nn.Sequential(OrderedDict([("bn", _bn(out)), ("relu", nn.ReLU(inplace=True))]))

    def forward(self, x: Tensor) -> Tensor:
        shortcut = self.shortcut(x)
        for unit in self.units:
            x = unit(x) + shortcut
            shortcut = x
        return self.blk_bna(x)


class DenseBlock(nn.Module):
    """Dense block of valid convs: each unit's output is concatenated to its (cropped) input."""

    def __init__(self, prefix: str, spec: ChannelSpec, units: int, ksize: int) -> None:
        super().__init__()
        w, inputs = spec.widths, spec.inputs
        self.units = nn.ModuleList()
        width = inputs[f"{prefix}.units.0.conv1"]
        for i in range(units):
            unit = f"{prefix}.units.{i}"
            c1, c2 = w[f"{unit}.conv1"], w[f"{unit}.conv2"]
            layers = [
                ("preact_bna/bn", _bn(width)),
                ("preact_bna/relu", nn.ReLU(inplace=True)),
                ("conv1", _conv(width, c1, 1)),
                ("conv1/bn", _bn(c1)),
                ("conv1/relu", nn.ReLU(inplace=True)),
                ("conv2", _conv(c1, c2, ksize, groups=DENSE_GROUPS)),
            ]
            self.units.append(nn.Sequential(OrderedDict(layers)))
            width += c2
        self.blk_bna = nn.Sequential(OrderedDict([("bn", _bn(width)), ("relu", nn.ReLU(inplace=True))]))

    def forward(self, x: Tensor) -> Tensor:
        for unit in self.units:
            new = unit(x)
            x = torch.cat([_center_crop(x, new.shape[-2], new.shape[-1]), new], dim=1)
        return self.blk_bna(x)


class DecoderBranch(nn.Module):
    """One decoder (``u3``, ``u2``: conva + dense block + convf; ``u1``: conva; ``u0``: BN-ReLU-head)."""

    def __init__(self, branch: str, spec: ChannelSpec, out_ch: int, ksize: int) -> None:
        super().__init__()
        w, inputs = spec.widths, spec.inputs
        prefix = f"decoder.{branch}"
        for level, units, *_ in _DENSE_LEVELS:
            p = f"{prefix}.{level}"
            layers = [
                ("conva", _conv(inputs[f"{p}.conva"], w[f"{p}.conva"], ksize)),
                ("dense", DenseBlock(f"{p}.dense", spec, units, ksize)),
                ("convf", _conv(inputs[f"{p}.convf"], w[f"{p}.convf"], 1)),
            ]
            self.add_module(level, nn.Sequential(OrderedDict(layers)))
        u1_in, u1_out = inputs[f"{prefix}.u1.conva"], w[f"{prefix}.u1.conva"]
        self.u1 = nn.Sequential(OrderedDict([("conva", _conv(u1_in, u1_out, ksize, padding=ksize // 2))]))
        head = [
            ("bn", _bn(u1_out)),
            ("relu", nn.ReLU(inplace=True)),
            ("conv", nn.Conv2d(u1_out, out_ch, 1, bias=True)),
        ]
        self.u0 = nn.Sequential(OrderedDict(head))

    def forward(self, d0: Tensor, d1: Tensor, d2: Tensor, bottom: Tensor, up: nn.Module) -> Tensor:
        x = up(self.u3(up(bottom) + d2))
        x = up(self.u2(x + _center_crop(d1, x.shape[-2], x.shape[-1])))
        x = self.u1(x + _center_crop(d0, x.shape[-2], x.shape[-1]))
        return self.u0(x)


class UpSample2x(nn.Module):
    """Nearest-neighbour 2x upsampling (TensorPack's FixedUnpooling with a ones matrix).

    The official module keeps its 2x2 ones matrix as the buffer ``unpool_mat``
    (present in every official checkpoint), so it is kept here for strict
    loading; the computation is the equivalent ``interpolate(nearest)``, which
    keeps channels_last layouts and is faster.
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("unpool_mat", torch.ones(2, 2, dtype=torch.float32))

    def forward(self, x: Tensor) -> Tensor:
        return F.interpolate(x, scale_factor=2.0, mode="nearest")


# ---------------------------------------------------------------------------------------------
# The network
# ---------------------------------------------------------------------------------------------
class HoVerNet(nn.Module):
    """HoVer-Net, official module tree, per-layer widths from ``spec``.

    ``forward`` takes float NCHW RGB in 0-255 (divided by 255 inside, as the
    official model does) and returns raw outputs: ``np`` (2-channel logits),
    ``hv`` (2 channels, channel 0 horizontal) and, when ``num_types`` is set,
    ``tp`` (``num_types`` logits, channel 0 background).
    """

    def __init__(self, mode: str = "fast", num_types: int | None = 5, spec: ChannelSpec | None = None) -> None:
        super().__init__()
        if mode not in MODES:
            raise ModelError(None, f"unknown HoVer-Net mode {mode!r}", f"use one of {sorted(MODES)}")
        if num_types is not None and (isinstance(num_types, bool) or not isinstance(num_types, int) or num_types < 1):
            raise ModelError(None, f"num_types={num_types!r} must be a positive integer or None")
        spec = ChannelSpec.full(mode) if spec is None else spec
        if spec.mode != mode:
            raise ModelError(
                None,
                f"channel spec is for mode {spec.mode!r} but the model is built in mode {mode!r}",
                f"build the spec with mode={mode!r} or the model with mode={spec.mode!r}",
            )
        branches = BRANCHES if num_types is not None else tuple(b for b in BRANCHES if b != "tp")
        if spec.branches != branches:
            spec = spec.select_branches(branches)
        info = MODES[mode]
        self.mode = mode
        self.num_types = num_types
        self.spec = spec
        self.input_size = info.input_size
        self.output_size = info.output_size

        stem = [
            ("/", _conv(3, spec[_STEM], 7, padding=info.stem_padding)),
            ("bn", _bn(spec[_STEM])),
            ("relu", nn.ReLU(inplace=True)),
        ]
        self.conv0 = nn.Sequential(OrderedDict(stem))
        for block, units, stride, _width in _ENCODER:
            self.add_module(block, ResidualBlock(block, spec, units, stride))
        self.conv_bot = _conv(spec.inputs[_BOTTLENECK], spec[_BOTTLENECK], 1)
        heads = {"tp": num_types, "np": 2, "hv": 2}
        self.decoder = nn.ModuleDict(OrderedDict((b, DecoderBranch(b, spec, heads[b], info.ksize)) for b in branches))
        self.upsample2x = UpSample2x()
        self._init_weights()

    def _init_weights(self) -> None:
        """The official initialisation: He (fan_out) convs, BN scale 1 and shift 0.

        Skipped for a model built on the meta device (weights about to be loaded): there the
        random init is not only wasted but runs through torch's reference ops, whose first
        call imports ``torch._dynamo`` (1.5-2.4 s of every process's start, measured with
        ``python -X importtime``).
        """
        if self.conv0[0].weight.is_meta:
            return
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, Tensor], copy: bool = True) -> HoVerNet:
        """Build the model the weights describe (mode, types, every width) and load them strictly.

        ``copy=False`` lets the model take the given tensors as its parameters
        instead of copies: for tensors nobody else holds (fresh from a file).
        """
        spec = ChannelSpec.from_state_dict(state_dict)
        head = state_dict.get("decoder.tp.u0.conv.weight")
        with torch.device("meta"):  # no allocation or random init of weights about to be replaced
            model = cls(spec.mode, None if head is None else int(head.shape[0]), spec)
        load_state_dict_checked(model, state_dict, assign=True, copy=copy)
        return model

    def output_size_for(self, input_size: int) -> int:
        """Output side for an input side (other sizes than the default work, and H != W)."""
        return output_size_for(self.mode, input_size)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ModelError(None, f"expected an N x 3 x H x W RGB batch, got shape {tuple(x.shape)}")
        self.output_size_for(x.shape[-2])
        self.output_size_for(x.shape[-1])
        x = x / 255.0
        d0 = self.d0(self.conv0(x))
        d1 = self.d1(d0)
        d2 = self.d2(d1)
        bottom = self.conv_bot(self.d3(d2))
        return {name: branch(d0, d1, d2, bottom, self.upsample2x) for name, branch in self.decoder.items()}
