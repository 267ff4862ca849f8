"""Structured channel pruning of the plain VGG (docs/design.md, "Pruning").

* ``channels``: Torch-Pruning on the dependency graph; the ``ChannelPlan`` of kept channels;
* ``masks``: the grad masks and scales sliced with the plan (the RepOptimizer stays exact);
* ``csla``: the CSLA twin pruned with the same plan (the equivalence after pruning);
* ``measure``: parameters and MACs of the deployed model.

A pruned model folds with the family's ``fuse`` (``target_train/families/vgg.py`` reads every width off
the folded kernels) and is timed with ``quantize.latency_table``.

The command-line step is ``python -m target_train.prune`` (``target_train/prune.py``).
"""
