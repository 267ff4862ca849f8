"""The pieces of ``python -m pipelines.benchmark``: one module per measured section.

* ``settings``   the sections and what each is told (``Settings``: device, dtype, sizes)
* ``timing``     synchronized calls, interleaved rounds, medians and ratios
* ``memory``     peak memory (the device allocator's, or peak RSS on a CPU)
* ``machine``    machine facts recorded beside every figure
* ``data``       the shared CIFAR-10 archive or synthetic batches
* ``reference``  the per-parameter Python-loop optimizers (the official style) used as baselines
* ``opt_step``   section ``opt``: one optimizer step on an architecture's parameters
* ``train_step`` section ``train``: forward + backward + optimizer step of each model kind
* ``loader``     section ``loader``: the stage-one input pipeline, device loader vs DataLoader
* ``hs_epoch``   section ``hs_epoch``: one Hyper-Search epoch, eager and compiled
* ``report``     the performance targets (PASS/FAIL/n/a) and the printed table
"""
