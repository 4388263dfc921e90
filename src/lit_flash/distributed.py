"""Several processes (DDP, FSDP; one node or many): what lit_flash adds to Lightning's own strategies.

Lightning launches the ranks, wraps the model and reduces the gradients. Three things it leaves to us:
- Samplers. By default Lightning gives every loader a `DistributedSampler` that pads each rank's share by
  repeating samples: in training some rows would be seen twice per epoch, and in validation the repeated rows
  would bias `val_ppl` away from the single-process value. `shard_sampler` gives training a sampler that drops
  the remainder instead (at most `world_size - 1` rows per epoch, a different random few each epoch) and
  evaluation one that neither pads nor drops (ranks may differ by one row; no collective runs per eval batch
  under DDP; under FSDP, whose forward is a collective, evaluation pads as Lightning does).
- The Hugging Face export under FSDP: each rank holds only a shard, so the full weights are gathered first.
- Resuming a sharded FSDP checkpoint (a folder) under another strategy, which Lightning cannot load.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DistributedSampler

from lit_flash.errors import LitFlashError


def shard_sampler(dataset: Any, trainer: Any, shuffle: bool, seed: int) -> DistributedSampler | None:
    """This rank's sampler over `dataset` when the trainer runs several processes; None for one process.

    Training (`shuffle=True`): every rank gets `len // world_size` distinct rows of one permutation seeded by
    `seed` and the epoch (Lightning calls `set_epoch`); the remainder is dropped, not repeated.
    Evaluation: rows `rank, rank + world_size, ...`, all rows exactly once, so the token-weighted mean loss
    (synced by torchmetrics) equals the single-process one.
    """
    kwargs = trainer.distributed_sampler_kwargs if trainer is not None else None
    world_size = int(kwargs.get("num_replicas", 1)) if kwargs else 1
    if world_size < 2:
        return None
    check_rows_per_rank(len(dataset), world_size, "training" if shuffle else "evaluation")
    if shuffle:
        return DistributedSampler(dataset, shuffle=True, seed=seed, drop_last=True, **kwargs)
    if is_fsdp(trainer):
        # Every FSDP forward all-gathers the weights: all ranks need the same number of batches, so up to
        # world_size - 1 rows are repeated (val_ppl then differs slightly from the single-process value).
        return DistributedSampler(dataset, shuffle=False, drop_last=False, **kwargs)
    return UnrepeatedDistributedSampler(dataset, shuffle=False, **kwargs)


def check_rows_per_rank(n_rows: int, world_size: int, split: str) -> None:
    """Every process needs a row of the split: fewer rows than processes would leave a rank without batches."""
    if n_rows < world_size:
        raise LitFlashError(
            f"the {split} split has {n_rows} rows, fewer than the {world_size} processes: "
            "use more data (data.max_train_samples / data.max_eval_samples) or fewer trainer.devices"
        )


def is_fsdp(trainer: Any) -> bool:
    from lightning.pytorch.strategies import FSDPStrategy

    return isinstance(getattr(trainer, "strategy", None), FSDPStrategy)


def gather_full_state_dict(trainer: Any, prefix: str = "model.") -> dict[str, torch.Tensor] | None:
    """Under FSDP, the full (unsharded) weights of the LightningModule's `prefix` submodule, on rank 0's CPU;
    an empty dict on the other ranks. None under any other strategy (the module holds its full weights).

    Every rank must call it: gathering the shards is a collective. Full weights whatever the strategy's
    `state_dict_type`, since a Hugging Face export needs them.
    """
    if not is_fsdp(trainer):
        return None
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    config = FullStateDictConfig(offload_to_cpu=True, rank0_only=True)
    with FSDP.state_dict_type(trainer.strategy.model, StateDictType.FULL_STATE_DICT, config):
        state = trainer.strategy.model.state_dict()
    return {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}


def check_resume(ckpt_path: str | None, strategy: Any) -> None:
    """A sharded FSDP checkpoint (a folder) resumes only under FSDP, with any number of GPUs (torch's distributed
    checkpoint reshards it). Elsewhere Lightning would fail deep inside `torch.load`: say what to do instead.
    A folder that is no checkpoint at all (empty, or without meta.pt) is called that, under any strategy."""
    if not ckpt_path or ckpt_path in ("last", "best", "hpc", "registry") or not Path(ckpt_path).is_dir():
        return
    if any((Path(ckpt_path) / name).is_file() for name in ("trainer_state.json", "config.json")):
        # The reference recipe's `checkpoint-<step>/` (HF Trainer): weights we can start from, not a Lightning state.
        raise LitFlashError(
            f"ckpt_path={ckpt_path} is a Hugging Face (Trainer) checkpoint, not a Lightning one: start from its "
            f"weights with --model.model_name_or_path {ckpt_path} (its optimizer state cannot be resumed)"
        )
    if not any(Path(ckpt_path).iterdir()):
        raise LitFlashError(
            f"ckpt_path={ckpt_path} is an empty folder, not a checkpoint: give a checkpoint file (e.g. "
            "<run>/checkpoints/last.ckpt), or --ckpt_path last (or auto) to resume this run"
        )
    if not (Path(ckpt_path) / "meta.pt").is_file():  # what Lightning's FSDP writes in a sharded checkpoint
        raise LitFlashError(
            f"ckpt_path={ckpt_path} is a folder but not a checkpoint (a sharded FSDP checkpoint holds meta.pt): "
            "give a checkpoint file (e.g. <run>/checkpoints/last.ckpt), or --ckpt_path last (or auto)"
        )
    from lightning.pytorch.strategies import FSDPStrategy

    name = strategy if isinstance(strategy, str) else type(strategy).__name__
    if isinstance(strategy, FSDPStrategy) or (isinstance(strategy, str) and strategy.startswith("fsdp")):
        return
    raise LitFlashError(
        f"ckpt_path={ckpt_path} is a sharded FSDP checkpoint (a folder), which trainer.strategy={name} cannot load: "
        "resume it with an FSDP strategy (any number of GPUs), or first convert it to one file with "
        f"`python -m lightning.pytorch.utilities.consolidate_checkpoint {ckpt_path}`"
    )
