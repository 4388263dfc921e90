"""Callbacks the CLI always adds: the Hugging Face export at the end of `fit`, and token throughput."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.throughput import Throughput, get_available_flops
from lightning.pytorch.trainer.states import RunningStage, TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

from lit_flash.distributed import gather_full_state_dict
from lit_flash.export import check_export_target, exported_step, record_exported_step
from lit_flash.lightning_adapters import is_log_step, steps_optimizer
from lit_flash.limits import PositiveFloat, WindowInt


class HFExport(L.Callback):
    """At the end of `fit`, save the model and tokenizer in Hugging Face format (safetensors).

    The target is checked when `fit` sets up, before any training: it may be a new folder, an empty one, or this
    run's own earlier export (a resumed or re-run fit replaces it). lit_flash writes `lit_flash_export.json` into
    every export, naming the run folder (`trainer.default_root_dir`) it belongs to; an export with that marker is
    this run's when it names this run's folder or lies inside it, and it lists the files the export wrote: a file
    added there since (notes, a tokenizer copied in) is refused too, as a new export replaces the whole folder. A
    fit resumed at its end (nothing to train) keeps the export of that step. A file, a folder holding anything else, or
    another run's export is refused with one error line naming `export.dirname`; so is a target whose parent
    folder cannot be written. The export is written into a temporary folder beside the target and renamed onto it
    in one step (a previous export of the run is renamed aside, and deleted once the new one is in place): a
    failure (a full disk, a kill) never leaves half a model at the target, and the previous export stays.

    Args:
        dirname: Folder under the trainer's `default_root_dir` (an absolute path is used as it is). Null: no export.
    """

    def __init__(self, dirname: str | None = "model") -> None:
        self.dirname = dirname

    def export_path(self, trainer: L.Trainer) -> Path | None:
        return None if self.dirname is None else Path(trainer.default_root_dir) / self.dirname

    @property
    def flag(self) -> str:
        return f"export.dirname={self.dirname}"

    def check_target(self, default_root_dir: str | Path) -> None:
        """Refuse a target this run may not write (see above). The CLI calls it before the trainer exists, so a
        refused run writes nothing; `setup` calls it for a Trainer built in Python."""
        if self.dirname is not None:
            check_export_target(Path(default_root_dir) / self.dirname, default_root_dir, self.flag)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trained = False
        if stage == "fit":
            # Every rank checks (the same answer on a shared filesystem): one rank raising alone would hang the rest.
            self.check_target(trainer.default_root_dir)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._trained = True  # not called when a resumed fit is already at its end

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        path = self.export_path(trainer)
        if path is None or trainer.interrupted:
            return
        if not getattr(self, "_trained", True) and exported_step(path) == trainer.global_step:
            # Nothing trained and the export holds these weights already; with a failed or older export, write it.
            rank_zero_info(f"The export at {path} already holds step {trainer.global_step}: kept as it is")
            return
        if hasattr(pl_module, "stop_if_nonfinite"):
            pl_module.stop_if_nonfinite()  # on GPU the NaN check is deferred: never export NaN-trained weights
        state_dict = gather_full_state_dict(trainer)  # FSDP: every rank takes part in gathering the shards
        self._export(pl_module, trainer, path, state_dict)

    @rank_zero_only
    def _export(self, pl_module: Any, trainer: L.Trainer, path: Path, state_dict: dict | None) -> None:
        tokenizer = getattr(trainer.datamodule, "tokenizer", None) if trainer.datamodule is not None else None
        pl_module.export_hf(path, tokenizer, state_dict=state_dict, run_dir=trainer.default_root_dir, flag=self.flag)
        record_exported_step(path, trainer.global_step)
        rank_zero_info(f"Exported the Hugging Face model to {path}")


class LastValidatedStep(L.Callback):
    """The `global_step` of the last validation (the sanity check aside): the CLI validates the final weights once
    more after fit unless the last step just did. Also whether this fit trained at all: resumed from a checkpoint
    already at the run's end, Lightning ends the fit at once, and the CLI says so instead of validating again."""

    def __init__(self) -> None:
        self.step: int | None = None
        self.trained = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.trained = True

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.step = trainer.global_step


def _batch_rows(batch: dict[str, Any]) -> int:
    return int(batch["input_ids"].shape[0])


def _batch_tokens(batch: dict[str, Any]) -> int:
    return int(batch["input_ids"].numel())


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype the matmuls run in under `trainer.precision`, for the card's peak FLOP/s."""
    if precision.startswith("bf16"):
        return torch.bfloat16
    if precision.startswith("16"):
        return torch.float16
    return torch.float64 if precision.startswith("64") else torch.float32


class _StageCount:
    """What a stage (train, validate, test) processed since its start, and the FLOPs not yet handed to Throughput."""

    def __init__(self, throughput: Throughput) -> None:
        self.throughput = throughput
        self.t0 = time.perf_counter()
        self.batches = self.samples = self.tokens = 0
        self.pending_flops = 0.0
        self.pending = False  # batches counted since the last record


class TokenThroughput(L.Callback):
    """Samples/s, tokens/s (`items_per_sec`), FLOP/s and MFU of token batches, logged every `log_every_n_steps`
    under Lightning's `ThroughputMonitor` names (`train/device/items_per_sec`, `train/time`, ...), computed by
    Lightning's `Throughput`; FLOPs from the module's `flops_per_batch`.

    Lightning's `ThroughputMonitor` synchronizes the GPU after every batch, which stops the CPU from queueing the
    next step's kernels ahead. This callback counts every batch on the host and synchronizes only on the steps it
    records: the optimizer steps that log (so a step's time includes its `optimizer.step()`), the start of each
    validation, whose time is left out of training, and the evaluation batches that log.

    Args:
        window_size: Number of recorded points the rates are computed over: the log steps, plus one at the start
            of each validation.
        peak_tflops: The card's peak for MFU (e.g. the bf16 peak of your GPU). Null: Lightning's table.
    """

    def __init__(self, window_size: WindowInt = 2, peak_tflops: PositiveFloat | None = None) -> None:
        self.window_size = window_size
        self.peak_tflops = peak_tflops
        self._stages: dict[RunningStage, _StageCount] = {}
        self._eval_steps: dict[RunningStage, int] = {}  # logging step of validation/test rows, across the run
        self._paused_at: float | None = None

    def _start(self, trainer: L.Trainer, stage: RunningStage) -> None:
        if self.peak_tflops:
            peak: float | None = self.peak_tflops * 1e12
        else:
            peak = get_available_flops(trainer.strategy.root_device, compute_dtype(str(trainer.precision)))
        throughput = Throughput(available_flops=peak, world_size=trainer.world_size, window_size=self.window_size)
        self._stages[stage] = _StageCount(throughput)

    def _count(self, stage: RunningStage, pl_module: L.LightningModule, batch: dict[str, Any]) -> None:
        count = self._stages[stage]
        count.batches += 1
        count.samples += _batch_rows(batch)
        count.tokens += _batch_tokens(batch)
        count.pending_flops += getattr(pl_module, "flops_per_batch", None) or 0
        count.pending = True

    def _record(self, trainer: L.Trainer, stage: RunningStage) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()  # only now: the time must include the queued work
        count = self._stages[stage]
        count.throughput.update(
            time=time.perf_counter() - count.t0,
            batches=count.batches,
            samples=count.samples,
            lengths=count.tokens,
            flops=count.pending_flops or None,
        )
        count.pending_flops, count.pending = 0.0, False

    def _log(self, trainer: L.Trainer, stage: RunningStage, step: int) -> None:
        throughput = self._stages[stage].throughput
        metrics = {f"{stage.value}{throughput.separator}{k}": v for k, v in throughput.compute().items()}
        if stage == RunningStage.TRAINING:  # as Lightning's training rows
            metrics.setdefault("epoch", trainer.current_epoch)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
            logger.save()

    @rank_zero_only
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start(trainer, RunningStage.TRAINING)

    @torch.inference_mode()
    @rank_zero_only
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._count(RunningStage.TRAINING, pl_module, batch)
        # Record after the optimizer step only, so that each point includes it, and only on the steps that log.
        if steps_optimizer(trainer, batch_idx) and is_log_step(trainer, before_optimizer_step=False):
            self._record(trainer, RunningStage.TRAINING)
            # The row of the step's train_loss: Lightning logs step n (counted from 1) at `step=n - 1`.
            self._log(trainer, RunningStage.TRAINING, trainer.global_step - 1)

    def _evaluation_start(self, trainer: L.Trainer, stage: RunningStage) -> None:
        if trainer.sanity_checking:
            return
        training = self._stages.get(RunningStage.TRAINING)
        if trainer.state.fn == TrainerFn.FITTING and training is not None:
            # Record the training batches since the last log step first, or their time would be cut (rates would
            # read too high); then stop the training clock until the validation ends.
            if training.pending:
                self._record(trainer, RunningStage.TRAINING)
            self._paused_at = time.perf_counter()
        self._start(trainer, stage)
        # A point at the start (nothing processed yet), so that the first logging batch already has a rate.
        self._stages[stage].throughput.update(time=0.0, batches=0, samples=0, lengths=0, flops=0.0)

    def _evaluation_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int, stage: RunningStage
    ) -> None:
        if trainer.sanity_checking or stage not in self._stages:
            return
        self._count(stage, pl_module, batch)
        self._eval_steps[stage] = self._eval_steps.get(stage, 0) + 1
        every = trainer.log_every_n_steps
        if every > 0 and (batch_idx + 1) % every == 0:
            # Recorded (a GPU sync) on the batches that log only: a sync after every batch would stop the host
            # from queueing the next batch while the GPU runs this one.
            self._record(trainer, stage)
            self._log(trainer, stage, self._eval_steps[stage])

    @rank_zero_only
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._evaluation_start(trainer, RunningStage.VALIDATING)

    @torch.inference_mode()
    @rank_zero_only
    def on_validation_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._evaluation_batch_end(trainer, pl_module, batch, batch_idx, RunningStage.VALIDATING)

    @rank_zero_only
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        training = self._stages.get(RunningStage.TRAINING)
        if self._paused_at is not None and training is not None and not trainer.sanity_checking:
            training.t0 += time.perf_counter() - self._paused_at  # the validation's time is not training time
        self._paused_at = None

    @rank_zero_only
    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._evaluation_start(trainer, RunningStage.TESTING)

    @torch.inference_mode()
    @rank_zero_only
    def on_test_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._evaluation_batch_end(trainer, pl_module, batch, batch_idx, RunningStage.TESTING)
