"""What the user reads on the terminal: one-line notes, and errors as one line each with an exit code.

Under torchrun every process runs the same code; process 0 alone prints, so that a note or an error
appears once.
"""

from __future__ import annotations

import os
import sys

from tqdm import tqdm

from segmentation.config import ConfigError, UserError


def is_main_process() -> bool:
    """Whether this is process 0 of a torchrun launch, or the only process."""
    return os.environ.get("RANK", "0") == "0"


def note(message: str) -> None:
    """A one-line notice to the user, printed without disturbing the progress bar (by process 0 alone
    when torchrun starts several)."""
    if is_main_process():
        tqdm.write(f"note: {message}", file=sys.stderr)


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (or its type's name), for one-line notices."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def report_error(error: UserError | OSError) -> int:
    """Print a UserError on stderr, one ``config error:`` or ``error:`` line per line of its message,
    or an OSError (a full disk, a file that cannot be written) as one line with its file (process 0
    alone, but for an error that says ``every_process``); returns the exit code: 2 for a config error, 1 otherwise."""
    prefix = "config error" if isinstance(error, ConfigError) else "error"
    lines = str(error).splitlines() if isinstance(error, UserError) else [first_line(error)]
    for line in lines if is_main_process() or getattr(error, "every_process", False) else ():
        print(f"{prefix}: {line}", file=sys.stderr)
    return 2 if isinstance(error, ConfigError) else 1
