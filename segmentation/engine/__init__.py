"""The training engine: the step, checkpoints, validation, devices, processes, and the one-batch checks."""
