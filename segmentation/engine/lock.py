"""One process per run folder: the lock file that a run's checkpoint folder holds while a process trains it.

Process 0 of a training run creates ``save_path/<run>/.lock`` before it writes anything of the run, at once
and only where none exists (``O_CREAT | O_EXCL``), holding its PID, its host and torchrun's run id; it
deletes the file when training ends, also on an error or Ctrl-C. Another process that would train the same
run (two ``train.resume=auto`` at once) refuses in one line. A lock whose process is gone (on this host, a
PID no longer alive, as after a kill -9) is taken over with a note, and so is the lock of a torchrun group
of the same launch (the same ``TORCHELASTIC_RUN_ID``: a group started again after a lost process,
maybe on another host).
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import asdict, dataclass
from pathlib import Path

from segmentation.config import UserError
from segmentation.console import note

LOCK_NAME = ".lock"


@dataclass(frozen=True)
class Holder:
    """Who holds a lock: the process ``pid`` on ``host``, started by the torchrun launch ``launch`` (its run
    id, ``TORCHELASTIC_RUN_ID``; None outside torchrun)."""

    pid: int
    host: str
    launch: str | None = None

    @classmethod
    def this_process(cls) -> Holder:
        return cls(os.getpid(), socket.gethostname(), os.environ.get("TORCHELASTIC_RUN_ID") or None)

    @classmethod
    def read(cls, path: Path) -> Holder | None:
        """The holder written in the lock file ``path``; None where it cannot be read (gone, being written,
        or not a lock this project writes)."""
        try:
            data = json.loads(path.read_text())
            return cls(int(data["pid"]), str(data["host"]), data.get("launch") and str(data["launch"]))
        except (OSError, ValueError, TypeError, KeyError):
            return None

    def gone(self) -> bool:
        """Whether the holder is a process of this host that no longer runs."""
        if self.host != socket.gethostname() or self.pid <= 0 or os.name == "nt":  # Windows' os.kill would kill
            return False
        try:
            os.kill(self.pid, 0)  # signal 0: only asks whether the process exists
        except ProcessLookupError:
            return True
        except PermissionError:  # it exists, as another user's process
            return False
        return False


class RunLock:
    """The lock of one run, held by this process until ``release`` (or the end of a ``with`` block)."""

    def __init__(self, path: Path, holder: Holder) -> None:
        self.path, self.holder = path, holder

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exception) -> None:
        self.release()

    def release(self) -> None:
        """Delete the lock file, where it is still this process's."""
        if Holder.read(self.path) == self.holder:
            self.path.unlink(missing_ok=True)


def take_run_lock(weights: Path, name: str) -> RunLock:
    """Lock run ``name`` (its checkpoint folder ``weights``, which must exist) for this process; a UserError
    of one line where another process that still runs holds it."""
    path, holder = weights / LOCK_NAME, Holder.this_process()
    for _ in range(2):  # once more after taking over a lock whose holder is gone
        try:
            descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            other = Holder.read(path)
            if other is None:
                raise UserError(
                    f"run {name} is locked by {path}, which names no process: wait for the process that trains it, "
                    "or delete the lock if none does"
                ) from None
            reason = takeover_reason(other, holder)
            if reason is None:
                raise UserError(
                    f"run {name} is being trained by process {other.pid} on {other.host} ({path}): wait for it, or "
                    "delete the lock if that process is gone"
                ) from None
            if reason:
                note(f"run {name}: taking over {path} from process {other.pid} on {other.host}, {reason}")
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(descriptor, "w") as file:
            file.write(json.dumps(asdict(holder)) + "\n")
        return RunLock(path, holder)
    raise UserError(f"run {name}: another process took {path} at the same moment; start again to see which holds it")


def takeover_reason(other: Holder, this: Holder) -> str | None:
    """Why the lock of ``other`` may be taken over by ``this`` process, in words ("" for this process's own lock,
    left by a run before in the same process), or None where ``other`` may still be training."""
    if other.host == this.host and other.pid == this.pid:
        return ""
    if other.launch is not None and other.launch == this.launch:
        return "of the torchrun group before this one"
    if other.gone():
        return "which is gone"
    return None
