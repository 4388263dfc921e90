"""The one exception type for mistakes the user can fix, and how a path that is not a file is said."""

from __future__ import annotations

import os
import stat


class LitFlashError(ValueError):
    """Bad input: the message names the flag, key or file to fix.

    The CLI prints it as a single line and exits with status 2 instead of a traceback.
    """


class NonFiniteLossError(LitFlashError):
    """The training loss became NaN or infinite (`model.on_nonfinite=stop`); the message names the step."""


def not_a_file(path: str | os.PathLike) -> str:
    """Why `path` is not a regular file, in words: missing, a folder, or a FIFO, socket or device (which a read
    would block on, or read for ever)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "no such file"
    except OSError as err:
        return f"cannot be read ({err.strerror or err})"
    if stat.S_ISDIR(mode):
        return "a folder, not a file"
    kinds = {stat.S_ISFIFO: "a named pipe (FIFO)", stat.S_ISSOCK: "a socket", stat.S_ISCHR: "a device",
             stat.S_ISBLK: "a device"}
    return next((f"{name}, not a regular file" for test, name in kinds.items() if test(mode)), "not a regular file")


def one_line(err: LitFlashError) -> str:
    """The error's own line. Raised in a DataLoader worker, torch re-raises it with "Caught LitFlashError in
    DataLoader worker process 0" and the worker's traceback around that line: keep the line only."""
    text = str(err).strip()
    if "Original Traceback" not in text:
        return text
    last = text.splitlines()[-1]
    return last.split("LitFlashError: ", 1)[-1]

