"""The Python API refuses what the CLI refuses: every range-annotated argument of `FlashGPT2LM` and
`WikitextDataModule`, given out of range in Python, is one `LitFlashError` naming `section.key` and the range in the
CLI's words; its boundary value is accepted. (The CLI's own refusals: test_bad_input.py, test_attack_matrix.py.)"""

from __future__ import annotations

import math
import typing
from typing import Any

import pytest

from lit_flash.datamodule import WikitextDataModule
from lit_flash.errors import LitFlashError
from lit_flash.limits import (
    RANGE_TYPES,
    DropoutFloat,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    SeedInt,
    TokenizerVocabInt,
    check_call_args,
)
from lit_flash.module import FlashGPT2LM

BELOW_0 = math.nextafter(0.0, -1.0)
# Per range type: (values refused, boundary values accepted).
BOUNDS: dict[type, tuple[list[Any], list[Any]]] = {
    PositiveFloat: ([0.0, -1.0], [math.nextafter(0.0, 1.0)]),
    NonNegativeFloat: ([BELOW_0], [0.0]),
    DropoutFloat: ([BELOW_0, 1.0], [0.0, math.nextafter(1.0, 0.0)]),
    NonNegativeInt: ([-1, 0.5], [0]),
    PositiveInt: ([0, True], [1]),
    SeedInt: ([-1, 2**32], [0, 2**32 - 1]),
    TokenizerVocabInt: ([256], [257]),
}
SECTIONS = {FlashGPT2LM: "model", WikitextDataModule: "data"}
# A class's own check, stricter than the type: a block of 1 token has nothing to predict (test_data.py).
SMALLEST = {"data.block_size": 2}


def range_parameters(cls: type) -> dict[str, tuple[type, int | None, bool]]:
    """name -> (range type, index in a tuple or None, nullable) for each range-annotated `__init__` argument."""
    found = {}
    for name, hint in typing.get_type_hints(cls.__init__).items():
        args = typing.get_args(hint)
        nullable = type(None) in args
        if hint in RANGE_TYPES.values() or (nullable and args[0] in RANGE_TYPES.values()):
            found[name] = (args[0] if nullable else hint, None, nullable)
        elif typing.get_origin(hint) is tuple and args and all(a in RANGE_TYPES.values() for a in args):
            found[name] = (args[0], len(args), False)
    return found


CASES = [(cls, name, *spec) for cls in SECTIONS for name, spec in range_parameters(cls).items()]


def build(cls: type, tiny_model_config: dict[str, Any], **values: Any) -> Any:
    if cls is WikitextDataModule:
        return WikitextDataModule(**values)
    return FlashGPT2LM(model_name_or_path=None, model_config=tiny_model_config, attn_implementation="sdpa", **values)


def test_the_matrix_covers_both_classes_and_every_range_type_they_use() -> None:
    names = {(SECTIONS[cls], name) for cls, name, *_ in CASES}
    assert {("model", "learning_rate"), ("model", "betas"), ("model", "dropout"), ("data", "batch_size"),
            ("data", "seed"), ("data", "train_tokenizer_vocab_size")} <= names
    assert {kind for _, _, kind, _, _ in CASES} <= set(BOUNDS)  # a new range type needs its bounds here


@pytest.mark.parametrize(("cls", "name", "kind", "size", "nullable"), CASES,
                         ids=[f"{SECTIONS[c]}.{n}" for c, n, *_ in CASES])
def test_out_of_range_is_refused_naming_the_key_and_the_boundary_accepted(
    cls: type, name: str, kind: type, size: int | None, nullable: bool, tiny_model_config: dict[str, Any]
) -> None:
    refused, accepted = BOUNDS[kind]
    key = f"{SECTIONS[cls]}.{name}"
    for value in refused:
        for index in range(size or 1):
            given = value if size is None else tuple(value if i == index else accepted[0] for i in range(size))
            with pytest.raises(LitFlashError) as error:
                build(cls, tiny_model_config, **{name: given})
            where = key if size is None else f"{key}[{index}]"
            assert str(error.value) == f"{where}={value!r}: must be {kind.__doc__}" + (", or null" if nullable else "")
    for value in [SMALLEST.get(key, v) for v in accepted] + ([None] if nullable else []):
        build(cls, tiny_model_config, **{name: value if size is None else (value,) * size})


def test_a_tuple_of_the_wrong_length_is_refused_naming_the_key() -> None:
    with pytest.raises(LitFlashError, match=r"^model\.betas=\(0\.9,\): must hold 2 values$"):
        check_call_args(FlashGPT2LM, {"betas": (0.9,)}, "model")


def test_the_python_refusal_says_what_the_cli_says(run_cli, tiny_config) -> None:
    code, _, err = run_cli(["fit", "--config", str(tiny_config), "--data.batch_size", "0"])
    assert code == 2
    with pytest.raises(LitFlashError) as error:
        WikitextDataModule(batch_size=0)
    assert err.strip().splitlines()[-1].startswith(f"error: {error.value}")


# Per class of wrong value, one argument of each kind: (section, key, value, what the one line says).
WRONG_TYPES = [
    ("model", "learning_rate", "np.float64(1e-3)", "must be a plain Python int or float (float64 given)"),
    ("model", "warmup_steps", "np.int64(1)", "must be a plain Python int or float (int64 given)"),
    ("model", "warmup_steps", "torch.tensor(1)", "must be a plain Python int or float (Tensor given)"),
    ("model", "dropout", "Fraction(1, 2)", "must be a plain Python int or float (Fraction given)"),
    ("data", "batch_size", "np.True_", "must be a plain Python int or float"),
    ("model", "compile", "'false'", "must be True or False"),
    ("model", "trust_remote_code", "'false'", "must be True or False"),
    ("model", "fused_adamw", "2", "must be True or False, or null"),
    ("data", "pin_memory", "np.False_", "must be True or False"),
    ("model", "on_nonfinite", "'Stop'", "must be one of 'stop', 'skip'"),
    ("model", "lr_scheduler", "'Cosine'", "must be one of 'linear', 'cosine'"),
    ("data", "packing_documents", "'lines'", "must be one of"),
    ("model", "betas", "0.9", "must be a list of 2 values"),
    ("model", "sdpa_backends", "'flash'", "must be a list"),
    ("model", "model_config", "'gpt2'", "must be a mapping"),
    ("data", "text_files", "'a.txt'", "must be a mapping"),
    ("data", "text_files", "{'train': 1}", "['train']=1: must be"),
    ("model", "lora", "'yes'", "must be a mapping of r, alpha"),
    ("model", "lora", "{'bogus': 1}", "['bogus'] not among r, alpha"),
    ("model", "lora", "{'r': 0}", ".r=0: must be an integer >= 1"),
    ("model", "model_name_or_path", "1", "must be a string, or null"),
]


@pytest.mark.parametrize(("section", "name", "given", "says"), WRONG_TYPES,
                         ids=[f"{s}.{n}={g}" for s, n, g, _ in WRONG_TYPES])
def test_a_value_of_the_wrong_kind_is_one_line_naming_the_key(
    section: str, name: str, given: str, says: str, tiny_model_config: dict[str, Any]
) -> None:
    """What the CLI's parser refuses by type is refused in Python too, before anything is built: a numpy or torch
    scalar (it would end up in every checkpoint, which a safe load then refuses), a truthy string for a bool (the
    string 'false' is true), a wrong choice, a string where a list or mapping belongs."""
    from fractions import Fraction  # noqa: F401  (used by eval)

    import numpy as np  # noqa: F401
    import torch  # noqa: F401

    value = eval(given)
    cls = FlashGPT2LM if section == "model" else WikitextDataModule
    values = {name: value}
    if name in ("model_config", "model_name_or_path"):
        with pytest.raises(LitFlashError) as error:
            FlashGPT2LM(**{"model_name_or_path": None, "model_config": tiny_model_config, name: value})
    else:
        with pytest.raises(LitFlashError) as error:
            build(cls, tiny_model_config, **values)
    message = str(error.value)
    assert message.startswith(f"{section}.{name}") and says in message and "\n" not in message, message
