"""`python -m lit_flash prepare`: raw text (hub or local files) to a folder of token blocks, as the reference's
`prepare_save_dataset.py` writes it; `fit` loads it with `data.tokenized_dataset_load_dir`."""

from __future__ import annotations

from pathlib import Path

from lit_flash.blocks import save_dataset_dict
from lit_flash.errors import LitFlashError, check_can_create
from lit_flash.limits import PositiveInt
from lit_flash.packing import Documents
from lit_flash.text import (
    check_no_empty_split,
    load_raw_text,
    load_tokenizer,
    tokenize_and_group,
)


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
    packing: bool = False,
    packing_documents: Documents = "auto",
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
        packing: Pack documents with a `position_ids` column (document boundaries), as `data.packing` does.
        packing_documents: Where documents start, as `data.packing_documents`.
    """
    from lit_flash.packing import pack_documents, resolve_documents, sample_by

    if block_size < 2:  # as fit's data.block_size: rows of 1 token have nothing to predict, and fit refuses them
        raise LitFlashError(f"--block_size {block_size}: must be >= 2")
    if Path(save_dir).exists() and not Path(save_dir).is_dir():
        raise LitFlashError(f"--save_dir {save_dir} is a file: choose a new folder")
    if Path(save_dir).exists() and any(Path(save_dir).iterdir()):
        raise LitFlashError(f"--save_dir {save_dir} exists and is not empty: choose a new folder")
    check_can_create(save_dir, f"--save_dir {save_dir}", "choose a new folder")  # before any tokenizing
    if splits is not None and not splits:  # [] was taken for the default, [train, test], unsaid
        raise LitFlashError("--splits is empty: name the splits to keep, e.g. --splits '[train, test]', or omit it")
    splits = splits or ["train", "test"]
    documents = resolve_documents(packing_documents, text_files, dataset_name)
    read_by = sample_by(documents) if packing else "line"
    raw = load_raw_text(dataset_name, dataset_config_name, text_files, text_column=text_column, prefix="--",
                        sample_by=read_by)
    missing = [s for s in splits if s not in raw]
    if missing:
        raise LitFlashError(
            f"--splits: {missing} not in the source (it has {sorted(raw)}): give text for them, or set --splits "
            f"{sorted(raw)}"
        )
    raw = type(raw)({s: raw[s] for s in splits})
    tokenizer = load_tokenizer(tokenizer_name, "--tokenizer_name", "give the tokenizer's folder or hub id")
    block_size = min(block_size, tokenizer.model_max_length)
    if packing:
        blocks = pack_documents(raw, tokenizer, block_size, documents, num_proc)
    else:
        blocks = tokenize_and_group(raw, tokenizer, block_size, num_proc)
    check_no_empty_split(blocks, block_size, "--text_files" if text_files else "--dataset_name", "--block_size")
    save_dataset_dict(blocks, save_dir)
