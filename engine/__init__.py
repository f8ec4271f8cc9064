"""The engine both scripts train with: the loop (training.py) over one run or a cohort (cohort.py,
members.py), the objective it minimises (objective.py, which asks methods/ what to compute), the
options and their rules (options.py, rules.py), checkpoints and logs (checkpoint.py), meters,
devices, torchrun, signals, run-folder locks and TensorBoard curves."""
