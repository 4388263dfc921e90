"""Checkpoints that never corrupt, load safely, and fail with one line naming what to fix.

Lightning's `TorchCheckpointIO` already saves through an fsspec transaction, but for local files that writes the
whole checkpoint to a temporary file in the system temp folder (often another disk: the final move is then a copy,
not atomic) and never fsyncs. `AtomicCheckpointIO` writes a temporary file beside the target, fsyncs it and
`os.replace`s it over the target: a kill or power cut at any moment leaves the old checkpoint or the new one.
"""

from __future__ import annotations

import errno
import os
import pickle
import shutil
import struct
import sys
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO

from lit_flash.distributed import check_resume
from lit_flash.errors import LitFlashError, not_a_file


def _is_local(path: str | os.PathLike) -> bool:
    return "file" in get_filesystem(path).protocol


def partial_path(path: str | os.PathLike) -> Path:
    """Where a checkpoint is written before it replaces `path`: same folder (so the rename is atomic), hidden."""
    path = Path(path)
    return path.with_name(f".{path.name}.partial")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """`torch.save` to a temporary file beside `path`, fsync, then `os.replace`: readers see the old or the new file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_path(path)
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:
        # torch's zip writer reports a failed write (a really full disk) as a RuntimeError ("[enforce fail at
        # inline_container.cc] ... unexpected pos" / "file write failed"), not as OSError.
        if isinstance(err, RuntimeError) and not _is_write_failure(err):
            tmp.unlink(missing_ok=True)
            raise
        full = _disk_full(err, path.parent)  # measured before the partial file gives its space back
        tmp.unlink(missing_ok=True)
        raise save_error(path, err, full) from err
    # The rename is durable only once the folder's entry is on disk too.
    try:
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _is_write_failure(err: RuntimeError) -> bool:
    text = str(err)
    return "inline_container" in text or "write failed" in text or "unexpected pos" in text


def _disk_full(err: BaseException, folder: Path, reserve: int = 1 << 20) -> bool:
    """ENOSPC/EDQUOT, or (torch hides the errno) less than `reserve` bytes left where the checkpoint goes."""
    if isinstance(err, OSError):
        return err.errno in (errno.ENOSPC, errno.EDQUOT)
    try:
        return shutil.disk_usage(folder).free < reserve
    except OSError:
        return False


def save_error(path: Path, err: BaseException, full: bool) -> LitFlashError:
    """The one line for a checkpoint that could not be written; the partial file is already gone."""
    if full:
        why = f"the disk holding {path.parent} is full"
        fix = (
            "free space there (older epoch=*-step=*.ckpt files in that folder can go, keep last.ckpt) or set "
            "trainer.default_root_dir to a folder on a larger disk, then resume with --ckpt_path auto"
        )
    else:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        why = getattr(err, "strerror", None) or first[:160]
        fix = "fix the folder or set trainer.default_root_dir to another one, then resume with --ckpt_path auto"
    return LitFlashError(f"cannot save the checkpoint {path}: {why}; the checkpoints already there are intact; {fix}")


def load_checkpoint_file(path: str | os.PathLike, map_location: Any = None, weights_only: bool | None = None) -> Any:
    """`torch.load` with `weights_only=True` unless asked otherwise, and one-line errors for missing, truncated,
    corrupted or unsafe files."""
    weights_only = True if weights_only is None else weights_only
    if not Path(path).is_file():
        raise LitFlashError(f"ckpt_path={path}: {not_a_file(path)}: give a checkpoint file (a .ckpt)")
    try:
        with open(path, "rb") as f:
            return torch.load(f, map_location=map_location, weights_only=weights_only)
    except LOAD_ERRORS as err:
        raise load_error(path, err) from err


# What torch.load raises on a truncated, corrupted or (with weights_only) unsafe file.
# What torch.load raises on a file that is not a checkpoint it can read: bytes that are no pickle fail inside the
# unpickler with whatever the opcode reader hits (an IndexError, KeyError or struct.error as often as an
# UnpicklingError).
LOAD_ERRORS = (
    pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError, IndexError, KeyError,
    TypeError, OverflowError, struct.error, OSError,  # OSError: e.g. mmap of a file cut short (EINVAL)
)


def load_error(path: str | os.PathLike, err: BaseException) -> LitFlashError:
    """The one line for a checkpoint `torch.load` could not read."""
    if isinstance(err, pickle.UnpicklingError) and "Unsupported global" in str(err):
        return LitFlashError(
            f"ckpt_path={path}: the checkpoint holds objects other than tensors and plain values; "
            "if you trust where it comes from, pass --weights_only false"
        )
    if isinstance(err, PermissionError):
        return LitFlashError(f"ckpt_path={path}: cannot be read (permission denied): fix its permissions")
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return LitFlashError(
        f"ckpt_path={path}: the file is truncated or corrupted ({first[:160]}); "
        "resume from an earlier checkpoint in the same folder"
    )


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's `TorchCheckpointIO` with atomic, fsynced local saves and `weights_only=True` loads by default
    (pass `--weights_only false` to `fit`/`validate`/... for a trusted checkpoint holding other objects)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(
        self, path: Any, map_location: Any = lambda storage, loc: storage, weights_only: bool | None = None
    ) -> Any:
        if not _is_local(path):
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        return load_checkpoint_file(path, map_location=map_location, weights_only=weights_only)


def check_state_dict_fits(expected: dict[str, torch.Tensor], found: dict[str, Any]) -> None:
    """The checkpoint's weights have this model's names and shapes, or a one-line error on the first difference."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    hint = "; use the model config the checkpoint was trained with, or another ckpt_path"
    for name, want in expected.items():
        got = found.get(name)
        if got is not None and hasattr(got, "shape") and tuple(got.shape) != tuple(want.shape):
            raise LitFlashError(
                f"the checkpoint is from a different model: {name} is {list(got.shape)} there and "
                f"{list(want.shape)} here{hint}"
            )
    if missing or unexpected:
        what = f"lacks {missing[0]}" if missing else f"has {unexpected[0]}, unknown here"
        count = len(missing) + len(unexpected)
        raise LitFlashError(f"the checkpoint is from a different model: it {what} ({count} names differ){hint}")


def loaded_checkpoint_name(trainer: Any) -> str:
    """How a one-line error names the checkpoint being loaded: `ckpt_path=<file>` when a trainer loads it, else
    (`load_from_checkpoint`, a hook called by hand) `the checkpoint`."""
    path = getattr(trainer, "ckpt_path", None) if trainer is not None else None
    return f"ckpt_path={path}" if path else "the checkpoint"


def _stored_state(path: Path) -> dict | None:
    """A checkpoint file's top-level dictionary, or None when it cannot be read (zero bytes, truncated, corrupted,
    not a dictionary). Cheap: with `mmap` the tensors are never read."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (*LOAD_ERRORS, OSError):
        return None
    return state if isinstance(state, dict) else None


def stored_global_step(path: Path) -> int | None:
    """The `global_step` a Lightning checkpoint file holds, or None when the file cannot be read."""
    step = (_stored_state(path) or {}).get("global_step")
    return step if isinstance(step, int) else None


def check_resumes_fit(path: str | os.PathLike, how: str) -> None:
    """Refuse to resume a fit from a weights-only checkpoint (`checkpoint.save_weights_only=true`): it has no
    optimizer, scheduler or loop state, and Lightning stops with a KeyError deep in its restore. `how`: the
    `--ckpt_path` value that chose it. An unreadable file is left to the load's own one-line error."""
    state = _stored_state(Path(path))
    if state is not None and "state_dict" in state and "optimizer_states" not in state:
        raise LitFlashError(
            f"--ckpt_path {how}: {path} holds the weights only (checkpoint.save_weights_only=true), not the optimizer "
            "and loop state a fit resumes from: give a full checkpoint (checkpoint.save_weights_only=false), or "
            "validate/test this one"
        )


def newest_intact_checkpoint(ckpt_dir: Path) -> Path | None:
    """The checkpoint of `ckpt_dir` with the highest stored global step (`last.ckpt` on a tie): not the newest
    file time, which a copy or a restore from backup reshuffles. Unreadable candidates are skipped with a warning
    naming them."""
    candidates = sorted(ckpt_dir.glob("*.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True)
    best: tuple[int, bool, Path] | None = None
    for path in candidates:
        step = stored_global_step(path)
        if step is None:
            print(f"lit_flash: warning: skipping {path}: not a readable checkpoint (empty, truncated or "
                  "corrupted)", file=sys.stderr, flush=True)
            continue
        key = (step, path.name == "last.ckpt", path)
        if best is None or key[:2] > best[:2]:
            best = key
    return None if best is None else best[2]


def _last_names(paths: list[Path], shown: int = 3) -> str:
    """The newest few file names, with how many more there are."""
    more = f" and {len(paths) - shown} more" if len(paths) > shown else ""
    return ", ".join(p.name for p in paths[-shown:]) + more


def _is_last_name(path: Path) -> bool:
    """A file Lightning's `ckpt_path="last"` finds (its pattern: a .ckpt whose name starts with `last`)."""
    return path.suffix == ".ckpt" and path.stem.startswith("last")


def resolve_ckpt_path(ckpt_path: str | None, ckpt_dir: str | os.PathLike, subcommand: str) -> str | None:
    """Turn `ckpt_path=auto` into the intact checkpoint of `ckpt_dir` with the highest step (normally `last.ckpt`;
    a step checkpoint when a kill landed between writing it and last.ckpt), or None (start fresh) when there is
    none; refuse `last` when there is none, and a fresh `fit` that would overwrite the checkpoints of an earlier
    run in the same folder."""
    if ckpt_path is not None and not str(ckpt_path).strip():
        raise LitFlashError("--ckpt_path is empty: give a checkpoint file, auto or last, or leave it out")
    if ckpt_path in ("best", "hpc", "registry") and not Path(ckpt_path).exists():  # Lightning's other words
        raise LitFlashError(
            f"--ckpt_path {ckpt_path}: not a choice here (lit_flash keeps every checkpoint, ranked by none): give a "
            "checkpoint file, last (the run's last.ckpt) or auto"
        )
    ckpt_dir = Path(ckpt_dir)
    existing = sorted(ckpt_dir.glob("*.ckpt"), key=lambda p: p.stat().st_mtime) if ckpt_dir.is_dir() else []
    if ckpt_path == "auto":
        chosen = newest_intact_checkpoint(ckpt_dir) if existing else None
        if chosen is not None:
            if subcommand == "fit":
                check_resumes_fit(chosen, "auto")
            print(f"lit_flash: resuming from {chosen} (ckpt_path=auto)", flush=True)
            return str(chosen)
        if existing:
            raise LitFlashError(
                f"--ckpt_path auto: none of the {len(existing)} checkpoints in {ckpt_dir} can be read; move them "
                "away to start from scratch, or give an intact checkpoint file with --ckpt_path"
            )
        then = "starting from scratch" if subcommand == "fit" else "using the model as configured"
        print(f"lit_flash: no checkpoint in {ckpt_dir} yet, {then} (ckpt_path=auto)", flush=True)
        return None
    if ckpt_path == "last" and not existing:  # Lightning would warn and go on without one
        raise LitFlashError(
            f"--ckpt_path last: no checkpoint in {ckpt_dir} yet; use --ckpt_path auto to start fresh when there is none"
        )
    if ckpt_path == "last" and not any(_is_last_name(p) for p in existing):
        # Lightning would warn and start from step 0, overwriting these checkpoints and the export.
        names = _last_names(existing)
        raise LitFlashError(
            f"--ckpt_path last: {ckpt_dir} has no last.ckpt, only {names}: resume with --ckpt_path auto (the one "
            "with the highest step) or give one of them as --ckpt_path <file>"
        )
    if subcommand == "fit" and ckpt_path == "last":  # the one Lightning picks: the newest last*.ckpt
        check_resumes_fit(max((p for p in existing if _is_last_name(p)), key=lambda p: p.stat().st_mtime), "last")
    elif subcommand == "fit" and ckpt_path is not None and Path(ckpt_path).is_file():
        check_resumes_fit(ckpt_path, str(ckpt_path))
    if ckpt_path is None and subcommand == "fit" and existing:
        names = _last_names(existing)
        raise LitFlashError(
            f"{ckpt_dir} already holds checkpoints of an earlier run ({names}): resume it with "
            "--ckpt_path last (or auto), or set trainer.default_root_dir to a new folder"
        )
    return ckpt_path


def resolve_resume(
    ckpt_path: str | None, ckpt_dir: str | os.PathLike, subcommand: str = "fit", strategy: Any = None
) -> str | None:
    """`--ckpt_path` (`auto`, `last`, a path, or unset) as the Trainer gets it, for the CLI and `resume_path` alike:
    `resolve_ckpt_path`'s choice, then (given the trainer's `strategy`) `check_resume`'s refusal of a folder that
    strategy cannot load."""
    resolved = resolve_ckpt_path(ckpt_path, ckpt_dir, subcommand)
    if strategy is not None:
        check_resume(resolved, strategy)
    return resolved
