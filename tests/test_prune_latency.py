"""Latency against the parent: interleaved rounds, both precisions, honest ratios."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from wsi_pipeline.errors import ConfigError
from wsi_pipeline.prune.latency import compare_latency, measure_latency

torch.set_num_threads(1)


class _Net(nn.Module):
    input_size = 32

    def __init__(self, width: int, depth: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, width, 3, padding=1)]
        layers += [nn.Conv2d(width, width, 3, padding=1) for _ in range(depth)]
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def test_every_model_and_precision_is_timed_each_round() -> None:
    result = measure_latency({"a": _Net(4, 0), "b": _Net(8, 1)}, iters=3, warmup=1)
    assert set(result) == {"a", "b"}
    for per_dtype in result.values():
        assert set(per_dtype) == {"fp32", "bf16"}
        for stats in per_dtype.values():
            assert len(stats["times_s"]) == 3
            assert stats["min_s"] <= stats["median_s"]
            assert stats["ms_per_patch"] == pytest.approx(1000 * stats["median_s"] / 4, abs=0.01)  # both rounded


def test_a_much_cheaper_model_is_faster_than_its_parent() -> None:
    # ~1000x fewer multiply-accumulates: no amount of machine noise hides that.
    result = compare_latency(_Net(4, 0), _Net(64, 6), iters=3, dtypes=("fp32",))
    assert set(result) == {"fp32"}
    assert result["fp32"]["speedup"] == pytest.approx(result["fp32"]["parent_s"] / result["fp32"]["model_s"], rel=1e-2)
    assert result["fp32"]["speedup"] > 3


def test_bad_options_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="precision"):
        measure_latency({"a": _Net(4, 0)}, dtypes=("fp16",))
    with pytest.raises(ConfigError, match="iters"):
        measure_latency({"a": _Net(4, 0)}, iters=0)
