"""One writer per run folder: ``exdrop train`` holds an OS lock on ``<run folder>/.lock`` (its pid
inside) while it runs, so a second run into the same folder is refused, naming the holder. The
lock goes with the process (a crashed run's lock file is taken over, with a message); the file is
removed when the run ends."""
from __future__ import annotations

import fcntl
import os
import sys
from pathlib import Path

LOCK = ".lock"
_HELD: dict[str, list] = {}   # this process's locks: folder -> [fd, users] (Trainers in one process share one)


class RunFolderBusy(OSError):
    """Another process is writing the run folder."""


def acquire(folder) -> None:
    """Lock ``folder`` (created if missing) for this process, or raise :class:`RunFolderBusy`."""
    folder = Path(folder)
    key = str(folder.resolve())
    if key in _HELD:
        _HELD[key][1] += 1
        return
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise RunFolderBusy(f"{folder}: another exdrop train (pid {holder}) is writing this run folder; wait for "
                            f"it to end, or train into another --out") from None
    stale = os.read(fd, 64).decode(errors="replace").strip()
    if stale and stale != str(os.getpid()):
        print(f"exdrop: {folder}: the run that held this folder (pid {stale}) is not running any more; "
              "taking over its lock", file=sys.stderr)
    os.lseek(fd, 0, os.SEEK_SET)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _HELD[key] = [fd, 1]


def release(folder) -> None:
    """Give the lock of ``folder`` back (the last user in this process removes the lock file)."""
    key = str(Path(folder).resolve())
    held = _HELD.get(key)
    if held is None:
        return
    held[1] -= 1
    if held[1]:
        return
    del _HELD[key]
    try:
        os.unlink(Path(folder) / LOCK)
    except OSError:
        pass
    os.close(held[0])   # closing the descriptor releases the flock
