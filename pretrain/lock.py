"""One run per workdir: an exclusive `fcntl.flock` on WORKDIR/.lock, held for the whole run.

Two runs writing the same checkpoints and metrics.jsonl would interleave them and
corrupt both, so a second run on a held workdir stops at once with
'WORKDIR: workdir in use by pid N' (`WorkdirInUseError`, an OSError: the command
line reports it as one line, exit status 1). The holder writes its pid into the
file. The kernel drops the lock when the holder's file descriptor closes, that is
also when the process is killed, so a dead run never leaves a stale lock; the file
itself stays (removing it would let a third run lock a fresh inode while a second
still holds the old one). Only the trainer writes a workdir, so `pretrain.train.train`
is where the lock is taken (on process 0 of a multi-process run), and every tool that
trains (tools.ablate, tools.demo) goes through it; tools that only read checkpoints
(tools.evaluate, tools.compress) do not lock. flock is advisory and, on some network
file systems, local to one host.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os

LOCK_FILE = ".lock"


class WorkdirInUseError(OSError):
    """Another live process holds the workdir's lock; the message names its pid."""


def holder_pid(path: str) -> str:
    """The pid written in a lock file ('unknown' while the holder has not written it yet)."""
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read().strip() or "unknown"
    except OSError:
        return "unknown"


@contextlib.contextmanager
def workdir_lock(workdir: str, enabled: bool = True):
    """Creates `workdir` if needed and holds its lock until the block ends (no-op when not
    `enabled`). WorkdirInUseError when another process holds it; an OSError naming the path
    ('cannot write to the workdir') when the directory or the lock file cannot be written."""
    if not enabled:
        yield
        return
    path = os.path.join(workdir, LOCK_FILE)
    try:
        os.makedirs(workdir, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise type(e)(e.errno, f"cannot write to the workdir ({e.strerror})", e.filename) from e
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise WorkdirInUseError(errno.EBUSY, f"workdir in use by pid {holder_pid(path)} (lock {path})",
                                    workdir) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)  # releases the lock
