"""Batches from token rows: one DataLoader builder for every kind of split (in-memory blocks with the exact-resume
sampler, a stream, packed documents), so that each gets the same workers, seeding and collation."""

from __future__ import annotations

import functools
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from lit_flash.blocks import BlockRows, collate_blocks
from lit_flash.distributed import check_rows_per_rank, shard_sampler
from lit_flash.interrupt import ignore_sigint_in_worker, kill_workers_at_exit
from lit_flash.packing import packed_collate
from lit_flash.resume import ResumableDataLoader, ResumableSampler
from lit_flash.stream import BlockStream, StreamLoader, collate_with_position


def block_loader(
    dataset: BlockRows | torch.utils.data.IterableDataset,
    batch_size: int,
    shuffle: bool,
    trainer: L.Trainer | None,
    seed: int,
    num_workers: int,
    pin_memory: bool,
    pad_rows: bool,
    packing_eos_id: int | None | bool = False,
) -> DataLoader:
    """The loader of one split. `shuffle`: training (a seeded permutation per epoch, its position saved for an
    exact resume); else in order, this rank's shard. `pad_rows`: an epoch's short last batch is filled with ignored
    rows (one batch shape). `packing_eos_id`: False, or packed rows (the end-of-text id, None if unknown)."""
    kwargs: dict[str, Any] = dict(
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=pin_memory and torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
        collate_fn=functools.partial(collate_blocks, pad_rows_to=batch_size) if pad_rows else collate_blocks,
        # Its own generator (for worker seeds): iterating never draws from the global RNG (exact resume).
        generator=torch.Generator().manual_seed(seed),
    )
    if num_workers > 0:
        kwargs["worker_init_fn"] = ignore_sigint_in_worker
        kill_workers_at_exit()
    replicas, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
    if isinstance(dataset, BlockStream):  # training on a stream: its position is saved in checkpoints
        kwargs["collate_fn"] = functools.partial(collate_with_position, collate=kwargs["collate_fn"])
        return StreamLoader(dataset, rank=rank, world_size=replicas, **kwargs)
    if isinstance(dataset, torch.utils.data.IterableDataset):  # read in order, split across ranks already
        return DataLoader(dataset, **kwargs)
    if packing_eos_id is not False:
        kwargs["collate_fn"] = packed_collate(dataset, batch_size, packing_eos_id, batch_size if pad_rows else None)
    if not shuffle:
        # Several processes: our own shard sampler (no repeated rows), which Lightning then leaves as it is.
        return DataLoader(dataset, sampler=shard_sampler(dataset, trainer, False, seed), **kwargs)
    # Training: this rank's share of each epoch's permutation, the remainder dropped as the shard sampler does.
    if replicas > 1:
        check_rows_per_rank(len(dataset), replicas, "training")
    sampler = ResumableSampler(dataset, num_replicas=replicas, rank=rank, seed=seed, drop_last=True)
    return ResumableDataLoader(dataset, sampler=sampler, **kwargs)
