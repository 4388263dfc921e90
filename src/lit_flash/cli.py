"""`python -m lit_flash fit|validate|test|prepare|generate|plot ...`: LightningCLI over lit_flash's classes."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info

from lit_flash.callbacks import HFExport, TokenThroughput
from lit_flash.data import WikitextDataModule
from lit_flash.distributed import check_resume
from lit_flash.errors import LitFlashError
from lit_flash.model import FlashGPT2LM

TRAINER_SUBCOMMANDS = ("fit", "validate", "test", "predict")
DEFAULT_CONFIG = "demo.yaml"
# Subcommands that are a typed function (jsonargparse.CLI), not a Trainer run: "module:function".
FUNCTION_SUBCOMMANDS = {
    "prepare": "lit_flash.data:prepare_dataset",
    "generate": "lit_flash.generate:generate_main",
    "plot": "lit_flash.plot:plot_main",
}


def config_path(name: str) -> Path:
    """A config shipped with lit_flash: inside the installed package, or `configs/` of a source checkout."""
    for folder in (Path(__file__).parent / "configs", Path(__file__).resolve().parents[2] / "configs"):
        if (folder / name).is_file():
            return folder / name
    raise LitFlashError(f"config {name!r} not found in lit_flash's configs/")


def default_loggers(root: str | os.PathLike) -> list[Any]:
    """CSV (`metrics.csv`) and TensorBoard, side by side in one `logs/version_N` folder of the run."""
    csv = CSVLogger(save_dir=root, name="logs")
    return [csv, TensorBoardLogger(save_dir=root, name="logs", version=csv.version, sub_dir="tensorboard")]


def with_default_loggers(configured: Any, root: str | os.PathLike) -> Any:
    """CSV + TensorBoard, plus loggers the config adds (`--trainer.logger+=WandbLogger`). A config naming its
    own CSVLogger or TensorBoardLogger gets exactly its loggers; `trainer.logger: false` gets none."""
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


def _checkpoint_dir(root: str | None) -> str:
    return os.path.join(root or os.getcwd(), "checkpoints")


class OneLineErrorParser(LightningArgumentParser):
    """Config mistakes (a typo'd key, a wrong type) as one line, not the whole usage text."""

    def error(self, message: str, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        if os.environ.get("JSONARGPARSE_DEBUG"):
            return super().error(message, *args, **kwargs)
        lines = [line.strip() for line in str(message).splitlines() if line.strip()]
        detail = next((line for line in lines[1:] if "not expected" in line or "No action" in line), "")
        sys.stderr.write(f"error: {' '.join(lines[:1] + ([detail] if detail else []))}  (see --help)\n")
        raise SystemExit(2)


class LitFlashCLI(LightningCLI):
    """LightningCLI with lit_flash's fixed parts: checkpoints, HF export, loggers, LR and throughput monitors."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        # No `predict`: text generation is the `generate` subcommand (sampling options, prompts in, text out).
        return {k: v for k, v in LightningCLI.subcommands().items() if k != "predict"}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.save_top_k": -1})
        parser.link_arguments("trainer.default_root_dir", "checkpoint.dirpath", compute_fn=_checkpoint_dir)
        parser.add_lightning_class_args(HFExport, "export")
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
        parser.add_lightning_class_args(TokenThroughput, "throughput")

    def _check_ckpt_path(self) -> None:
        check_resume(self._get(self.config_init, "ckpt_path"), self.trainer.strategy)

    before_fit = before_validate = before_test = _check_ckpt_path

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        config = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        root = config.get("default_root_dir") or os.getcwd()
        config["logger"] = with_default_loggers(config.get("logger"), root)
        callbacks = [self._get(self.config_init, key) for key in self._parser(self.subcommand).callback_keys]
        if config.get("enable_checkpointing") is False:  # the user turned our always-on checkpointing off
            callbacks = [c for c in callbacks if not isinstance(c, ModelCheckpoint)]
        return self._instantiate_trainer(config, callbacks)


def cli_main(args: list[str] | None = None, run: bool = True) -> LitFlashCLI | None:
    """Run the CLI in-process (tests, notebooks) or from the shell; `args` as on the command line.

    Without `--config`, the trainer subcommands run the offline demo (`configs/demo.yaml`).
    """
    args = list(sys.argv[1:] if args is None else args)
    try:
        if args and args[0] in FUNCTION_SUBCOMMANDS:
            import importlib

            from jsonargparse import CLI

            module, name = FUNCTION_SUBCOMMANDS[args[0]].split(":")
            if args[0] == "generate":
                from lit_flash.generate import expand_prompts_flag

                args = args[:1] + expand_prompts_flag(args[1:])
            function = getattr(importlib.import_module(module), name)
            CLI(function, args=args[1:], as_positional=args[0] == "plot")
            return None
        if args and args[0] == "predict":
            raise LitFlashError("to generate text: python -m lit_flash generate --model_name_or_path <run>/model ...")
        if args and args[0] in TRAINER_SUBCOMMANDS and not any(a in ("-c", "--config") or a.startswith("--config=")
                                                               for a in args):
            if not any(a in ("-h", "--help", "--print_config") or a.startswith("--print_config") for a in args):
                print(f"lit_flash: no --config given, running the offline demo ({config_path(DEFAULT_CONFIG)})")
            args[1:1] = ["--config", str(config_path(DEFAULT_CONFIG))]
        return LitFlashCLI(
            FlashGPT2LM,
            WikitextDataModule,
            args=args,
            run=run,
            parser_class=OneLineErrorParser,
            save_config_kwargs={"overwrite": False},
        )
    except LitFlashError as err:
        sys.stderr.write(f"error: {err}\n")
        raise SystemExit(2) from None


def main() -> None:
    """Console entry point (`lit-flash`)."""
    cli_main()
