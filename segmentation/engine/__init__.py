"""The training engine: the step, checkpoints, validation, processes, stop requests and the one-batch checks."""
