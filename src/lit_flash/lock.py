"""One `fit` per run folder: an advisory lock on `<run folder>/.lit_flash.lock`.

Two fits writing into one folder interleave their checkpoints (`last.ckpt` of one, `step=N.ckpt` of the other)
and a later `--ckpt_path auto` resumes a mix of both. `fcntl.flock` is held by the open file, so the kernel
releases it when the process ends in any way (SIGKILL, a crash, a power cut on a local disk): a lock left by a
dead process never blocks. The file holds the PID and host of the holder, for the error message only.
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path
from typing import IO

from lit_flash.errors import LitFlashError

LOCK_NAME = ".lit_flash.lock"
_held: dict[Path, IO[str]] = {}  # folder -> open lock file, for release_all()


def acquire_run_lock(folder: str | os.PathLike, flag: str = "trainer.default_root_dir") -> Path:
    """Lock `folder` for this process, or raise a one-line error naming the process that holds it."""
    folder = Path(folder).resolve()
    if folder in _held:  # this process already holds it (a second fit in the same notebook or test)
        return folder / LOCK_NAME
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    if path.exists() and not path.is_file():  # a folder or a FIFO there would fail to open or block the open
        raise LitFlashError(
            f"{flag}={folder}: {path} is not a file (lit_flash keeps its run lock there): remove it, or give this "
            f"run another {flag}"
        )
    f = open(path, "a+")  # never truncate before holding the lock: the holder's PID is in there
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise LitFlashError(
            f"{flag}={folder} is in use by another lit_flash fit ({holder}): wait for it to end or stop it, "
            f"then resume with --ckpt_path auto; or give this run another {flag}"
        ) from None
    f.seek(0)
    f.truncate()
    f.write(f"PID {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    _held[folder] = f
    return path


def release_all() -> None:
    """Release every lock this process holds (the end of a `fit`, however it ended)."""
    while _held:
        _, f = _held.popitem()
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
        f.close()
