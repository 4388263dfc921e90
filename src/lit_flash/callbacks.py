"""Callbacks the CLI always adds: the Hugging Face export at the end of `fit`, and token throughput."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ThroughputMonitor
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

from lit_flash.distributed import gather_full_state_dict


class HFExport(L.Callback):
    """At the end of `fit`, save the model and tokenizer in Hugging Face format (safetensors).

    Args:
        dirname: Folder under the trainer's `default_root_dir` (an absolute path is used as it is). Null: no export.
    """

    def __init__(self, dirname: str | None = "model") -> None:
        self.dirname = dirname

    def export_path(self, trainer: L.Trainer) -> Path | None:
        return None if self.dirname is None else Path(trainer.default_root_dir) / self.dirname

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        path = self.export_path(trainer)
        if path is None or trainer.interrupted:
            return
        state_dict = gather_full_state_dict(trainer)  # FSDP: every rank takes part in gathering the shards
        self._export(pl_module, trainer, path, state_dict)

    @rank_zero_only
    def _export(self, pl_module: Any, trainer: L.Trainer, path: Path, state_dict: dict | None) -> None:
        tokenizer = getattr(trainer.datamodule, "tokenizer", None) if trainer.datamodule is not None else None
        pl_module.export_hf(path, tokenizer, state_dict=state_dict)
        rank_zero_info(f"Exported the Hugging Face model to {path}")


def _batch_rows(batch: dict[str, Any]) -> int:
    return int(batch["input_ids"].shape[0])


def _batch_tokens(batch: dict[str, Any]) -> int:
    return int(batch["input_ids"].numel())


class TokenThroughput(ThroughputMonitor):
    """Lightning's `ThroughputMonitor` set up for token batches: logs samples/s, tokens/s ('items'), TFLOP/s and
    MFU (when the card's peak is known) every `log_every_n_steps`. FLOPs come from the module's `flops_per_batch`."""

    def __init__(self, window_size: int = 50) -> None:
        super().__init__(batch_size_fn=_batch_rows, length_fn=_batch_tokens, window_size=window_size)
