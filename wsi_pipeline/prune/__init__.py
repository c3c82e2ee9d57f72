"""Pruning workshop: turn a trained HoVer-Net into a smaller one the engine loads like any other.

Kept apart like Torch-Pruning's concepts, each swappable:

* :mod:`~wsi_pipeline.prune.structured`: the HoVer-Net adapter over Torch-Pruning's DepGraph
  (coupled channel groups, exact parameter accounting, ratio bisection, surgery);
* :mod:`~wsi_pipeline.prune.importance`: criteria (filter L1/L2, BatchNorm scale, magnitude);
* :mod:`~wsi_pipeline.prune.unstructured`: magnitude masks (layer-wise / global), sparse storage;
* :mod:`~wsi_pipeline.prune.schedule`: one-shot, iterative, Network Slimming, IMP, fine-tuning;
* :mod:`~wsi_pipeline.prune.latency`: latency against the parent, in one process.

Nothing is imported here, so ``import wsi_pipeline.prune`` stays cheap for the CLI.
"""
