"""The checks of the Lightning values in a parsed config (Trainer, ModelCheckpoint, seed): Lightning annotates them
with its own Unions, so lit_flash cannot give them range types (limits.py) and checks them after parsing instead."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from lit_flash.errors import LitFlashError
from lit_flash.limits import INT64_MAX


def _int_at_least(low: int) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        ok = isinstance(value, int) and not isinstance(value, bool) and low <= value <= INT64_MAX
        return None if ok else f"must be an integer >= {low}"

    return check


def _clip_value(value: Any) -> str | None:
    # A negative clip value scales gradients by a negative factor: training silently runs uphill.
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value >= 0
    return None if ok else "must be a finite number >= 0"


def _batches_or_fraction(least: int, fraction: str, counts: str) -> Callable[[Any], str | None]:
    """Lightning's meaning: an int counts batches (at least `least`), a float is a fraction of the epoch.
    `fraction`: the allowed interval as said; `counts`: the short form of the count's bound."""
    wrong = f"must be a number of batches (an integer >= {least}) or {fraction}"

    def check(value: Any) -> str | None:
        if isinstance(value, bool):
            return wrong
        if isinstance(value, int):
            return None if least <= value <= INT64_MAX else f"must be a number of batches >= {least}, or {counts}"
        if not isinstance(value, float) or not math.isfinite(value):
            return wrong
        return None if (0 < value <= 1 if least else 0 <= value <= 1) else wrong

    return check


_int_or_fraction = _batches_or_fraction(1, "a fraction of the epoch in (0, 1]", "a fraction in (0, 1]")
_limit_batches = _batches_or_fraction(0, "a fraction in [0, 1]", "a fraction in [0, 1]")


def _devices(value: Any) -> str | None:
    # "auto", a count, -1 (all), or a list of indices; 0 devices cannot train.
    if isinstance(value, bool):
        return "must be a count >= 1, -1 for all, 'auto', or a list of device indices"
    if isinstance(value, int):
        return None if value >= 1 or value == -1 else "must be a count >= 1, -1 for all, or 'auto'"
    if isinstance(value, str):
        text = value.strip()
        if text == "auto" or text == "-1":
            return None
        if text.lstrip("-").isdigit():
            return _devices(int(text))
        parts = [p.strip() for p in text.strip("[]").split(",") if p.strip()]
        ok = bool(parts) and all(p.isdigit() for p in parts)
        return None if ok else "must be a count >= 1, -1 for all, 'auto', or device indices such as '0,1'"
    if isinstance(value, list | tuple):
        ok = bool(value) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
        return None if ok else "must be a non-empty list of device indices >= 0"
    return "must be a count >= 1, -1 for all, 'auto', or a list of device indices"


def _optional(check: Callable[[Any], str | None], null_means: str) -> Callable[[Any], str | None]:
    def optional_check(value: Any) -> str | None:
        problem = check(value) if value is not None else None
        return None if problem is None else f"{problem}, or null for {null_means}"

    return optional_check


def _seed(value: Any) -> str | None:
    # true: a random seed (LightningCLI's own); an int goes to numpy, which takes 0 .. 2**32-1 only.
    if isinstance(value, bool) or value is None:
        return None
    ok = isinstance(value, int) and 0 <= value <= 2**32 - 1
    return None if ok else "must be an integer in [0, 4294967295], or true for a random seed"


# What ModelCheckpoint can monitor in a lit_flash run: the metrics FlashGPT2LM logs with `self.log` (module.py:
# train_loss, and `loss` for the progress bar; val_loss/val_ppl; test_* are never seen by a fit's checkpoints), and
# the epoch and step ModelCheckpoint adds itself. Any other name made Lightning raise at the first save, after training.
MONITORABLE = ("val_loss", "val_ppl", "train_loss", "loss", "step", "epoch")


def _monitor(value: Any) -> str | None:
    if value is None or value in MONITORABLE:
        return None
    return f"not a metric lit_flash logs: monitor one of {', '.join(MONITORABLE)}, or null (keep the latest)"


def _overfit_batches(value: Any) -> str | None:
    # lit_flash's loaders resume exactly (a seeded sampler of their own): Lightning's overfit mode swaps the sampler,
    # which they cannot take (a TypeError at the first batch).
    if value is None or (isinstance(value, int | float) and not isinstance(value, bool) and value == 0):
        return None
    return ("is not supported by lit_flash's resumable loaders: to train on a few batches, set "
            "trainer.limit_train_batches=N (and trainer.limit_val_batches)")


LIGHTNING_CHECKS: dict[str, Callable[[Any], str | None]] = {
    "seed_everything": _seed,
    "trainer.max_steps": _int_at_least(-1),
    "trainer.min_steps": _optional(_int_at_least(0), "no minimum"),
    "trainer.max_epochs": _optional(_int_at_least(-1), "Lightning's default"),
    "trainer.min_epochs": _optional(_int_at_least(0), "no minimum"),
    "trainer.val_check_interval": _optional(_int_or_fraction, "once per epoch"),
    "trainer.check_val_every_n_epoch": _optional(_int_at_least(1), "validating by steps only"),
    "trainer.accumulate_grad_batches": _int_at_least(1),
    "trainer.gradient_clip_val": _optional(_clip_value, "no clipping"),
    "trainer.log_every_n_steps": _optional(_int_at_least(0), "Lightning's default"),
    "trainer.num_sanity_val_steps": _optional(_int_at_least(-1), "Lightning's default"),
    "trainer.limit_train_batches": _optional(_limit_batches, "all batches"),
    "trainer.limit_val_batches": _optional(_limit_batches, "all batches"),
    "trainer.limit_test_batches": _optional(_limit_batches, "all batches"),
    "trainer.num_nodes": _int_at_least(1),
    "trainer.devices": _devices,
    "trainer.overfit_batches": _overfit_batches,
    "checkpoint.monitor": _monitor,
    "checkpoint.every_n_train_steps": _optional(_int_at_least(0), "no step checkpoints"),
    "checkpoint.every_n_epochs": _optional(_int_at_least(0), "Lightning's default"),
    "checkpoint.save_top_k": _int_at_least(-1),
    "throughput.window_size": _int_at_least(2),
}


def check_lightning_values(config: Mapping[str, Any] | Any) -> None:
    """Refuse an out-of-range Trainer or ModelCheckpoint value before Lightning sees it (it raises a traceback,
    divides by zero, or - for a negative clip value - trains uphill). `config`: the subcommand's parsed namespace."""
    for key, check in LIGHTNING_CHECKS.items():
        value = _get(config, key)
        if value is _MISSING:
            continue
        problem = check(value)
        if problem is not None:
            raise LitFlashError(f"{key}={value!r}: {problem}")
    check_cpu_processes(_get(config, "trainer.accelerator"), _get(config, "trainer.devices"))
    check_loader_workers(_get(config, "data.num_workers"))
    check_run_paths(_get(config, "trainer.default_root_dir"), _get(config, "checkpoint.filename"))


def check_run_paths(root: Any, filename: Any) -> None:
    """An empty run folder would write into the current directory; a checkpoint name with a path in it would write
    outside the checkpoints folder (`../../notes` replaced the user's `notes.ckpt`)."""
    if isinstance(root, str) and not root.strip():
        raise LitFlashError("trainer.default_root_dir is empty: give the folder the run writes to, e.g. runs/my_run")
    if isinstance(filename, str) and ("/" in filename or "\\" in filename or filename.strip() in ("", ".", "..")):
        raise LitFlashError(
            f"checkpoint.filename={filename!r}: a file name inside the checkpoints folder, without a path (such as "
            "'{epoch}-{step}'); to put checkpoints elsewhere, set trainer.default_root_dir"
        )


def check_training_length(config: Mapping[str, Any] | Any) -> None:
    """`fit` that would train no step (max_steps 0, max_epochs 0, no training batch) exported the untrained model
    as if it had trained."""
    for key, none_means in (("trainer.max_steps", 0), ("trainer.max_epochs", 0), ("trainer.limit_train_batches", 0)):
        value = _get(config, key)
        if value is not _MISSING and value is not None and not isinstance(value, bool) and value == none_means:
            raise LitFlashError(f"{key}={value!r}: fit would train no step; give a positive value (or leave it unset)")
    max_time = _get(config, "trainer.max_time")
    seconds = _seconds(max_time) if max_time is not _MISSING else None
    if seconds is not None and seconds <= 0:
        raise LitFlashError(
            f"trainer.max_time={max_time!r}: fit would train no step; give a positive time (DD:HH:MM:SS, such as "
            "00:12:00:00), or leave it unset"
        )


def _seconds(duration: Any) -> float | None:
    """Lightning's `max_time` (a "DD:HH:MM:SS" string, a dict of timedelta's keywords, or a timedelta) in seconds;
    None when it is none of these (Lightning says so)."""
    from datetime import timedelta

    try:
        if isinstance(duration, timedelta):
            return duration.total_seconds()
        if isinstance(duration, str):
            days, hours, minutes, seconds = (float(part) for part in duration.strip().split(":"))
            return timedelta(days=days, hours=hours, minutes=minutes, seconds=seconds).total_seconds()
        if isinstance(duration, Mapping):
            return timedelta(**duration).total_seconds()
    except (TypeError, ValueError, OverflowError):
        return None
    return None


def check_loader_workers(num_workers: Any) -> None:
    """Each DataLoader worker is a process holding a copy of the loader: a typo such as 100000 forks until the
    machine runs out of memory. Four per core is already more than a loader can use."""
    import os

    most = 4 * (os.cpu_count() or 1)
    if isinstance(num_workers, int) and not isinstance(num_workers, bool) and num_workers > most:
        raise LitFlashError(
            f"data.num_workers={num_workers}: each worker is a process, and this machine has {most // 4} cores: "
            f"use at most {most} (0 loads in the training process)"
        )


def check_cpu_processes(accelerator: Any, devices: Any) -> None:
    """On CPU every device is a process Lightning starts: a typo such as `devices: 100` would fork a hundred
    training processes and exhaust the machine's memory. At most one per core."""
    import os

    import torch

    on_cpu = accelerator == "cpu" or (accelerator in ("auto", None, _MISSING) and not torch.cuda.is_available())
    count = int(devices) if isinstance(devices, str) and devices.strip().isdigit() else devices
    cores = os.cpu_count() or 1
    if on_cpu and isinstance(count, int) and not isinstance(count, bool) and count > cores:
        raise LitFlashError(
            f"trainer.devices={devices!r}: on CPU each device is a process, and this machine has {cores} cores: "
            f"use at most {cores} (or 1)"
        )


_MISSING = object()


def _get(config: Any, dotted: str) -> Any:
    node = config
    for part in dotted.split("."):
        try:
            node = node[part]
        except (KeyError, TypeError, AttributeError):
            return _MISSING
    return node
