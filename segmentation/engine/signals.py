"""Stop requests: Ctrl-C and SIGTERM turned into a flag that the training loop reads after each whole step.

Cluster schedulers send SIGTERM before they stop a job; a user presses Ctrl-C. Either way the loop
finishes its step, saves a consistent ``last.pt`` and exits, so that ``train.resume=auto`` continues
exactly there. A second Ctrl-C stops at once, without saving.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading

from tqdm import tqdm


@contextlib.contextmanager
def stop_requests():
    """Within the block, Ctrl-C or SIGTERM (as cluster schedulers send) only sets a flag (a non-empty list),
    so that the loop can stop after a whole step and save a consistent ``last.pt``; a second Ctrl-C
    stops at once, without saving."""
    requested: list[int] = []

    def request(signum, frame):
        if requested:
            raise KeyboardInterrupt
        requested.append(signum)
        message = "stopping after this step and saving last.pt (Ctrl-C again to stop at once, without saving)"
        tqdm.write(message, file=sys.stderr)

    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield requested
        return
    previous = {number: signal.signal(number, request) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield requested
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
