"""Channel pruning of HoVer-Net: the adapter between our model and Torch-Pruning's DepGraph.

Torch-Pruning finds which channels are tied together (its dependency groups) and does
the surgery; everything that decides *how many* channels each group keeps is here,
because its built-in ``MetaPruner`` gets two things wrong for HoVer-Net:

* grouped convs whose input and output widths differ (the dense units' ``conv2``,
  groups=4): its ``round_to`` counts channels of one conv group against the width of the
  whole layer, so a 32-wide ``conv1`` feeding a 4-group conv is rounded to zero;
* its ratio is a fraction of *channels*, while we promise a fraction of *parameters*.

So a group here keeps ``k`` of its channels where ``k`` respects ``round_to``, the conv
groups (the same positions are removed in each of the 4 groups, as the grouped weight
layout requires) and a per-layer maximum ratio, and the channel ratio (uniform) or
importance threshold (global) is bisected until the parameter count, computed exactly
from the group membership without touching the weights, meets the target.

The output heads ``decoder.*.u0.conv`` are never pruned (their widths are the task);
their *inputs* shrink with ``u1.conva``. A pruned model is rebuilt with
:meth:`HoVerNet.from_state_dict`, so it is a plain HoVer-Net whose channel spec is read
from its weights and saves/loads like any other.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from wsi_pipeline.engine.macs import count_params
from wsi_pipeline.engine.model import HoVerNet
from wsi_pipeline.errors import ModelError

__all__ = [
    "ChannelGroup",
    "Member",
    "PruningGraph",
    "StructuredResult",
    "prune_channels",
    "smallest_input",
]

MemberKind = Literal["conv_out", "conv_in", "bn"]
Scorer = Callable[[nn.Module, "ChannelGroup"], Tensor]
"""A criterion: ``scorer(model, group)`` -> one importance per channel of the group's root."""

log = logging.getLogger(__name__)

_BISECT_ITERS = 40
RATIO_WARN = 0.02
"""Warn when the parameter fraction removed misses the request by more than this."""
STRIDED_1X1_MIN_INPUT = 16
"""Channels kept at least where a stride-2 1x1 conv reads them (the encoder shortcuts).

torch 2.13's CPU backward of a strided 1x1 conv in channels_last (how ``fit`` trains)
corrupts memory and aborts the process when the conv has 12 or fewer input channels
(``nn.Conv2d(8, 32, 1, stride=2)`` on a 2x8x256x256 channels_last input is enough);
16 and more are fine. Keeping the encoder streams at >= 16 channels sidesteps it.
"""


@dataclass(frozen=True)
class Member:
    """One layer touched by a group: which of its channels, and where they sit in the root's index space."""

    module: str
    kind: MemberKind
    idxs: tuple[int, ...]
    root_idxs: tuple[int, ...]


@dataclass(frozen=True)
class ChannelGroup:
    """Channels that must be removed together, rooted at the output channels of ``root``.

    ``conv_groups`` is 4 where a grouped conv reads or writes these channels: the group
    then has ``size // 4`` *positions*, and removing position ``p`` removes channel
    ``g * positions + p`` in every conv group ``g``.
    """

    root: str
    size: int
    conv_groups: int
    members: tuple[Member, ...]

    @property
    def positions(self) -> int:
        return self.size // self.conv_groups

    def names(self, kind: MemberKind) -> frozenset[str]:
        return frozenset(m.module for m in self.members if m.kind == kind)

    @property
    def producers(self) -> frozenset[str]:
        """Convs whose output channels these are (all must keep the same ones)."""
        return self.names("conv_out")

    @property
    def consumers(self) -> frozenset[str]:
        """Convs that read these channels."""
        return self.names("conv_in")

    @property
    def bns(self) -> frozenset[str]:
        """BatchNorms over these channels."""
        return self.names("bn")


@dataclass
class StructuredResult:
    """A pruned model and how it was obtained."""

    model: HoVerNet
    params_before: int
    params_after: int
    target_params: int
    reference_params: int
    keep: dict[str, int]
    removed: dict[str, list[int]] = field(default_factory=dict)
    knob: float = 0.0  # the bisected channel ratio (uniform) or threshold quantile (global)

    @property
    def removed_fraction(self) -> float:
        """Parameters removed, as a fraction of the reference (parent) model's."""
        return 1.0 - self.params_after / self.reference_params


def smallest_input(model: HoVerNet) -> int:
    """Smallest input side the model accepts: tracing at it keeps graph building cheap."""
    for side in range(8, 4096):
        try:
            model.output_size_for(side)
        except ModelError:
            continue
        return side
    raise ModelError(None, "no input size fits this model")  # pragma: no cover - every mode has one


def _heads(model: HoVerNet) -> list[nn.Module]:
    return [branch.u0.conv for branch in model.decoder.values()]


class PruningGraph:
    """HoVer-Net's channel groups from Torch-Pruning's DepGraph, plus exact parameter accounting.

    Built on the model it will prune (surgery happens on that object); tracing runs in
    eval mode so BatchNorm statistics are not touched.
    """

    def __init__(self, model: HoVerNet, example_size: int | None = None) -> None:
        import torch_pruning as tp

        self.model = model
        self._tp = tp
        names = {module: name for name, module in model.named_modules()}
        self._modules = dict(model.named_modules())
        for name, module in self._modules.items():
            if isinstance(module, nn.Conv2d) and module.groups > 1 and module.out_channels == module.groups:
                raise ModelError(
                    None,
                    f"grouped conv {name} has {module.out_channels} output channels = its groups: "
                    "Torch-Pruning would take it for a depthwise conv and couple its input and output",
                    "give grouped convs at least 2 output channels per group (e.g. widths >= 8)",
                )
        side = example_size or smallest_input(model)
        was_training = model.training
        model.eval()
        try:
            example = torch.rand(1, 3, side, side, generator=torch.Generator().manual_seed(0)) * 255
            self.graph = tp.DependencyGraph().build_dependency(model, example_inputs=example)
        finally:
            model.train(was_training)
        self.groups: list[ChannelGroup] = []
        for tp_group in self.graph.get_all_groups(ignored_layers=_heads(model), root_module_types=[nn.Conv2d]):
            self.groups.append(self._convert(tp_group, names))
        self.by_root = {g.root: g for g in self.groups}

    def _convert(self, tp_group: object, names: Mapping[nn.Module, str]) -> ChannelGroup:
        tp = self._tp
        kinds = {
            tp.prune_conv_out_channels: "conv_out",
            tp.prune_conv_in_channels: "conv_in",
            tp.prune_batchnorm_out_channels: "bn",
        }
        members = []
        for item in tp_group:  # type: ignore[attr-defined]
            dep, idxs = item.dep, item.idxs
            module = dep.target.module
            if not isinstance(module, nn.Module) or module not in names:
                continue  # graph-only nodes (adds, concats, ReLUs): nothing to prune
            kind = kinds.get(dep.handler)
            if kind is None:
                raise ModelError(None, f"unexpected pruning dependency {dep.handler} on {names[module]}")
            members.append(
                Member(names[module], kind, tuple(int(i) for i in idxs), tuple(int(i) for i in item.root_idxs))
            )
        root = members[0]
        conv_groups = 1
        for m in members:
            module = self._modules[m.module]
            if isinstance(module, nn.Conv2d) and module.groups > 1:
                conv_groups = max(conv_groups, module.groups)
        size = len(root.idxs)
        if size % conv_groups:
            raise ModelError(None, f"group of {root.module}: {size} channels do not divide into {conv_groups} groups")
        return ChannelGroup(root.module, size, conv_groups, tuple(members))

    # -- planning -----------------------------------------------------------------------------------
    def allowed_keeps(
        self, group: ChannelGroup, round_to: int, max_layer_ratio: float, reference: Mapping[str, int] | None
    ) -> list[int]:
        """Channel counts this group may keep, ascending (its current size always among them).

        Counts divide by ``lcm(round_to, conv_groups)``; grouped channels keep at least 2 per
        conv group (see the depthwise note in :class:`PruningGraph`), channels read by a
        strided 1x1 conv at least :data:`STRIDED_1X1_MIN_INPUT`; none drops below
        ``(1 - max_layer_ratio)`` of its reference (parent) width.
        """
        quantum = math.lcm(max(round_to, 1), group.conv_groups)
        floor_min = 2 * group.conv_groups if group.conv_groups > 1 else 1
        if any(self._is_strided_1x1(m.module) for m in group.members if m.kind == "conv_in"):
            floor_min = max(floor_min, STRIDED_1X1_MIN_INPUT)
        ref = (reference or {}).get(group.root, group.size)
        floor_ratio = math.ceil(ref * (1.0 - max_layer_ratio) - 1e-9)
        lowest = max(quantum, floor_min, floor_ratio)
        keeps = [k for k in range(quantum, group.size, quantum) if k >= lowest]
        return keeps + [group.size]

    def _is_strided_1x1(self, name: str) -> bool:
        module = self._modules[name]
        return isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and max(module.stride) > 1

    def params_for(self, keep: Mapping[str, int]) -> int:
        """Exact parameter count after each group keeps ``keep[root]`` channels (others unchanged).

        Every member of a group sees all the group's channels, so a member loses exactly as
        many channels as its group; conv weights shrink in both dimensions.
        """
        lost_out: dict[str, int] = {}
        lost_in: dict[str, int] = {}
        for root, k in keep.items():
            group = self.by_root[root]
            removed = group.size - k
            if removed <= 0:
                continue
            for m in group.members:
                target = lost_in if m.kind == "conv_in" else lost_out
                target[m.module] = target.get(m.module, 0) + removed
        total = 0
        for name, module in self._modules.items():
            if isinstance(module, nn.Conv2d):
                out_ch = module.out_channels - lost_out.get(name, 0)
                in_ch = module.in_channels - lost_in.get(name, 0)
                kh, kw = module.kernel_size
                total += out_ch * (in_ch // module.groups) * kh * kw
                if module.bias is not None:
                    total += out_ch
            elif isinstance(module, nn.BatchNorm2d):
                if module.affine:
                    total += 2 * (module.num_features - lost_out.get(name, 0))
            elif not list(module.children()):
                total += sum(p.numel() for p in module.parameters(recurse=False))
        return total

    def folded_scores(self, scorer: Scorer) -> dict[str, Tensor]:
        """Importance per position of every group (averaged over conv groups), float64 on CPU."""
        out = {}
        with torch.no_grad():
            for group in self.groups:
                scores = scorer(self.model, group).detach().to("cpu", torch.float64)
                if scores.shape != (group.size,):
                    raise ModelError(None, f"criterion gave {tuple(scores.shape)} scores for {group.size} channels")
                out[group.root] = scores.view(group.conv_groups, group.positions).mean(0)
        return out

    @staticmethod
    def _nearest(allowed: list[int], value: float) -> int:
        return min(allowed, key=lambda k: (abs(k - value), -k))

    def plan_uniform(self, channel_ratio: float, allowed: Mapping[str, list[int]]) -> dict[str, int]:
        """Every group removes ``channel_ratio`` of its channels (to the nearest allowed count)."""
        return {g.root: self._nearest(allowed[g.root], g.size * (1.0 - channel_ratio)) for g in self.groups}

    def plan_global(
        self, threshold: float, scores: Mapping[str, Tensor], allowed: Mapping[str, list[int]]
    ) -> dict[str, int]:
        """Every group keeps its positions scoring above one network-wide ``threshold``."""
        keep = {}
        for g in self.groups:
            above = int((scores[g.root] > threshold).sum())
            keep[g.root] = self._nearest(allowed[g.root], above * g.conv_groups)
        return keep

    def removal(self, keep: Mapping[str, int], scores: Mapping[str, Tensor]) -> dict[str, list[int]]:
        """Root channel indices each group loses: its lowest-scoring positions, in every conv group."""
        removed = {}
        for g in self.groups:
            n_pos = (g.size - keep[g.root]) // g.conv_groups
            if n_pos <= 0:
                continue
            order = torch.argsort(scores[g.root], stable=True)[:n_pos].tolist()
            removed[g.root] = sorted(c * g.positions + p for c in range(g.conv_groups) for p in order)
        return removed

    def apply(self, removed: Mapping[str, list[int]]) -> None:
        """Remove the channels in place (Torch-Pruning surgery, one group at a time)."""
        tp = self._tp
        for root, idxs in removed.items():
            # Asked for afresh per group: concat index offsets change as other groups shrink.
            group = self.graph.get_pruning_group(self._modules[root], tp.prune_conv_out_channels, idxs)
            if not self.graph.check_pruning_group(group):
                raise ModelError(None, f"pruning {len(idxs)} channels of {root} would empty a layer")
            group.prune()


def _bisect(evaluate: Callable[[float], int], lo: float, hi: float, target: int) -> tuple[float, int]:
    """The knob in [lo, hi] whose parameter count is closest to ``target`` (counts fall as the knob rises)."""
    best_knob, best_params = lo, evaluate(lo)
    top = evaluate(hi)
    if abs(top - target) < abs(best_params - target):
        best_knob, best_params = hi, top
    for _ in range(_BISECT_ITERS):
        mid = 0.5 * (lo + hi)
        params = evaluate(mid)
        if abs(params - target) < abs(best_params - target) or (
            abs(params - target) == abs(best_params - target) and mid < best_knob
        ):
            best_knob, best_params = mid, params
        if params > target:
            lo = mid
        else:
            hi = mid
    return best_knob, best_params


def prune_channels(
    model: HoVerNet,
    scorer: Scorer,
    ratio: float,
    *,
    global_ranking: bool = False,
    normalize: bool = True,
    round_to: int = 8,
    max_layer_ratio: float = 0.9,
    reference_params: int | None = None,
    reference_widths: Mapping[str, int] | None = None,
    example_size: int | None = None,
) -> StructuredResult:
    """Remove whole channels so that ``ratio`` of the reference model's parameters are gone.

    ``model`` is left untouched (a copy is pruned and rebuilt). ``reference_params`` and
    ``reference_widths`` describe the parent when this is one step of an iterative schedule
    (default: ``model`` itself), so the ratio and the per-layer maximum stay relative to it.

    * uniform (``global_ranking=False``): every group removes the same fraction of its
      channels, bisected; the scores only choose *which* channels go;
    * global: one importance threshold over all groups, bisected; ``normalize`` divides
      each group's scores by their mean first (norms of layers of different fan-in are not
      comparable; BatchNorm scales are, so Network Slimming passes ``normalize=False``).
    """
    if not 0.0 <= ratio < 1.0:
        raise ModelError(
            None, f"pruning ratio {ratio!r} must be in [0, 1)", "give the fraction of parameters to remove"
        )
    if not 0.0 < max_layer_ratio < 1.0:
        raise ModelError(None, f"max_layer_ratio {max_layer_ratio!r} must be in (0, 1)", "use e.g. 0.9")
    work = copy.deepcopy(model)
    meta = getattr(model, "meta", None)
    params_before = count_params(work)
    reference_params = reference_params or params_before
    target = round(reference_params * (1.0 - ratio))
    if reference_widths is None:
        reference_widths = dict(model.spec.widths)
    graph = PruningGraph(work, example_size)
    allowed = {g.root: graph.allowed_keeps(g, round_to, max_layer_ratio, reference_widths) for g in graph.groups}
    scores = graph.folded_scores(scorer)
    if global_ranking:
        ranked = {r: (s / s.mean().clamp_min(1e-12) if normalize else s) for r, s in scores.items()}
        pooled = torch.cat(list(ranked.values()))

        def plan(q: float) -> dict[str, int]:
            return graph.plan_global(float(torch.quantile(pooled, q)) if q > 0 else -math.inf, ranked, allowed)

        knob, _ = _bisect(lambda q: graph.params_for(plan(q)), 0.0, 1.0, target)
        keep = plan(knob)
        scores = ranked
    else:

        def plan(c: float) -> dict[str, int]:
            return graph.plan_uniform(c, allowed)

        knob, _ = _bisect(lambda c: graph.params_for(plan(c)), 0.0, 1.0, target)
        keep = plan(knob)
    expected = graph.params_for(keep)
    removed = graph.removal(keep, scores)
    graph.apply(removed)
    pruned = HoVerNet.from_state_dict(work.state_dict()).train(model.training)
    if meta is not None:
        pruned.meta = copy.deepcopy(meta)
    params_after = count_params(pruned)
    if params_after != expected:
        raise ModelError(None, f"internal: expected {expected} parameters after pruning, got {params_after}")
    achieved = 1.0 - params_after / reference_params
    if abs(achieved - ratio) > RATIO_WARN:
        log.warning(
            "asked to remove %.3f of the parameters, removed %.3f: the layers' floors (round_to=%d, "
            "max_layer_ratio=%.2f) and channel granularity allow no closer",
            ratio,
            achieved,
            round_to,
            max_layer_ratio,
        )
    return StructuredResult(
        model=pruned,
        params_before=params_before,
        params_after=params_after,
        target_params=target,
        reference_params=reference_params,
        keep=keep,
        removed=removed,
        knob=knob,
    )
