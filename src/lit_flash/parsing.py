"""How the command line is read: parse errors as one line, lit_flash's `--ckpt_path` and `--weights_only`, and
checks of `--config` files before jsonargparse reads them."""

from __future__ import annotations

import dataclasses
import inspect
import os
import re
import sys
import weakref
from pathlib import Path
from typing import Any

from jsonargparse import ArgumentParser
from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningArgumentParser

from lit_flash.errors import LitFlashError, not_a_file
from lit_flash.limits import RANGE_TYPES

# `--help` section titles. jsonargparse takes a class's first docstring line, which is cut mid-sentence where the
# summary runs over a line (Lightning's ModelCheckpoint among them).
GROUP_TITLES = {  # in the order of `--help` (cli.py: add_core_arguments_to_parser)
    "model": "model: FlashGPT2LM, the causal LM (attention, speed levers, loss guard, AdamW and its schedule)",
    "data": "data: WikitextDataModule, token blocks from a hub dataset, text files or a tokenized dataset",
    "checkpoint": "checkpoint: Lightning's ModelCheckpoint (lit_flash keeps every checkpoint, and last.ckpt)",
    "export": "export: the Hugging Face model written at the end of fit",
    "lr_monitor": "lr_monitor: Lightning's LearningRateMonitor",
    "throughput": "throughput: samples/s, tokens/s, FLOP/s and MFU, logged every trainer.log_every_n_steps",
    "trainer": "trainer: Lightning's Trainer (devices, precision, steps, validation and logging intervals)",
}
OVERVIEW = """usage: python -m lit_flash <subcommand> [options]   (or: lit-flash <subcommand> ...)

  fit       train; without --config, the offline CPU demo (configs/demo.yaml)
  validate  validation loss and perplexity of a model or checkpoint (--ckpt_path)
  test      the same on the test split
  prepare   tokenize text into the reference recipe's DatasetDict (save_to_disk), for data.tokenized_dataset_load_dir
  generate  sample text from an exported model folder (<run>/model, or a hub id)
  plot      draw a run's training loss and validation perplexity into a PNG

`python -m lit_flash <subcommand> --help` lists a subcommand's options; `fit --config configs/gpt2_flash.yaml
--print_config` shows a complete config.
"""


# The program's name as users type it (argparse would say `__main__.py`), and a short usage line per subcommand
# (argparse lists every one of the ~100 options there, before the help itself).
PARSER_KWARGS: dict[str, Any] = {
    "prog": "python -m lit_flash",
    **{
        name: {
            "usage": f"python -m lit_flash {name} [--config FILE ...] [--ckpt_path PATH|last|auto] "
                     "[--<section>.<key> VALUE ...]   (sections: model, data, checkpoint, ..., trainer)",
            "description": f"{what} Every option below is a key of a YAML config (--config) or a flag; "
                           "--ckpt_path is explained at the end, under 'Where the run starts from'.",
        }
        for name, what in (("fit", "Train, validate every trainer.val_check_interval, save checkpoints, export."),
                           ("validate", "Validation loss and perplexity of a model or a checkpoint."),
                           ("test", "Test loss and perplexity of a model or a checkpoint (the test split)."))
    },
}


RESUME_TITLE = "Where the run starts from"
# The help of the trainer subcommands' `--ckpt_path`; its values are resolved by checkpointing.resolve_resume.
CKPT_PATH_HELP = (
    "The checkpoint to start from. A file path; or `auto`: the intact checkpoint with the highest step in "
    "<default_root_dir>/checkpoints/, or a fresh start when there is none (for jobs that restart on their own); "
    "or `last`: that folder's last.ckpt, an error when there is none (the resume command printed after a SIGTERM "
    "or Ctrl-C). Unset with `fit`: a fresh run, refused when the folder already holds checkpoints."
)
WEIGHTS_ONLY_HELP = (
    "Unset (null) or true: the checkpoint is loaded with torch.load(weights_only=True), which reads tensors and "
    "plain values only and runs no code from the file (lit_flash's default, not torch's or Lightning's). false: "
    "full unpickling, which can run code from the file: only for a checkpoint you trust. A sharded FSDP "
    "checkpoint (a folder) is read by torch.distributed.checkpoint, which this flag does not change."
)


_PARSERS: weakref.WeakSet = weakref.WeakSet()  # this process's lit_flash parsers, for did_you_mean


class _OneLineErrors:
    """Config mistakes (a typo'd key, a wrong type) as one line, not the whole usage text.

    Abbreviated options are off: `--trainer.max_step 3` would otherwise silently set `max_steps`, and a typo such
    as `--model.learning_rat` would pass as `learning_rate`.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        _PARSERS.add(self)

    def error(self, message: str, *args: Any, **kwargs: Any) -> None:
        # A nested parser (a dataclass's, a class's init_args) raises instead: its parent's message names the key.
        if os.environ.get("JSONARGPARSE_DEBUG") or not self.exit_on_error:
            return super().error(message, *args, **kwargs)  # type: ignore[misc]
        line = one_line_parser_error(message)
        sys.stderr.write(f"error: {line}{did_you_mean(line, self)}  (see --help)\n")
        raise SystemExit(2)


def did_you_mean(line: str, parser: ArgumentParser) -> str:
    """`; did you mean --model.learning_rate?` for the unknown keys an error line names, from the parser's keys."""
    import difflib

    unknown = re.findall(r"--([\w.]+)", line) + re.findall(r"option '([\w.]+)'", line)
    # A key inside a nested setting (a dataclass such as model.lora): "model.lora: Option 'alhpa' is not accepted".
    unknown += [f"{section}.{key}" for section, key in re.findall(r"([\w.]+): Option '([\w.]+)'", line)]
    if not unknown:
        return ""
    known: list[str] = []
    # The subcommands' parsers as well: a config file's unknown key is reported by the top-level parser.
    for candidate in {parser, *_PARSERS}:
        try:
            known += [re.sub(r"^(fit|validate|test|predict)\.", "", k) for k in candidate.get_defaults().keys()]
        except Exception:  # noqa: BLE001 - a hint is a nicety: never let it hide the error itself
            continue
    from lit_flash.lora import LoraSettings  # a null-by-default setting: its keys are not among the defaults

    known += [f"model.lora.{field.name}" for field in dataclasses.fields(LoraSettings)]
    # Not the unknown key's own section (`model.lora` for `model.lora.alhpa`): that says nothing new.
    guesses = [m for key in unknown for m in difflib.get_close_matches(key, known, n=2, cutoff=0.75)
               if not key.startswith(f"{m}.")][:len(unknown)]
    return f"; did you mean {', '.join('--' + g for g in dict.fromkeys(guesses))}?" if guesses else ""


class OneLineErrorParser(_OneLineErrors, LightningArgumentParser):
    """The Trainer subcommands' parser."""

    def add_method_arguments(self, class_type: type, method_name: str, *args: Any, **kwargs: Any) -> list[str]:
        """The trainer subcommands' `--ckpt_path` and `--weights_only`, with lit_flash's meaning of their values
        (Lightning's docstrings describe Trainer.fit's, without `auto`)."""
        params = inspect.signature(getattr(class_type, method_name)).parameters
        ours = {"ckpt_path": CKPT_PATH_HELP, "weights_only": WEIGHTS_ONLY_HELP}
        ours = {name: text for name, text in ours.items() if name in params}
        if not issubclass(class_type, Trainer) or not ours:
            return super().add_method_arguments(class_type, method_name, *args, **kwargs)
        kwargs["skip"] = set(kwargs.get("skip") or ()) | set(ours)
        added = super().add_method_arguments(class_type, method_name, *args, **kwargs)
        group = self.add_argument_group(RESUME_TITLE)
        if "ckpt_path" in ours:
            group.add_argument("--ckpt_path", type=str | None, default=None, help=ours["ckpt_path"])
        if "weights_only" in ours:
            group.add_argument("--weights_only", type=bool | None, default=None, help=ours["weights_only"])
        return added + list(ours)


class OneLineToolParser(_OneLineErrors, ArgumentParser):
    """The parser of `prepare`, `generate` and `plot` (plain functions, not LightningCLI)."""


def one_line_parser_error(message: str) -> str:
    """jsonargparse's message as one line: the key, then what was wrong with its value. A range type's reason
    (`model.learning_rate: must be a finite number > 0, got '-1'`) is used as it is; a Union's many lines (one per
    member type, `null` included) shrink to the reasons of its non-null members and the given value."""
    nested = _nested_error(str(message))
    if nested is not None:
        return nested
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    if not lines:
        return "invalid arguments"
    key = re.match(r'Parser key "([^"]+)"', lines[0])
    choice = _choice_error(key.group(1), str(message)) if key else None
    if choice is not None:
        return choice
    # "Not of type X: reason" (a registered type's own reason); a union lists them as "- Not of type X: reason".
    reasons = [m.group(1) for line in lines[1:] if (m := re.match(r"-?\s*Not of type \S+: (.*)", line))]
    types = [m.group(1) for line in lines[1:] if (m := re.match(r"-?\s*Not of type (\S+):", line))]
    given = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("Given value:")), None)
    if key and types and types[0] in RANGE_TYPES and given is not None:
        # A Union's member errors are rewritten by jsonargparse (it blanks the value inside them): say the range
        # from the type itself.
        nullable = any("NoneType" in line for line in lines[1:])
        return f"{key.group(1)}={given}: must be {RANGE_TYPES[types[0]].__doc__}{', or null' if nullable else ''}"
    if key and reasons:
        # A range type says "must be <range>, got <value>": as lit_flash's other lines, "key=value: must be ...".
        got = re.match(r"(must be .*), got (.*)$", reasons[0])
        if got:
            return f"{key.group(1)}={got.group(2).strip(chr(39))}: {got.group(1)}"
        return f"{key.group(1)}: {'; or '.join(dict.fromkeys(reasons))}"
    details = [line for line in lines[1:] if line.startswith(("Expected", "Given value:"))]
    if key and any(line.startswith("Does not validate") for line in lines[1:]):
        members = [line[2:] for line in lines[1:] if line.startswith("- ") and "NoneType" not in line]
        return " ".join([f"{key.group(1)}:", *members[:2], *details[-1:]])
    details += [line for line in lines[1:] if line.startswith("Does not validate")]
    details += [line for line in lines[1:] if "not expected" in line or "No action" in line][:1]
    return " ".join(lines[:1] + details) if details else " ".join(lines[:2])


def _choice_error(key: str, message: str) -> str | None:
    """A value outside a Literal's choices as check_call_args says it from Python, `key='value': must be one of
    ...`: quoted, so a stray space shows (jsonargparse's line printed 'sdpa ' as sdpa), with the choice it likely
    meant where case, spaces or dashes are all that differ. None: not one Literal's error (a Union of several)."""
    expected = [e for e in re.findall(r"Expected a (.*?)(?:\. Got value: .*)?$", message, re.MULTILINE)
                if "NoneType" not in e]
    if len(expected) != 1 or not expected[0].startswith("typing.Literal["):
        return None
    choices = expected[0][len("typing.Literal[") : -1]
    got = re.findall(r"Got value: (.*)$", message, re.MULTILINE)  # the value, or the list item that is wrong
    given = re.findall(r"Given value: (.*)$", message, re.MULTILINE)  # the whole value
    if not got and not given:
        return None
    item = bool(got) and "Given value type: <class 'list'>" in message  # an item of a list is wrong
    value = got[-1] if item or not given else given[-1]
    def normal(text: str) -> str:  # both sides: a choice may hold dashes ('reduce-overhead') or underscores
        return text.strip().lower().replace("-", "_")

    guess = next((c for c in re.findall(r"'([^']*)'", choices) if normal(c) == normal(value)), None)
    hint = f"; did you mean {guess!r}?" if guess is not None else ""
    nullable = ", or null" if "NoneType" in message else ""
    if item and given:
        return f"{key}={given[-1]}: {value!r} is not one of {choices}{hint}"
    return f"{key}={value!r}: must be one of {choices}{nullable}{hint}"


def _nested_error(message: str) -> str | None:
    """A dataclass's setting inside a Union (`model.lora.r`): that setting's own error, under its full key."""
    raw = message.splitlines()
    key = re.match(r'Parser key "([^"]+)"', raw[0]) if raw else None
    start = next((i for i, line in enumerate(raw) if line.strip().startswith("- Problem with given class_path")), None)
    if key is None or start is None:
        return None
    depth = len(raw[start]) - len(raw[start].lstrip())
    inner = []
    for line in raw[start + 1 :]:
        if len(line) - len(line.lstrip()) <= depth:
            break
        inner.append(line.strip())
    sub = re.match(r'Parser key "([^"]+)":', inner[0]) if inner else None
    if sub:
        return one_line_parser_error("\n".join([f'Parser key "{key.group(1)}.{sub.group(1)}":', *inner[1:]]))
    return f"{key.group(1)}: {inner[0]}" if inner else None


MAX_CONFIG_NODES = 100_000
# The sections of a trainer subcommand's config: each a mapping of keys (GROUP_TITLES' sections, and the Trainer's).
CONFIG_SECTIONS = tuple(GROUP_TITLES)


def expanded_yaml_size(node: Any, sizes: dict[int, int] | None = None) -> int:
    """How many values a composed YAML document holds once its aliases are expanded, counted without expanding
    them (an alias is the same node object: its size is computed once)."""
    sizes = {} if sizes is None else sizes
    if node is None:
        return 0
    if id(node) not in sizes:
        children = node.value if isinstance(node.value, list) else []
        items = [part for child in children for part in (child if isinstance(child, tuple) else (child,))]
        sizes[id(node)] = 1 + sum(expanded_yaml_size(item, sizes) for item in items)
    return sizes[id(node)]


def check_config_files(args: list[str]) -> None:
    """Each `--config FILE`: UTF-8 text holding a YAML mapping. jsonargparse would raise a UnicodeDecodeError
    traceback for other bytes, and call an empty file or a list "Unexpected config"."""
    import yaml

    paths = [args[i + 1] for i, a in enumerate(args[:-1]) if a in ("-c", "--config")]
    paths += [a.split("=", 1)[1] for a in args if a.startswith("--config=")]
    for path in paths:
        if not os.path.exists(path):
            continue  # jsonargparse names a missing one
        if not os.path.isfile(path):  # a FIFO would block the read for ever; a folder is not a config
            raise LitFlashError(f"--config {path}: {not_a_file(path)}: give a YAML file")
        raw = Path(path).read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise LitFlashError(
                f"--config {path}: not UTF-8 text (byte {raw[err.start]:#04x} at offset {err.start}): "
                "save it as UTF-8 (a YAML file)"
            ) from None
        try:
            content = yaml.safe_load(text)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise LitFlashError(f"--config {path}: not valid YAML{where} ({problem}): fix the file") from None
        size = expanded_yaml_size(yaml.compose(text))
        if size > MAX_CONFIG_NODES:  # nested anchors expand exponentially ("billion laughs"): a hang
            raise LitFlashError(
                f"--config {path}: its YAML aliases (*name) expand to {size:.3g} values, more than a config can "
                f"hold ({MAX_CONFIG_NODES}): write the values out"
            )
        if content is None:
            raise LitFlashError(f"--config {path} is empty: give a YAML file with trainer:, model:, data: ... keys")
        if not isinstance(content, dict):
            raise LitFlashError(
                f"--config {path}: holds a {type(content).__name__}, not a mapping: give a YAML file with "
                "trainer:, model:, data: ... keys"
            )
        for section in CONFIG_SECTIONS:  # `trainer: 5` raised a TypeError; `trainer:` (null) a misleading key error
            if section in content and not isinstance(content[section], dict):
                raise LitFlashError(
                    f"--config {path}: {section} must be a mapping of keys (e.g. {section}: {{key: value}}), got "
                    f"{content[section]!r}: give its keys, or leave the section out"
                )
