"""Pruning criteria: how much each channel (structured) or weight (unstructured) matters.

Structured criteria score the channels of one coupled group (see
:mod:`wsi_pipeline.prune.structured`), aggregating over every layer the group ties
together, so a residual-stream channel is judged by all the convs that write it rather
than by whichever one a library happens to take as root:

* ``l1`` / ``l2``: the L1 / L2 norm of each producing conv's output filter (Li et al.,
  2017), averaged over the group's producers;
* ``bn_scale``: ``|gamma|`` of the BatchNorms over the channel (Network Slimming, Liu et
  al., 2017), averaged over the group's BatchNorms. Meaningful after training with an L1
  penalty on the gammas (``TrainConfig.bn_l1``), which pushes unneeded channels to zero.

Unstructured pruning ranks single weights by ``magnitude`` (``|w|``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from wsi_pipeline.prune.structured import ChannelGroup

__all__ = ["CRITERIA", "Criterion", "bn_scale", "filter_norm", "l1_norm", "l2_norm", "magnitude"]


def _aggregate(group: ChannelGroup, parts: list[tuple[Tensor, tuple[int, ...]]]) -> Tensor:
    """Mean over contributing layers, each contribution placed at its root indices."""
    total = torch.zeros(group.size, dtype=torch.float64)
    count = torch.zeros(group.size, dtype=torch.float64)
    for values, root_idxs in parts:
        index = torch.as_tensor(root_idxs, dtype=torch.long)
        total.index_add_(0, index, values.to(torch.float64))
        count.index_add_(0, index, torch.ones(len(root_idxs), dtype=torch.float64))
    return total / count.clamp_min(1.0)


def filter_norm(p: int) -> Callable[[nn.Module, ChannelGroup], Tensor]:
    """Criterion: Lp norm of the output filters of the group's producing convs, group mean."""

    @torch.no_grad()
    def score(model: nn.Module, group: ChannelGroup) -> Tensor:
        modules = dict(model.named_modules())
        parts = []
        for m in group.members:
            if m.kind != "conv_out":
                continue
            weight = modules[m.module].weight.detach()
            rows = weight[list(m.idxs)].flatten(1).to(torch.float64)
            parts.append((rows.abs().pow(p).sum(1).pow(1.0 / p), m.root_idxs))
        return _aggregate(group, parts)

    score.__name__ = f"l{p}_norm"
    return score


l1_norm = filter_norm(1)
l2_norm = filter_norm(2)


@torch.no_grad()
def bn_scale(model: nn.Module, group: ChannelGroup) -> Tensor:
    """Criterion: ``|gamma|`` of the BatchNorms over the group's channels, group mean."""
    modules = dict(model.named_modules())
    parts = []
    for m in group.members:
        if m.kind != "bn":
            continue
        gamma = modules[m.module].weight.detach()
        parts.append((gamma[list(m.idxs)].abs(), m.root_idxs))
    if not parts:  # no BatchNorm in the group: fall back to filter norms rather than ranking at random
        return l1_norm(model, group)
    return _aggregate(group, parts)


def magnitude(weight: Tensor) -> Tensor:
    """Criterion for single weights: ``|w|`` (the smallest are zeroed first)."""
    return weight.detach().abs()


@dataclass(frozen=True)
class Criterion:
    """A structured criterion and how it ranks across layers.

    ``normalize``: for global ranking, divide each group's scores by their mean first.
    Filter norms of layers with different fan-in are not comparable, BatchNorm scales are.
    """

    name: str
    scorer: Callable[[nn.Module, ChannelGroup], Tensor]
    normalize: bool


CRITERIA: dict[str, Criterion] = {
    "l1": Criterion("l1", l1_norm, normalize=True),
    "l2": Criterion("l2", l2_norm, normalize=True),
    "slimming": Criterion("slimming", bn_scale, normalize=False),
    "imp": Criterion("imp", l1_norm, normalize=True),
}
"""Structured methods of the CLI and their criteria (IMP ranks by filter magnitude)."""
