"""The LightningDataModule over token blocks: where they come from (cache, load dir, stream), collation, loaders."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn
from torch.utils.data import DataLoader

from lit_flash.blocks import (
    OPTIONAL_COLUMNS,
    REQUIRED_COLUMN,
    BlockRows,
    load_tokenized,
    max_token_ids,
    save_dataset_dict,
)
from lit_flash.errors import LitFlashError
from lit_flash.guards import DataFacts
from lit_flash.limits import NonNegativeInt, PositiveInt, SeedInt, TokenizerVocabInt, check_call_args
from lit_flash.loaders import block_loader
from lit_flash.packing import (
    Documents,
    check_packable,
    check_resume_packing,
    pack_documents,
    resolve_documents,
    sample_by,
)
from lit_flash.stream import POSITION_KEY, StreamLoader, check_resume_streaming, stream_splits
from lit_flash.text import (
    check_no_empty_split,
    check_text_files_not_empty,
    load_raw_text,
    load_tokenizer,
    tokenize_and_group,
    tokenized_cache_dir,
    train_bpe_tokenizer,
)


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
            shuffle; a resume continues the stream where it stopped. Needs `trainer.max_steps`. Validation/test
            read the source's `validation`/`test` split (the first `max_eval_samples` blocks if set), and are
            skipped when it has none (e.g. FineWeb).
        pad_last_batch: Fill an epoch's short last batch (training, validation, test) up to the batch size with
            ignored rows (labels -100): the loss is unchanged, and a compiled model (`model.compile`) runs one shape
            instead of compiling again for the short batch (a step of many seconds; benchmarks/RESULTS.md).
            Throughput logs count the filler rows as processed tokens.
        packing: Pack whole documents into the blocks, each attending only to itself: `position_ids` restart at
            every document, nothing is predicted across a boundary, and flash_attention_2 runs its variable-length
            kernel (sdpa/eager a block-diagonal mask). No padding: documents continue in the next block. A
            pre-tokenized load dir needs a `position_ids` column (`prepare --packing true`) or end-of-text tokens
            between documents (the tokenizer's eos id). Not with `streaming`.
        packing_documents: Where documents start with `packing`: `headings` (wikitext's top-level ` = Title = `
            lines), `file` (one per text file), `paragraph` (blank-line-separated blocks), `row` (one per dataset
            row); `auto`: `file` for `text_files`, `headings` for wikitext, else `row`.
    """

    def __init__(
        self,
        dataset_name: str | None = "wikitext",
        dataset_config_name: str | None = "wikitext-2-raw-v1",
        text_files: dict[str, str | list[str]] | None = None,
        tokenized_dataset_load_dir: str | None = None,
        tokenizer_name: str | None = "openai-community/gpt2",
        train_tokenizer_vocab_size: TokenizerVocabInt | None = None,
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
        packing: bool = False,
        packing_documents: Documents = "auto",
    ) -> None:
        super().__init__()
        check_call_args(WikitextDataModule, locals(), "data")  # the CLI's range checks, for a call from Python
        if streaming and (tokenized_dataset_load_dir or train_tokenizer_vocab_size):
            raise LitFlashError(
                "data.streaming=true reads raw text with a given tokenizer: unset data.tokenized_dataset_load_dir "
                "and data.train_tokenizer_vocab_size"
            )
        if streaming and packing:
            raise LitFlashError("data.packing=true does not work with data.streaming=true yet: set one of them false")
        check_text_files_not_empty(text_files, "data.")  # before the cache key: {} would name the hub's blocks
        if block_size < 2:  # past its type's range (>= 1): a block of 1 token has nothing to predict
            raise LitFlashError(f"data.block_size={block_size}: must be >= 2")
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
        self.max_token_where: str | None = None  # the column, split and folder holding it
        self._train_loader: Any = None

    # -- where the blocks live
    @property
    def cache_path(self) -> Path:
        """The cache folder for this source, tokenizer and block size (unused with a load dir)."""
        h = self.hparams
        packing = resolve_documents(h.packing_documents, h.text_files, h.dataset_name) if h.packing else None
        source = h.text_files or [h.dataset_name, h.dataset_config_name]
        tokenizer = {"tokenizer": h.tokenizer_name, "trained_vocab": h.train_tokenizer_vocab_size}
        return tokenized_cache_dir(h.cache_dir, source, tokenizer, h.block_size, h.text_column, packing)

    @property
    def blocks_path(self) -> Path:
        return Path(self.hparams.tokenized_dataset_load_dir or self.cache_path / "blocks")

    def data_facts(self) -> DataFacts:
        """What the model checks these blocks against before training (after `setup`)."""
        tokenizer_size = len(self.tokenizer) if self.tokenizer is not None else None
        trained = bool(self.hparams.train_tokenizer_vocab_size) and not self.hparams.tokenized_dataset_load_dir
        return DataFacts(self.seq_len, self.max_token_id, tokenizer_size, self.max_token_where, trained)

    def state_dict(self) -> dict[str, Any]:
        # How the run read its data, for a resume to compare. The stream's position is the train loader's state
        # (`StreamLoader`); the mark tells a resume it was saved.
        read = {"streaming": True, "stream_position": True} if self.hparams.streaming else {"streaming": False}
        return {**read, "packing": self.hparams.packing}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.trainer is not None and self.trainer.state.fn == TrainerFn.FITTING:  # validate/test: no resume
            check_resume_packing(state_dict.get("packing"), self.hparams.packing)
        check_resume_streaming(state_dict, self.hparams.streaming)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if isinstance(batch, dict) and isinstance(self._train_loader, StreamLoader) and POSITION_KEY in batch:
            self._train_loader.record_trained(batch)  # a training batch of a stream: the position to save
        return batch

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
        for folder in (cache, cache / "blocks"):  # only lit_flash writes there: a file in the way was put by hand
            if folder.exists() and not folder.is_dir():
                raise LitFlashError(
                    f"data.cache_dir: {folder} is a file where the tokenized cache keeps a folder: move it away"
                )
        cache.mkdir(parents=True, exist_ok=True)
        documents = resolve_documents(h.packing_documents, h.text_files, h.dataset_name)
        read_by = sample_by(documents) if h.packing else "line"
        raw = load_raw_text(h.dataset_name, h.dataset_config_name, h.text_files, text_column=h.text_column,
                            sample_by=read_by)
        if "train" not in raw:
            raise LitFlashError(f"the raw data has no 'train' split (found {sorted(raw)}): name one in data.text_files")
        if h.train_tokenizer_vocab_size:
            tokenizer = train_bpe_tokenizer(raw, h.train_tokenizer_vocab_size, cache / "tokenizer")
        else:
            tokenizer = self._load_tokenizer()
        if h.packing:
            blocks = pack_documents(raw, tokenizer, h.block_size, documents, h.num_proc)
        else:
            blocks = tokenize_and_group(raw, tokenizer, h.block_size, h.num_proc)
        check_no_empty_split(blocks, h.block_size, self._source_flag(), "data.block_size")
        save_dataset_dict(blocks, cache / "blocks", overwrite=True)

    def _source_flag(self) -> str:
        """How errors name where the blocks come from: the user's load dir or text, not our cache folder."""
        h = self.hparams
        if h.tokenized_dataset_load_dir:
            return f"data.tokenized_dataset_load_dir={h.tokenized_dataset_load_dir}"
        return "data.text_files" if h.text_files else f"data.dataset_name={h.dataset_name}"

    def _load_tokenizer(self) -> Any:
        h = self.hparams
        if h.train_tokenizer_vocab_size and not h.tokenized_dataset_load_dir:
            name = str(self.cache_path / "tokenizer")
        else:
            name = h.tokenizer_name
        if name is None:
            return None
        return load_tokenizer(name, "data.tokenizer_name", "give the tokenizer's folder or hub id")

    def setup(self, stage: str) -> None:
        h = self.hparams
        if self.tokenizer is None:
            self.tokenizer = self._load_tokenizer()
        if h.streaming:
            return self._setup_streaming(stage)
        dataset = self._load_blocks()
        eval_split = "validation" if "validation" in dataset else "test"
        if stage == "fit":
            self.train_dataset = self._subset(dataset["train"], h.max_train_samples)
        if stage in ("fit", "validate"):
            if eval_split not in dataset:
                raise LitFlashError(
                    f"{self._source_flag()}: no 'validation' or 'test' split to validate on: add one, or set "
                    "trainer.limit_val_batches=0"
                )
            self.val_dataset = self._subset(dataset[eval_split], h.max_eval_samples)
        if stage == "test":
            if "test" not in dataset:
                raise LitFlashError(f"{self._source_flag()}: no 'test' split (found {sorted(dataset)})")
            self.test_dataset = self._subset(dataset["test"], h.max_eval_samples)
        if stage == "predict":  # scores the test split (the validation split when there is none)
            split = "test" if "test" in dataset else eval_split
            if split not in dataset:
                raise LitFlashError(f"{self._source_flag()}: no 'test' or 'validation' split to predict on")
            self.predict_dataset = self._subset(dataset[split], h.max_eval_samples)
        splits = (self.train_dataset, self.val_dataset, self.test_dataset, self.predict_dataset)
        used = [d for d in splits if d is not None]
        if h.packing:
            for d in used:
                check_packable(d, self._eos_id(), str(self.blocks_path))
        self.seq_len = max(len(d[0]["input_ids"]) for d in used)
        names = ("train", eval_split, "test", "predict")
        tops = [(v, c, n) for n, d in zip(names, splits, strict=True) if d is not None
                for c, v in max_token_ids(d).items()]
        self.max_token_id, column, split = max(tops)
        self.max_token_where = f"{column} of the {split!r} rows in {self.blocks_path}"

    def _load_blocks(self) -> Any:
        """The load dir's blocks, or our cache's: a damaged cache (a truncated Arrow file, a lost split) is named as
        the cache, with the fix; it was named as data.tokenized_dataset_load_dir, a key the user had not set."""
        if self.hparams.tokenized_dataset_load_dir:
            return load_tokenized(self.blocks_path)
        try:
            return load_tokenized(self.blocks_path, "data.cache_dir")
        except LitFlashError as err:
            raise LitFlashError(f"{err}; the tokenized cache is damaged: remove {self.cache_path} to tokenize "
                                "the text again") from err

    def _setup_streaming(self, stage: str) -> None:
        h = self.hparams
        splits = stream_splits(
            load_raw_text(h.dataset_name, h.dataset_config_name, h.text_files, True, h.text_column), self.tokenizer,
            h.block_size, h.batch_size, stage, self.trainer, h.max_train_samples, h.max_eval_samples,
        )
        self.train_dataset, self.val_dataset, self.test_dataset = splits
        self.seq_len = h.block_size
        self.max_token_id = None  # unknown without reading the stream; the tokenizer's size is checked instead

    def _eos_id(self) -> int | None:
        return getattr(self.tokenizer, "eos_token_id", None)

    def _columns(self, ds: Any) -> list[str]:
        skip = () if self.hparams.packing else ("position_ids",)  # a packed dataset read unpacked: plain blocks
        return [c for c in (REQUIRED_COLUMN, *OPTIONAL_COLUMNS) if c in ds.column_names and c not in skip]

    def _subset(self, ds: Any, limit: int | None) -> Any:
        if limit is not None:
            ds = ds.select(range(min(limit, len(ds))))
        return ds.with_format("torch", columns=self._columns(ds))

    # -- loaders
    def _loader(self, dataset: Any, batch_size: int, shuffle: bool, predict: bool = False) -> DataLoader:
        h = self.hparams
        stream = isinstance(dataset, torch.utils.data.IterableDataset)
        rows = dataset if stream else BlockRows(dataset, self._columns(dataset))
        return block_loader(
            rows, batch_size, shuffle=shuffle, trainer=self.trainer, seed=h.seed, num_workers=h.num_workers,
            pin_memory=h.pin_memory, pad_rows=h.pad_last_batch and not predict,
            packing_eos_id=self._eos_id() if h.packing else False,
        )

    def train_dataloader(self) -> DataLoader:
        self._train_loader = self._loader(self.train_dataset, self.hparams.batch_size, shuffle=True)
        return self._train_loader

    def val_dataloader(self) -> DataLoader | list:
        if self.val_dataset is None and self.hparams.streaming:
            return []  # a stream without a validation/test split: no validation
        return self._loader(self.val_dataset, self.hparams.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_dataset, self.hparams.eval_batch_size, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.predict_dataset, self.hparams.eval_batch_size, shuffle=False, predict=True)
