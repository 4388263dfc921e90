"""Callbacks the CLI always adds: the Hugging Face export at the end of `fit`, and token throughput."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ThroughputMonitor
from lightning.pytorch.trainer.states import RunningStage, TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

from lit_flash.distributed import gather_full_state_dict
from lit_flash.export import check_export_target
from lit_flash.limits import PositiveFloat, WindowInt


class HFExport(L.Callback):
    """At the end of `fit`, save the model and tokenizer in Hugging Face format (safetensors).

    The target is checked when `fit` sets up, before any training: it may be a new folder, an empty one, or this
    run's own earlier export (a resumed or re-run fit replaces it). lit_flash writes `lit_flash_export.json` into
    every export, naming the run folder (`trainer.default_root_dir`) it belongs to; an export with that marker is
    this run's when it names this run's folder or lies inside it. A file, a folder holding anything else, or
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

    def _flag(self) -> str:
        return f"export.dirname={self.dirname}"

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        path = self.export_path(trainer)
        if stage == "fit" and path is not None:
            # Every rank checks (the same answer on a shared filesystem): one rank raising alone would hang the rest.
            check_export_target(path, trainer.default_root_dir, self._flag())

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        path = self.export_path(trainer)
        if path is None or trainer.interrupted:
            return
        if hasattr(pl_module, "_stop_if_nonfinite"):
            pl_module._stop_if_nonfinite()  # on GPU the NaN check is deferred: never export NaN-trained weights
        state_dict = gather_full_state_dict(trainer)  # FSDP: every rank takes part in gathering the shards
        self._export(pl_module, trainer, path, state_dict)

    @rank_zero_only
    def _export(self, pl_module: Any, trainer: L.Trainer, path: Path, state_dict: dict | None) -> None:
        tokenizer = getattr(trainer.datamodule, "tokenizer", None) if trainer.datamodule is not None else None
        pl_module.export_hf(path, tokenizer, state_dict=state_dict, run_dir=trainer.default_root_dir, flag=self._flag())
        rank_zero_info(f"Exported the Hugging Face model to {path}")


def _batch_rows(batch: dict[str, Any]) -> int:
    return int(batch["input_ids"].shape[0])


def _batch_tokens(batch: dict[str, Any]) -> int:
    return int(batch["input_ids"].numel())


class TokenThroughput(ThroughputMonitor):
    """Lightning's `ThroughputMonitor` set up for token batches: logs samples/s, tokens/s (`items_per_sec`),
    FLOP/s and MFU every `log_every_n_steps`, FLOPs from the module's `flops_per_batch`.

    The stock callback synchronizes the GPU after every batch, which stops the CPU from queueing the next step's
    kernels ahead (not measured on its own here). This one counts every batch on the host and synchronizes only
    on the steps it logs.

    Args:
        window_size: Number of recorded points the rates are computed over: the log steps, plus one at the start
            of each validation (whose time is left out of training).
        peak_tflops: The card's peak for MFU (e.g. 790: bf16 on an H100/H200 as measured). Null: Lightning's table.
    """

    def __init__(self, window_size: WindowInt = 2, peak_tflops: PositiveFloat | None = None) -> None:
        super().__init__(batch_size_fn=_batch_rows, length_fn=_batch_tokens, window_size=window_size)
        self.peak_tflops = peak_tflops
        self._pending_flops: dict[Any, float] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.peak_tflops:
            for throughput in self._throughputs.values():
                throughput.available_flops = self.peak_tflops * 1e12

    @torch.inference_mode()
    def _update(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, iter_num: int) -> None:
        stage = trainer.state.stage
        self._samples[stage] += self.batch_size_fn(batch)
        self._lengths[stage] += self.length_fn(batch)
        self._batches[stage] += 1
        flops = getattr(pl_module, "flops_per_batch", None) or 0
        self._pending_flops[stage] = self._pending_flops.get(stage, 0) + flops
        if stage == RunningStage.TRAINING and (
            trainer.fit_loop._should_accumulate() or not trainer._logger_connector.should_update_logs
        ):
            return
        self._record(trainer, stage)

    def _record(self, trainer: L.Trainer, stage: RunningStage) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()  # only now: the time must include the queued work
        self._throughputs[stage].update(
            time=time.perf_counter() - self._t0s[stage],
            batches=self._batches[stage],
            samples=self._samples[stage],
            lengths=self._lengths[stage],
            flops=self._pending_flops.pop(stage, 0) or None,
        )

    @rank_zero_only
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning pauses the training clock from the last training update to the end of validation: record the
        # training batches since the last log step first, or their time would be cut (rates read ~2x too high).
        fitting = trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking
        if fitting and RunningStage.TRAINING in self._pending_flops:  # batches not yet recorded
            self._record(trainer, RunningStage.TRAINING)
        super().on_validation_start(trainer, pl_module)
