"""The one exception type for mistakes the user can fix, how a path that is not a file is said, and whether a file
or folder can be created at a path."""

from __future__ import annotations

import errno
import os
import stat
import tempfile
import warnings
from pathlib import Path
from typing import Any


class LitFlashWarning(UserWarning):
    """lit_flash's own warnings: about something the user set; printed as one line (`show_own_warnings_as_lines`)."""


def warn_user(message: str) -> None:
    """Warn (on rank 0 only) about something the user set; the CLI prints it as one line, without file or source."""
    from lightning.pytorch.utilities import rank_zero_warn  # here: generate.py imports lit_flash without Lightning

    rank_zero_warn(message, category=LitFlashWarning)


def show_own_warnings_as_lines() -> None:
    """Print `LitFlashWarning`s as `lit_flash: <message>` (Python shows the file, line and source line of the call,
    which tell a user nothing); every other warning as before. Only the printed text changes: code that records
    warnings (`warnings.catch_warnings(record=True)`, `pytest.warns`) still gets them. Safe to call again."""
    previous = warnings.formatwarning
    if getattr(previous, "lit_flash", False):
        return

    def format_warning(message: Any, category: type[Warning], filename: str, lineno: int,
                       line: str | None = None) -> str:
        if issubclass(category, LitFlashWarning):
            return f"lit_flash: {message}\n"
        return previous(message, category, filename, lineno, line)

    format_warning.lit_flash = True  # type: ignore[attr-defined]
    warnings.formatwarning = format_warning


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


def check_can_create(path: str | os.PathLike, flag: str, fix: str = "choose another") -> None:
    """Refuse, before any work, a file or folder lit_flash will create at `path` (or write into, where it is an
    existing folder) that cannot be: a file, a dangling symbolic link or a link loop on its way, or a nearest
    existing folder nothing can be written in (/proc, read-only). `flag`: how the message names the setting, e.g.
    `--save_dir x` or `data.cache_dir=x`. An existing `path` that is a file is the caller's to judge first."""
    path = Path(os.path.abspath(path))
    existing = None
    for part in (path, *path.parents):
        try:
            mode = os.stat(part).st_mode
        except FileNotFoundError:
            if os.path.islink(part):
                raise LitFlashError(f"{flag}: {part} is a symbolic link to nothing (dangling): {fix}") from None
            continue
        except NotADirectoryError:
            continue  # a file further up: named when the walk gets there
        except OSError as err:
            what = "a symbolic link loop" if err.errno == errno.ELOOP else f"unreadable ({err.strerror or err})"
            raise LitFlashError(f"{flag}: {part} is {what}: {fix}") from None
        if not stat.S_ISDIR(mode):
            where = "" if part == path else f"cannot create {path}: "
            raise LitFlashError(f"{flag}: {where}{part} is {not_a_folder(part)}: {fix}")
        existing = part
        break
    if existing is None:
        raise LitFlashError(f"{flag}: no folder of {path} exists: {fix}")
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".lit_flash-write-probe-"):
            pass
    except OSError as err:
        raise LitFlashError(f"{flag}: cannot write in {existing} ({err.strerror or err}); {fix}") from err


def not_a_folder(path: str | os.PathLike) -> str:
    """What a path that is not a folder is, in words: a file, a FIFO, a socket or a device."""
    why = not_a_file(path)
    return "a file, not a folder" if why == "not a regular file" or os.path.isfile(path) else why.replace(
        ", not a regular file", ", not a folder")


def one_line(err: LitFlashError) -> str:
    """The error's own line. Raised in a DataLoader worker, torch re-raises it with "Caught LitFlashError in
    DataLoader worker process 0" and the worker's traceback around that line: keep the line only."""
    text = str(err).strip()
    if "Original Traceback" not in text:
        return text
    last = text.splitlines()[-1]
    return last.split("LitFlashError: ", 1)[-1]

