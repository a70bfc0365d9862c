"""Run by tests/test_distributed.py under torchrun: ``ddp_worker.py OUT section.key=value ...``.

Each process trains with the overrides, then saves the weights it ended with as ``OUT/rank<RANK>.pt``.
Processes other than 0 get save and log folders of their own under ``OUT/rank<RANK>/``, so that
anything found there was written by a process that should have written nothing.
"""

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import training  # noqa: E402
from segmentation.config import load_config  # noqa: E402

out, overrides = Path(sys.argv[1]), sys.argv[2:]
rank = int(os.environ["RANK"])
config = load_config(None, overrides)
if rank != 0:
    folders = {
        "train.save_path": str(out / f"rank{rank}" / "weights"),
        "train.log_path": str(out / f"rank{rank}" / "logs"),
    }
    config = config.with_values(folders)
summary = training.train(config)
torch.save(summary.model.state_dict(), out / f"rank{rank}.pt")
