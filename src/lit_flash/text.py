"""Raw text -> token blocks: read text files or a hub dataset, tokenize, cut into fixed-length blocks.

No Lightning here: `prepare` and the DataModule both call these, and the result is saved in the reference
recipe's format by `blocks.py`.
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import itertools
import json
import os
import re
import sysconfig
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lit_flash.errors import LitFlashError, check_can_create, not_a_file

# What `datasets` accepts as a split name (its `NamedSplit`); any other raised a ValueError deep in load_dataset.
SPLIT_NAME = re.compile(r"^\w+(\.\w+)*$")
# The reference recipe groups within map batches of 1000 rows and drops each batch's tail; so do we.
GROUP_BATCH_ROWS = 1000
EOS_TOKEN = "<|endoftext|>"


def tokenize_texts(texts: list[str], tokenizer: Any) -> dict[str, list[list[int]]]:
    """Tokenize a batch of lines as the reference recipe does (special tokens on, truncation to the tokenizer's
    `model_max_length`)."""
    # As the reference: lines longer than the tokenizer's model_max_length are truncated to it.
    encoded = tokenizer(texts, add_special_tokens=True, truncation=True, return_attention_mask=False, verbose=False)
    return {"input_ids": encoded["input_ids"]}


def group_texts(examples: dict[str, list[list[int]]], block_size: int) -> dict[str, list[list[int]]]:
    """Concatenate token lists and cut them into `block_size` blocks; the tail shorter than a block is dropped.

    No separator is inserted between lines, as in the reference recipe and HF's run_clm: the lines carry their own
    "\n" (wikitext's rows do; `load_raw_text` keeps it for text files). `labels` is a copy of `input_ids`: the model
    shifts them itself.
    """
    if block_size < 1:
        raise LitFlashError(f"block_size must be >= 1, got {block_size}")
    tokens = list(itertools.chain.from_iterable(examples["input_ids"]))
    usable = len(tokens) // block_size * block_size
    blocks = [tokens[i : i + block_size] for i in range(0, usable, block_size)]
    return {
        "input_ids": blocks,
        "attention_mask": [[1] * block_size for _ in blocks],
        "labels": [list(b) for b in blocks],
    }


def resolve_text_files(text_files: dict[str, str | list[str]], prefix: str = "data.") -> dict[str, list[str]]:
    """Expand globs (and `{stdlib}`, the running Python's standard library folder) into sorted file lists.
    `prefix`: how errors name the options (`data.` for fit's keys, `--` for `prepare`'s flags)."""
    stdlib = sysconfig.get_paths()["stdlib"]
    resolved: dict[str, list[str]] = {}
    for split, patterns in text_files.items():
        check_split_files(split, patterns, prefix)
        files: list[str] = []
        for pattern in [patterns] if isinstance(patterns, str) else patterns:
            pattern = os.path.expanduser(pattern.replace("{stdlib}", stdlib))
            matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
            missing = [m for m in matches if not os.path.isfile(m)]
            if missing and os.path.exists(missing[0]):  # a folder, a FIFO, a device: said for what it is
                raise LitFlashError(
                    f"{prefix}text_files[{split!r}]: {missing[0]} is {not_a_file(missing[0])}: give text files "
                    "(a glob such as folder/*.txt for a folder's files)"
                )
            if not matches or missing:
                first = missing[0] if missing else pattern
                raise LitFlashError(f"{prefix}text_files[{split!r}]: no file matches {first}")
            files.extend(matches)
        resolved[split] = files
    return resolved


def check_text_files_not_empty(text_files: dict[str, Any] | None, prefix: str) -> None:
    """`text_files: {}` is falsy: it read the hub dataset instead (wikitext by default), the setting ignored."""
    if text_files is not None and not text_files:
        raise LitFlashError(
            f"{prefix}text_files is empty ({{}}): give files per split, e.g. {{train: a.txt, validation: b.txt}}, "
            "or leave it unset for the hub dataset"
        )


def check_split_files(split: str, patterns: str | list[str], prefix: str) -> None:
    """A split's name must be one `datasets` takes, and its file list must name a file: both failed as a traceback
    inside `load_dataset` ("Split name should match ...", "Instruction ... corresponds to no data")."""
    if not SPLIT_NAME.match(split):
        raise LitFlashError(
            f"{prefix}text_files: split name {split!r} is not a word: name splits with letters, digits and _ "
            "(train, validation, test)"
        )
    if not isinstance(patterns, str) and not patterns:
        raise LitFlashError(
            f"{prefix}text_files[{split!r}]: an empty list: give a file or glob, or leave the split out"
        )


def check_text_file(path: str | os.PathLike, flag: str) -> None:
    """A text input is UTF-8 text with something in it: an empty file, a binary one (NUL bytes) or another encoding
    would otherwise fail inside `datasets` as a traceback, or tokenize to nothing without a word."""
    size = os.path.getsize(path)
    if size == 0:
        raise LitFlashError(f"{flag}: {path} is empty: give a file with text in it")
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):  # also UTF-32's: their BOMs begin alike
        raise LitFlashError(f"{flag}: {path} is UTF-16/32 text: convert it to UTF-8, e.g. iconv -f utf-16 -t utf-8")
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):  # whole file, a MiB at a time: a bad byte may sit anywhere
            if b"\0" in chunk:
                raise LitFlashError(f"{flag}: {path} is a binary file (NUL bytes), not text: give a UTF-8 text file")
            try:
                decoder.decode(chunk, final=len(chunk) < 1 << 20)
            except UnicodeDecodeError as err:
                raise LitFlashError(
                    f"{flag}: {path} is not UTF-8 text (byte {chunk[err.start]:#04x} at offset {offset + err.start}):"
                    " convert it, e.g. iconv -f latin1 -t utf-8"
                ) from None
            offset += len(chunk)


@contextmanager
def quiet_datasets_progress() -> Iterator[None]:
    """`datasets`' progress bars off while lit_flash reads the raw text, back as they were after: for local files
    they count files "downloaded" and splits "generated", a screen of bars before the first step of the demo. The
    tokenization's bars stay (minutes on a large dataset); hub downloads keep huggingface_hub's own bar.
    HF_DATASETS_DISABLE_PROGRESS_BARS, when set (0 shows them), is the user's choice and is left alone."""
    import datasets

    if datasets.are_progress_bars_disabled() or "HF_DATASETS_DISABLE_PROGRESS_BARS" in os.environ:
        yield
        return
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        datasets.enable_progress_bars()


@quiet_datasets_progress()
def load_raw_text(
    dataset_name: str | None,
    dataset_config_name: str | None,
    text_files: dict[str, str | list[str]] | None,
    streaming: bool = False,
    text_column: str = "text",
    prefix: str = "data.",
    sample_by: str = "line",
) -> Any:
    """Load raw text from local files (when given) or the HF hub, as a `DatasetDict` with a `text` column.
    `prefix`: how errors name the options (`data.` for fit's keys, `--` for `prepare`'s flags). `sample_by`: a
    file's rows are its lines, blank-line-separated `paragraph`s, or the whole `document`."""
    import datasets

    check_text_files_not_empty(text_files, prefix)
    if text_files:
        # Each row keeps its "\n", as wikitext's rows on the hub do and as HF's run_clm reads text files: without it
        # the lines of a file run together ("return 1x = f()").
        files = resolve_text_files(text_files, prefix)
        for split, paths in files.items():
            for path in paths:
                check_text_file(path, f"{prefix}text_files[{split!r}]")
        raw = datasets.load_dataset(
            "text", data_files=files, streaming=streaming, keep_linebreaks=True, sample_by=sample_by
        )
    elif dataset_name:
        try:
            raw = datasets.load_dataset(dataset_name, dataset_config_name, streaming=streaming)
        except (ConnectionError, OSError, ValueError) as err:  # offline, no such dataset or configuration
            first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
            raise LitFlashError(
                f"{prefix}dataset_name={dataset_name} ({dataset_config_name}): cannot load it ({first}); offline, "
                f"give {prefix}text_files" + (" or data.tokenized_dataset_load_dir" if prefix == "data." else "")
            ) from err
    else:
        also = ", or data.tokenized_dataset_load_dir" if prefix == "data." else ""
        raise LitFlashError(f"no data source: set {prefix}dataset_name or {prefix}text_files{also}")
    columns = next(iter(raw.values())).column_names  # None for a stream that does not list its columns
    if columns is not None and text_column not in columns:
        raise LitFlashError(
            f"{prefix}text_column={text_column!r} is not a column of the data ({columns}): set it to one"
        )
    if text_column != "text":
        raw = raw.rename_column(text_column, "text")
    return raw


def tokenize_and_group(raw: Any, tokenizer: Any, block_size: int, num_proc: int | None = None) -> Any:
    """Raw text `DatasetDict` -> reference-format blocks. Empty lines are dropped first, as the reference does."""
    kwargs = {} if num_proc is None or num_proc < 2 else {"num_proc": num_proc}
    # Only `text` goes on (a stream may not know its other columns in advance: it cannot list them to drop).
    raw = raw.select_columns(["text"])
    raw = raw.filter(lambda ex: [bool(t.strip()) for t in ex["text"]], batched=True, **kwargs)
    tokens = raw.map(
        lambda ex: tokenize_texts(ex["text"], tokenizer), batched=True, remove_columns=["text"], **kwargs
    )
    return tokens.map(
        lambda ex: group_texts(ex, block_size), batched=True, batch_size=GROUP_BATCH_ROWS, **kwargs
    )


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def load_tokenizer(source: str, flag: str, fix: str) -> Any:
    """`AutoTokenizer.from_pretrained(source)`, or one line naming `flag` (a config key such as
    `data.tokenizer_name`, or a tool's `--flag`) and `source`, ending with `fix`.

    transformers 5 builds a one-token tokenizer from a folder without tokenizer files but with a config.json (a
    model's folder): every text then encodes to nothing, and the run failed far away ("the split is empty")."""
    from transformers import AutoTokenizer

    given = f"{flag} {source}" if flag.startswith("--") else f"{flag}={source}"
    folder = Path(source).expanduser()
    no_files = folder.is_dir() and not any((folder / name).is_file() for name in TOKENIZER_FILES)
    missing = f"{given} has no tokenizer (none of {', '.join(TOKENIZER_FILES)} in that folder): {fix}"
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as err:  # ValueError: a folder transformers cannot make a tokenizer of
        if no_files:
            raise LitFlashError(missing) from err
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise LitFlashError(f"{given}: cannot load the tokenizer ({first})") from err
    if len(tokenizer) < 2:
        raise LitFlashError(missing if no_files else f"{given} has no tokenizer (it loads with no vocabulary): {fix}")
    return tokenizer


def train_bpe_tokenizer(raw: Any, vocab_size: int, save_dir: str | Path) -> Any:
    """Train a byte-level BPE tokenizer (GPT-2's kind) on the `train` split and save it in HF format."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    lines = (t for t in raw["train"]["text"] if t.strip())
    bpe.train_from_iterator(
        lines, vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS_TOKEN], show_progress=False
    )
    PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token=EOS_TOKEN, eos_token=EOS_TOKEN, unk_token=EOS_TOKEN, model_max_length=1024
    ).save_pretrained(str(save_dir))
    # Reloaded, not the object above: that one wraps `bpe`, whose truncation setter transformers 5 cannot call
    # (`truncation=True` raised a TypeError), and training then uses exactly what `setup` and the export load.
    return AutoTokenizer.from_pretrained(str(save_dir))


CACHE_FORMAT_VERSION = 1  # raise when the cached blocks' format changes: older caches are then rebuilt


def tokenized_cache_dir(
    cache_dir: str | os.PathLike | None, source: Any, tokenizer: dict[str, Any], block_size: int, text_column: str,
    packing: str | None,
) -> Path:
    """The cache folder of these blocks: named by a hash of everything they depend on (the text files' sizes and
    times, or the hub dataset; the tokenizer; the block size; packing), under `cache_dir` (default
    ~/.cache/lit_flash)."""
    key: dict[str, Any] = {**tokenizer, "block_size": block_size, "text_column": text_column,
                           "version": CACHE_FORMAT_VERSION}
    if isinstance(source, dict):  # local text files per split
        files = resolve_text_files(source)
        key["files"] = {s: [(f, os.path.getsize(f), os.path.getmtime(f)) for f in fs] for s, fs in files.items()}
    else:
        key["hub"] = list(source)
    if packing:  # packed blocks differ from grouped ones; unpacked runs keep their existing cache key
        key["packing"] = packing
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    root = Path(cache_dir or Path.home() / ".cache" / "lit_flash").expanduser()
    check_can_create(root, f"data.cache_dir={root}", "give a folder for the tokenized cache")
    return root / digest


def check_no_empty_split(blocks: Any, block_size: int, text_flag: str, block_flag: str) -> None:
    """Refuse blocks with an empty split (less text than one block): saved, they would be refused later, by a check
    that can only name the cache folder, far from the cause."""
    empty = [split for split in blocks if len(blocks[split]) == 0]
    if empty:
        raise LitFlashError(
            f"{text_flag}: split {empty[0]!r} holds fewer than {block_flag}={block_size} tokens of text: give more "
            f"text or a smaller {block_flag}"
        )
