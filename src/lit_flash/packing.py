"""Document-aware packing (`data.packing`): documents cut into fixed-length blocks without cross-document attention.

Text is split into documents (wikitext articles at their top-level ` = Title = ` headings, one per file, one per
blank-line-separated paragraph, or one per row), each document ends with the tokenizer's end-of-text token, and the
token stream is cut into `block_size` blocks exactly as the unpacked grouping does (within map batches, tails
dropped): every token trains, no padding. Each block carries `position_ids` that restart at 0 at each document's
first token and at the block's first token. From them the collate function derives, on the host and before any
transfer to the GPU:

- `labels` -100 at each document's first token: nothing is predicted across a document boundary;
- `cu_seq_lens`: the cumulative document lengths over the flattened batch, for flash-attn's variable-length kernel,
  padded to one length per loader (repeating the total: empty sequences) so a compiled step sees one shape.

The model (`module.py`) hands flash_attention_2 those boundaries explicitly (no host sync), and sdpa/eager the
`position_ids` alone, from which transformers builds a block-diagonal causal mask.
"""

from __future__ import annotations

import functools
import itertools
import re
from typing import Any, Literal

import numpy as np
import torch

from lit_flash.attention import is_flash
from lit_flash.errors import LitFlashError

IGNORE_INDEX = -100  # blocks.IGNORE_INDEX (blocks.py imports this module: not imported from there)

Documents = Literal["auto", "headings", "file", "paragraph", "row"]
# A wikitext article's title line: " = Title = " (exactly one "=" each side; " = = Section = = " is not one).
_ARTICLE_HEADING = re.compile(r" = [^=](?:.*[^=])? = ")


def is_article_heading(line: str) -> bool:
    """Whether a wikitext line opens a new article (a top-level heading, not a section's)."""
    return bool(_ARTICLE_HEADING.fullmatch(line.rstrip("\n")))


def resolve_documents(documents: str, text_files: Any, dataset_name: str | None) -> str:
    """`auto`: one document per file for `data.text_files`, per article for wikitext, per row for other datasets."""
    if documents != "auto":
        return documents
    if text_files:
        return "file"
    return "headings" if dataset_name and "wikitext" in dataset_name.lower() else "row"


def sample_by(documents: str) -> str:
    """How `datasets`' text loader reads files for this document split: a row per file, per paragraph, per line."""
    return {"file": "document", "paragraph": "paragraph"}.get(documents, "line")


def tokenize_documents(texts: list[str], indices: list[int], tokenizer: Any, documents: str) -> dict[str, list]:
    """Tokenize rows (whole, no truncation: the blocks cut them); `doc_start` is where a document's first token is
    in the row (-1: the row continues the document before it). Each document but the split's first is preceded
    by the end-of-text token, which ends the document before it."""
    ids = tokenizer(texts, add_special_tokens=True, return_attention_mask=False, verbose=False)["input_ids"]
    eos = tokenizer.eos_token_id
    out_ids, starts = [], []
    for text, row, index in zip(texts, ids, indices, strict=True):
        if documents == "headings" and not is_article_heading(text):
            out_ids.append(row)
            starts.append(-1)
        elif eos is not None and index > 0:
            out_ids.append([eos, *row])
            starts.append(1)
        else:
            out_ids.append(row)
            starts.append(0)
    return {"input_ids": out_ids, "doc_start": starts}


def pack_blocks(examples: dict[str, list], block_size: int) -> dict[str, list[list[int]]]:
    """Concatenate rows and cut them into `block_size` blocks (the tail is dropped, as `group_texts`), with
    `position_ids` restarting at each document start and each block start, and `labels` -100 where they are 0."""
    lengths = np.fromiter((len(r) for r in examples["input_ids"]), dtype=np.int64, count=len(examples["input_ids"]))
    tokens = np.fromiter(itertools.chain.from_iterable(examples["input_ids"]), dtype=np.int64, count=lengths.sum())
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    at = np.asarray(examples["doc_start"], dtype=np.int64)
    start = np.zeros(len(tokens), dtype=bool)
    start[(offsets + at)[(at >= 0) & (at < lengths)]] = True
    rows = len(tokens) // block_size
    tokens = tokens[: rows * block_size].reshape(rows, block_size)
    start = start[: rows * block_size].reshape(rows, block_size)
    positions = positions_from_starts(start)
    labels = np.where(positions == 0, IGNORE_INDEX, tokens)
    return {"input_ids": tokens.tolist(), "labels": labels.tolist(), "position_ids": positions.tolist()}


def positions_from_starts(start: np.ndarray) -> np.ndarray:
    """Per row: each token's distance from the last document start at or before it (row starts count as starts)."""
    start = start.copy()
    start[:, 0] = True
    index = np.broadcast_to(np.arange(start.shape[1]), start.shape)
    return index - np.maximum.accumulate(np.where(start, index, 0), axis=1)


def pack_documents(raw: Any, tokenizer: Any, block_size: int, documents: str, num_proc: int | None = None) -> Any:
    """Raw text `DatasetDict` (rows as `sample_by(documents)` read them) -> packed blocks with `position_ids`."""
    from lit_flash.text import GROUP_BATCH_ROWS

    kwargs = {} if num_proc is None or num_proc < 2 else {"num_proc": num_proc}
    raw = raw.select_columns(["text"])
    raw = raw.filter(lambda ex: [bool(t.strip()) for t in ex["text"]], batched=True, **kwargs)
    tokens = raw.map(
        lambda ex, idx: tokenize_documents(ex["text"], idx, tokenizer, documents),
        batched=True, with_indices=True, remove_columns=["text"], **kwargs,
    )
    for split in tokens if documents == "headings" else ():
        if len(tokens[split]) and max(tokens[split]["doc_start"]) < 0:  # else nothing would be packed apart
            raise LitFlashError(
                f"packing_documents=headings: the {split!r} text has no top-level ` = Title = ` heading (wikitext's "
                "article titles): choose file, paragraph or row documents instead (or auto)"
            )
    return tokens.map(
        lambda ex: pack_blocks(ex, block_size), batched=True, batch_size=GROUP_BATCH_ROWS,
        remove_columns=["doc_start"], **kwargs,
    )


# ---------------------------------------------------------------------------------------------- the batch side
def positions_from_eos(input_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """`position_ids` of rows whose documents are separated by end-of-text tokens (a document starts after one)."""
    start = torch.zeros_like(input_ids, dtype=torch.bool)
    start[:, 1:] = input_ids[:, :-1] == eos_id
    return torch.from_numpy(positions_from_starts(start.numpy()))


def cu_seq_lens(position_ids: torch.Tensor, length: int) -> torch.Tensor:
    """Cumulative document lengths over the flattened rows (int32, as flash-attn wants), padded to `length` entries
    by repeating the total: the padding is empty sequences. Longer when the batch holds more documents."""
    flat = position_ids.reshape(-1)
    starts = torch.nonzero(flat == 0).reshape(-1).to(torch.int32)
    cu = torch.full((max(length, len(starts) + 1),), flat.numel(), dtype=torch.int32, device=flat.device)
    cu[: len(starts)] = starts
    return cu


def packed_attention_kwargs(
    position_ids: torch.Tensor | None, cu_seqs: torch.Tensor | None, attn_implementation: str
) -> dict[str, Any]:
    """The model's keyword arguments for packed rows (none for plain rows): sdpa/eager build a block-diagonal mask
    from `position_ids`; flash gets the boundaries explicitly (transformers' own inference from position_ids syncs
    with the host in every layer) and a Python-int longest length (a document is at most a row: one compiled
    shape)."""
    if position_ids is None:
        return {}
    # No cache: with one (GPT-2's config default), transformers ignores position_ids when building the mask.
    packed: dict[str, Any] = {"position_ids": position_ids, "use_cache": False}
    if is_flash(attn_implementation):
        if cu_seqs is None:  # a batch from another collate function: found here, at the cost of a sync
            cu_seqs = cu_seq_lens(position_ids, 0)
        longest = position_ids.shape[1]
        packed.update(cu_seq_lens_q=cu_seqs, cu_seq_lens_k=cu_seqs, max_length_q=longest, max_length_k=longest)
    return packed


def segment_counts(rows: Any, eos_id: int | None) -> np.ndarray:
    """Documents (or parts of one) per row of a `BlockRows` split, one pass over its memory-mapped arrays."""
    counts = []
    for chunk in rows.chunks:
        if "position_ids" in chunk:
            counts.append((chunk["position_ids"] == 0).sum(axis=1))
        else:
            counts.append(1 + (chunk["input_ids"][:, :-1] == eos_id).sum(axis=1))
    return np.concatenate(counts) if counts else np.zeros(0, dtype=np.int64)


def packed_collate(rows: Any, batch_size: int, eos_id: int | None, pad_rows_to: int | None = None) -> Any:
    """The collate function of a packed split: `cu_seq_lens` padded to the most documents any `batch_size` rows of
    it hold (the sum of the largest counts), so every batch of the split has one shape."""
    counts = np.sort(segment_counts(rows, eos_id))[::-1]
    bound = int(counts[:batch_size].sum()) + max(0, batch_size - len(counts))
    return functools.partial(collate_packed, eos_id=eos_id, cu_length=bound + 1, pad_rows_to=pad_rows_to)


def collate_packed(
    rows: list[dict[str, torch.Tensor]], eos_id: int | None, cu_length: int, pad_rows_to: int | None = None
) -> dict[str, torch.Tensor]:
    """Stack packed rows: `input_ids`, `labels` (-100 at each document's first token), `position_ids` and
    `cu_seq_lens`. Filler rows (`pad_rows_to`) are one document each with every label ignored."""
    from lit_flash.blocks import collate_blocks

    batch = collate_blocks(rows, pad_rows_to)
    if "attention_mask" in batch:
        raise LitFlashError("data.packing=true: these rows hold padding (attention_mask 0); pack unpadded rows")
    ids = batch["input_ids"][: len(rows)]
    if "position_ids" in rows[0]:
        positions = torch.stack([r["position_ids"] for r in rows])
        if bool((positions[:, 0] != 0).any()):
            raise LitFlashError("data.packing=true: a position_ids row does not start at 0: prepare the data again")
    else:
        positions = positions_from_eos(ids, eos_id)
    filler = torch.arange(ids.shape[1]).expand(len(batch["input_ids"]) - len(rows), -1)
    batch["position_ids"] = torch.cat([positions, filler])
    batch["labels"] = batch["labels"].masked_fill(batch["position_ids"] == 0, IGNORE_INDEX)
    batch["cu_seq_lens"] = cu_seq_lens(batch["position_ids"], cu_length)
    return batch


def check_packable(ds: Any, eos_id: int | None, where: str) -> None:
    """A pre-tokenized split can be packed when it says where documents start: a `position_ids` column, or the
    tokenizer's end-of-text token between documents."""
    import pyarrow.compute as pc

    if "position_ids" in ds.column_names:
        column = ds.data.table.column("position_ids")
        positions = np.asarray(pc.list_flatten(column)).reshape(len(ds), -1) if len(ds) else np.zeros((0, 1))
        # Each row restarts at 0 and counts up by 1 within a document: then no position passes the row's length
        # (which the model's context is checked against), and the batches' document boundaries are these.
        ok = (positions[:, 0] == 0) & ((positions[:, 1:] == 0) | (positions[:, 1:] == positions[:, :-1] + 1)).all(1)
        if not ok.all():
            row = int(np.nonzero(~ok)[0][0])
            raise LitFlashError(
                f"data.packing=true: {where}, row {row}: position_ids must start at 0 and count up by 1 within each "
                "document; prepare the data again with `python -m lit_flash prepare --packing true`"
            )
        return
    fix = "prepare the data with `python -m lit_flash prepare --packing true`, or set data.packing=false"
    if eos_id is None:
        raise LitFlashError(f"data.packing=true: {where} has no position_ids and no tokenizer gives an end-of-text id"
                            f" to find documents by: set data.tokenizer_name, {fix}")
    values = pc.list_flatten(ds.data.table.column("input_ids"))
    if not pc.any(pc.equal(values, eos_id)).as_py():
        raise LitFlashError(f"data.packing=true: {where} holds no end-of-text token (id {eos_id}), so no document "
                            f"boundary: {fix}")


def check_resume_packing(saved: bool | None, packing: bool) -> None:
    """A fit resumed with `data.packing` flipped is refused: the sampler's saved position counts packed rows or plain
    blocks, so it would point at other data (no exact resume is possible). `saved`: the checkpoint's setting, None
    in a checkpoint from before lit_flash recorded it (accepted, as before)."""
    if saved is None or saved == packing:
        return
    raise LitFlashError(
        f"data.packing={str(packing).lower()}, but the checkpoint was saved with data.packing={str(saved).lower()}: "
        "packed rows and plain blocks are different data, so the run cannot continue where it stopped; resume with "
        f"data.packing={str(saved).lower()}, or start a new run (another trainer.default_root_dir)"
    )
