"""What `python -m lit_flash fit` adds to every Trainer, for a Trainer built in Python (a notebook, a script).

    trainer = L.Trainer(max_epochs=1, **lit_flash.trainer_kwargs("runs/nb", every_n_train_steps=100))
    trainer.fit(module, datamodule, ckpt_path=lit_flash.resume_path("runs/nb"))

gives the CLI's guarantees: atomic checkpoint files loaded with `weights_only=True`, every checkpoint kept plus
`last.ckpt` in `<root>/checkpoints`, exact resume (RNG states, a checkpoint on SIGTERM), the Hugging Face export
in `<root>/model` at the end of `fit`, CSV and TensorBoard logs in `<root>/logs`, learning rate and throughput.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, ProgressBar
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info

from lit_flash.callbacks import HFExport, LastValidatedStep, TokenThroughput
from lit_flash.checkpointing import AtomicCheckpointIO, resolve_resume
from lit_flash.errors import LitFlashError, check_can_create, show_own_warnings_as_lines
from lit_flash.lightning_adapters import NextEpochAfterResume, quiet_library_notices, with_progress_bar
from lit_flash.limits import PositiveInt, check_call_args
from lit_flash.resume import ExactResume

# The CLI's ModelCheckpoint defaults and the Python API's, from here: every checkpoint kept, and last.ckpt. No
# version counter: a run folder holds one run (the lock, the refusal of a fresh fit over checkpoints), so a name
# that exists is this run's own file from before a resume. With the counter, a run folder copied or moved elsewhere
# (Lightning then does not restore `last_model_path`) wrote `last-v1.ckpt` beside a stale `last.ckpt`, and
# `--ckpt_path last` could pick the stale one.
CHECKPOINT_DEFAULTS: dict[str, Any] = {"save_last": True, "save_top_k": -1, "enable_version_counter": False}


def default_loggers(root: str | os.PathLike) -> list[Any]:
    """CSV (`metrics.csv`) and TensorBoard, side by side in one `logs/version_N` folder of the run."""
    # Rows appended at every logged step (cheap): a killed run keeps its metrics up to the kill.
    csv = CSVLogger(save_dir=root, name="logs", flush_logs_every_n_steps=1)
    return [csv, TensorBoardLogger(save_dir=root, name="logs", version=csv.version, sub_dir="tensorboard")]


def new_log_dirs(loggers: Sequence[Any]) -> list[str]:
    """The CSV loggers' `logs/version_N` folders this run will create (they do not exist yet): see
    `remove_unused_log_dirs`. Read before fit; the version, once read, is kept by the logger."""
    return [lg.log_dir for lg in loggers if isinstance(lg, CSVLogger) and not os.path.exists(lg.log_dir)]


def remove_unused_log_dirs(folders: Sequence[str]) -> list[str]:
    """Remove the folders of `new_log_dirs` that hold no metrics, after a fit that trained nothing (resumed at its
    end): Lightning writes the config, the hyperparameters and a TensorBoard file (the CLI's loggers put it inside)
    before it knows, and each such resume would leave one more `version_N` with no step in it. Returns them."""
    removed = [f for f in folders if os.path.isdir(f) and not os.path.exists(os.path.join(f, "metrics.csv"))]
    for folder in removed:
        shutil.rmtree(folder, ignore_errors=True)
    return removed


def say_nothing_trained(step: int, removed: Sequence[str]) -> None:
    """A fit resumed at its end: why nothing ran, and the log folder it did not keep."""
    sys.stderr.write(
        f"lit_flash: nothing to train: the checkpoint is at step {step}, where this run ends; to train longer, raise "
        "trainer.max_steps (or trainer.max_epochs)"
        + (f" (its empty log folder {', '.join(removed)} is removed)" if removed else "") + "\n"
    )


def with_default_loggers(configured: Any, root: str | os.PathLike) -> Any:
    """The CLI's loggers: CSV + TensorBoard, plus loggers the config adds (`--trainer.logger+=WandbLogger`). A config
    naming its own CSVLogger or TensorBoardLogger gets exactly its loggers; `trainer.logger: false` gets none."""
    if configured is False:
        return False
    extra = [] if configured in (None, True) else configured if isinstance(configured, list) else [configured]
    if any(isinstance(logger, (CSVLogger, TensorBoardLogger)) for logger in extra):
        return extra
    wandb = any(type(logger).__name__ == "WandbLogger" for logger in extra)
    if wandb and not os.environ.get("WANDB_API_KEY"):
        # As the reference recipe: W&B online only with a key; else keep the run locally (`wandb sync` later).
        if os.environ.setdefault("WANDB_MODE", "offline") == "offline":
            rank_zero_info("lit_flash: no WANDB_API_KEY, so W&B logs offline (upload it with `wandb sync`)")
    return default_loggers(root) + list(extra)


def checkpoint_dir(default_root_dir: str | os.PathLike | None) -> str:
    """`<root>/checkpoints`, where the CLI's ModelCheckpoint writes (`trainer.default_root_dir` -> dirpath; unset:
    the working directory, as Lightning's own default)."""
    return os.path.join(default_root_dir or os.getcwd(), "checkpoints")


# The CLI's callbacks, each a config section of its own (`--checkpoint.*`, `--export.*`, ...).
CALLBACK_SECTIONS = {
    "checkpoint": ModelCheckpoint,
    "export": HFExport,
    "lr_monitor": LearningRateMonitor,
    "throughput": TokenThroughput,
}


def fixed_callbacks() -> list[L.Callback]:
    """The callbacks no setting turns off: exact resume (and the next epoch's start after one), and the step of the
    last validation (fit's final validation is skipped when it is the last step)."""
    return [ExactResume(), NextEpochAfterResume(), LastValidatedStep()]


def trainer_callbacks(
    default_root_dir: str | os.PathLike,
    every_n_train_steps: int | None = None,
    export_dirname: str | None = "model",
    lr_monitor: bool = True,
) -> list[L.Callback]:
    """The CLI's callbacks: ModelCheckpoint (every checkpoint kept, `last.ckpt`, every `every_n_train_steps`
    optimizer steps or else each epoch), the HF export (`export_dirname`; None: none), exact resume, throughput,
    and the learning-rate monitor (`lr_monitor`; it needs a logger)."""
    checkpoint = ModelCheckpoint(
        dirpath=checkpoint_dir(default_root_dir), every_n_train_steps=every_n_train_steps, **CHECKPOINT_DEFAULTS
    )
    callbacks: list[L.Callback] = [*fixed_callbacks(), checkpoint, HFExport(export_dirname), TokenThroughput()]
    return callbacks + ([LearningRateMonitor()] if lr_monitor else [])


def trainer_plugins() -> list[Any]:
    """The CLI's checkpoint IO: atomic, fsynced saves; `weights_only=True` loads."""
    return [AtomicCheckpointIO()]


def console_callbacks(callbacks: Sequence[Any], enable_progress_bar: bool | None) -> list[Any]:
    """What a run prints, the same for the CLI and a Trainer built in Python: library notices a user cannot act on
    hidden, lit_flash's own warnings as one line, and `callbacks` plus the progress bar without a negative epoch
    total (unless the bar is off, or `callbacks` holds its own). Call it before the Trainer is built: Lightning's
    logger tip comes from its __init__."""
    quiet_library_notices()
    show_own_warnings_as_lines()
    return with_progress_bar(list(callbacks), enable_progress_bar)


def trainer_kwargs(
    default_root_dir: str | os.PathLike,
    every_n_train_steps: PositiveInt | None = None,
    export_dirname: str | None = "model",
    callbacks: Sequence[L.Callback] = (),
    enable_progress_bar: bool = True,
) -> dict[str, Any]:
    """`L.Trainer(**trainer_kwargs(root), ...)`: the run folder, the CLI's loggers, callbacks, plugins and console
    (progress bar, quiet notices). `callbacks`: your own, added to the CLI's (a progress bar of yours replaces
    lit_flash's). `enable_progress_bar` is Lightning's flag, given here because the bar is one of the callbacks:
    the Trainer would refuse a bar among them with the flag off."""
    check_call_args(trainer_kwargs, {"every_n_train_steps": every_n_train_steps,
                                     "enable_progress_bar": enable_progress_bar}, "trainer_kwargs")
    if not isinstance(callbacks, Sequence) or isinstance(callbacks, str):
        raise LitFlashError(f"trainer_kwargs: callbacks={callbacks!r} must be a list of callbacks")
    if not enable_progress_bar and any(isinstance(c, ProgressBar) for c in callbacks):
        raise LitFlashError("trainer_kwargs: callbacks holds a progress bar and enable_progress_bar=False: drop one")
    root = Path(default_root_dir)
    for folder in (root, root / "checkpoints", root / "logs"):  # what the run creates and writes into
        if folder.exists() and not folder.is_dir():
            raise LitFlashError(f"trainer_kwargs: {folder} is a file, and the run needs a folder there: choose "
                                "another default_root_dir")
    check_can_create(root, f"trainer_kwargs: default_root_dir={root}")
    own = [*callbacks, *trainer_callbacks(default_root_dir, every_n_train_steps, export_dirname)]
    return {
        "default_root_dir": str(default_root_dir),
        "logger": default_loggers(default_root_dir),
        "callbacks": console_callbacks(own, enable_progress_bar),
        "plugins": trainer_plugins(),
        "enable_progress_bar": enable_progress_bar,
    }


def resume_path(default_root_dir: str | os.PathLike, ckpt_path: str | None = "auto") -> str | None:
    """`trainer.fit(..., ckpt_path=resume_path(root))`: the CLI's `--ckpt_path auto` (the run's newest checkpoint,
    None to start fresh when there is none) or `last` (an error when there is none); a path is returned as it is."""
    return resolve_resume(ckpt_path, checkpoint_dir(default_root_dir), "fit")
