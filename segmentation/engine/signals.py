"""Stop requests: Ctrl-C and SIGTERM turned into a flag that the training loop reads after each whole step.

Cluster schedulers send SIGTERM before they stop a job; a user presses Ctrl-C. Either way the loop
finishes its step, saves a consistent ``last.pt`` and exits, so that ``train.resume=auto`` continues
exactly there. A second Ctrl-C stops at once, without saving.

Under torchrun, SIGTERM also comes from torchrun's agent when another process of the group is gone: the
agent stops the others (and kills them 30 s later). Such a process learns of the loss at its next
collective and says so in its one line; so, for the whole life of the process group, SIGTERM never ends
a process on the spot (``terminations_held``), and a SIGTERM prints nothing when it arrives: the line that
follows says what came of it (saved, or a process gone).
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading

from tqdm import tqdm

# SIGTERMs that arrived while ``terminations_held`` held them outside the training loop (signals are per process)
_held_terminations: list[int] = []


def _in_main_thread() -> bool:
    """Whether handlers can be set here: Python runs signal handlers in the main thread only."""
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def terminations_held():
    """Within the block, SIGTERM is noted instead of ending the process. torchrun's agent sends it to the
    processes that survive a lost one, often while they unwind the failed collective that told them so: held,
    it lets them reach their one line. One that arrives before the training loop is a stop request for it
    (``stop_requests`` starts with it); one after it leaves the process to end as it was ending (its error's
    line, or the end of the run)."""
    if not _in_main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: _held_terminations.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        _held_terminations.clear()


@contextlib.contextmanager
def stop_requests():
    """Within the block, Ctrl-C or SIGTERM (as cluster schedulers send) only sets a flag (a non-empty list),
    so that the loop can stop after a whole step and save a consistent ``last.pt``; a second Ctrl-C
    stops at once, without saving. A SIGTERM held before the block (``terminations_held``) starts it set."""
    requested: list[int] = list(_held_terminations)

    def request(signum, frame):
        if requested:
            raise KeyboardInterrupt
        requested.append(signum)
        # a person pressed Ctrl-C and waits for an answer; SIGTERM's outcome is the line that follows (saved, or
        # under torchrun possibly a process gone, where this promise of a save would be wrong)
        if signum == signal.SIGINT:
            message = "stopping after this step and saving last.pt (Ctrl-C again to stop at once, without saving)"
            tqdm.write(message, file=sys.stderr)

    if not _in_main_thread():
        yield requested
        return
    previous = {number: signal.signal(number, request) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield requested
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
