"""Ctrl-C (SIGINT) as a preemption: finish the running batch, save `last.ckpt`, print how to resume, exit 130.

Python's default turns SIGINT into a `KeyboardInterrupt` raised at whatever line the main thread is running. Inside
a fit that can be the middle of a logger call: Lightning then finalizes the loggers, and TensorBoard's writer,
interrupted halfway, waited forever in `_AsyncWriterThread.stop` (or aborted writing to a closed file). Here the
first Ctrl-C calls the SIGTERM handler Lightning installs while a Trainer runs (it sets `trainer.received_sigterm`;
the loops stop at the next batch boundary with `SIGTERMException`, and `ExactResume` saves `last.ckpt`): the same
tested path as a preemption. Outside a Trainer run there is nothing to save and Ctrl-C interrupts as usual. A
second Ctrl-C exits at once (status 130) without saving; the atomic saves leave every checkpoint intact.
"""

from __future__ import annotations

import atexit
import os
import signal
import threading
from types import FrameType
from typing import Any

EXIT_CODE = 130  # 128 + SIGINT, as a shell reports a process stopped by Ctrl-C
_count = 0
_exit_hook_registered = False
_saved: tuple[int, str] | None = None  # (step, path) of the checkpoint saved on the way out


def install() -> Any:
    """Route SIGINT as above for this process; returns the previous handler (for `restore`). A no-op off the
    main thread, where Python cannot set handlers."""
    global _count, _saved
    _count, _saved = 0, None
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGINT, _on_sigint)


def restore(previous: Any) -> None:
    if previous is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, previous)


def received() -> bool:
    """Whether a Ctrl-C came since `install`."""
    return _count > 0


def note_saved(step: int, path: str) -> None:
    """Called by `ExactResume` once the checkpoint of a stopped run is written, for the CLI's last line."""
    global _saved
    _saved = (step, path)


def saved_checkpoint() -> tuple[int, str] | None:
    return _saved


def signal_name() -> str:
    return "Ctrl-C" if received() else "SIGTERM"


def _on_sigint(signum: int, frame: FrameType | None) -> None:
    global _count
    _count += 1
    if _count > 1:
        # os.write, not print: the main thread may be inside a print when the signal lands.
        os.write(2, b"\nlit_flash: second Ctrl-C: exiting now without saving (checkpoints already written are "
                    b"intact; resume with --ckpt_path auto)\n")
        os._exit(EXIT_CODE)
    on_sigterm = signal.getsignal(signal.SIGTERM)
    if callable(on_sigterm):  # Lightning's handler: a Trainer is running
        os.write(2, b"\nlit_flash: Ctrl-C: stopping after the running batch and saving last.ckpt "
                    b"(Ctrl-C again to quit at once without saving)\n")
        on_sigterm(signal.SIGTERM, frame)
        return
    raise KeyboardInterrupt


def ignore_sigint_in_worker(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: a terminal's Ctrl-C, and the SIGTERM that `timeout`, systemd or Slurm send,
    reach the whole process group; the workers leave both to the main process (which saves and then stops them)
    instead of dying, which failed the batch being fetched and ended the run with nothing saved. A worker whose
    main process is gone still exits: the DataLoader's workers watch their parent."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def kill_workers_at_exit() -> None:
    """Call in the main process when starting loader workers. At exit, multiprocessing stops daemonic children with
    SIGTERM and then waits for them; workers that ignore SIGTERM (above) would keep the process from ever exiting.
    Registered after multiprocessing's own exit hook, this runs first and ends them with SIGKILL."""
    global _exit_hook_registered
    if not _exit_hook_registered:
        atexit.register(_kill_daemon_children)
        _exit_hook_registered = True


def _kill_daemon_children() -> None:
    import multiprocessing

    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()


def stopped_while_starting() -> SystemExit:
    """A Ctrl-C before a Trainer runs (while modules import or the data loads): nothing to save, so say so and exit
    130 instead of printing the traceback of whatever import was running."""
    os.write(2, b"\nlit_flash: Ctrl-C while starting: stopped before training; nothing was saved\n")
    return SystemExit(EXIT_CODE)
