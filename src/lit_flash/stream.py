"""A streamed training set that resumes where it stopped: the position is saved per rank and per loader worker.

The position comes from `datasets`' own `IterableDataset.state_dict()` (shard, row in the shard, and the batched
`map`s' place in their current batch: the grouping into blocks is recomputed from that batch's start, so the
blocks after a resume are those an uninterrupted run reads). Not torchdata's `StatefulDataLoader`: it saves the
state of the last batch it yielded, and Lightning's loop fetches one batch ahead of the one it trains on (for a
loader without a length), so a resume would skip a batch; the position below is the last batch trained on.

- Each loader worker (or the main process, without workers) reads its own shards; `BlockStream` tags the last
  block of each batch it hands out with its worker, its count of batches and the dataset's state after it.
- The tag travels with the batch, past what workers and Lightning prefetch, to the training loop:
  `StreamLoader.record_trained(batch)` (the DataModule's `on_before_batch_transfer`) removes it and keeps it as
  the position. A checkpoint saves the position of the last batch trained on, never one only prefetched.
- On resume every worker starts from its saved state. The loader takes batches from its workers in turn, starting
  at worker 0: the workers that had already delivered in the interrupted turn start one batch earlier and that
  batch is dropped on arrival, so the next batch comes from the worker an uninterrupted run would ask, and the
  batches continue exactly (same blocks, same order; tested with 0 and 2 workers).
- Several processes: every rank's position goes into the checkpoint (gathered when it is saved); each rank loads
  its own. Another number of processes or workers cannot continue these positions: that is an error.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader

from lit_flash.errors import LitFlashError, warn_user

POSITION_KEY = "stream_position"  # in a batch from `StreamLoader` until `record_trained` takes it out
END = "end"  # the state of a worker whose shards ran out (its last batch was short)
_KIND = "lit_flash.stream/1"


class BlockStream(torch.utils.data.IterableDataset):
    """This rank's stream of blocks (a `datasets.IterableDataset`), each batch's last block tagged with its position.

    `starts` (set by `StreamLoader`): per worker, `[state, batches already delivered]` for the next pass only.
    """

    def __init__(self, blocks: Any, batch_size: int, block_size: int | None = None) -> None:
        self.blocks = blocks
        self.batch_size = batch_size
        self.block_size = block_size
        self.starts: list[list[Any]] | None = None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        starts, self.starts = self.starts, None  # at iter() time: a worker reads its copy when it starts
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        state, done = starts[worker] if starts else (None, 0)
        return self._blocks(worker, state, done)

    def _blocks(self, worker: int, state: Any, done: int) -> Iterator[dict[str, Any]]:
        if state == END:
            return
        self.blocks.load_state_dict(state)  # None: from the start (a state once loaded would otherwise stay)
        size = self.batch_size
        for i, row in enumerate(self.blocks):
            tag: dict[str, Any] = {"worker": worker, "batch": done + i // size + 1}
            if (i + 1) % size == 0:
                tag["state"] = self.blocks.state_dict()
            row[POSITION_KEY] = tag
            yield row


def collate_with_position(rows: list[dict[str, Any]], collate: Callable[[list[Any]], dict[str, Any]]) -> dict:
    """`collate` the rows, the batch keeping its last row's tag (a short batch ends its worker's stream)."""
    tags = [row.pop(POSITION_KEY) for row in rows]
    batch = collate(rows)
    batch[POSITION_KEY] = tags[-1] if "state" in tags[-1] else {**tags[-1], "state": END}
    return batch


class StreamLoader(DataLoader):
    """A `DataLoader` over a `BlockStream` whose position (the last batch trained on) Lightning saves with each
    checkpoint (`state_dict`) and restores on resume (`load_state_dict`)."""

    dataset: BlockStream

    def __init__(self, dataset: BlockStream, *args: Any, rank: int = 0, world_size: int = 1, **kwargs: Any) -> None:
        super().__init__(dataset, *args, **kwargs)
        self.rank, self.world_size = rank, world_size
        self._workers = max(1, self.num_workers)
        # per worker: [batches trained on, state after the last of them, state before it]
        self._positions = [[0, None, None] for _ in range(self._workers)]
        self._last_worker: int | None = None
        self._drop = [0] * self._workers  # per worker: batches re-delivered after a resume, dropped on arrival
        self._starts: list[list[Any]] | None = None
        self._untracked = 0  # batches handed out since the last `record_trained`

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        fresh = self._starts is None
        if fresh:  # a pass from the start of the stream (a new epoch): no position in it yet
            self._positions = [[0, None, None] for _ in range(self._workers)]
            self._last_worker = None
        self.dataset.starts, self._starts = self._starts, None
        batches = super().__iter__()  # the workers (or the main process) have read their starts by now
        self.dataset.starts = None
        drop, self._drop = self._drop, [0] * self._workers
        yielded = False
        for batch in batches:
            tag = batch[POSITION_KEY]
            if tag["batch"] <= drop[tag["worker"]]:
                continue
            self._untracked += 1
            yielded = True
            yield batch
        if fresh and not yielded:  # else each new pass is empty too: max_steps never comes
            raise LitFlashError(
                "data.streaming=true: the stream gives no block of data.block_size tokens"
                f"{' on this rank' if self.world_size > 1 else ''}: give more text, or a smaller data.block_size"
            )

    def record_trained(self, batch: dict[str, Any]) -> None:
        """Take the position tag out of `batch` and keep it: the training loop is about to train on it."""
        tag = batch.pop(POSITION_KEY)
        worker = tag["worker"]
        self._positions[worker] = [tag["batch"], tag["state"], self._positions[worker][1]]
        self._last_worker = worker
        self._untracked = 0

    def local_state(self) -> dict[str, Any]:
        """This rank's position."""
        return {
            "workers": self.num_workers,
            "batch_size": self.batch_size,
            "block_size": self.dataset.block_size,
            "last_worker": self._last_worker,
            "positions": [list(p) for p in self._positions],
        }

    def state_dict(self) -> dict[str, Any]:
        if self._untracked > 1:  # Lightning prefetches one batch; more means nobody called record_trained
            warn_user(
                "the stream's position is not tracked (StreamLoader.record_trained was not called on the batches): "
                "train through WikitextDataModule so that a resume continues the stream"
            )
        return {"kind": _KIND, "world_size": self.world_size, "ranks": gather_from_ranks(self.local_state())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != _KIND:
            raise LitFlashError(
                "data.streaming=true: the checkpoint holds no stream position (it was saved by a run that did not "
                "stream): resume it with data.streaming=false"
            )
        if state["world_size"] != self.world_size:
            raise LitFlashError(
                f"data.streaming=true: the checkpoint was saved by {state['world_size']} processes and this run has "
                f"{self.world_size}: each process saved its own place in its own share of the stream, so resume on "
                f"{state['world_size']} processes (trainer.devices x trainer.num_nodes)"
            )
        local = state["ranks"][self.rank]
        if local["workers"] != self.num_workers:
            raise LitFlashError(
                f"data.streaming=true: the checkpoint was saved with data.num_workers={local['workers']} and this run "
                f"has {self.num_workers}: each worker saved its place in its own shards, so resume with "
                f"data.num_workers={local['workers']}"
            )
        if local["block_size"] != self.dataset.block_size:
            raise LitFlashError(
                f"data.streaming=true: the checkpoint was saved with data.block_size={local['block_size']} and this "
                f"run has {self.dataset.block_size}: resume with data.block_size={local['block_size']}"
            )
        self._load_local(local)
        self._iterator = None  # persistent workers already started would not see the new starts

    def _load_local(self, local: dict[str, Any]) -> None:
        positions, last = local["positions"], local["last_worker"]
        if local["batch_size"] != self.batch_size:
            warn_user(
                f"the checkpoint was saved with data.batch_size={local['batch_size']} and this run has "
                f"{self.batch_size}: the stream continues where each worker stopped (no block skipped or repeated), "
                "but the batches differ from an uninterrupted run's"
            )
            positions, last = [[0, state, None] for _, state, _ in positions], None
        # The workers that delivered in the interrupted turn (up to `last`) start one batch earlier, dropped on
        # arrival: the loader starts its turns at worker 0, and its next batch must come from worker last + 1.
        turn = last is not None and last < self._workers - 1
        self._starts, self._drop = [], []
        for worker, (done, state, before) in enumerate(positions):
            again = turn and worker <= last and done > 0
            self._starts.append([before, done - 1] if again else [state, done])
            self._drop.append(done if again else 0)
        self._positions = [list(p) for p in positions]
        self._last_worker = last


def gather_from_ranks(obj: Any) -> list[Any]:
    """`obj` of every rank, in rank order (every rank calls this: Lightning builds a checkpoint on all of them)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def check_resume_streaming(saved: dict[str, Any], streaming: bool) -> None:
    """Refuse a streaming resume of a checkpoint that holds no stream position (Lightning restores no loader state:
    the stream would start over silently); warn for one saved before positions were."""
    if saved.get("streaming") is False and streaming:
        raise LitFlashError(
            "data.streaming=true, but the checkpoint was saved by a run that did not stream: it holds no stream "
            "position, so the stream would start over; resume with data.streaming=false, or start a new run"
        )
    if saved.get("streaming") and not saved.get("stream_position") and streaming:
        warn_user(
            "data.streaming=true: this checkpoint was saved before lit_flash saved stream positions, so the "
            "stream restarts from its first block (the blocks trained on before it are read again)"
        )


def stream_splits(
    raw: Any, tokenizer: Any, block_size: int, batch_size: int, stage: str, trainer: Any,
    max_train: int | None, max_eval: int | None,
) -> tuple[BlockStream | None, Any, Any]:
    """The (train, validation, test) streams of `stage` from streamed raw text (None where the stage has none):
    blocks of `block_size` tokens, this rank's share of them."""
    from datasets.distributed import split_dataset_by_node

    from lit_flash.text import tokenize_and_group

    if stage == "fit" and trainer is not None and trainer.max_steps in (None, -1):
        raise LitFlashError("data.streaming=true: a stream has no length, so set trainer.max_steps")
    blocks = tokenize_and_group(raw, tokenizer, block_size)
    rank, world_size = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def stream(split: str, limit: int | None) -> Any:
        ds = blocks[split] if limit is None else blocks[split].take(limit)
        # Whole shards (files) per rank when they divide evenly, else every world_size-th block; the DataLoader's
        # workers then split each rank's shards among themselves: no block is read twice.
        return split_dataset_by_node(ds, rank=rank, world_size=world_size).with_format("torch")

    if "train" not in blocks:
        raise LitFlashError(f"the streamed data has no 'train' split (found {sorted(blocks)})")
    eval_split = next((s for s in ("validation", "test") if s in blocks), None)
    train = BlockStream(stream("train", max_train), batch_size, block_size) if stage == "fit" else None
    val = stream(eval_split, max_eval) if stage in ("fit", "validate") and eval_split is not None else None
    test = None
    if stage == "test":
        if "test" not in blocks:
            raise LitFlashError(f"the streamed data has no 'test' split (found {sorted(blocks)})")
        test = stream("test", max_eval)
    return train, val, test
