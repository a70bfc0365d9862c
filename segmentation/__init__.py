"""The library behind training.py, test.py and bench.py, grouped by job.

- ``config``: the settings, read and validated once into frozen dataclasses, one per config section;
  ``options``: checking one config value against its option.
- ``console``: notes and one-line errors on the terminal.
- ``device``: the compute device, its speed settings and out-of-memory advice.
- ``metrics``: pixel, cell and object scores.
- ``data``: reading images and masks, generating synthetic ones, preprocessing, the cache, augmentation.
- ``engine``: the training step, checkpoints, validation, processes, stop requests, the one-batch checks.
- ``inference``: whole-image prediction by tiles, segmenting files, export.
- ``runs``: run folders, metrics.csv, figures and the diagnostics of test.py.
- ``benchmarks``: what bench.py measures.

Dependencies point one way: ``config``, ``options`` and ``console`` import nothing of the project but
``model``; ``data`` builds on them, ``dataset.py`` (on top) on ``data``, ``engine``, ``inference`` and
``runs`` on those; nothing here imports an entry point.
"""
