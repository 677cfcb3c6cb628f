"""Experiments on top of the driver: resumable sweeps (:mod:`.sweep`), the LR-scaling fit in
LR and effective-LR space (:mod:`.lr_scaling`) and plots (:mod:`.plots`). Command-line fronts:
``tools/sweep.py``, ``tools/fit_lr_scaling.py``, ``tools/plot_run.py``."""
