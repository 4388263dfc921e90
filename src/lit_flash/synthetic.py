"""Synthetic token data in the reference recipe's on-disk format, for machines without the hub (GPU tests,
benchmarks, smoke runs). Not random noise: unigram frequencies follow Zipf's law as in natural text, and half of the
tokens follow from the previous one, so a model has structure to learn and its loss falls as a real run's does."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lit_flash.blocks import save_dataset_dict


def synthetic_blocks(n_blocks: int, block_size: int = 1024, vocab_size: int = 50257, seed: int = 0) -> np.ndarray:
    """`(n_blocks, block_size)` int32 token ids: Zipf(1.1) draws, half of them replaced by one of 4 fixed
    successors of the previous draw (a sparse bigram table)."""
    rng = np.random.default_rng(seed)
    n = n_blocks * block_size
    draws = (rng.zipf(1.1, size=n) - 1) % vocab_size
    follows = rng.random(n) < 0.5
    successor = (draws * 7919 + rng.integers(0, 4, size=n) * 104729 + 17) % vocab_size
    tokens = draws.copy()
    tokens[1:][follows[1:]] = successor[:-1][follows[1:]]
    return tokens.astype(np.int32).reshape(n_blocks, block_size)


def save_synthetic_dataset(
    save_dir: str | Path,
    n_train: int = 2000,
    n_test: int = 64,
    block_size: int = 1024,
    vocab_size: int = 50257,
    seed: int = 0,
) -> Path:
    """Write a reference-format `DatasetDict` (train/test; input_ids, attention_mask, labels) to `save_dir`."""
    import datasets
    import pyarrow as pa

    def rows(values: np.ndarray) -> pa.ListArray:  # Arrow lists straight from numpy: no Python loop
        offsets = np.arange(0, values.size + 1, values.shape[1], dtype=np.int32)
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values.reshape(-1)))

    def split(n: int, split_seed: int) -> datasets.Dataset:
        ids = rows(synthetic_blocks(n, block_size, vocab_size, split_seed))
        mask = rows(np.ones((n, block_size), np.int8))
        return datasets.Dataset(pa.table({"input_ids": ids, "attention_mask": mask, "labels": ids}))

    dataset = datasets.DatasetDict(train=split(n_train, seed), test=split(n_test, seed + 1))
    save_dataset_dict(dataset, save_dir)
    return Path(save_dir)
