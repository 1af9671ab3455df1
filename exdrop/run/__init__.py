"""One training run: the loop that schedules test, step, display and snapshot for either backend,
its run folder's records (log.csv, results.json) and its curves."""
