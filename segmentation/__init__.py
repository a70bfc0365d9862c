"""The library behind training.py, test.py and bench.py, grouped by job.

- ``settings``: the settings' schema, one frozen dataclass per job; ``config``: config.yaml and its
  overrides read and validated once into them; ``options``: checking one config value against its option.
- ``console``: notes and one-line errors on the terminal.
- ``device``: the compute device, its speed settings and out-of-memory advice.
- ``metrics``: pixel, cell and object scores.
- ``data``: reading images and masks, generating synthetic ones, preprocessing, the cache, augmentation.
- ``plan``: the run's plan, every choice made from the settings and the data, decided once.
- ``checkpoints``: checkpoint files, read as data, and the progress they record.
- ``engine``: a run's state, the training step, resuming, validation, folds, processes, stop requests, the
  one-batch checks.
- ``inference``: a checkpoint back to model and predictor, whole-image prediction by tiles, segmenting
  files, export.
- ``runs``: run folders, metrics.csv, figures and the diagnostics of test.py.
- ``benchmarks``: what bench.py measures.

Dependencies point one way: ``options`` imports nothing of the project, ``settings`` only ``options``,
``config`` those and ``model``, ``console`` ``config``; ``data`` builds on them, ``plan`` and
``checkpoints`` on ``data``, ``dataset.py`` (on top) on those, ``engine``, ``inference`` and ``runs`` on all
of them; nothing here imports an entry point.
"""
