"""Benchmark evaluation (``jobs/evaluate.py``): the sets (:mod:`.sets`), the per-image work (:mod:`.scoring`), the
results, table and files (:mod:`.report`) and the run that ties them together (:mod:`.run`)."""
