"""Range types for the CLI's numeric settings, and the checks of the Trainer values lit_flash's configs set.

A range type is the annotation of an `__init__` argument (`batch_size: PositiveInt`): jsonargparse then refuses an
out-of-range value while parsing, with a message that names the key, and `--help` shows the range in the type's
name. Each type is registered with a deserializer that returns a plain `int`/`float`, never an instance of the
type: the parsed values go into checkpoints as hyperparameters, and a `weights_only` load accepts builtins only.
In Python (no parser) the annotations check nothing by themselves: `check_call_args` checks a call's values against
them, with the CLI's words.
"""

from __future__ import annotations

import functools
import math
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any

from jsonargparse.typing import register_type

from lit_flash.errors import LitFlashError

INT64_MAX = 2**63 - 1  # torch and numpy store counts and seeds as int64: a larger value overflows later, deep inside


def _as_int(value: Any) -> int:
    # YAML `true` is a bool, and bool is an int to Python: refuse it rather than count it as 1.
    if isinstance(value, bool) or isinstance(value, float):
        raise ValueError(f"{value!r} is not an integer")
    if isinstance(value, str):
        value = value.strip()
    return int(value)  # "1.5", "1e3", "abc" raise ValueError


def _as_float(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a number")
    result = float(value)  # "nan", "inf", "1e400" parse: refused just below
    if not math.isfinite(result):
        raise ValueError(f"{value!r} is not a finite number")
    return result


def _range_text(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    parts = []
    if low is not None:
        parts.append(f"{'>' if low_open else '>='} {low}")
    if high is not None:
        parts.append(f"{'<' if high_open else '<='} {high}")
    return " and ".join(parts)


def number_type(
    name: str,
    base: type,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> type:
    """A registered jsonargparse type `name`: a `base` (int or float) in the range; its values parse to `base`."""
    wanted = f"{'an integer' if base is int else 'a finite number'} {_range_text(low, high, low_open, high_open)}"
    if base is int and high is None:
        high = INT64_MAX  # not in the message: only a value past int64 meets it, and that one is shown

    def deserialize(value: Any) -> Any:
        number = (_as_int if base is int else _as_float)(value)
        too_low = low is not None and (number <= low if low_open else number < low)
        too_high = high is not None and (number >= high if high_open else number > high)
        if too_low or too_high:
            raise ValueError(f"must be {wanted}, got {value!r}")
        return number

    def parse(value: Any) -> Any:
        try:
            return deserialize(value)
        except (TypeError, ValueError) as err:
            message = str(err) if str(err).startswith("must be") else f"must be {wanted}, got {value!r}"
            raise ValueError(message) from None

    kind = type(name, (base,), {"__doc__": wanted, "check": staticmethod(parse)})
    register_type(kind, serializer=base, deserializer=parse)
    RANGE_TYPES[name] = kind
    return kind


RANGE_TYPES: dict[str, type] = {}  # name -> range type: the parser's one-line error looks the range up by name


PositiveInt = number_type("PositiveInt", int, low=1)
NonNegativeInt = number_type("NonNegativeInt", int, low=0)
WindowInt = number_type("IntAtLeast2", int, low=2)
SeedInt = number_type("SeedInt", int, low=0, high=2**32 - 1)  # numpy's and Lightning's seed range
PositiveFloat = number_type("PositiveFloat", float, low=0, low_open=True)
NonNegativeFloat = number_type("NonNegativeFloat", float, low=0)
UnitFloat = number_type("FloatIn0To1", float, low=0, high=1)
DropoutFloat = number_type("FloatFrom0Below1", float, low=0, high=1, high_open=True)  # 1 drops everything
# A trained byte-level BPE tokenizer holds the 256 byte tokens and its special token whatever size is asked: a
# smaller data.train_tokenizer_vocab_size silently gave 257.
TokenizerVocabInt = number_type("IntAtLeast257", int, low=257)
OpenUnitFloat = number_type("FloatAbove0To1", float, low=0, high=1, low_open=True)


def check_call_args(func_or_cls: Callable[..., Any], values: Mapping[str, Any], section: str) -> None:
    """What the CLI's parser checks, for a call from Python: each of `values` (e.g. an `__init__`'s `locals()`) whose
    parameter of `func_or_cls` (a class: its `__init__`) is annotated with a range type, alone, `X | None`, or in a
    tuple or list (`betas: tuple[DropoutFloat, DropoutFloat]`), must be in range; the first that is not raises one
    line naming `section.name`, in the CLI's words (`model.learning_rate=-1: must be a finite number > 0`)."""
    func = func_or_cls.__init__ if isinstance(func_or_cls, type) else func_or_cls
    for name, annotation in _range_annotations(func).items():
        if name in values:
            problem = _range_problem(annotation, values[name])
            if problem is not None:
                raise LitFlashError(f"{section}.{name}{problem}")


@functools.cache
def _range_annotations(func: Callable[..., Any]) -> dict[str, Any]:
    """The parameters of `func` whose annotation holds a range type (once per function: resolving is not free)."""
    hints = typing.get_type_hints(func)
    return {name: hint for name, hint in hints.items() if name != "return" and _holds_range(hint)}


def _holds_range(hint: Any) -> bool:
    return hint in RANGE_TYPES.values() or any(_holds_range(arg) for arg in typing.get_args(hint))


def _range_problem(hint: Any, value: Any) -> str | None:
    """None when `value` fits `hint`, else what follows the key in the error: `=value: must be ...`."""
    if hint in RANGE_TYPES.values():
        try:
            if isinstance(value, str):  # the parser reads "5" from a command line; Python code passes numbers
                raise ValueError(value)
            hint.check(value)
        except (TypeError, ValueError):
            return f"={value!r}: must be {hint.__doc__}"
        return None
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        members = [arg for arg in args if arg is not type(None)]
        if len(members) != 1 or value is None:  # `X | None` only; a wider union is no one range
            return None
        problem = _range_problem(members[0], value)
        return None if problem is None else f"{problem}, or null"
    if origin in (tuple, list) and isinstance(value, tuple | list):
        fixed = origin is tuple and Ellipsis not in args
        if fixed and len(value) != len(args):
            return f"={value!r}: must hold {len(args)} values"
        for index, item in enumerate(value):
            problem = _range_problem(args[index] if fixed else args[0], item)
            if problem is not None:
                return f"[{index}]{problem}"
    return None  # not a range type (a string, a Literal, a dataclass): the callee's own checks apply


# -- Trainer and ModelCheckpoint values: Lightning's own Union annotations, so checked after parsing instead.
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
