"""Exact resume: what a Lightning checkpoint needs beyond weights, optimizer, scheduler and grad-scaler state.

Lightning restores the loops (global step, batch index) and asks every training `DataLoader` that has
`state_dict`/`load_state_dict` for its position (`CombinedLoader._state_dicts`). A plain `DataLoader` has none, so
a resumed run would restart the epoch's data from the top with a fresh shuffle. `ResumableDataLoader` over a
`ResumableSampler` (a per-epoch seeded permutation, as `DistributedSampler`) records the epoch and the batches
already handed out, and skips them after a restore. `ExactResume` carries the RNG states (dropout masks), flushes
the loggers with each checkpoint and writes `last.ckpt` when a preemption's SIGTERM stops the run.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Iterator
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch.utils.data import DataLoader, DistributedSampler

from lit_flash.errors import LitFlashError, warn_user
from lit_flash.interrupt import note_saved, signal_name


class ResumableSampler(DistributedSampler):
    """`DistributedSampler` (a seeded permutation per epoch, this rank's share of it) that can start mid-epoch.

    Being a `DistributedSampler`, Lightning keeps it under DDP instead of wrapping it; `num_replicas=1, rank=0` on
    one device. `start` is the number of this rank's indices to skip in the next pass only.
    """

    def __init__(
        self, dataset: Any, num_replicas: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last)
        self.start = 0

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        start, self.start = self.start, 0
        return iter(indices[start:])


class ResumableDataLoader(DataLoader):
    """A `DataLoader` over a `ResumableSampler` whose position (epoch, rows handed out) is saved in Lightning
    checkpoints and restored on resume, so a resumed run sees exactly the batches an uninterrupted run would.

    The position is kept in rows, not batches: a run resumed with another `data.batch_size` continues at the same
    row of the epoch (no row skipped or seen twice), with other batches than an uninterrupted run (it warns).
    """

    sampler: ResumableSampler

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.sampler, ResumableSampler):
            raise TypeError("ResumableDataLoader needs sampler=ResumableSampler(...)")
        self._batches_out = 0
        self._rows_out = 0
        self._skip = (0, 0)  # (batches, rows) of the epoch a restored checkpoint had already handed out
        self._length: int | None = None  # set only by a restore with another batch size: see load_state_dict

    def __len__(self) -> int:
        return self._length if self._length is not None else super().__len__()

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        # Counted here, where batches reach the training loop: worker prefetching runs ahead of the sampler.
        (self._batches_out, self._rows_out), self._skip = self._skip, (0, 0)
        self.sampler.start = self._rows_out
        rows = len(self.sampler)
        for batch in super().__iter__():
            self._batches_out += 1
            self._rows_out = min(self._rows_out + self.batch_size, rows)
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": self.sampler.epoch,
            "batches": self._batches_out,
            "rows": self._rows_out,
            "batch_size": self.batch_size,
            "replicas": self.sampler.num_replicas,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        if "epoch" not in state:  # a stream's position (`stream.StreamLoader`)
            raise LitFlashError("the checkpoint was saved while streaming: resume it with data.streaming=true")
        epoch, batches = state["epoch"], state["batches"]
        saved_batch_size = state.get("batch_size", self.batch_size)
        rows = state.get("rows", batches * saved_batch_size)  # checkpoints from before rows were stored
        if rows >= len(self.sampler):  # saved after the epoch's last batch: the next pass is the next epoch, from 0
            epoch, batches, rows = epoch + 1, 0, 0
        if state.get("replicas", 1) != self.sampler.num_replicas and rows:
            warn_user(
                f"the checkpoint was saved mid-epoch by {state['replicas']} processes and this run has "
                f"{self.sampler.num_replicas}: the shards differ, so epoch {epoch} starts over"
            )
            batches, rows = 0, 0
        if rows and saved_batch_size != self.batch_size:
            left = len(self.sampler) - rows
            warn_user(
                f"the checkpoint was saved with data.batch_size={saved_batch_size} and this run has "
                f"{self.batch_size}: epoch {epoch} continues at row {rows} of {len(self.sampler)} (no row skipped "
                "or repeated), but the batches, the steps per epoch and so the data order per step differ from an "
                "uninterrupted run"
            )
            # Lightning restores its count of this epoch's batches (in the old size) and ends the epoch when that
            # count reaches len(loader), which it reads after this restore: cover the restored count plus the
            # batches left, and never less than a full epoch (later epochs end when the data runs out).
            self._length = max(super().__len__(), batches + math.ceil(left / self.batch_size))
        self.sampler.set_epoch(epoch)
        self._skip = (batches, rows)


class ExactResume(L.Callback):
    """What the CLI adds to every run so that a stopped run resumes exactly:

    - the torch (CPU, CUDA) and Python RNG states go into each checkpoint and are restored just before the first
      training batch after a resume, so dropout draws the same masks as in an uninterrupted run (on several GPUs
      rank 0 saves its own GPU's state and every rank restores it on its own GPU: the ranks are seeded alike and
      draw alike, so their states are equal in an uninterrupted run);
    - the loggers are flushed with every checkpoint, so the metrics up to it survive a SIGKILL (a CSVLogger
      writes only every 100 steps by default; the CLI's writes every logged step);
    - a SIGTERM (a preemption, `docker stop`, a stopped FlexAI job) saves `last.ckpt` before the process exits:
      Lightning's own handler sets `trainer.received_sigterm`, lets the running batch finish and raises
      `SIGTERMException`, a point it resumes from exactly.
    """

    def __init__(self) -> None:
        self._rng_to_restore: dict[str, Any] | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.ckpt_path is None:  # known from here on: Lightning sets it when it restores, after `setup`
            # A fresh fit would write over an earlier run's checkpoints and export in this folder: the CLI refuses
            # it before the Trainer exists; this refuses it for a Trainer built in Python (`trainer_kwargs`).
            from lit_flash.checkpointing import resolve_ckpt_path

            resolve_ckpt_path(None, os.path.dirname(last_checkpoint_path(trainer)), "fit")

    def state_dict(self) -> dict[str, Any]:
        states: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            states["cuda"] = torch.cuda.get_rng_state()  # this rank's device only: see the class docstring
        return states

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._rng_to_restore = state_dict

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        # Restored here, not on load: setting up the run in between draws random numbers (model init, seeding).
        states, self._rng_to_restore = self._rng_to_restore, None
        if states is None:
            return
        torch.set_rng_state(states["torch"])
        random.setstate(states["python"])
        cuda = states.get("cuda")
        if isinstance(cuda, list):  # older checkpoints: every device's state as rank 0 saw it; its own is current
            own = torch.cuda.current_device() if trainer.world_size == 1 else 0
            cuda = cuda[own] if own < len(cuda) else None
        if cuda is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(cuda)  # on the current device: each rank's own GPU

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        for logger in trainer.loggers:
            logger.save()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException) or trainer.state.fn != TrainerFn.FITTING:
            return
        path = last_checkpoint_path(trainer)
        trainer.save_checkpoint(path, weights_only=False)  # a whole checkpoint, as ModelCheckpoint writes
        note_saved(trainer.global_step, path)
        rank_zero_info(f"{signal_name()} at step {trainer.global_step}: saved {path} (resume with --ckpt_path last "
                       "added to the same command)")


def last_checkpoint_path(trainer: L.Trainer) -> str:
    """`<ModelCheckpoint dirpath>/last.ckpt`, or `<default_root_dir>/checkpoints/last.ckpt` without one."""
    callback = trainer.checkpoint_callback
    folder = callback.dirpath if isinstance(callback, ModelCheckpoint) and callback.dirpath else None
    folder = folder or os.path.join(trainer.default_root_dir, "checkpoints")
    return os.path.join(folder, ModelCheckpoint.CHECKPOINT_NAME_LAST + ModelCheckpoint.FILE_EXTENSION)
