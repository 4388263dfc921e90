"""Data: raw text -> token blocks in the reference recipe's format, and the LightningDataModule over them.

The on-disk format is the one `prepare_save_dataset.py` of the reference recipe writes and its FlexAI job mounts
at `/input`: a `DatasetDict` saved with `save_to_disk`, splits `train`/`test` (optionally `validation`), columns
`input_ids`, `attention_mask`, `labels`, all rows of one length. Our own tokenization cache is written in that
same format, so every path (hub, local files, `/input`) ends in the one loader, `load_tokenized`.
"""

from __future__ import annotations

import codecs
import functools
import glob
import hashlib
import itertools
import json
import os
import shutil
import sysconfig
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pyarrow.compute as pc
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader

from lit_flash.distributed import shard_sampler
from lit_flash.errors import LitFlashError
from lit_flash.interrupt import ignore_sigint_in_worker
from lit_flash.limits import NonNegativeInt, PositiveInt, SeedInt
from lit_flash.resume import ResumableDataLoader, ResumableSampler

IGNORE_INDEX = -100  # labels the loss skips (transformers' convention)

REQUIRED_COLUMN = "input_ids"
OPTIONAL_COLUMNS = ("attention_mask", "labels")
# The reference recipe groups within map batches of 1000 rows and drops each batch's tail; so do we.
GROUP_BATCH_ROWS = 1000
EOS_TOKEN = "<|endoftext|>"
_CACHE_FORMAT_VERSION = 1


# ----------------------------------------------------------------------------------------------- pure helpers


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


def perplexity(mean_loss: torch.Tensor | float) -> torch.Tensor:
    """Perplexity from a token-weighted mean cross-entropy (natural log)."""
    return torch.exp(torch.as_tensor(mean_loss, dtype=torch.float64)).to(torch.float32)


def resolve_text_files(text_files: dict[str, str | list[str]]) -> dict[str, list[str]]:
    """Expand globs (and `{stdlib}`, the running Python's standard library folder) into sorted file lists."""
    stdlib = sysconfig.get_paths()["stdlib"]
    resolved: dict[str, list[str]] = {}
    for split, patterns in text_files.items():
        files: list[str] = []
        for pattern in [patterns] if isinstance(patterns, str) else patterns:
            pattern = os.path.expanduser(pattern.replace("{stdlib}", stdlib))
            matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
            missing = [m for m in matches if not os.path.isfile(m)]
            if not matches or missing:
                raise LitFlashError(f"data.text_files[{split!r}]: no file matches {missing[0] if missing else pattern}")
            files.extend(matches)
        resolved[split] = files
    return resolved


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


def collate_blocks(rows: list[dict[str, torch.Tensor]], pad_rows_to: int | None = None) -> dict[str, torch.Tensor]:
    """Stack equal-length rows; derive `labels` and drop an all-ones `attention_mask`.

    Without a mask the attention kernels take their dense (faster) path instead of unpadding. `pad_rows_to`: a
    short batch (an epoch's last) gets copies of its first row with every label ignored (-100), up to that many
    rows: the loss, a mean over predicted tokens, is unchanged, and a compiled model sees one shape only.
    """
    missing = max(0, (pad_rows_to or 0) - len(rows))
    batch = {"input_ids": torch.stack([r["input_ids"] for r in rows])}
    batch["labels"] = torch.stack([r["labels"] for r in rows]) if "labels" in rows[0] else batch["input_ids"].clone()
    if "attention_mask" in rows[0]:
        mask = torch.stack([r["attention_mask"] for r in rows])
        if not bool(mask.all()):
            batch["attention_mask"] = mask
            if "labels" not in rows[0]:  # derived labels: padding is not something to predict
                batch["labels"] = batch["labels"].masked_fill(mask == 0, IGNORE_INDEX)
    if missing:
        for key, tensor in batch.items():
            filler = torch.full_like(tensor[:1], IGNORE_INDEX) if key == "labels" else tensor[:1]
            batch[key] = torch.cat([tensor, filler.expand(missing, -1)])
    return batch


class BlockRows(torch.utils.data.Dataset):
    """A split of fixed-length token blocks as rows of NumPy arrays over its memory-mapped Arrow file.

    At batch 8 a training step is bounded by the host's time: fetching a batch through `datasets`' formatting costs
    about a millisecond of it; indexing these arrays, a tenth of that. The arrays are views (zero copy) of each
    Arrow chunk, so a split larger than memory stays on disk.
    """

    def __init__(self, ds: Any, columns: list[str]) -> None:
        self.columns = columns
        self.chunks: list[dict[str, Any]] = []
        ends: list[int] = []
        for batch in ds.data.table.select(columns).to_batches():
            if batch.num_rows:
                self.chunks.append({c: _block_array(batch.column(c)) for c in columns})
                ends.append((ends[-1] if ends else 0) + batch.num_rows)
        self.ends = np.asarray(ends)

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> list[dict[str, torch.Tensor]]:
        # The DataLoader hands a batch's indices at once: one fancy index per chunk and column, not one per row.
        rows = np.asarray(indices, dtype=np.int64)
        chunk_of = np.searchsorted(self.ends, rows, side="right")
        batch = {c: torch.empty((len(rows), self.chunks[0][c].shape[1]), dtype=torch.int64) for c in self.columns}
        for chunk in np.unique(chunk_of):
            at = np.nonzero(chunk_of == chunk)[0]
            local = rows[at] - (self.ends[chunk - 1] if chunk else 0)
            for c in self.columns:
                batch[c][torch.from_numpy(at)] = torch.from_numpy(self.chunks[chunk][c][local].astype(np.int64))
        return [{c: batch[c][i] for c in self.columns} for i in range(len(rows))]


def _block_array(column: Any) -> Any:
    """A list<int> Arrow column of equal-length rows as a 2-D NumPy view (a copy only where Arrow holds nulls)."""
    values = column.flatten()
    return values.to_numpy(zero_copy_only=values.null_count == 0).reshape(len(column), -1)


# ------------------------------------------------------------------------------------- building the datasets


def load_raw_text(
    dataset_name: str | None,
    dataset_config_name: str | None,
    text_files: dict[str, str | list[str]] | None,
    streaming: bool = False,
    text_column: str = "text",
) -> Any:
    """Load raw text from local files (when given) or the HF hub, as a `DatasetDict` with a `text` column."""
    import datasets

    if text_files:
        # Each row keeps its "\n", as wikitext's rows on the hub do and as HF's run_clm reads text files: without it
        # the lines of a file run together ("return 1x = f()").
        files = resolve_text_files(text_files)
        for split, paths in files.items():
            for path in paths:
                check_text_file(path, f"data.text_files[{split!r}]")
        raw = datasets.load_dataset("text", data_files=files, streaming=streaming, keep_linebreaks=True)
    elif dataset_name:
        try:
            raw = datasets.load_dataset(dataset_name, dataset_config_name, streaming=streaming)
        except (ConnectionError, OSError, ValueError) as err:  # offline, no such dataset or configuration
            first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
            raise LitFlashError(
                f"data.dataset_name={dataset_name} ({dataset_config_name}): cannot load it ({first}); offline, give "
                "data.text_files or data.tokenized_dataset_load_dir"
            ) from err
    else:
        raise LitFlashError("no data source: set data.dataset_name, data.text_files or data.tokenized_dataset_load_dir")
    columns = next(iter(raw.values())).column_names  # None for a stream that does not list its columns
    if columns is not None and text_column not in columns:
        raise LitFlashError(f"data.text_column={text_column!r} is not a column of the data ({columns}): set it to one")
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


def save_dataset_dict(dataset: Any, save_dir: str | Path, overwrite: bool = False) -> None:
    """`save_to_disk` through a temporary folder and a rename, so a killed save never leaves half a dataset."""
    save_dir = Path(save_dir)
    if save_dir.exists() and any(save_dir.iterdir()) and not overwrite:
        raise LitFlashError(f"{save_dir} exists and is not empty: choose another save dir or remove it yourself")
    tmp = save_dir.with_name(f".{save_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    dataset.save_to_disk(str(tmp))
    if save_dir.exists():
        shutil.rmtree(save_dir)
    os.replace(tmp, save_dir)


def load_tokenized(load_dir: str | Path, flag: str = "data.tokenized_dataset_load_dir") -> Any:
    """Load and check a reference-format `DatasetDict`; every problem is one `LitFlashError` naming what to fix."""
    import datasets

    path = Path(load_dir)
    if not path.is_dir():
        raise LitFlashError(f"{flag}={load_dir}: no such directory")
    if not (path / "dataset_dict.json").is_file():
        hint = " (it is a single Dataset: save a DatasetDict with splits)" if (path / "state.json").is_file() else ""
        raise LitFlashError(f"{flag}={load_dir}: not a DatasetDict saved by save_to_disk (no dataset_dict.json){hint}")
    for split in _empty_splits(path):  # datasets cannot load a split saved without rows (an IndexError)
        raise LitFlashError(
            f"{flag}={load_dir} split {split!r}: the split is empty (0 rows): prepare it again from data that has "
            "rows for it, or leave the split out"
        )
    try:
        dataset = datasets.load_from_disk(str(path))
    except Exception as err:  # corrupt arrow files, wrong versions: say which folder, not 40 lines of pyarrow
        raise LitFlashError(f"{flag}={load_dir}: cannot be loaded ({type(err).__name__}: {err})") from err
    if "train" not in dataset:
        raise LitFlashError(f"{flag}={load_dir}: no 'train' split (found {sorted(dataset)})")
    for split, ds in dataset.items():
        check_token_columns(ds, f"{flag}={load_dir} split {split!r}")
    return dataset


def _empty_splits(path: Path) -> list[str]:
    """Splits of a saved `DatasetDict` written with no data file (what `save_to_disk` does for 0 rows)."""
    try:
        splits = json.loads((path / "dataset_dict.json").read_text(encoding="utf-8"))["splits"]
        states = {s: json.loads((path / s / "state.json").read_text(encoding="utf-8")) for s in splits}
    except (OSError, ValueError, KeyError, TypeError):
        return []  # not as expected: load_from_disk says what is wrong
    return [s for s, state in states.items() if isinstance(state, dict) and state.get("_data_files") == []]


def check_token_columns(ds: Any, where: str) -> int:
    """Check one split's columns and that every row has the same length; return that length."""
    if REQUIRED_COLUMN not in ds.column_names:
        raise LitFlashError(f"{where}: no 'input_ids' column (found {ds.column_names})")
    if len(ds) == 0:
        raise LitFlashError(f"{where}: the split is empty")
    table = ds.data.table
    lengths = {}
    for column in (REQUIRED_COLUMN, *OPTIONAL_COLUMNS):
        if column in ds.column_names:
            stats = pc.min_max(pc.list_value_length(table.column(column)))
            lengths[column] = (stats["min"].as_py(), stats["max"].as_py())
    low, high = lengths[REQUIRED_COLUMN]
    if low != high:
        raise LitFlashError(f"{where}: rows of unequal length ({low}..{high} tokens): group them into fixed blocks")
    for column, bounds in lengths.items():
        if bounds != (low, low):
            raise LitFlashError(f"{where}: column {column!r} is not as long as input_ids ({low}) in every row")
    check_token_values(ds, where)
    return low


def _flat_chunks(ds: Any, column: str, skip_first: bool = False) -> Any:
    """A column's values, one Arrow chunk at a time (memory bounded by a chunk on any dataset size);
    `skip_first`: without each row's first position, which no label is predicted at (the model shifts)."""
    for chunk in ds.data.table.column(column).chunks:
        yield pc.list_flatten(pc.list_slice(chunk, 1) if skip_first else chunk)


def _count(mask: Any) -> int:
    return int(pc.sum(mask).as_py() or 0)


def check_token_values(ds: Any, where: str) -> None:
    """Refuse values the model would fail on mid-training (an IndexError on CPU, a device-side assert that kills
    the process on GPU) or learn nothing from: negative input ids, labels below 0 other than -100 (ignored), and
    a split with no label to predict (its mean loss is 0/0, NaN). Ids past the vocabulary are the model's check
    (`max_token_id`)."""
    for values in _flat_chunks(ds, REQUIRED_COLUMN):
        low = pc.min(values).as_py()
        if low is not None and low < 0:
            raise LitFlashError(f"{where}: input_ids holds the negative token id {low}: tokenize the data again")
    if "labels" in ds.column_names:
        predicted = 0
        for values in _flat_chunks(ds, "labels", skip_first=True):
            ignored = _count(pc.equal(values, IGNORE_INDEX))
            if _count(pc.less(values, 0)) > ignored:
                bad = pc.min(pc.filter(values, pc.and_(pc.less(values, 0), pc.not_equal(values, IGNORE_INDEX))))
                raise LitFlashError(
                    f"{where}: labels holds {bad.as_py()}: a label is a token id (>= 0), or {IGNORE_INDEX} for a "
                    "token not to predict; fix the labels column"
                )
            predicted += len(values) - ignored
        what = f"every label (after each row's first, which nothing predicts) is {IGNORE_INDEX}"
    elif "attention_mask" in ds.column_names:  # labels are input_ids, with padding (mask 0) ignored
        predicted = sum(_count(pc.not_equal(values, 0)) for values in _flat_chunks(ds, "attention_mask", True))
        what = "attention_mask is 0 everywhere (after each row's first token), so every label is padding"
    else:
        return
    if predicted == 0:
        raise LitFlashError(
            f"{where}: no token to predict: {what}, so the loss would be NaN (0/0); give the tokens to learn "
            "real labels (e.g. labels = input_ids)"
        )


def max_token_id(ds: Any) -> int:
    """Largest token id in a split's input_ids and labels (one Arrow pass each, no Python loop): an id or a label
    past the vocabulary is an IndexError on CPU and a device-side assert on GPU."""
    columns = [c for c in (REQUIRED_COLUMN, "labels") if c in ds.column_names]
    return max(int(pc.max(pc.list_flatten(ds.data.table.column(c))).as_py()) for c in columns)


def prepare_dataset(
    save_dir: str,
    dataset_name: str | None = "wikitext",
    dataset_config_name: str | None = "wikitext-2-raw-v1",
    text_files: dict[str, str | list[str]] | None = None,
    tokenizer_name: str = "openai-community/gpt2",
    block_size: PositiveInt = 1024,
    splits: list[str] | None = None,
    text_column: str = "text",
    num_proc: PositiveInt | None = None,
) -> None:
    """Tokenize raw text into blocks and `save_to_disk` them, as the reference's `prepare_save_dataset.py` does.

    The same as its `--dataset_group_text true`; the result loads with `data.tokenized_dataset_load_dir`.

    Args:
        save_dir: Output folder (must not exist or be empty). The reference's `--tokenized_dataset_save_dir`.
        dataset_name: HF hub dataset (ignored when `text_files` is given).
        dataset_config_name: Its configuration.
        text_files: Local text files per split, e.g. `{train: a.txt, test: [b.txt, c/*.txt]}`.
        tokenizer_name: Tokenizer (hub id or local folder). The reference's `--tokenizer_model_name`.
        block_size: Tokens per row, capped at the tokenizer's `model_max_length` as the reference does.
        splits: Splits to keep; default `[train, test]`, as the reference (it drops wikitext's validation split).
        text_column: Column holding the text. The reference's `--dataset_text_field`.
        num_proc: Worker processes for tokenization.
    """
    from transformers import AutoTokenizer

    if Path(save_dir).exists() and not Path(save_dir).is_dir():
        raise LitFlashError(f"--save_dir {save_dir} is a file: choose a new folder")
    if Path(save_dir).exists() and any(Path(save_dir).iterdir()):
        raise LitFlashError(f"--save_dir {save_dir} exists and is not empty: choose a new folder")
    splits = splits or ["train", "test"]
    raw = load_raw_text(dataset_name, dataset_config_name, text_files, text_column=text_column)
    missing = [s for s in splits if s not in raw]
    if missing:
        raise LitFlashError(f"--splits: {missing} not in the source (it has {sorted(raw)})")
    raw = type(raw)({s: raw[s] for s in splits})
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_name)
    except (OSError, ValueError) as err:  # ValueError: a folder transformers cannot make a tokenizer of
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise LitFlashError(f"--tokenizer_name {tokenizer_name}: cannot load the tokenizer ({first})") from err
    block_size = min(block_size, tokenizer.model_max_length)
    blocks = tokenize_and_group(raw, tokenizer, block_size, num_proc)
    empty = [split for split in splits if len(blocks[split]) == 0]
    if empty:  # saving it would hand fit a dataset it refuses later, far from the cause
        raise LitFlashError(
            f"--text_files: split {empty[0]!r} holds fewer than --block_size={block_size} tokens of text: "
            "give more text or a smaller --block_size"
        )
    save_dataset_dict(blocks, save_dir)


# ------------------------------------------------------------------------------------------- the DataModule


class WikitextDataModule(L.LightningDataModule):
    """Token blocks for causal-LM fine-tuning: wikitext (or any hub text dataset), local text files, or a
    pre-tokenized `DatasetDict` such as the reference recipe's `/input`.

    Args:
        dataset_name: HF hub dataset with a `text` column.
        dataset_config_name: Its configuration, e.g. `wikitext-2-raw-v1` or `wikitext-103-raw-v1`.
        text_files: Local text files per split instead of the hub, e.g. `{train: train.txt, validation: val.txt}`;
            globs work, and `{stdlib}` stands for this Python's standard library folder.
        tokenized_dataset_load_dir: A `DatasetDict` saved with `save_to_disk` (the reference's `/input`); when set,
            nothing is tokenized and the raw-text options are ignored.
        tokenizer_name: Tokenizer (hub id or folder). Saved beside the exported model; may be null with
            `tokenized_dataset_load_dir`, then no tokenizer is exported.
        train_tokenizer_vocab_size: If set, train a byte-level BPE tokenizer of this size on the train split
            (saved in the cache folder) instead of loading `tokenizer_name`. Used by the offline demo.
        block_size: Tokens per training row when tokenizing raw text.
        batch_size: Rows per training batch and device (the reference's `--per_device_train_batch_size`).
        eval_batch_size: Rows per validation/test batch and device (`--per_device_eval_batch_size`).
        num_workers: DataLoader worker processes (`--dataloader_num_workers`).
        pin_memory: Pin host memory for faster copies to the GPU.
        max_train_samples: Keep only the first N training rows (`--max_train_samples`).
        max_eval_samples: Keep only the first N validation/test rows (`--max_eval_samples`).
        cache_dir: Where tokenized raw text is cached (default `~/.cache/lit_flash`); a second run reuses it.
        text_column: Column of the raw dataset holding the text (`--dataset_text_field`).
        num_proc: Processes for tokenization (`--dataset_num_proc`).
        seed: Seed of the training shuffle.
        streaming: Read the raw text as a stream (`--dataset_streaming`): nothing is downloaded whole or cached;
            lines are tokenized and grouped on the fly, shards split across ranks and dataloader workers, no
            shuffle. Needs `trainer.max_steps`. Validation/test read the source's `validation`/`test` split (the
            first `max_eval_samples` blocks if set), and are skipped when it has none (e.g. FineWeb).
        pad_last_batch: Fill an epoch's short last batch (training, validation, test) up to the batch size with
            ignored rows (labels -100): the loss is unchanged, and a compiled model (`model.compile`) runs one shape
            instead of compiling again for the short batch (a step of many seconds; benchmarks/RESULTS.md).
            Throughput logs count the filler rows as processed tokens.
    """

    def __init__(
        self,
        dataset_name: str | None = "wikitext",
        dataset_config_name: str | None = "wikitext-2-raw-v1",
        text_files: dict[str, str | list[str]] | None = None,
        tokenized_dataset_load_dir: str | None = None,
        tokenizer_name: str | None = "openai-community/gpt2",
        train_tokenizer_vocab_size: PositiveInt | None = None,
        block_size: PositiveInt = 1024,
        batch_size: PositiveInt = 8,
        eval_batch_size: PositiveInt = 8,
        num_workers: NonNegativeInt = 0,
        pin_memory: bool = True,
        max_train_samples: PositiveInt | None = None,
        max_eval_samples: PositiveInt | None = None,
        cache_dir: str | None = None,
        text_column: str = "text",
        num_proc: PositiveInt | None = None,
        seed: SeedInt = 42,
        streaming: bool = False,
        pad_last_batch: bool = False,
    ) -> None:
        super().__init__()
        if streaming and (tokenized_dataset_load_dir or train_tokenizer_vocab_size):
            raise LitFlashError(
                "data.streaming=true reads raw text with a given tokenizer: unset data.tokenized_dataset_load_dir "
                "and data.train_tokenizer_vocab_size"
            )
        for name, value in (("max_train_samples", max_train_samples), ("max_eval_samples", max_eval_samples)):
            if value is not None and value < 1:
                raise LitFlashError(f"data.{name}={value}: must be >= 1, or null for all rows")
        sizes = (("batch_size", batch_size), ("eval_batch_size", eval_batch_size), ("block_size", block_size))
        for name, value in sizes:
            if value < 1:
                raise LitFlashError(f"data.{name}={value}: must be >= 1")
        if tokenizer_name is None and tokenized_dataset_load_dir is None and train_tokenizer_vocab_size is None:
            raise LitFlashError("data.tokenizer_name is null: raw text needs a tokenizer")
        self.save_hyperparameters()
        self.tokenizer: Any = None
        self.train_dataset: Any = None
        self.val_dataset: Any = None
        self.test_dataset: Any = None
        self.predict_dataset: Any = None
        self.seq_len: int | None = None
        self.max_token_id: int | None = None

    # -- where the blocks live
    @property
    def cache_path(self) -> Path:
        """The cache folder for this source, tokenizer and block size (unused with a load dir)."""
        h = self.hparams
        source: dict[str, Any] = {"tokenizer": h.tokenizer_name, "trained_vocab": h.train_tokenizer_vocab_size}
        source.update(block_size=h.block_size, text_column=h.text_column, version=_CACHE_FORMAT_VERSION)
        if h.text_files:
            files = resolve_text_files(h.text_files)
            source["files"] = {s: [(f, os.path.getsize(f), os.path.getmtime(f)) for f in fs] for s, fs in files.items()}
        else:
            source["hub"] = [h.dataset_name, h.dataset_config_name]
        key = hashlib.sha256(json.dumps(source, sort_keys=True).encode()).hexdigest()[:16]
        root = Path(h.cache_dir or Path.home() / ".cache" / "lit_flash").expanduser()
        return root / key

    @property
    def blocks_path(self) -> Path:
        return Path(self.hparams.tokenized_dataset_load_dir or self.cache_path / "blocks")

    def state_dict(self) -> dict[str, Any]:
        # A stream's position is not saved (Lightning's own warning is off for a loader without a length): the
        # mark lets a resume say so.
        return {"streaming": True} if self.hparams.streaming else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("streaming") and self.hparams.streaming:
            rank_zero_warn(
                "data.streaming=true: the stream restarts from its first block on resume, so the blocks trained on "
                "before the checkpoint are read again (a pre-tokenized dataset or the cache resumes exactly)"
            )

    def prepare_data(self) -> None:
        """Download and tokenize once (rank 0 only), into the cache; a second run finds it there."""
        h = self.hparams
        if h.tokenized_dataset_load_dir or h.streaming:
            if h.tokenizer_name:
                self._load_tokenizer()
            return
        cache = self.cache_path
        if (cache / "blocks" / "dataset_dict.json").is_file():
            return
        cache.mkdir(parents=True, exist_ok=True)
        raw = load_raw_text(h.dataset_name, h.dataset_config_name, h.text_files, text_column=h.text_column)
        if "train" not in raw:
            raise LitFlashError(f"the raw data has no 'train' split (found {sorted(raw)}): name one in data.text_files")
        if h.train_tokenizer_vocab_size:
            tokenizer = train_bpe_tokenizer(raw, h.train_tokenizer_vocab_size, cache / "tokenizer")
        else:
            tokenizer = self._load_tokenizer()
        blocks = tokenize_and_group(raw, tokenizer, h.block_size, h.num_proc)
        save_dataset_dict(blocks, cache / "blocks", overwrite=True)

    def _load_tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        h = self.hparams
        if h.train_tokenizer_vocab_size and not h.tokenized_dataset_load_dir:
            name = str(self.cache_path / "tokenizer")
        else:
            name = h.tokenizer_name
        if name is None:
            return None
        try:
            return AutoTokenizer.from_pretrained(name)
        except (OSError, ValueError) as err:  # ValueError: a folder transformers cannot make a tokenizer of
            first = str(err).splitlines()[0]
            raise LitFlashError(f"data.tokenizer_name={name}: cannot load the tokenizer ({first})") from err

    def setup(self, stage: str) -> None:
        h = self.hparams
        if self.tokenizer is None:
            self.tokenizer = self._load_tokenizer()
        if h.streaming:
            return self._setup_streaming(stage)
        dataset = load_tokenized(self.blocks_path)
        eval_split = "validation" if "validation" in dataset else "test"
        if stage == "fit":
            self.train_dataset = self._subset(dataset["train"], h.max_train_samples)
        if stage in ("fit", "validate"):
            if eval_split not in dataset:
                raise LitFlashError(f"{self.blocks_path}: no 'validation' or 'test' split to validate on")
            self.val_dataset = self._subset(dataset[eval_split], h.max_eval_samples)
        if stage == "test":
            if "test" not in dataset:
                raise LitFlashError(f"{self.blocks_path}: no 'test' split (found {sorted(dataset)})")
            self.test_dataset = self._subset(dataset["test"], h.max_eval_samples)
        if stage == "predict":  # scores the test split (the validation split when there is none)
            split = "test" if "test" in dataset else eval_split
            if split not in dataset:
                raise LitFlashError(f"{self.blocks_path}: no 'test' or 'validation' split to predict on")
            self.predict_dataset = self._subset(dataset[split], h.max_eval_samples)
        splits = (self.train_dataset, self.val_dataset, self.test_dataset, self.predict_dataset)
        used = [d for d in splits if d is not None]
        self.seq_len = max(len(d[0]["input_ids"]) for d in used)
        self.max_token_id = max(max_token_id(d) for d in used)

    def _setup_streaming(self, stage: str) -> None:
        from datasets.distributed import split_dataset_by_node

        h = self.hparams
        trainer = self.trainer
        if stage == "fit" and trainer is not None and trainer.max_steps in (None, -1):
            raise LitFlashError("data.streaming=true: a stream has no length, so set trainer.max_steps")
        raw = load_raw_text(h.dataset_name, h.dataset_config_name, h.text_files, True, h.text_column)
        blocks = tokenize_and_group(raw, self.tokenizer, h.block_size)
        rank, world_size = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

        def stream(split: str, limit: int | None) -> Any:
            ds = blocks[split] if limit is None else blocks[split].take(limit)
            # Whole shards (files) per rank when they divide evenly, else every world_size-th block; the
            # DataLoader's workers then split each rank's shards among themselves: no block is read twice.
            return split_dataset_by_node(ds, rank=rank, world_size=world_size).with_format("torch")

        if "train" not in blocks:
            raise LitFlashError(f"the streamed data has no 'train' split (found {sorted(blocks)})")
        eval_split = next((s for s in ("validation", "test") if s in blocks), None)
        if stage == "fit":
            self.train_dataset = stream("train", h.max_train_samples)
        if stage in ("fit", "validate") and eval_split is not None:
            self.val_dataset = stream(eval_split, h.max_eval_samples)
        if stage == "test":
            if "test" not in blocks:
                raise LitFlashError(f"the streamed data has no 'test' split (found {sorted(blocks)})")
            self.test_dataset = stream("test", h.max_eval_samples)
        self.seq_len = h.block_size
        self.max_token_id = None  # unknown without reading the stream; the tokenizer's size is checked instead

    @staticmethod
    def _subset(ds: Any, limit: int | None) -> Any:
        if limit is not None:
            ds = ds.select(range(min(limit, len(ds))))
        columns = [c for c in (REQUIRED_COLUMN, *OPTIONAL_COLUMNS) if c in ds.column_names]
        return ds.with_format("torch", columns=columns)

    # -- loaders
    def _loader(self, dataset: Any, batch_size: int, shuffle: bool, predict: bool = False) -> DataLoader:
        seed = self.hparams.seed
        # Streams are read in order and split across ranks by `split_dataset_by_node` already.
        iterable = isinstance(dataset, torch.utils.data.IterableDataset)
        workers = self.hparams.num_workers
        kwargs: dict[str, Any] = dict(
            batch_size=batch_size,
            num_workers=workers,
            pin_memory=self.hparams.pin_memory and torch.cuda.is_available(),
            persistent_workers=workers > 0,
            collate_fn=collate_blocks,
            # Its own generator (for worker seeds): iterating never draws from the global RNG (exact resume).
            generator=torch.Generator().manual_seed(seed),
        )
        if workers > 0:
            kwargs["worker_init_fn"] = ignore_sigint_in_worker
        if self.hparams.pad_last_batch and not predict:
            kwargs["collate_fn"] = functools.partial(collate_blocks, pad_rows_to=batch_size)
        if iterable:
            return DataLoader(dataset, **kwargs)
        dataset = BlockRows(dataset, [c for c in (REQUIRED_COLUMN, *OPTIONAL_COLUMNS) if c in dataset.column_names])
        # Several processes: our own shard sampler (no repeated rows), which Lightning then leaves as it is.
        shard = shard_sampler(dataset, self.trainer, shuffle, seed)
        if not shuffle:
            return DataLoader(dataset, sampler=shard, **kwargs)
        # Training: a seeded permutation per epoch (this rank's share of it, the remainder dropped as the shard
        # sampler does) whose position is saved in checkpoints for an exact resume.
        replicas, rank = (shard.num_replicas, shard.rank) if shard is not None else (1, 0)
        sampler = ResumableSampler(dataset, num_replicas=replicas, rank=rank, seed=seed, drop_last=True)
        return ResumableDataLoader(dataset, sampler=sampler, **kwargs)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset, self.hparams.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_dataset is None and self.hparams.streaming:
            return []  # a stream without a validation/test split: no validation
        return self._loader(self.val_dataset, self.hparams.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_dataset, self.hparams.eval_batch_size, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.predict_dataset, self.hparams.eval_batch_size, shuffle=False, predict=True)
