"""A run's wall-time budget (``train.max_minutes``): how many epochs fit in the time left, and when it is up.

Cluster jobs have wall-time limits and a benchmark compares systems for equal minutes; a run that is killed at
the limit ends mid-schedule, with a learning rate still high and no calibrated threshold. With a budget the
run plans its epochs from the seconds its epochs take, fits the learning-rate schedule to that plan after
every epoch, and ends cleanly: the last planned epoch is validated, best.pt saved and the threshold calibrated.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field


def clock() -> float:
    """Seconds of wall time on a monotonic clock: what budgets and epoch lengths are measured with."""
    return time.monotonic()


@dataclass
class TimeBudget:
    """``minutes`` of wall time (0: no budget), counted from ``started`` (``clock``) plus ``used_before``
    seconds that earlier sessions of the same run used (a resumed run), and ``epoch_seconds``, the wall time of
    each whole epoch of this session (training, validation and saving)."""

    minutes: float
    used_before: float = 0.0
    started: float = field(default_factory=clock)
    epoch_seconds: list[float] = field(default_factory=list)

    @property
    def limited(self) -> bool:
        return self.minutes > 0

    def used(self) -> float:
        """Seconds used so far, earlier sessions included."""
        return self.used_before + clock() - self.started

    def over(self) -> bool:
        """Whether the budget is spent (never without one)."""
        return self.limited and self.used() >= 60 * self.minutes

    def planned_epochs(self, epochs_done: int, max_epochs: int, seconds_into_epoch: float) -> int:
        """The number of epochs the run will have trained when it ends: ``max_epochs`` without a budget; else
        the current epoch (the ``epochs_done + 1``-th, ``seconds_into_epoch`` s trained so far) and as many more
        as the time left holds at the median length of the whole epochs so far (the current epoch's training
        time before the first has ended), never more than ``max_epochs`` nor fewer than ``epochs_done + 1``."""
        if not self.limited:
            return max_epochs
        typical = statistics.median(self.epoch_seconds) if self.epoch_seconds else seconds_into_epoch
        rest_of_epoch = max(0.0, typical - seconds_into_epoch)  # its validation and saving, as epochs so far took
        left = 60 * self.minutes - self.used() - rest_of_epoch
        more = math.floor(left / typical) if typical > 0 and left > 0 else 0
        return min(max_epochs, epochs_done + 1 + more)
