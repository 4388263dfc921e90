"""Shared fixtures: tiny, offline stand-ins for the hub (text, tokenizer, tokenized datasets, GPT-2 configs, CLI runs).

Everything here is built in the test session itself (no downloads) and is small enough for a 2-core CPU:

- `corpus`: deterministic English-like lines, with wikitext-style empty lines among them.
- `tokenizer_dir` / `tokenizer`: a byte-level BPE tokenizer (GPT-2's kind) trained on `corpus`, saved in HF format;
  pass the folder wherever a `tokenizer_name` is expected.
- `text_files`: `train.txt`, `validation.txt`, `test.txt` written from `corpus`, as `data.text_files` wants them.
- `make_token_dataset`: a builder of `DatasetDict`s in the reference recipe's `save_to_disk` format (or broken ones).
- `tiny_model_config`: a GPT-2 config dict for `model.model_config` whose vocabulary fits `tokenizer`.
- `tiny_config`: a complete CLI config file (tiny model, `text_files`, `tokenizer_dir`) for a fit of a few seconds.
- `run_cli`: runs `cli_main` in-process and returns its exit code, stdout and stderr.

Plain helpers (tiny modules, CPU trainers, whole CLI runs in a subprocess or a fork, logged losses) are in
`_helpers.py`, the one helper module.
"""

from __future__ import annotations

import os
import random
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

# Tests never reach the hub: a test that tries fails fast instead of hanging on the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# A fresh datasets cache for each session, as on a new CI machine: a warm one skips `map`s whose fingerprint it
# knows, which once hid a tokenizer that failed on first use.
os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="lit_flash_test_hf_datasets_")
# No tqdm monitor thread: it takes tqdm's lock every few seconds, and a test that forks (fork_cli) while it holds
# that lock leaves the child waiting on it forever (seen once in test_soak_...: the child hung in load_from_disk).
import tqdm  # noqa: E402

tqdm.tqdm.monitor_interval = 0

# The fast tier runs in parallel (`-n 2`, pytest-xdist): one intra-op thread per worker, so two workers on two cores
# do not fight over them. (Bit-identical comparisons run both sides in one process, or in forks set to one thread.)
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch  # noqa: E402

    torch.set_num_threads(1)

TINY_VOCAB = 320  # 256 bytes + <|endoftext|> + a few merges: the BPE tokenizer below stays within it
TINY_CONTEXT = 64  # the tiny model's n_positions
ALL_COLUMNS = ("input_ids", "attention_mask", "labels")

_WORDS = (
    "the a of and to in is was for on with as by at from that this it an are be or his her their river city "
    "king army song album game season church school station road island team war film book music world year "
    "first second new old great small north south early later during after before between under over about"
).split()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests marked `gpu` where there is no CUDA GPU."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def make_lines(n_lines: int, seed: int = 0, empty_every: int = 4) -> list[str]:
    """`n_lines` lines of 5-20 words from a small vocabulary; every `empty_every`-th line is empty (0: none)."""
    rng = random.Random(seed)
    lines = []
    for i in range(n_lines):
        if empty_every and i % empty_every == empty_every - 1:
            lines.append("")
        else:
            lines.append(" ".join(rng.choice(_WORDS) for _ in range(rng.randint(5, 20))) + " .")
    return lines


@pytest.fixture(scope="session")
def corpus() -> dict[str, list[str]]:
    """Raw text per split (`train`, `validation`, `test`), wikitext-like: some lines are empty."""
    return {"train": make_lines(240, seed=0), "validation": make_lines(60, seed=1), "test": make_lines(60, seed=2)}


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory, corpus: dict[str, list[str]]) -> Path:
    """A byte-level BPE tokenizer (at most `TINY_VOCAB` tokens, `<|endoftext|>` = 0) saved with save_pretrained."""
    from lit_flash.text import train_bpe_tokenizer

    path = tmp_path_factory.mktemp("tokenizer")
    train_bpe_tokenizer({"train": {"text": corpus["train"]}}, vocab_size=TINY_VOCAB, save_dir=path)
    return path


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir: Path) -> Any:
    """The `tokenizer_dir` tokenizer, loaded with AutoTokenizer (do not mutate it: it is shared)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    assert len(tok) <= TINY_VOCAB
    return tok


@pytest.fixture
def text_files(tmp_path: Path, corpus: dict[str, list[str]]) -> dict[str, str]:
    """`{split: path}` of one text file per split, written from `corpus` (for `data.text_files`)."""
    folder = tmp_path / "text"
    folder.mkdir()
    files = {}
    for split, lines in corpus.items():
        files[split] = str(folder / f"{split}.txt")
        Path(files[split]).write_text("\n".join(lines) + "\n")
    return files


@pytest.fixture
def make_token_dataset(tmp_path: Path) -> Callable[..., Path]:
    """Builder of a tokenized `DatasetDict` saved with `save_to_disk`, as the reference's prepare script writes it.

    `make_token_dataset(name="tokenized", splits=("train", "test"), n_rows=12, seq_len=32, vocab_size=TINY_VOCAB,
    columns=ALL_COLUMNS, rows=None, seed=0) -> Path`

    Rows are random ids below `vocab_size`; `labels` is a copy of `input_ids`, `attention_mask` all ones; keep only
    some of `columns` to drop the others. `rows={split: [[ids], ...]}` gives a split's `input_ids` explicitly
    (unequal lengths, out-of-vocabulary ids...). The folder is `tmp_path / name`.
    """
    import datasets

    def build(
        name: str = "tokenized",
        splits: Sequence[str] = ("train", "test"),
        n_rows: int = 12,
        seq_len: int = 32,
        vocab_size: int = TINY_VOCAB,
        columns: Sequence[str] = ALL_COLUMNS,
        rows: dict[str, list[list[int]]] | None = None,
        seed: int = 0,
    ) -> Path:
        rng = random.Random(seed)
        split_data = {}
        for split in splits:
            ids = (rows or {}).get(split)
            if ids is None:
                ids = [[rng.randrange(vocab_size) for _ in range(seq_len)] for _ in range(n_rows)]
            data = {"input_ids": ids, "attention_mask": [[1] * len(r) for r in ids], "labels": [list(r) for r in ids]}
            split_data[split] = datasets.Dataset.from_dict({c: data[c] for c in ALL_COLUMNS if c in columns})
        path = tmp_path / name
        datasets.DatasetDict(split_data).save_to_disk(str(path))
        return path

    return build


@pytest.fixture
def tiny_model_config() -> dict[str, Any]:
    """`model.model_config` of a ~60k-parameter GPT-2 whose vocabulary fits the `tokenizer` fixture."""
    return {
        "model_type": "gpt2",
        "vocab_size": TINY_VOCAB,
        "n_positions": TINY_CONTEXT,
        "n_embd": 32,
        "n_layer": 2,
        "n_head": 2,
        "bos_token_id": 0,
        "eos_token_id": 0,
    }


@pytest.fixture
def tiny_config(tmp_path: Path, text_files: dict[str, str], tokenizer_dir: Path, tiny_model_config: dict) -> Path:
    """A complete CLI config (`--config`): the tiny model on `text_files`, 6 CPU steps, validation every 3,
    output under `tmp_path/run`, the tokenization cache under `tmp_path/cache`. Override keys on the command line."""
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "precision": "32-true",
            "max_steps": 6,
            "val_check_interval": 3,
            "check_val_every_n_epoch": None,
            "log_every_n_steps": 1,
            "num_sanity_val_steps": 0,
            "enable_model_summary": False,
            "default_root_dir": str(tmp_path / "run"),
        },
        "checkpoint": {"every_n_train_steps": 3},
        "model": {
            "model_name_or_path": None,
            "model_config": tiny_model_config,
            "attn_implementation": "sdpa",
            "learning_rate": 1e-2,
            "warmup_steps": 2,
        },
        "data": {
            "text_files": text_files,
            "tokenizer_name": str(tokenizer_dir),
            "block_size": 32,
            "batch_size": 4,
            "eval_batch_size": 4,
            "max_eval_samples": 8,
            "cache_dir": str(tmp_path / "cache"),
        },
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def run_cli(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> Callable[[list[str]], tuple[int, str, str]]:
    """`run_cli(args) -> (exit_code, stdout, stderr)`: `cli_main(args)` in-process; a normal return is code 0."""
    from lit_flash.cli import cli_main

    # pytest's own arguments are not the CLI's (LightningCLI warns when sys.argv and args differ).
    monkeypatch.setattr(sys, "argv", sys.argv[:1])

    def run(args: list[str]) -> tuple[int, str, str]:
        capsys.readouterr()  # drop what came before
        try:
            cli_main(args)
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        out, err = capsys.readouterr()
        return code, out, err

    return run
