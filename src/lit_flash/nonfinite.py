"""The guard that stops, or skips, on a NaN/inf training loss: on GPU without a host sync each step."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.strategies import FSDPStrategy, Strategy

from lit_flash.blocks import IGNORE_INDEX
from lit_flash.errors import LitFlashError, NonFiniteLossError, warn_user


def check_skip_supported(on_nonfinite: str, precision: str, strategy: Any) -> None:
    """Lightning's FSDP precision plugin unscales the fp16 gradients of a skipped step without updating its
    GradScaler, so the next step would fail; the other strategies' plugin skips both."""
    if on_nonfinite == "skip" and precision in ("16-mixed", "16") and isinstance(strategy, FSDPStrategy):
        raise LitFlashError(
            "model.on_nonfinite=skip cannot skip a step under FSDP with trainer.precision=16-mixed: "
            "use bf16-mixed, or model.on_nonfinite=stop"
        )


def record_first_nonfinite(first: torch.Tensor | None, loss: torch.Tensor, step: int) -> torch.Tensor:
    """`first` (the first step whose loss was NaN/inf, -1: none), updated on the device without a host sync."""
    if first is None:
        first = torch.tensor(-1, device=loss.device)
    first.copy_(torch.where(~torch.isfinite(loss.detach()) & (first < 0), step, first))
    return first


def stop_if_nonfinite(first: torch.Tensor | None, strategy: Strategy) -> None:
    """Raise when any rank recorded a NaN/inf loss (`record_first_nonfinite`); every rank must call it."""
    step = -1 if first is None else int(first)
    if not strategy.reduce_boolean_decision(step < 0, all=True):
        raise NonFiniteLossError(
            f"train_loss was NaN/inf at step {step} (on GPU checked every trainer.log_every_n_steps; no checkpoint "
            "holds the weights since): lower model.learning_rate, use bf16-mixed instead of 16-mixed, or set "
            "model.on_nonfinite=skip"
        )


def finite_or_skip(
    loss: torch.Tensor, n_tokens: torch.Tensor | None, on_nonfinite: str, strategy: Strategy, where: str
) -> bool:
    """Whether to train on this batch: True for a finite loss; False (with a warning) to skip a NaN/inf one; or
    `NonFiniteLossError`. `where`: the step, epoch and batch, for the message. One host sync."""
    # Every rank takes the same decision: a skip on one rank alone would hang DDP.
    finite = strategy.reduce_boolean_decision(bool(torch.isfinite(loss)), all=True)
    if finite:
        return True
    where = f"train_loss is {loss.item()} at {where}"
    if on_nonfinite == "stop":
        if n_tokens is not None and int(n_tokens) == 0:  # a mean over no token: 0/0, whatever the weights
            raise NonFiniteLossError(
                f"{where}: the batch has no token to predict (every label is {IGNORE_INDEX}); give its rows "
                "labels to learn, or leave such rows out of the data"
            )
        raise NonFiniteLossError(
            f"{where}: stopped before updating the weights; lower model.learning_rate, use bf16-mixed instead "
            "of 16-mixed, or set model.on_nonfinite=skip"
        )
    warn_user(f"{where}: skipped the batch (model.on_nonfinite=skip)")
    return False
