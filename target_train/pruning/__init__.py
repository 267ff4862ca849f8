"""Structured channel pruning of the plain VGG (docs/design.md, "Pruning").

* ``channels``: Torch-Pruning on the dependency graph; the ``ChannelPlan`` of kept channels;
* ``masks``: the grad masks and scales sliced with the plan (the RepOptimizer stays exact);
* ``csla``: the CSLA twin pruned with the same plan (the equivalence after pruning);
* ``fold``: the deployed conv+ReLU form of a pruned model;
* ``measure``: parameters, MACs and ONNX Runtime latency.

The command-line step is ``python -m target_train.prune`` (``target_train/prune.py``).
"""
