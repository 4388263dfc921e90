"""The on-disk format of token blocks: save, load, check columns and values, and rows to batch.

The format is the one `prepare_save_dataset.py` of the reference recipe writes and its FlexAI job mounts at
`/input`: a `DatasetDict` saved with `save_to_disk`, splits `train`/`test` (optionally `validation`), columns
`input_ids`, `attention_mask`, `labels`, all rows of one length. Our own tokenization cache is written in that
same format, so every path (hub, local files, `/input`) ends in the one loader, `load_tokenized`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from lit_flash.errors import LitFlashError

IGNORE_INDEX = -100  # labels the loss skips (transformers' convention)

REQUIRED_COLUMN = "input_ids"
OPTIONAL_COLUMNS = ("attention_mask", "labels", "position_ids")  # position_ids: packed rows (packing.py)


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
        # Filled in NumPy, handed to torch once: torch's CPU index_put cost half a millisecond a call on a GPU host
        # (the profile of a training step), NumPy's assignment a few microseconds.
        arrays = {c: np.empty((len(rows), self.chunks[0][c].shape[1]), dtype=np.int64) for c in self.columns}
        for chunk in np.unique(chunk_of):
            at = np.nonzero(chunk_of == chunk)[0]
            local = rows[at] - (self.ends[chunk - 1] if chunk else 0)
            for c in self.columns:
                arrays[c][at] = self.chunks[chunk][c][local]
        batch = {c: torch.from_numpy(a) for c, a in arrays.items()}
        return [{c: batch[c][i] for c in self.columns} for i in range(len(rows))]


def _block_array(column: Any) -> Any:
    """A list<int> Arrow column of equal-length rows as a 2-D NumPy view (a copy only where Arrow holds nulls)."""
    values = column.flatten()
    return values.to_numpy(zero_copy_only=values.null_count == 0).reshape(len(column), -1)


def save_dataset_dict(dataset: Any, save_dir: str | Path, overwrite: bool = False) -> None:
    """`save_to_disk` through a temporary folder and a rename, so a killed save never leaves half a dataset."""
    save_dir = Path(save_dir)
    if save_dir.is_symlink():  # a link to an (empty) folder: replace that folder; rmtree refuses a link
        save_dir = save_dir.resolve()
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
    for column in (REQUIRED_COLUMN, *OPTIONAL_COLUMNS):
        if column in ds.column_names:
            kind = table.schema.field(column).type
            # Each row a list of integer ids: strings, floats (silently cut to integers) or nested lists are not
            # token blocks, and the checks below would fail on them with a traceback.
            listed = pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)
            if not listed or not pa.types.is_integer(kind.value_type):
                raise LitFlashError(
                    f"{where}: column {column!r} holds {kind}, not a list of integer token ids per row: save the "
                    "dataset with integer ids (e.g. as the tokenizer returns them)"
                )
    for column in (REQUIRED_COLUMN, *OPTIONAL_COLUMNS):
        if column in ds.column_names:
            check_no_nulls(table.column(column), column, where)
    lengths = {}
    for column in (REQUIRED_COLUMN, *OPTIONAL_COLUMNS):
        if column in ds.column_names:
            stats = pc.min_max(pc.list_value_length(table.column(column)))
            lengths[column] = (stats["min"].as_py(), stats["max"].as_py())
    low, high = lengths[REQUIRED_COLUMN]
    if not high:  # every row empty (min and max 0, or no value at all)
        raise LitFlashError(f"{where}: the rows hold no tokens: group the text into blocks of token ids")
    if low != high:
        raise LitFlashError(f"{where}: rows of unequal length ({low}..{high} tokens): group them into fixed blocks")
    for column, bounds in lengths.items():
        if bounds != (low, low):
            raise LitFlashError(f"{where}: column {column!r} is not as long as input_ids ({low}) in every row")
    check_token_values(ds, where)
    return low


def check_no_nulls(column: Any, name: str, where: str) -> None:
    """Refuse a missing row or id (Arrow null): a null row failed as a reshape traceback when batched, and a null id
    became an arbitrary integer (NumPy's cast of NaN) that trained unsaid or failed mid-run."""
    rows = column.null_count
    ids = sum(pc.list_flatten(chunk).null_count for chunk in column.chunks)
    if rows or ids:
        what = f"{rows} missing (null) rows" if rows else f"{ids} missing (null) token ids"
        raise LitFlashError(f"{where}: column {name!r} has {what}: drop those rows or tokenize the data again")


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
    if "attention_mask" in ds.column_names:  # another value (2, -1) was taken for 1 by attention and loss alike
        for values in _flat_chunks(ds, "attention_mask"):
            bounds = pc.min_max(values)  # one pass; the stray value is looked for only when there is one
            low, high = bounds["min"].as_py(), bounds["max"].as_py()
            if low is not None and (low < 0 or high > 1):
                stray = pc.filter(values, pc.and_(pc.not_equal(values, 0), pc.not_equal(values, 1)))
                raise LitFlashError(
                    f"{where}: attention_mask holds {stray[0].as_py()}: a mask is 1 (a real token) or 0 (padding); "
                    "fix the attention_mask column"
                )
    width = pc.max(pc.list_value_length(ds.data.table.column(REQUIRED_COLUMN))).as_py() if len(ds) else None
    if width is not None and width < 2:
        raise LitFlashError(
            f"{where}: rows are {width} token long, and a row's first token is predicted by nothing: no token to "
            "predict; make rows of at least 2 tokens (a larger block size)"
        )
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


def max_token_ids(ds: Any) -> dict[str, int]:
    """Largest token id in each of a split's input_ids and labels (one Arrow pass each, no Python loop): an id or a
    label past the vocabulary is an IndexError on CPU and a device-side assert on GPU."""
    columns = [c for c in (REQUIRED_COLUMN, "labels") if c in ds.column_names]
    return {c: int(pc.max(pc.list_flatten(ds.data.table.column(c))).as_py()) for c in columns}


def max_token_id(ds: Any) -> int:
    """Largest token id in a split's input_ids and labels."""
    return max(max_token_ids(ds).values())


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
