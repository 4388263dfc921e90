"""The attack matrix, by class of bad input: every case goes through the CLI and must end with exit status 2, one
`error:` line (the last on stderr) naming the key or file to fix, no traceback, and every file the user had left
byte for byte as it was. A correct run and a resume afterwards still work.

Classes: values out of range for each numeric option (generated: hypothesis, derandomized), config files that are
not YAML mappings in UTF-8, checkpoints not written by Lightning, text inputs that are not text, model shapes that
cannot be built (generated), generate/plot/prepare edge cases, and a bad `--model.*` value beside `--ckpt_path`.
Cases run in-process (`cli_main`); a few run `python -m lit_flash` to prove the real entry point.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import pickle
import random
import re
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from _helpers import BLOCK, cli_command, cli_env, make_dataset, snapshot, tiny_run_config, write_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lit_flash.cli import cli_main

# About 190 whole CLI runs (half a minute): the full suite (CI) runs them; the fast tier keeps
# tests/test_bad_input.py's one-line-error checks of each class.
pytestmark = pytest.mark.slow


def generated(max_examples: int) -> settings:
    """Hypothesis settings: the same cases on every CI run (derandomized, no example database), no deadline (a
    case runs the CLI), the module-scoped `user` fixture shared by all examples."""
    return settings(
        max_examples=max_examples,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )


# -- running the CLI and judging its answer
def run(args: list[str]) -> tuple[int, str]:
    """`cli_main(args)` in-process: (exit status, stderr). A normal return is status 0."""
    err = io.StringIO()
    argv = sys.argv
    sys.argv = argv[:1]  # pytest's own arguments are not the CLI's
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            cli_main(args)
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        sys.argv = argv
    return code, err.getvalue()


def assert_one_error_line(code: int, err: str, *names: str) -> None:
    """Exit 2; the last non-empty stderr line is the only `error:` line and names each of `names`; no traceback."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert "Traceback" not in err, err
    assert lines and lines[-1].startswith("error:"), err
    assert [line for line in lines if line.startswith("error:")] == [lines[-1]], err
    assert "\n" not in lines[-1]
    for name in names:
        assert name in lines[-1], (name, lines[-1])


def assert_refused_and_unchanged(root: Path, args: list[str], *names: str) -> None:
    before = snapshot(root)
    code, err = run(args)
    assert_one_error_line(code, err, *names)
    after = snapshot(root)
    assert {path: after.get(path) for path in before} == before, "a user file was changed or deleted"


# -- the user's things: a dataset, a config that trains, a finished run with its checkpoint and export
@pytest.fixture(scope="module")
def user(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("user")
    data = make_dataset(root / "data", n_train=16, n_val=8)
    config = tiny_run_config(root / "run", data, trainer={"max_steps": 2, "val_check_interval": 2})
    write_config(root / "config.yaml", config)
    code, err = run(["fit", "--config", str(root / "config.yaml")])
    assert code == 0, err
    ckpt = root / "run" / "checkpoints" / "last.ckpt"
    return {"root": root, "config": root / "config.yaml", "run": root / "run", "ckpt": ckpt}


def fit_args(user: dict[str, Path], *extra: str) -> list[str]:
    # A fresh output folder: the finished run must not be what refuses (fresh fit over an earlier run).
    return ["fit", "--config", str(user["config"]), f"--trainer.default_root_dir={user['root'] / 'fresh'}", *extra]


# -- class 1: numeric values out of range (generated)
# key -> (kind, low, high): "int" counts, "float" finite numbers; None = unbounded on that side; open bounds as
# (value, False). Every numeric __init__ argument of the model, data module and callbacks, and the Trainer and
# ModelCheckpoint values lit_flash's configs set.
INT, FLOAT = "int", "float"
FIT_RANGES: dict[str, tuple[str, Any, Any]] = {
    "data.block_size": (INT, 2, None),
    "data.batch_size": (INT, 1, None),
    "data.eval_batch_size": (INT, 1, None),
    "data.num_workers": (INT, 0, None),
    "data.max_train_samples": (INT, 1, None),
    "data.max_eval_samples": (INT, 1, None),
    "data.num_proc": (INT, 1, None),
    "data.seed": (INT, 0, 2**32 - 1),
    "data.train_tokenizer_vocab_size": (INT, 257, None),
    "model.warmup_steps": (INT, 0, None),
    "model.pad_vocab_to_multiple_of": (INT, 1, None),
    "model.learning_rate": (FLOAT, (0, False), None),
    "model.weight_decay": (FLOAT, 0, None),
    "model.eps": (FLOAT, (0, False), None),
    "model.dropout": (FLOAT, 0, (1, False)),
    "throughput.window_size": (INT, 2, None),
    "throughput.peak_tflops": (FLOAT, (0, False), None),
    "trainer.max_steps": (INT, -1, None),
    "trainer.max_epochs": (INT, -1, None),
    "trainer.min_steps": (INT, 0, None),
    "trainer.accumulate_grad_batches": (INT, 1, None),
    "trainer.gradient_clip_val": (FLOAT, 0, None),
    "trainer.log_every_n_steps": (INT, 0, None),
    "trainer.check_val_every_n_epoch": (INT, 1, None),
    "trainer.num_sanity_val_steps": (INT, -1, None),
    "trainer.num_nodes": (INT, 1, None),
    "checkpoint.every_n_train_steps": (INT, 0, None),
    "checkpoint.save_top_k": (INT, -1, None),
    "checkpoint.every_n_epochs": (INT, 0, None),
}
GENERATE_RANGES: dict[str, tuple[str, Any, Any]] = {
    "max_new_tokens": (INT, 1, None),
    "temperature": (FLOAT, 0, None),
    "top_k": (INT, 1, None),
    "top_p": (FLOAT, (0, False), 1),
    "seed": (INT, 0, 2**32 - 1),
    "batch_size": (INT, 1, None),
}
NOT_NUMBERS = ["true", "false", "abc", "[1, 2]", "{a: 1}", "nan", "inf", "-inf", "1e400"]


def _bound(bound: Any) -> tuple[float, bool]:
    return (bound[0], False) if isinstance(bound, tuple) else (bound, True)


@st.composite
def bad_value(draw: st.DrawFn, spec: tuple[str, Any, Any]) -> str:
    """A command-line value outside `spec`: below or above the range, a non-integer for a count, a bool, NaN or
    inf, a value past int64, or not a number at all."""
    kind, low, high = spec
    choices: list[st.SearchStrategy[str]] = [st.sampled_from(NOT_NUMBERS)]
    if low is not None:
        value, closed = _bound(low)
        if kind == INT:
            choices.append(st.integers(max_value=int(value) - 1, min_value=-(2**70)).map(str))
        else:
            finite = st.floats(max_value=value, allow_nan=False, allow_infinity=False)
            choices.append(finite.filter(lambda x: x < value if closed else x <= value).map(repr))
    if high is not None:
        value, closed = _bound(high)
        if kind == INT:
            choices.append(st.integers(min_value=int(value) + 1, max_value=2**70).map(str))
        else:
            finite = st.floats(min_value=value, allow_nan=False, allow_infinity=False)
            choices.append(finite.filter(lambda x: x > value if closed else x >= value).map(repr))
    if kind == INT:
        choices.append(st.floats(allow_nan=False, allow_infinity=False).filter(lambda x: x != int(x)).map(repr))
        choices.append(st.integers(min_value=2**63, max_value=2**80).map(str))  # past int64
    return draw(st.one_of(choices))


@pytest.mark.slow
@generated(60)
@given(data=st.data())
def test_fit_values_out_of_range(user: dict[str, Path], data: st.DataObject) -> None:
    key = data.draw(st.sampled_from(sorted(FIT_RANGES)), label="key")
    value = data.draw(bad_value(FIT_RANGES[key]), label="value")
    assert_refused_and_unchanged(user["root"], fit_args(user, f"--{key}={value}"), key)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("trainer.val_check_interval", "0"),
        ("trainer.val_check_interval", "-1"),
        ("trainer.val_check_interval", "1.5"),
        ("trainer.val_check_interval", "nan"),
        ("trainer.limit_train_batches", "-1"),
        ("trainer.limit_val_batches", "2.5"),
        ("trainer.limit_test_batches", "-0.5"),
        ("trainer.devices", "0"),
        ("trainer.devices", "-2"),
        ("trainer.devices", "[]"),
        ("model.betas", "[1.5, 0.9]"),
        ("model.betas", "[0.9, -0.1]"),
        ("model.betas", "[0.9, nan]"),
        ("seed_everything", "-1"),
        ("seed_everything", str(2**32)),
        ("seed_everything", "abc"),
        ("trainer.strategy", "no_such_strategy"),
        ("trainer.limit_train_batches", "0.01"),
        ("trainer.limit_val_batches", "0.01"),
        ("data.train_tokenizer_vocab_size", "10"),  # a byte-level BPE holds 257 tokens at least: it gave 257
        ("model.sdpa_backends", "[flash]"),  # CPU's flash kernel takes no dropout: it failed at step 1
        ("trainer.overfit_batches", "2"),
        ("trainer.overfit_batches", "0.5"),
        ("checkpoint.monitor", "foo"),
    ],
)
def test_trainer_union_values_out_of_range(user: dict[str, Path], key: str, value: str) -> None:
    # Lightning types these as unions (a count or a fraction, a count or a list): checked by lit_flash by value.
    assert_refused_and_unchanged(user["root"], fit_args(user, f"--{key}={value}"), key)


@generated(40)
@given(data=st.data())
def test_generate_values_out_of_range(user: dict[str, Path], data: st.DataObject) -> None:
    key = data.draw(st.sampled_from(sorted(GENERATE_RANGES)), label="key")
    value = data.draw(bad_value(GENERATE_RANGES[key]), label="value")
    args = ["generate", "--model_name_or_path", str(user["run"] / "model"), "--prompts", "hi", f"--{key}={value}"]
    assert_refused_and_unchanged(user["root"], args, key)


@pytest.mark.parametrize(("key", "value"), [("block_size", "0"), ("block_size", "-3"), ("num_proc", "0")])
def test_prepare_values_out_of_range(user: dict[str, Path], key: str, value: str) -> None:
    args = ["prepare", "--save_dir", str(user["root"] / "prepared"), f"--{key}={value}"]
    assert_refused_and_unchanged(user["root"], args, key)
    assert not (user["root"] / "prepared").exists()


# -- class 2: model shapes that cannot be built (generated), checked before anything is built
@pytest.mark.slow
@generated(15)
@given(width=st.integers(1, 512), heads=st.integers(1, 64))
def test_width_not_divisible_by_heads(user: dict[str, Path], width: int, heads: int) -> None:
    if width % heads == 0:
        width += 1 if heads > 1 else 0
    if width % heads == 0:
        return  # heads == 1 divides everything: a buildable shape
    args = fit_args(user, f"--model.model_config.n_embd={width}", f"--model.model_config.n_head={heads}")
    assert_refused_and_unchanged(user["root"], args, "model.model_config.n_embd", "model.model_config.n_head")


@pytest.mark.parametrize("key", ["n_layer", "n_head", "n_embd", "vocab_size", "n_positions", "n_inner"])
@pytest.mark.parametrize("value", ["0", "-4", "true", "2.5", "1e400"])
def test_model_sizes_that_cannot_be_built(user: dict[str, Path], key: str, value: str) -> None:
    assert_refused_and_unchanged(user["root"], fit_args(user, f"--model.model_config.{key}={value}"), key)


@pytest.mark.parametrize("key", ["vocab_size", "n_embd", "n_layer", "n_positions"])
def test_model_sizes_past_this_machines_memory(user: dict[str, Path], key: str) -> None:
    # Buildable, but its fp32 weights alone would not fit in memory: refused before anything is allocated.
    huge = {"vocab_size": 10**12, "n_embd": 2**24, "n_layer": 10**9, "n_positions": 10**12}[key]
    args = fit_args(user, f"--model.model_config.{key}={huge}")
    assert_refused_and_unchanged(user["root"], args, "model.model_config")


def test_model_size_within_memory_is_counted_as_built() -> None:
    from transformers import GPT2Config

    from lit_flash.errors import LitFlashError
    from lit_flash.guards import check_model_fits_memory

    check_model_fits_memory(GPT2Config(n_layer=3, n_embd=32, n_head=2, vocab_size=100))  # small: no refusal
    with pytest.raises(LitFlashError, match="model.model_config"):
        check_model_fits_memory(GPT2Config(n_layer=10**8, n_embd=32, n_head=2, vocab_size=100))


@pytest.mark.parametrize(
    ("setting", "name"),
    [
        ("--model.model_config.resid_pdrop=1.5", "resid_pdrop"),
        ("--model.model_config.attn_pdrop=-0.1", "attn_pdrop"),
        ("--model.model_config.layer_norm_epsilon=-1", "layer_norm_epsilon"),
        ("--model.model_config.scale_attn_weights=3", "scale_attn_weights"),
        ("--model.model_config.model_type=not_a_model", "model_type"),
        ("--model.model_config=7", "model.model_config"),
        ("--model.model_config.n_positions=8", "data.block_size"),  # the context is shorter than a row
        ("--model.model_name_or_path=/no/such/model", "model.model_name_or_path"),
    ],
)
def test_model_config_values(user: dict[str, Path], setting: str, name: str) -> None:
    assert_refused_and_unchanged(user["root"], fit_args(user, setting), name)


# -- class 3: files that are not what they claim
def _write(path: Path, content: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def _safetensors(path: Path) -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"w": torch.zeros(2)}, str(path))
    return path


def _zip(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("notes.txt", "hello")
    return path


def _torch_save(obj: Any) -> Callable[[Path], Path]:
    def make(path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(obj, path)
        return path

    return make


def _hf_trainer_folder(path: Path) -> Path:
    _write(path / "trainer_state.json", "{}")
    _write(path / "config.json", "{}")
    _safetensors(path / "model.safetensors")
    return path


def _empty_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


CONFIG_FILES: dict[str, Callable[[Path], Path]] = {
    "latin-1 text": lambda p: _write(p, "trainer:\n  max_steps: 1  # caf\xe9\n".encode("latin-1")),
    "utf-16 text": lambda p: _write(p, "trainer:\n  max_steps: 1\n".encode("utf-16")),
    "random bytes": lambda p: _write(p, bytes(range(256)) * 4),
    "empty": lambda p: _write(p, ""),
    "a list": lambda p: _write(p, "- trainer\n- model\n"),
    "a scalar": lambda p: _write(p, "hello\n"),
    "broken YAML": lambda p: _write(p, "trainer: {max_steps: [\n"),
    "a folder": _empty_folder,
    "a checkpoint": _torch_save({"a": 1}),
}


@pytest.mark.parametrize("kind", sorted(CONFIG_FILES))
def test_config_file_that_is_not_a_yaml_mapping(user: dict[str, Path], kind: str) -> None:
    path = CONFIG_FILES[kind](user["root"] / "configs" / kind.replace(" ", "_"))
    args = ["fit", "--config", str(user["config"]), "--config", str(path)]
    assert_refused_and_unchanged(user["root"], args, str(path))


SCALAR_SECTIONS = ["model: 5", "data: 5", "trainer: 5", "trainer: null", "checkpoint: 5", "export: [a, b]"]


@pytest.mark.parametrize("section", SCALAR_SECTIONS)
def test_a_config_section_that_is_not_a_mapping_is_named(user: dict[str, Path], section: str) -> None:
    """`trainer: 5` raised a TypeError, `trainer: null` a misleading "Key trainer.default_root_dir not found"."""
    path = _write(user["root"] / "configs" / f"section-{section.replace(' ', '').replace(':', '_')}.yaml", section)
    args = ["fit", "--config", str(user["config"]), "--config", str(path)]
    assert_refused_and_unchanged(user["root"], args, str(path), f"{section.split(':')[0]} must be a mapping of keys")


CHECKPOINT_FILES: dict[str, Callable[[Path], Path]] = {
    "random bytes": lambda p: _write(p, random.Random(0).randbytes(4096)),
    "empty file": lambda p: _write(p, b""),
    "text": lambda p: _write(p, "state_dict: none\n"),
    "a zip": _zip,
    "a plain pickle": lambda p: _write(p, pickle.dumps({"state_dict": {}})),
    "a torch dict": _torch_save({"weights": torch.zeros(2)}),
    "a torch list": _torch_save([1, 2, 3]),
    "a torch dict without a version": _torch_save({"state_dict": {}}),
    "a safetensors file": _safetensors,
    "an empty folder": _empty_folder,
    "a HF Trainer folder": _hf_trainer_folder,
}


@pytest.mark.parametrize("subcommand", ["fit", "validate"])
@pytest.mark.parametrize("kind", sorted(CHECKPOINT_FILES))
def test_checkpoint_not_written_by_lightning(user: dict[str, Path], kind: str, subcommand: str) -> None:
    path = CHECKPOINT_FILES[kind](user["root"] / "ckpts" / subcommand / kind.replace(" ", "_"))
    args = [*fit_args(user, "--ckpt_path", str(path))]
    args[0] = subcommand
    assert_refused_and_unchanged(user["root"], args, str(path))


@pytest.mark.parametrize("keep", [512, 5_000, 20_000, 0.5])
def test_a_real_checkpoint_cut_short_at_any_length_is_one_line(user: dict[str, Path], keep: float) -> None:
    """Cut at 5,000 or 20,000 bytes, the mmap'd load raised a bare OSError (EINVAL)."""
    whole = user["ckpt"].read_bytes()
    cut = _write(user["root"] / "ckpts" / f"cut-{keep}.ckpt", whole[: int(keep * len(whole)) if keep < 1 else keep])
    for subcommand in ("fit", "validate"):
        args = fit_args(user, "--ckpt_path", str(cut))
        args[0] = subcommand
        assert_refused_and_unchanged(user["root"], args, str(cut))


@pytest.mark.parametrize("word", ["best", "hpc", "registry"])
def test_lightnings_other_ckpt_path_words_are_refused_in_one_line(user: dict[str, Path], word: str) -> None:
    assert_refused_and_unchanged(user["root"], fit_args(user, "--ckpt_path", word), f"--ckpt_path {word}")


TEXT_FILES: dict[str, Callable[[Path], Path]] = {
    "latin-1": lambda p: _write(p, "caf\xe9 au lait\n".encode("latin-1") * 50),
    "utf-16": lambda p: _write(p, "some text\n".encode("utf-16") * 50),
    "binary": lambda p: _write(p, bytes(range(256)) * 8),
    "empty": lambda p: _write(p, ""),
    "a safetensors file": _safetensors,
    "a folder": _empty_folder,
    "a fifo": lambda p: (p.parent.mkdir(parents=True, exist_ok=True), os.mkfifo(p), p)[-1],
}


@pytest.mark.parametrize(("kind", "said"), [("a folder", "a folder"), ("a fifo", "named pipe")])
def test_a_text_file_that_is_a_folder_or_fifo_is_said_for_what_it_is(user: dict[str, Path], kind: str, said: str):
    """It said "no file matches" of a path that exists."""
    path = TEXT_FILES[kind](user["root"] / "texts" / f"said-{kind.replace(' ', '_')}")
    prepare = ["prepare", "--save_dir", str(user["root"] / "prepared"), f"--text_files={{train: {path}}}",
               "--splits=[train]"]
    assert_refused_and_unchanged(user["root"], prepare, str(path), "--text_files", said)


@pytest.fixture(scope="module")
def tokenizer_folder(tokenizer_dir: Path) -> Path:
    return tokenizer_dir


@pytest.mark.parametrize("kind", sorted(TEXT_FILES))
def test_text_file_that_is_not_text(user: dict[str, Path], tokenizer_folder: Path, kind: str) -> None:
    path = TEXT_FILES[kind](user["root"] / "texts" / f"{kind.replace(' ', '_')}.txt")
    good = _write(user["root"] / "texts" / "good.txt", "one two three four five six seven\n" * 100)
    files = f"--data.text_files={{train: {path}, test: {good}}}"
    args = fit_args(user, "--data.tokenized_dataset_load_dir=null", f"--data.tokenizer_name={tokenizer_folder}", files,
                    f"--data.cache_dir={user['root'] / 'cache'}")
    assert_refused_and_unchanged(user["root"], args, str(path), "data.text_files")
    prepare = ["prepare", "--save_dir", str(user["root"] / "prepared"), f"--tokenizer_name={tokenizer_folder}",
               f"--text_files={{train: {path}}}", "--splits=[train]"]
    assert_refused_and_unchanged(user["root"], prepare, str(path), "--text_files")  # prepare's flag, not fit's key
    prompts = ["generate", "--model_name_or_path", str(user["run"] / "model"), "--prompts_file", str(path)]
    assert_refused_and_unchanged(user["root"], prompts, str(path))


@pytest.mark.parametrize(
    ("setting", "flag"),
    [("--text_files={train: /no/such/file.txt}", "--text_files"), ("--text_column=body", "--text_column"),
     ("--splits=[train, validation]", "--splits")],
)
def test_prepare_errors_name_prepares_own_flags(user: dict[str, Path], tokenizer_folder: Path, setting: str,
                                               flag: str) -> None:
    good = _write(user["root"] / "texts" / "good.txt", "one two three four five six seven\n" * 100)
    args = ["prepare", "--save_dir", str(user["root"] / "prepared"), f"--tokenizer_name={tokenizer_folder}",
            f"--text_files={{train: {good}}}", "--splits=[train]", setting]
    code, err = run(args)
    assert_one_error_line(code, err, flag)
    assert "data." not in err  # fit's keys mean nothing to a prepare user


@pytest.mark.parametrize(
    ("make", "what"),
    [
        (lambda root: root / "nowhere", "no such folder"),
        (lambda root: _empty_folder(root / "models" / "empty"), "config.json"),
        (lambda root: _safetensors(root / "models" / "a.safetensors"), "is a file"),
        (lambda root: _zip(root / "models" / "a.zip"), "is a file"),
    ],
    ids=["missing", "empty folder", "a safetensors file", "a zip"],
)
def test_generate_model_of_the_wrong_kind(user: dict[str, Path], make: Callable[[Path], Path], what: str) -> None:
    path = make(user["root"])
    args = ["generate", "--model_name_or_path", str(path), "--prompts", "hi"]
    assert_refused_and_unchanged(user["root"], args, str(path), what)


@pytest.mark.parametrize(
    ("make", "name"),
    [
        (lambda root: _write(root / "plots" / "junk.csv", b"\xff\xfe\x00garbage"), "junk.csv"),
        (lambda root: _write(root / "plots" / "words.csv", "step,train_loss\nabc,xyz\n"), "words.csv"),
        (lambda root: _write(root / "plots" / "empty.csv", ""), "empty.csv"),
        (lambda root: _write(root / "plots" / "no_metrics/logs/version_0/metrics.csv", "epoch,step\n"), "metrics.csv"),
        (lambda root: _empty_folder(root / "plots" / "empty_run"), "empty_run"),
        (lambda root: root / "plots" / "missing_run", "missing_run"),
    ],
    ids=["binary csv", "non-numbers", "empty csv", "run without metrics", "empty folder", "missing folder"],
)
def test_plot_input_of_the_wrong_kind(user: dict[str, Path], make: Callable[[Path], Path], name: str) -> None:
    path = make(user["root"])
    assert_refused_and_unchanged(user["root"], ["plot", str(path), "--output", str(user["root"] / "x.png")], name)
    assert not (user["root"] / "x.png").exists()


# -- class 4: generate / plot / prepare edge cases
@pytest.fixture(scope="module")
def model_folder(tmp_path_factory: pytest.TempPathFactory, tokenizer: Any) -> Path:
    """A tiny saved GPT-2 with the session's tokenizer beside it."""
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path_factory.mktemp("hf_model")
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=BLOCK, n_embd=32, n_layer=1, n_head=2)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    ("extra", "name"),
    [
        (["--prompts", ""], "prompt 0 is empty"),
        (["--input_str", ""], "prompt 0 is empty"),
        (["--prompts", "a", "--max_new_tokens", "0"], "max_new_tokens"),
        (["--prompts", "a", "--max_new_tokens", "-5"], "max_new_tokens"),
        (["--prompts", "a", "--max_new_tokens", str(10 * BLOCK)], "max_new_tokens"),
        (["--prompts", "a", "--temperature", "-1"], "temperature"),
        (["--prompts", "a", "--temperature", "nan"], "temperature"),
        (["--prompts", "a", "--temperature", "1e-40"], "temperature"),  # "probability tensor contains inf"
        (["--prompts", "a", "--top_k", "0"], "top_k"),
        (["--prompts", "a", "--top_p", "0"], "top_p"),
        (["--prompts", "a", "--device", "banana"], "--device"),
        ([], "no prompts"),
        (["--prompts", "a", "--no_such_option", "1"], "no_such_option"),
        (["--prompts", "a", "--tokenizer", "/nowhere/tok"], "--tokenizer"),
    ],
)
def test_generate_edge_cases(user: dict[str, Path], model_folder: Path, extra: list[str], name: str) -> None:
    assert_refused_and_unchanged(model_folder, ["generate", "--model_name_or_path", str(model_folder), *extra], name)


def test_generate_output_that_exists(model_folder: Path, tmp_path: Path) -> None:
    out = _write(tmp_path / "out.jsonl", "mine")
    args = ["generate", "--model_name_or_path", str(model_folder), "--prompts", "a", "--output", str(out)]
    assert_refused_and_unchanged(tmp_path, args, str(out))


def test_the_smallest_temperature_samples_without_overflow(model_folder: Path, tmp_path: Path) -> None:
    from lit_flash.generate import MIN_TEMPERATURE

    args = ["generate", "--model_name_or_path", str(model_folder), "--prompts", "one two", "--temperature",
            str(MIN_TEMPERATURE), "--max_new_tokens", "3", "--output", str(tmp_path / "out.jsonl")]
    code, err = run(args)
    assert code == 0, err
    assert (tmp_path / "out.jsonl").read_text().count("completion") == 1


def test_temperature_zero_is_greedy_and_works(model_folder: Path, tmp_path: Path) -> None:
    # Not an error: 0 is greedy decoding (documented); the same completion twice.
    outputs = []
    for name in ("a.jsonl", "b.jsonl"):
        args = ["generate", "--model_name_or_path", str(model_folder), "--prompts", "one two", "--temperature", "0",
                "--max_new_tokens", "3", "--output", str(tmp_path / name)]
        code, err = run(args)
        assert code == 0, err
        outputs.append((tmp_path / name).read_text())
    assert outputs[0] == outputs[1]


@pytest.mark.parametrize(
    ("extra", "name"),
    [
        (["--splits", "[nope]"], "--splits"),
        (["--tokenizer_name", "/nowhere/tokenizer"], "--tokenizer_name"),
        (["--block_size", "100000"], "--block_size"),
    ],
)
def test_prepare_edge_cases(user: dict[str, Path], tokenizer_folder: Path, extra: list[str], name: str) -> None:
    text = _write(user["root"] / "texts" / "small.txt", "one two three\n" * 20)
    args = ["prepare", "--save_dir", str(user["root"] / "prepared"), f"--tokenizer_name={tokenizer_folder}",
            f"--text_files={{train: {text}}}", "--splits=[train]", *extra]
    assert_refused_and_unchanged(user["root"], args, name)
    assert not (user["root"] / "prepared").exists()


def test_prepare_into_a_file(user: dict[str, Path], tokenizer_folder: Path) -> None:
    target = _write(user["root"] / "notes.md", "mine")
    args = ["prepare", "--save_dir", str(target), f"--tokenizer_name={tokenizer_folder}"]
    assert_refused_and_unchanged(user["root"], args, str(target))


# -- class 5: a bad --model.* value beside an explicit --ckpt_path (the checkpoint's hparams replace the user's)
@pytest.mark.parametrize(
    ("setting", "name"),
    [
        ("--model.model_config.n_head=3", "model.model_config.n_head"),
        ("--model.model_config.n_layer=0", "model.model_config.n_layer"),
        ("--model.learning_rate=-1", "model.learning_rate"),
        ("--model.dropout=nan", "model.dropout"),
    ],
)
@pytest.mark.parametrize("subcommand", ["fit", "validate"])
def test_bad_model_value_beside_ckpt_path_is_refused(
    user: dict[str, Path], setting: str, name: str, subcommand: str
) -> None:
    args = [subcommand, "--config", str(user["config"]), "--ckpt_path", str(user["ckpt"]), setting]
    assert_refused_and_unchanged(user["root"], args, name)


def test_replaced_model_value_is_said_then_resume_works(user: dict[str, Path]) -> None:
    """After all the refused cases above, the user's run still resumes; a model value the checkpoint overrides is
    named on stderr instead of being dropped silently."""
    before = snapshot(user["root"] / "data")
    code, err = run(["fit", "--config", str(user["config"]), "--trainer.max_steps=3", "--ckpt_path", str(user["ckpt"]),
                     "--model.learning_rate=0.5", "--export.dirname=null"])
    assert code == 0, err
    assert "model.learning_rate=0.5 is ignored" in err
    assert torch.load(user["ckpt"], weights_only=True)["global_step"] == 3
    assert snapshot(user["root"] / "data") == before


# -- the real entry point: a few cases as the shell runs them, started together (each imports torch)
@pytest.mark.slow
def test_real_entry_point(user: dict[str, Path], tmp_path: Path) -> None:
    bad_ckpt = _zip(tmp_path / "model.ckpt")
    latin = _write(tmp_path / "latin.yaml", "trainer:\n  max_steps: 1 # \xe9\n".encode("latin-1"))
    # Two processes (each imports torch and Lightning): a Trainer subcommand and a tool, each with a file and a value.
    cases = {
        "fit": (["fit", "--config", str(latin), "--data.batch_size=0"], str(latin)),
        "generate": (["generate", "--model_name_or_path", str(bad_ckpt), "--prompts", "a"], str(bad_ckpt)),
    }
    before = snapshot(user["root"])
    procs = {
        name: subprocess.Popen(cli_command(*args), env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
        for name, (args, _) in cases.items()
    }
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=240)
        assert_one_error_line(proc.returncode, err, cases[name][1])
    assert {path: snapshot(user["root"]).get(path) for path in before} == before


def test_matrix_covers_every_numeric_init_argument() -> None:
    """A new numeric option must join the matrix: every int/float argument of the CLI's classes is listed."""
    import inspect

    from lit_flash.callbacks import TokenThroughput
    from lit_flash.datamodule import WikitextDataModule
    from lit_flash.generate import generate_main
    from lit_flash.module import FlashGPT2LM

    def numeric(function: Callable, prefix: str) -> set[str]:
        names = set()
        for name, parameter in inspect.signature(function).parameters.items():
            default = parameter.default
            if isinstance(default, int | float) and not isinstance(default, bool) and math.isfinite(default):
                names.add(prefix + name)
            elif default is None and any(t in str(parameter.annotation) for t in ("Int", "Float", "int", "float")):
                names.add(prefix + name)
        return names

    listed = set(FIT_RANGES) | {f"generate.{k}" for k in GENERATE_RANGES} | {"model.betas"}
    wanted = (
        numeric(FlashGPT2LM.__init__, "model.")
        | numeric(WikitextDataModule.__init__, "data.")
        | numeric(TokenThroughput.__init__, "throughput.")
        | numeric(generate_main, "generate.")
    )
    assert wanted - listed == set()



def test_more_cpu_devices_than_cores_is_refused_before_any_process_starts(tmp_path, capsys):
    """`--trainer.devices 64` on CPU started 64 training processes (one per device) and exhausted the memory."""
    from lit_flash.cli import cli_main

    too_many = (os.cpu_count() or 1) + 1
    with pytest.raises(SystemExit) as exit_:
        cli_main(["fit", "--trainer.accelerator", "cpu", "--trainer.devices", str(too_many),
                  "--trainer.default_root_dir", str(tmp_path / "run")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: trainer.devices=") and "cores" in err[-1]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("typo", "meant"),
    [(["--model.learning_rat=3"], "--model.learning_rate"), (["--trainer.max_step=3"], "--trainer.max_steps"),
     (["--modle.dropout=0.1"], "--model.dropout"), (["--data.batch_sise=4"], "--data.batch_size"),
     (["--config", "TYPO_YAML"], "--model.learning_rate")],
    ids=["option", "trainer option", "section", "data option", "key in a config file"],
)
def test_a_typo_in_a_key_is_refused_with_the_key_it_likely_meant(user: dict[str, Path], typo: list[str],
                                                                 meant: str) -> None:
    typo_yaml = _write(user["root"] / "typo.yaml", "model:\n  learnin_rate: 0.1\n")
    args = fit_args(user, *[str(typo_yaml) if a == "TYPO_YAML" else a for a in typo])
    code, err = run(args)
    assert_one_error_line(code, err)
    assert f"did you mean {meant}?" in err


def test_a_key_like_no_other_gets_no_guess(user: dict[str, Path]) -> None:
    code, err = run(fit_args(user, "--zzzz=3"))
    assert_one_error_line(code, err)
    assert "did you mean" not in err


def test_several_nodes_without_a_launcher_is_refused_instead_of_waiting_for_ever(tmp_path, capsys, monkeypatch):
    """`--trainer.num_nodes 2` started by hand on one machine waited for ever for a second node."""
    from lit_flash.cli import cli_main

    for name in ("NODE_RANK", "RANK", "WORLD_SIZE", "GROUP_RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "SLURM_NTASKS",
                 "LSB_JOBID"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(SystemExit) as exit_:
        cli_main(["fit", "--trainer.accelerator", "cpu", "--trainer.num_nodes", "2",
                  "--trainer.default_root_dir", str(tmp_path / "run")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: trainer.num_nodes=2:") and "torchrun" in err[-1]
    assert not (tmp_path / "run").exists()


def test_several_nodes_under_a_launcher_or_a_set_node_rank_pass_the_launch_check(monkeypatch):
    from lit_flash.errors import LitFlashError
    from lit_flash.preflight import check_multi_node_launch

    for name in ("NODE_RANK", "RANK", "WORLD_SIZE", "TORCHELASTIC_RUN_ID", "SLURM_NTASKS", "LSB_JOBID"):
        monkeypatch.delenv(name, raising=False)
    check_multi_node_launch(1)
    with pytest.raises(LitFlashError, match="trainer.num_nodes=2"):
        check_multi_node_launch(2)
    for launched in ({"TORCHELASTIC_RUN_ID": "job"}, {"WORLD_SIZE": "16", "RANK": "3"}, {"NODE_RANK": "1"}):
        with monkeypatch.context() as env:  # torchrun; Kubeflow-style variables; Lightning's launcher by hand
            for name, value in launched.items():
                env.setenv(name, value)
            check_multi_node_launch(2)


def test_a_typo_in_the_number_of_loader_workers_is_refused(tmp_path, capsys):
    """`--data.num_workers=100000` forked workers until the run died."""
    from lit_flash.cli import cli_main

    too_many = 4 * (os.cpu_count() or 1) + 1
    with pytest.raises(SystemExit) as exit_:
        cli_main(["fit", "--data.num_workers", str(too_many), "--trainer.default_root_dir", str(tmp_path / "run")])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"error: data.num_workers={too_many}: ")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("where", ["lock is a folder", "lock is a fifo", "checkpoints is a file", "logs is a file"])
def test_a_run_folder_holding_the_wrong_kind_of_entry_is_one_line(user: dict[str, Path], tmp_path, where: str):
    """Each of these ended in a traceback (IsADirectoryError, a non-seekable FIFO, FileExistsError)."""
    root = tmp_path / "run"
    root.mkdir()
    name = {"lock is a folder": ".lit_flash.lock", "lock is a fifo": ".lit_flash.lock",
            "checkpoints is a file": "checkpoints", "logs is a file": "logs"}[where]
    if where == "lock is a folder":
        (root / name).mkdir()
    elif where == "lock is a fifo":
        os.mkfifo(root / name)
    else:
        (root / name).write_text("the user's notes\n")
    args = fit_args(user, f"--trainer.default_root_dir={root}", "--ckpt_path=auto")
    assert_refused_and_unchanged(root, args, name)


@pytest.mark.parametrize("extra", [
    "--trainer.default_root_dir=", "--checkpoint.filename=../../notes", "--checkpoint.filename=sub/x",
    "--trainer.max_steps=0", "--trainer.max_epochs=0", "--trainer.limit_train_batches=0",
    "--trainer.max_time=00:00:00:00", "--trainer.max_time={minutes: 0}",
])
def test_a_run_that_would_write_elsewhere_or_train_nothing_is_refused(user: dict[str, Path], extra: str):
    """`checkpoint.filename=../../notes` replaced the user's notes.ckpt; an empty root wrote into the current
    folder; a fit of no step exported the untrained model as if it had trained."""
    key = extra.split("=")[0].lstrip("-")
    assert_refused_and_unchanged(user["root"], fit_args(user, extra), key)


def test_a_logged_monitor_and_a_positive_max_time_still_train(user: dict[str, Path], tmp_path) -> None:
    args = fit_args(user, f"--trainer.default_root_dir={tmp_path / 'run'}", "--checkpoint.monitor=val_loss",
                    "--trainer.max_time=00:00:10:00")
    code, err = run(args)
    assert code == 0, err
    assert (tmp_path / "run" / "model").is_dir()


def test_plot_output_in_a_format_matplotlib_cannot_write_is_one_line(user: dict[str, Path]) -> None:
    """`plot <run> --output out.txt` raised matplotlib's ValueError after reading the logs."""
    target = user["root"] / "plots" / "out.txt"
    assert_refused_and_unchanged(user["root"], ["plot", str(user["run"]), "--output", str(target)], "out.txt")
    assert not target.exists()


def test_plot_output_in_a_new_folder_is_written(user: dict[str, Path]) -> None:
    """A missing parent folder raised FileNotFoundError; generate --output creates it, and so does plot now."""
    from lit_flash.cli import cli_main

    target = user["root"] / "plots" / "new" / "folder" / "curves.png"
    cli_main(["plot", str(user["run"]), "--output", str(target)])
    assert target.is_file() and target.stat().st_size > 0


def test_a_config_that_is_a_fifo_is_refused_not_read_for_ever(user: dict[str, Path]) -> None:
    fifo = user["root"] / "configs" / "fifo.yaml"
    fifo.parent.mkdir(exist_ok=True)
    os.mkfifo(fifo)
    assert_refused_and_unchanged(user["root"], fit_args(user, "--config", str(fifo)), "fifo.yaml")


@pytest.mark.parametrize("kind", ["fifo", "folder", "missing"])
@pytest.mark.parametrize("flag", ["--ckpt_path", "--prompts_file", "--config"])
def test_a_path_that_is_not_a_regular_file_is_named_for_what_it_is(user: dict[str, Path], flag: str, kind: str) -> None:
    if flag == "--config" and kind == "missing":
        pytest.skip("jsonargparse itself names a missing config")
    path = user["root"] / "odd" / f"{flag.strip('-')}-{kind}"
    path.parent.mkdir(exist_ok=True)
    if kind == "fifo" and not path.exists():
        os.mkfifo(path)
    elif kind == "folder":
        path.mkdir(exist_ok=True)
    said = {"fifo": "named pipe", "folder": "folder", "missing": "no such file"}[kind]
    if flag == "--prompts_file":
        args = ["generate", "--model_name_or_path", str(user["run"] / "model"), flag, str(path)]
    else:
        args = fit_args(user, flag, str(path))
    assert_refused_and_unchanged(user["root"], args, flag.strip("-"), said)


def test_a_config_of_nested_yaml_aliases_is_refused_not_expanded(user: dict[str, Path]) -> None:
    """Nine levels of nine aliases ("billion laughs") hung the parser."""
    lines = ['a0: &a0 ["lol"]'] + [
        f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)
    ]
    laughs = _write(user["root"] / "configs" / "laughs.yaml", "\n".join(lines) + "\n")
    assert_refused_and_unchanged(user["root"], fit_args(user, "--config", str(laughs)), "laughs.yaml")


@pytest.mark.parametrize("extra", ["--ckpt_path=", "--model.model_config.activation_function=bogus"])
def test_an_empty_ckpt_path_or_an_unknown_activation_is_one_line(user: dict[str, Path], extra: str) -> None:
    """`--ckpt_path=` raised Lightning's ValueError; an unknown activation, transformers' bare KeyError."""
    assert_refused_and_unchanged(user["root"], fit_args(user, extra), extra.split("=")[0].lstrip("-"))


def test_resuming_with_max_steps_below_the_checkpoints_step_is_refused(user: dict[str, Path], tmp_path) -> None:
    """It exited 0 and exported again, with a warning about a schedule 'stretched' to end before it started."""
    import shutil

    run_dir = tmp_path / "copy"
    shutil.copytree(user["run"], run_dir)
    args = ["fit", "--config", str(user["config"]), f"--trainer.default_root_dir={run_dir}", "--ckpt_path=auto",
            "--trainer.max_steps=1"]
    assert_refused_and_unchanged(run_dir, args, "trainer.max_steps")


@pytest.mark.parametrize("rows", [
    {"input_ids": [[], []]},
    {"input_ids": [["1", "2"], ["3", "4"]]},
    {"input_ids": [[1.5, 2.0], [3.0, 4.0]]},
    {"input_ids": [[[1, 2]], [[3, 4]]]},
], ids=["empty rows", "strings", "floats", "nested"])
def test_token_rows_of_the_wrong_shape_or_type_are_one_line(user: dict[str, Path], tmp_path, rows) -> None:
    """Empty rows, string or nested ids ended in a TypeError or an Arrow error; float ids were cut silently."""
    import datasets

    folder = tmp_path / "blocks"
    datasets.DatasetDict({s: datasets.Dataset.from_dict(rows) for s in ("train", "test")}).save_to_disk(str(folder))
    assert_refused_and_unchanged(tmp_path, fit_args(user, f"--data.tokenized_dataset_load_dir={folder}"), "blocks")


def _dangling_link(tmp: Path) -> Path:
    (tmp / "dangling").symlink_to(tmp / "nowhere" / "target")
    return tmp / "dangling"


def _link_loop(tmp: Path) -> Path:
    (tmp / "loop").symlink_to(tmp / "loop")
    return tmp / "loop"


# Places lit_flash cannot create a folder or file in (each a traceback - NotADirectoryError, FileExistsError,
# OSError - once the work was done): tmp -> the path to give.
UNCREATABLE: dict[str, Callable[[Path], Path]] = {
    "a file": lambda tmp: _write(tmp / "afile", "the user's file\n"),
    "under a file": lambda tmp: _write(tmp / "afile", "the user's file\n") / "sub",
    "under /proc": lambda tmp: Path("/proc/lit_flash_no_such/sub"),
    "a dangling link": _dangling_link,
    "under a dangling link": lambda tmp: _dangling_link(tmp) / "sub",
    "a link loop": _link_loop,
    "under a link loop": lambda tmp: _link_loop(tmp) / "sub",
}


@pytest.mark.parametrize("where", sorted(UNCREATABLE))
def test_a_cache_dir_that_cannot_be_created_is_one_line(user: dict[str, Path], tokenizer_dir: Path, tmp_path,
                                                         where: str) -> None:
    text = _write(tmp_path / "train.txt", "one two three four five six seven\n" * 100)
    args = fit_args(user, "--data.tokenized_dataset_load_dir=null", f"--data.tokenizer_name={tokenizer_dir}",
                    f"--data.text_files={{train: {text}, test: {text}}}",
                    f"--data.cache_dir={UNCREATABLE[where](tmp_path)}")
    assert_refused_and_unchanged(tmp_path, args, "data.cache_dir")


@pytest.mark.parametrize("where", sorted(set(UNCREATABLE) - {"a file"}))  # a file: test_prepare_into_a_file
def test_a_prepare_save_dir_that_cannot_be_created_is_refused_before_tokenizing(
    user: dict[str, Path], tokenizer_folder: Path, tmp_path, where: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import lit_flash.prepare

    def no_tokenizing(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("tokenized before the --save_dir check")

    monkeypatch.setattr(lit_flash.prepare, "tokenize_and_group", no_tokenizing)
    text = _write(tmp_path / "small.txt", "one two three\n" * 20)
    args = ["prepare", "--save_dir", str(UNCREATABLE[where](tmp_path)), f"--tokenizer_name={tokenizer_folder}",
            f"--text_files={{train: {text}}}", "--splits=[train]"]
    assert_refused_and_unchanged(tmp_path, args, "--save_dir")


@pytest.mark.parametrize("where", sorted(set(UNCREATABLE) - {"a file"}))  # a file: test_generate_output_that_exists
def test_a_generate_output_that_cannot_be_created_is_refused_before_loading(
    model_folder: Path, tmp_path, where: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import lit_flash.generate

    def no_loading(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("loaded the model before the --output check")

    monkeypatch.setattr(lit_flash.generate, "load_for_generation", no_loading)
    output = UNCREATABLE[where](tmp_path) / "out.jsonl" if where.startswith("a ") else UNCREATABLE[where](tmp_path)
    args = ["generate", "--model_name_or_path", str(model_folder), "--prompts", "a", "--output", str(output)]
    assert_refused_and_unchanged(tmp_path, args, "--output")


def test_an_empty_generate_output_is_named_as_empty(model_folder: Path, tmp_path) -> None:
    """It said "--output  exists" (the empty path is the current folder)."""
    args = ["generate", "--model_name_or_path", str(model_folder), "--prompts", "a", "--output", ""]
    assert_refused_and_unchanged(tmp_path, args, "--output is empty")


def test_a_validation_interval_longer_than_an_epoch_while_counting_by_epochs_is_one_line(user: dict[str, Path]):
    """Lightning raised a ValueError traceback when the loader was built."""
    args = fit_args(user, "--trainer.val_check_interval=1000", "--trainer.check_val_every_n_epoch=1")
    assert_refused_and_unchanged(user["root"], args, "trainer.val_check_interval")



def test_any_random_bytes_as_a_checkpoint_are_one_error_not_a_traceback(tmp_path) -> None:
    """Random bytes fail inside torch's unpickler with an IndexError, KeyError or UnicodeDecodeError about one time in
    twelve (a traceback, and a test that failed now and then): 300 seeded files, each refused as lit_flash's error."""
    from lit_flash.ckpt_file import check_is_lightning_checkpoint
    from lit_flash.errors import LitFlashError

    path = tmp_path / "x.ckpt"
    for seed in range(300):
        path.write_bytes(random.Random(seed).randbytes(4096))
        with pytest.raises(LitFlashError, match="x.ckpt"):
            check_is_lightning_checkpoint(path)


def test_an_unknown_subcommand_lists_every_subcommand(capsys) -> None:
    """LightningCLI's own message listed fit, validate and test only."""
    from lit_flash.cli import cli_main

    with pytest.raises(SystemExit) as exit_:
        cli_main(["frobnicate"])
    assert exit_.value.code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("error: unknown subcommand 'frobnicate'")
    assert all(name in line for name in ("fit", "validate", "test", "prepare", "generate", "plot"))


# -- class 7 (attack2): inputs that reached a library's traceback, or a setting silently replaced by a default
@pytest.mark.parametrize(("files", "name"), [
    ("{train: TEXT, validation: []}", "data.text_files['validation']"),  # "Instruction ... corresponds to no data"
    ("{train: TEXT, 'my split': TEXT}", "'my split'"),  # "Split name should match ..."
    ("{train: TEXT, '': TEXT}", "split name ''"),
    ("{}", "data.text_files is empty"),  # was falsy: read the hub's wikitext instead
], ids=["empty list", "split name with a space", "empty split name", "no split"])
def test_text_files_that_datasets_cannot_read_are_one_line(user: dict[str, Path], tokenizer_dir: Path, tmp_path,
                                                           files: str, name: str) -> None:
    text = _write(tmp_path / "train.txt", "one two three four five six seven\n" * 100)
    args = fit_args(user, "--data.tokenized_dataset_load_dir=null", f"--data.tokenizer_name={tokenizer_dir}",
                    f"--data.text_files={files.replace('TEXT', str(text))}", f"--data.cache_dir={tmp_path / 'c'}")
    assert_refused_and_unchanged(tmp_path, args, name)


@pytest.mark.parametrize("last_row", [None, [None] * BLOCK, [None] + list(range(1, BLOCK))],
                         ids=["a null row", "a row of null ids", "one null id"])
def test_token_columns_with_missing_values_are_one_line(user: dict[str, Path], tmp_path, last_row) -> None:
    """A null row failed as a NumPy reshape traceback when batched; null ids trained unsaid as arbitrary ints."""
    import datasets

    rows = [list(range(i, i + BLOCK)) for i in range(7)] + [last_row]
    folder = tmp_path / "blocks"
    datasets.DatasetDict({s: datasets.Dataset.from_dict({"input_ids": rows})
                          for s in ("train", "test")}).save_to_disk(str(folder))
    args = fit_args(user, f"--data.tokenized_dataset_load_dir={folder}")
    assert_refused_and_unchanged(tmp_path, args, "null", "'input_ids'", str(folder))


@pytest.mark.parametrize("where", ["cache", "blocks"])
def test_a_file_where_the_cache_keeps_a_folder_is_one_line(text_files, tokenizer_dir, tmp_path, where) -> None:
    """A file put by hand where the tokenized cache (or its blocks) goes: a NotADirectoryError/FileExistsError
    traceback, and the file is left as it was."""
    from lit_flash import WikitextDataModule
    from lit_flash.errors import LitFlashError

    dm = WikitextDataModule(text_files=text_files, tokenizer_name=str(tokenizer_dir), block_size=32,
                            cache_dir=str(tmp_path / "cache"))
    planted = dm.cache_path if where == "cache" else dm.cache_path / "blocks"
    planted.parent.mkdir(parents=True, exist_ok=True)
    planted.write_text("mine")
    with pytest.raises(LitFlashError, match=rf"^data.cache_dir: {re.escape(str(planted))} is a file .*move it away$"):
        dm.prepare_data()
    assert planted.read_text() == "mine"


def test_a_damaged_tokenization_cache_names_the_cache_and_the_fix(text_files, tokenizer_dir, tmp_path) -> None:
    """It was named as data.tokenized_dataset_load_dir, a key the user had not set, with no fix."""
    from lit_flash import WikitextDataModule
    from lit_flash.errors import LitFlashError

    dm = WikitextDataModule(text_files=text_files, tokenizer_name=str(tokenizer_dir), block_size=32,
                            cache_dir=str(tmp_path / "cache"))
    dm.prepare_data()
    arrow = next((dm.cache_path / "blocks" / "train").glob("*.arrow"))
    arrow.write_bytes(arrow.read_bytes()[: arrow.stat().st_size // 2])  # a disk error, a partial copy
    with pytest.raises(LitFlashError) as err:
        dm.setup("fit")
    message = str(err.value)
    assert "data.cache_dir" in message and f"remove {dm.cache_path}" in message, message
    assert "tokenized_dataset_load_dir" not in message and "\n" not in message


def test_prepare_into_a_link_to_an_empty_folder_writes_there(user: dict[str, Path], tokenizer_folder: Path,
                                                              tmp_path) -> None:
    """rmtree refused the link: a traceback after the whole tokenization, and a temporary folder left behind."""
    text = _write(tmp_path / "small.txt", "one two three four five\n" * 40)
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    args = ["prepare", "--save_dir", str(tmp_path / "link"), f"--tokenizer_name={tokenizer_folder}",
            f"--text_files={{train: {text}}}", "--splits=[train]", "--block_size=8"]
    code, err = run(args)
    assert code == 0, err
    assert (tmp_path / "link").is_symlink() and (tmp_path / "real" / "dataset_dict.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real", "small.txt"]


@pytest.mark.parametrize(("extra", "name"), [
    (["--block_size", "1"], "--block_size 1"),  # fit refuses 1-token rows: prepare wrote a dataset nothing loads
    (["--splits", "[]"], "--splits is empty"),  # [] was the default [train, test], unsaid
], ids=["block of one token", "no split"])
def test_prepare_settings_fit_would_refuse_or_ignore(user: dict[str, Path], tokenizer_folder: Path, tmp_path,
                                                     extra: list[str], name: str) -> None:
    text = _write(tmp_path / "small.txt", "one two three\n" * 20)
    args = ["prepare", "--save_dir", str(tmp_path / "prepared"), f"--tokenizer_name={tokenizer_folder}",
            f"--text_files={{train: {text}, test: {text}}}", *extra]
    assert_refused_and_unchanged(tmp_path, args, name)
    assert not (tmp_path / "prepared").exists()


def test_a_generate_output_naming_a_folder_is_refused_before_loading(
    model_folder: Path, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--output new/` failed with IsADirectoryError after the whole generation."""
    import lit_flash.generate

    def no_loading(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("loaded the model before the --output check")

    monkeypatch.setattr(lit_flash.generate, "load_for_generation", no_loading)
    args = ["generate", "--model_name_or_path", str(model_folder), "--prompts", "a", "--output", f"{tmp_path}/new/"]
    assert_refused_and_unchanged(tmp_path, args, "--output", "names a folder")


def _damaged_copy(model_folder: Path, tmp: Path) -> Path:
    import shutil

    copy = tmp / "model"
    shutil.copytree(model_folder, copy)
    with open(copy / "model.safetensors", "r+b") as f:
        f.truncate(1000)  # a copy cut short
    return copy


def test_a_model_with_truncated_weights_is_one_line(user: dict[str, Path], model_folder: Path, tmp_path) -> None:
    """safetensors' SafetensorError (not an OSError) went through as a traceback, in generate and in fit."""
    copy = _damaged_copy(model_folder, tmp_path)
    assert_refused_and_unchanged(tmp_path, ["generate", "--model_name_or_path", str(copy), "--prompts", "a"],
                                 "--model_name_or_path", "cannot load it")
    args = fit_args(user, f"--model.model_name_or_path={copy}", "--model.model_config=null")
    assert_refused_and_unchanged(tmp_path, args, "model.model_name_or_path", "cannot load it")


@pytest.mark.parametrize("override", ["{n_embd: 64}", "{n_layer: 2}", "{vocab_size: 1000}"])
def test_a_model_config_override_that_reshapes_pretrained_weights_is_one_line(
    user: dict[str, Path], model_folder: Path, tmp_path, override: str
) -> None:
    """transformers printed a table of every mismatched weight (or, for new layers, initialized them unsaid)."""
    config = tiny_run_config(tmp_path / "run", user["root"] / "data")
    config["model"].update(model_name_or_path=str(model_folder), model_config=None)
    write_config(tmp_path / "config.yaml", config)
    args = ["fit", "--config", str(tmp_path / "config.yaml"), f"--model.model_config={override}"]
    assert_refused_and_unchanged(tmp_path, args, "model.model_config", override.strip("{}").split(":")[0])
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("where", ["plot.png is a folder", "metrics.csv is a folder", "no metric asked for"])
def test_plot_of_a_folder_in_a_files_place_or_no_metric_is_one_line(user: dict[str, Path], tmp_path,
                                                                    where: str) -> None:
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(user["run"] / "logs", run_dir / "logs")
    logs = sorted((run_dir / "logs").glob("version_*"))[-1]
    extra = []
    if where == "plot.png is a folder":
        (logs / "plot.png").mkdir()
    elif where == "metrics.csv is a folder":
        (logs / "metrics.csv").unlink()
        (logs / "metrics.csv").mkdir()
    else:
        extra = ["--metrics", "[]"]  # drew the default metrics, unsaid
    name = "--metrics is empty" if extra else "is a folder"
    assert_refused_and_unchanged(tmp_path, ["plot", str(run_dir), *extra], name)
