"""Range types for lit_flash's numeric settings, and `check_call_args`: the same ranges for a call from Python.

A range type is the annotation of an `__init__` argument (`batch_size: PositiveInt`): jsonargparse then refuses an
out-of-range value while parsing, with a message that names the key, and `--help` shows the range in the type's
name. Each type is registered with a deserializer that returns a plain `int`/`float`, never an instance of the
type: the parsed values go into checkpoints as hyperparameters, and a `weights_only` load accepts builtins only.
In Python (no parser) the annotations check nothing by themselves: `check_call_args` checks a call's values against
them, with the CLI's words.
"""

from __future__ import annotations

import dataclasses
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
    """What the CLI's parser checks, for a call from Python: each of `values` (e.g. an `__init__`'s `locals()`) must
    fit its parameter's annotation in `func_or_cls` (a class: its `__init__`): range types (alone, `X | None`, in a
    tuple or list), plain Python numbers (a numpy or torch scalar would end up in the checkpoints, which a
    `weights_only` load then refuses), `bool`, `str`, `Literal`, mappings, lists and dataclass settings. The first
    that does not raises one line naming `section.name`, in the CLI's words (`model.learning_rate=-1: must be a
    finite number > 0`)."""
    func = func_or_cls.__init__ if isinstance(func_or_cls, type) else func_or_cls
    for name, annotation in _annotations(func).items():
        if name in values:
            problem = _type_problem(annotation, values[name])
            if problem is not None:
                raise LitFlashError(f"{section}.{name}{problem}")


@functools.cache
def _annotations(func: Callable[..., Any]) -> dict[str, Any]:
    """The annotated parameters of `func` (once per function: resolving is not free)."""
    return {name: hint for name, hint in typing.get_type_hints(func).items() if name != "return"}


def _type_problem(hint: Any, value: Any) -> str | None:
    """None when `value` fits `hint`, else what follows the key in the error: `=value: must be ...`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint in RANGE_TYPES.values():
        if not isinstance(value, str | bool) and type(value) not in (int, float):  # numpy, torch, Decimal, Fraction
            return f"={value!r}: must be a plain Python int or float ({type(value).__name__} given), {hint.__doc__}"
        try:
            if isinstance(value, str):  # the parser reads "5" from a command line; Python code passes numbers
                raise ValueError(value)
            hint.check(value)
        except (TypeError, ValueError):
            return f"={value!r}: must be {hint.__doc__}"
        return None
    if hint is bool:
        return None if type(value) is bool else f"={value!r}: must be True or False"
    if hint in (int, float):
        ok = type(value) is int or (hint is float and type(value) is float)
        return None if ok else f"={value!r}: must be a plain Python {hint.__name__}"
    if hint is str:
        return None if isinstance(value, str) else f"={value!r}: must be a string"
    if origin is typing.Literal:
        return None if value in args and type(value) in {type(a) for a in args} else (
            f"={value!r}: must be one of " + ", ".join(repr(a) for a in args))
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None if type(None) in args else f"=None: must be {hint}"
        members = [arg for arg in args if arg is not type(None)]
        problems = [_type_problem(member, value) for member in members]
        if None in problems:
            return None
        if len(members) == 1:
            return problems[0] + (", or null" if type(None) in args else "")
        return f"={value!r}: must be {hint}"
    if origin in (dict, Mapping) or hint is dict:
        if not isinstance(value, Mapping):
            return f"={value!r}: must be a mapping (key: value)"
        item = args[1] if len(args) == 2 else Any
        for key, entry in value.items():
            problem = _type_problem(item, entry)
            if problem is not None:
                return f"[{key!r}]{problem}"
        return None
    if origin in (tuple, list):
        if isinstance(value, str | bytes) or not isinstance(value, tuple | list):
            return f"={value!r}: must be a list" + (f" of {len(args)} values" if origin is tuple else "")
        fixed = origin is tuple and Ellipsis not in args
        if fixed and len(value) != len(args):
            return f"={value!r}: must hold {len(args)} values"
        for index, item in enumerate(value):
            problem = _type_problem(args[index] if fixed else args[0], item)
            if problem is not None:
                return f"[{index}]{problem}"
        return None
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        if isinstance(value, hint):
            return None
        if not isinstance(value, Mapping):
            return f"={value!r}: must be a mapping of " + ", ".join(f.name for f in dataclasses.fields(hint))
        unknown = sorted(set(value) - {f.name for f in dataclasses.fields(hint)})
        if unknown:
            return f": {unknown} not among " + ", ".join(f.name for f in dataclasses.fields(hint))
        fields = typing.get_type_hints(hint)
        for key, entry in value.items():
            problem = _type_problem(fields[key], entry)
            if problem is not None:
                return f".{key}{problem}"
    return None  # Any, or a type the callee checks itself
