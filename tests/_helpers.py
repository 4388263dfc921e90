"""Small helpers shared by the model, speed, reliability and GPU tests."""

from __future__ import annotations

import lightning as L
import pytest
import yaml

from lit_flash.cli import cli_main, config_path
from lit_flash.model import FlashGPT2LM


def tiny_module(config: dict, **kwargs) -> FlashGPT2LM:
    """A from-config FlashGPT2LM with sdpa attention (runs anywhere); `kwargs` override any argument."""
    return FlashGPT2LM(**{"model_name_or_path": None, "model_config": config, "attn_implementation": "sdpa", **kwargs})


def cpu_trainer(**kwargs) -> L.Trainer:
    """A quiet one-process CPU Trainer: no logger, checkpoints, progress bar or summary unless `kwargs` say so."""
    defaults = {
        "accelerator": "cpu", "devices": 1, "logger": False, "enable_checkpointing": False,
        "enable_progress_bar": False, "enable_model_summary": False,
    }
    return L.Trainer(**{**defaults, **kwargs})


class RecordLosses(L.Callback):
    """The training loss of every step, as floats."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def print_config(*configs: str, capsys: pytest.CaptureFixture) -> dict:
    """The complete config `fit --config A --config B ... --print_config` prints, as a dict (no hub, no data)."""
    args = ["fit"] + [a for name in configs for a in ("--config", str(config_path(name)))] + ["--print_config"]
    with pytest.raises(SystemExit):
        cli_main(args)
    return yaml.safe_load(capsys.readouterr().out)
