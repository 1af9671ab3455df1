"""One training run: the loop that schedules test, step, display and snapshot (train.py), the backends
it drives (backends.py: the engine on PyTorch, or real pycaffe), the run folder's lock,
its records (log.csv, results.json) and its curves."""
