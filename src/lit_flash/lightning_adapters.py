"""Loop state lit_flash needs that Lightning keeps private: rebuilt from public state where it can be, else read
through one small adapter each.

A private name can change in any release without notice, so none is read anywhere else in lit_flash; each adapter
says why no public API serves (test_lightning_api.py keeps it that way).
"""

from __future__ import annotations

import importlib.util
import logging
import warnings
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar


def is_log_step(trainer: L.Trainer, before_optimizer_step: bool) -> bool:
    """Whether the loggers write at this optimizer step (every `log_every_n_steps`, and when the run stops), as
    Lightning's own logging decides it; for each micro-batch of that step when gradients accumulate.

    Public state only: Lightning counts the batches that stepped (private, `_batches_that_stepped`), which equals
    `global_step` (optimizer steps, skipped ones included) and is restored with it on a resume. `global_step` grows
    after the optimizer step, so a caller before it (`training_step`) asks about `global_step + 1`.
    """
    every = trainer.log_every_n_steps
    if every <= 0:
        return False
    step = trainer.global_step + (1 if before_optimizer_step else 0)
    return step % every == 0 or trainer.should_stop


def steps_optimizer(trainer: L.Trainer, batch_idx: int) -> bool:
    """Whether the training batch `batch_idx` of the epoch ends an optimizer step (the last batch of a gradient
    accumulation, or the epoch's last batch). An epoch of unknown length (a streaming dataset) counts only
    full accumulations."""
    if (batch_idx + 1) % trainer.accumulate_grad_batches == 0:
        return True
    return batch_idx + 1 == trainer.num_training_batches


def last_saved_step(checkpoint: ModelCheckpoint) -> int:
    """The `global_step` of the last checkpoint `checkpoint` wrote.

    No public API: ModelCheckpoint keeps it as `_last_global_step_saved` (it decides whether a save at this step is
    a duplicate; Lightning-AI/pytorch-lightning#12057 made it exact). `last_model_path` names the file but not the
    step it holds, and reading the step back from the file would load a whole checkpoint.
    """
    return int(checkpoint._last_global_step_saved)


def attached_trainer(module: L.LightningModule) -> L.Trainer | None:
    """The trainer `module` is attached to, or None (a module built in a notebook, before `fit`). The public
    property raises instead of answering None."""
    try:
        return module.trainer
    except RuntimeError:
        return None


class _DropLitLoggerTip(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in str(record.msg)


# One instance: `addFilter` skips a filter the logger already has, so a second call adds nothing.
_LITLOGGER_TIP_FILTER = _DropLitLoggerTip()


def quiet_library_notices() -> None:
    """Hide notices a lit_flash user cannot act on: Lightning's advertisement for its cloud logger at every fit, the
    deprecation warning torch >= 2.13 raises at each step for the `LeafSpec` that Lightning 2.6 builds, and
    ModelCheckpoint's warning that a resumed run's checkpoint folder is not empty. Safe to call again (each
    Trainer built from `trainer_kwargs` calls it): `filterwarnings` too replaces an identical filter."""
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_LITLOGGER_TIP_FILTER)
    warnings.filterwarnings("ignore", message=r".*LeafSpec.* is deprecated", module=r"lightning\.pytorch\.utilities")
    # lit_flash itself refuses a fresh fit over checkpoints; on a resume the folder is meant to hold them.
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")


def with_progress_bar(callbacks: list[Any], enabled: bool | None) -> list[Any]:
    """`callbacks` plus Lightning's default progress bar (Rich, when installed) without a negative epoch total:
    unless the bar is off or the config names its own."""
    if enabled is False or any(isinstance(c, ProgressBar) for c in callbacks) or not importlib.util.find_spec("rich"):
        return callbacks
    from lightning.pytorch.callbacks import RichProgressBar

    class StepBoundedRichProgressBar(RichProgressBar):
        # A run bounded by steps alone has max_epochs=-1, which Lightning 2.6's bar shows as "Epoch 2/-2"
        # (Lightning#21925, fixed after 2.6). No public hook sets the description: this overrides the protected one.
        def _get_train_description(self, current_epoch: int) -> str:
            description = super()._get_train_description(current_epoch)
            if self.trainer.max_epochs == -1:
                return description.replace(f"Epoch {current_epoch}/-2", f"Epoch {current_epoch}", 1)
            return description

    return [*callbacks, StepBoundedRichProgressBar()]


class NextEpochAfterResume(L.Callback):
    """Start the epoch after a resume from zero batches when the checkpoint was written after the previous epoch's
    last batch (the `last.ckpt` a finished run leaves, or a stop right at the epoch's end) in a run bounded by steps.

    Lightning 2.6 marks such a run as restarting and restores its epoch loop with the finished epoch's batch count:
    the next epoch would end after one batch, skipping its data and running the epoch count ahead. Lightning resets
    those counters itself only for a checkpoint written at `on_train_batch_end` (its restart stages,
    Lightning#14579 / #20379); this does the same reset here. The loop's progress counters are public attributes;
    no hook or trainer argument sets them.
    """

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loop = trainer.fit_loop.epoch_loop
        if loop.restarting and loop.batch_progress.current.completed >= trainer.num_training_batches:
            loop.batch_progress.reset_on_run()
            loop.scheduler_progress.reset_on_run()
            loop.automatic_optimization.optim_progress.reset_on_run()
            loop.val_loop.batch_progress.total.reset()
