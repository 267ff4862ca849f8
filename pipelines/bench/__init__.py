"""The pieces of ``python -m pipelines.benchmark``: one module per measured section.

* ``common``     timing (CUDA events or perf_counter), peak memory, machine facts, data sources
* ``reference``  the per-parameter Python-loop optimizers (the official style) used as baselines
* ``opt_step``   section ``opt``: one optimizer step on an architecture's parameters
* ``train_step`` section ``train``: forward + backward + optimizer step of each model kind
* ``loader``     section ``loader``: the stage-one input pipeline, device loader vs DataLoader
* ``hs_epoch``   section ``hs_epoch``: one Hyper-Search epoch, eager and compiled
* ``report``     the performance targets (PASS/FAIL/n/a) and the printed table
"""
