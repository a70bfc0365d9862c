"""The files a run writes, replaced atomically through a temporary file; a full disk said in one line.

Checkpoints, ``metrics.csv``, ``plan.json`` and ``config.yaml`` are written to ``NAME.tmp`` beside their
place and renamed over it once whole: a crash or a full disk never leaves half a file, and the earlier
version stays as it was. A write that finds no room removes its temporary file and raises one line naming
the file, the space it needs, the space free in its folder and the setting that moves the folder.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from segmentation.config import UserError
from segmentation.device import amount

# the errors of a write that found no room, in words, and what to do about each
NO_ROOM = {
    errno.ENOSPC: ("no space left on the device", "free some space"),
    errno.EDQUOT: ("the disk quota is used up", "free some space"),
    errno.EFBIG: ("the file would pass this process's file-size limit", "raise the limit (ulimit -f)"),
}


def write_atomically(
    path: Path, write: Callable[[Path], None], needed: int, setting: str, kind: str = "the file", kept: str = ""
) -> None:
    """Write ``path`` by ``write(temporary)`` (``path`` + ``.tmp``, in the same folder) and a rename. Where the
    write fails, the temporary file is removed and ``path`` keeps its earlier contents; a failure for want of
    room is a UserError of one line: ``kind`` (``a checkpoint``) needs about ``needed`` bytes, ``setting``
    (``train.save_path``) moves the folder, ``kept`` says what stays intact. A Ctrl-C leaves no partial file
    either."""
    temporary = path.with_name(path.name + ".tmp")
    try:
        write(temporary)
        os.replace(temporary, path)
    except BaseException as error:
        temporary.unlink(missing_ok=True)
        reason = no_room_reason(error, path.parent, needed)
        if reason is None:
            raise
        words, cure = NO_ROOM[reason]
        space = free_space(path.parent)
        free = "little" if space is None else amount(space)
        intact = f"; {kept}" if kept else ""
        raise UserError(
            f"cannot write {path}: {words} ({free} free in {path.parent}, {kind} needs about {amount(needed)}): "
            f"{cure} or set {setting}{intact}"
        ) from None


def write_text_atomically(path: Path, text: str, setting: str) -> None:
    """``text`` to ``path`` (UTF-8) as ``write_atomically`` writes: whole or not at all."""
    data = text.encode()
    write_atomically(path, lambda temporary: temporary.write_bytes(data), len(data), setting)


def no_room_reason(error: BaseException, folder: Path, needed: int) -> int | None:
    """The ``NO_ROOM`` errno behind a failed write, or None for any other failure. torch.save's zip writer
    reports a failed write as a RuntimeError whose context holds the OSError; a failure that names no errno
    counts as a full disk where the folder has less free space than the file needs."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno is not None:
            return seen.errno if seen.errno in NO_ROOM else None
        seen = seen.__cause__ or seen.__context__
    free = free_space(folder)
    if isinstance(error, (OSError, RuntimeError)) and free is not None and free < needed:
        return errno.ENOSPC
    return None


def free_space(folder: Path) -> int | None:
    """The bytes free for this user on the file system of ``folder`` (``shutil.disk_usage``); None where the
    folder cannot be asked."""
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None
