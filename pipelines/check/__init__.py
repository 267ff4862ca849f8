"""The pieces of ``python -m pipelines.gpu_check`` (``scripts/gpu_check.sh``): the device check.

* ``runner``            the parts in order under one time budget; child processes with timeouts
* ``parts``             env, tests (pytest -m gpu), benchmark, hs_cifar10, target_224
* ``synthetic_folder``  a synthetic ImageFolder of 224 px JPEGs for the target epoch
* ``report``            report.json, report.md and results.tar.gz
"""
