"""The development split: whole source tiles held out from training.

Crops of one CoNSeP tile overlap, and MoNuSeg tiles come from different patients and
organs; holding out individual crops would leak the same nuclei into both sides. So the
unit of a split is a *source* (:func:`source_of`), and ``configs/dev_split.yaml`` lists
the held-out sources. The tiles there were picked by :func:`propose_dev_split` with a
fixed seed: for CoNSeP, the 4 tiles (of 27) whose class mix is closest to the whole
set's, so that even the rare "other" class (~2% of nuclei) is represented; for MoNuSeg,
2 tiles (of 13) of different organs, each from an organ that keeps other tiles in
training.
"""

from __future__ import annotations

import itertools
import logging
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from wsi_pipeline.data.dataset import LazySamples, Sample, instance_types, sample_sources, source_of
from wsi_pipeline.errors import DataError

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_DEV_SPLIT",
    "class_counts_by_source",
    "load_dev_split",
    "monuseg_organ",
    "pick_balanced_sources",
    "pick_organ_sources",
    "propose_dev_split",
    "source_of",
    "split_dev",
]

DEFAULT_DEV_SPLIT = Path(__file__).resolve().parents[2] / "configs" / "dev_split.yaml"

# TCGA tissue-source-site codes of the MoNuSeg tiles -> organ. MoNuSeg's paper calls the
# lung sites (18, 21, 38, 49, 50) "liver"; the grouping is what matters here.
_TCGA_ORGAN = {
    **dict.fromkeys(["18", "21", "38", "49", "50"], "lung"),
    **dict.fromkeys(["A7", "AR", "E2", "AO", "A2", "AN"], "breast"),
    **dict.fromkeys(["B0", "HE"], "kidney"),
    **dict.fromkeys(["CH", "G9", "EJ"], "prostate"),
    **dict.fromkeys(["DK", "G2", "ZF"], "bladder"),
    **dict.fromkeys(["AY", "NH"], "colon"),
    **dict.fromkeys(["KB", "RD"], "stomach"),
}
_TCGA_NAME = re.compile(r"^TCGA-([A-Z0-9]{2})-")


def monuseg_organ(name: str) -> str:
    """Organ of a TCGA tile from its tissue-source-site code (``unknown:XX`` if unlisted)."""
    match = _TCGA_NAME.match(name)
    if not match:
        raise ValueError(f"{name!r} is not a TCGA barcode")
    return _TCGA_ORGAN.get(match.group(1), f"unknown:{match.group(1)}")


def split_dev(samples: Sequence[Sample], dev_sources: set[str]) -> tuple[Sequence[Sample], Sequence[Sample]]:
    """(train, dev): samples whose source is in ``dev_sources`` go to dev, the rest to train.

    ``dev_sources`` may name sources of other datasets (the config lists CoNSeP and
    MoNuSeg together); a split that holds out nothing is logged, one that leaves nothing
    to train on is an error. Lazy sample sequences stay lazy.
    """
    sources = sample_sources(samples)
    dev_idx = [i for i, s in enumerate(sources) if s in dev_sources]
    train_idx = [i for i, s in enumerate(sources) if s not in dev_sources]
    if not train_idx and sources:
        raise DataError(
            None,
            f"every one of the {len(sources)} samples is in the dev split: nothing left to train on",
            "hold out fewer sources",
        )
    if not dev_idx:
        log.warning("dev split holds out none of these %d samples (no source matches)", len(sources))
    if isinstance(samples, LazySamples):
        return samples.subset(train_idx), samples.subset(dev_idx)
    return [samples[i] for i in train_idx], [samples[i] for i in dev_idx]


def load_dev_split(path: str | Path = DEFAULT_DEV_SPLIT) -> set[str]:
    """All held-out sources listed under ``dev_sources`` in the YAML file, as one set."""
    path = Path(path)
    fix = "give a YAML file with dev_sources: {dataset: [source, ...]}"
    try:
        doc = yaml.safe_load(path.read_text())
    except FileNotFoundError as exc:
        raise DataError(path, "dev split file not found", fix) from exc
    except (OSError, yaml.YAMLError) as exc:
        raise DataError(path, f"cannot be read as YAML ({exc})", fix) from exc
    groups = doc.get("dev_sources") if isinstance(doc, dict) else None
    if not isinstance(groups, dict) or not groups:
        raise DataError(path, "has no dev_sources mapping", fix)
    out: set[str] = set()
    for key, names in groups.items():
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise DataError(path, f"dev_sources.{key} must be a list of source names", fix)
        out.update(names)
    return out


def class_counts_by_source(samples: Sequence[Sample], num_types: int) -> dict[str, np.ndarray]:
    """Nuclei per class (index = type id, 0 unused) summed over each source's samples."""
    counts: dict[str, np.ndarray] = {}
    for s in samples:
        c = counts.setdefault(s.source, np.zeros(num_types, dtype=np.int64))
        if s.type_map is None:
            continue
        for t in instance_types(s.inst_map, s.type_map).values():
            if 0 < t < num_types:
                c[t] += 1
    return counts


def pick_balanced_sources(counts: dict[str, np.ndarray], n: int, seed: int = 0, draws: int = 20000) -> list[str]:
    """``n`` sources whose pooled class shares best match ``n / len(counts)`` for every class.

    The score of a candidate set is its worst class: max over classes of |log(share /
    target)|. Candidates are ``draws`` random n-subsets from ``seed`` (all subsets when
    fewer), so the choice is deterministic for a given seed and data.
    """
    names = sorted(counts)
    if not 0 < n < len(names):
        raise ValueError(f"cannot hold out {n} of {len(names)} sources")
    table = np.stack([counts[k] for k in names]).astype(np.float64)
    totals = table.sum(0)
    used = totals > 0
    target = n / len(names)
    if math.comb(len(names), n) <= draws:
        candidates = list(itertools.combinations(range(len(names)), n))
    else:
        rng = np.random.default_rng(seed)
        candidates = [tuple(sorted(rng.choice(len(names), n, replace=False))) for _ in range(draws)]
    best, best_score = None, np.inf
    for cand in candidates:
        share = table[list(cand)].sum(0)[used] / totals[used]
        score = float(np.max(np.abs(np.log(np.maximum(share, 1e-9) / target))))
        if score < best_score:
            best, best_score = cand, score
    return [names[i] for i in best]


def pick_organ_sources(names: Sequence[str], n: int, seed: int = 0) -> list[str]:
    """``n`` tiles of ``n`` different organs, each organ keeping at least one tile in training."""
    by_organ: dict[str, list[str]] = {}
    for name in sorted(set(names)):
        by_organ.setdefault(monuseg_organ(name), []).append(name)
    eligible = sorted(o for o, tiles in by_organ.items() if len(tiles) >= 2)
    if len(eligible) < n:
        raise ValueError(f"only {len(eligible)} organs have 2+ tiles; cannot hold out {n} organs")
    rng = np.random.default_rng(seed)
    organs = sorted(rng.choice(eligible, n, replace=False).tolist())
    return sorted(by_organ[o][int(rng.integers(len(by_organ[o])))] for o in organs)


def propose_dev_split(
    consep: Sequence[Sample] | None, monuseg_names: Sequence[str] | None, seed: int = 0
) -> dict[str, Any]:
    """The content of ``configs/dev_split.yaml`` for these data and seed.

    CoNSeP: 4 of its tiles by :func:`pick_balanced_sources` over the 4 classes; MoNuSeg:
    2 tiles by :func:`pick_organ_sources`.
    """
    groups: dict[str, list[str]] = {}
    if consep is not None:
        groups["consep"] = pick_balanced_sources(class_counts_by_source(consep, 5), 4, seed)
    if monuseg_names is not None:
        groups["monuseg"] = pick_organ_sources([source_of(n) for n in monuseg_names], 2, seed)
    return {"seed": seed, "dev_sources": groups}
