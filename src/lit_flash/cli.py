"""`python -m lit_flash fit|validate|test|prepare|generate|plot ...`: LightningCLI over lit_flash's classes."""

from __future__ import annotations

import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.trainer.states import TrainerStatus
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException

from lit_flash import interrupt
from lit_flash.callbacks import HFExport, LastValidatedStep
from lit_flash.checkpointing import LOAD_ERRORS, load_error, resolve_resume
from lit_flash.ckpt_file import check_is_lightning_checkpoint, warn_replaced_model_values
from lit_flash.datamodule import WikitextDataModule
from lit_flash.errors import LitFlashError, one_line, show_own_warnings_as_lines
from lit_flash.guards import check_model_config
from lit_flash.lightning_adapters import last_saved_step
from lit_flash.lightning_checks import check_lightning_values, check_training_length
from lit_flash.lock import acquire_run_lock, release_all
from lit_flash.loss import check_fused_loss_runs_on
from lit_flash.module import FlashGPT2LM
from lit_flash.parsing import (
    GROUP_TITLES,
    OVERVIEW,
    PARSER_KWARGS,
    OneLineErrorParser,
    OneLineToolParser,
    check_config_files,
)
from lit_flash.preflight import (
    bf16_supported,
    check_multi_node_launch,
    check_output_dir,
    check_precision_supported,
    trainer_device_type,
)
from lit_flash.resume import last_checkpoint_path
from lit_flash.trainer_setup import (
    CALLBACK_SECTIONS,
    CHECKPOINT_DEFAULTS,
    checkpoint_dir,
    console_callbacks,
    fixed_callbacks,
    new_log_dirs,
    remove_unused_log_dirs,
    say_nothing_trained,
    trainer_plugins,
    with_default_loggers,
)

TRAINER_SUBCOMMANDS = ("fit", "validate", "test", "predict")
DEFAULT_CONFIG = "demo.yaml"
# Subcommands that are a typed function (jsonargparse.CLI), not a Trainer run: "module:function".
FUNCTION_SUBCOMMANDS = {
    "prepare": "lit_flash.prepare:prepare_dataset",
    "generate": "lit_flash.generate:generate_main",
    "plot": "lit_flash.plot:plot_main",
}


def config_path(name: str) -> Path:
    """A config shipped with lit_flash: inside the installed package, or `configs/` of a source checkout."""
    for folder in (Path(__file__).parent / "configs", Path(__file__).resolve().parents[2] / "configs"):
        if (folder / name).is_file():
            return folder / name
    raise LitFlashError(f"config {name!r} not found in lit_flash's configs/")


class LitFlashCLI(LightningCLI):
    """LightningCLI with lit_flash's fixed parts: checkpoints, HF export, loggers, LR and throughput monitors."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        # No `predict`: text generation is the `generate` subcommand (sampling options, prompts in, text out).
        return {k: v for k, v in LightningCLI.subcommands().items() if k != "predict"}

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        # cli_main always passes `args` (the shell's own, plus the demo config when none is given): Lightning's
        # warning against giving both `args` and command-line arguments is about a mistake lit_flash cannot make.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
            super().parse_arguments(parser, args)
        # Lightning's Trainer and ModelCheckpoint values (and seed_everything, which LightningCLI applies right after
        # parsing) are Unions it checks (or not) deep inside: refuse an out-of-range one here, naming its key,
        # before anything is seeded, built or written.
        subcommand = self.config.get("subcommand")
        check_lightning_values(self.config[subcommand] if subcommand else self.config)
        if subcommand in (None, "fit"):
            check_training_length(self.config[subcommand] if subcommand else self.config)

    def add_core_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # LightningCLI's own calls, reordered: `--help` lists the sections in the order they are added, and
        # lit_flash's (model, data, its callbacks) were lost after the Trainer's hundred options.
        parser.add_lightning_class_args(self.model_class, "model", subclass_mode=self.subclass_mode_model)
        parser.add_lightning_class_args(self.datamodule_class, "data", subclass_mode=self.subclass_mode_data)
        for key, callback_class in CALLBACK_SECTIONS.items():
            # As `add_lightning_class_args` does, without registering them as LightningCLI's callback keys: which
            # of them the trainer gets depends on its settings (see instantiate_trainer).
            parser.add_class_arguments(callback_class, key, fail_untyped=False, sub_configs=True)
        parser.set_defaults({f"checkpoint.{key}": value for key, value in CHECKPOINT_DEFAULTS.items()})
        parser.add_lightning_class_args(self.trainer_class, "trainer")
        parser.set_defaults({f"trainer.{k}": v for k, v in self.trainer_defaults.items() if k != "callbacks"})

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("trainer.default_root_dir", "checkpoint.dirpath", compute_fn=checkpoint_dir)
        for key, title in GROUP_TITLES.items():
            if key in parser.groups:
                parser.groups[key].title = title

    def before_instantiate_classes(self) -> None:
        # The model's shape, checked before it is built (transformers would raise deep inside its __init__).
        config = self.config[self.subcommand] if self.subcommand else self.config
        check_model_config(config["model"]["model_config"], from_scratch=config["model"]["model_name_or_path"] is None)
        accelerator = config["trainer"].get("accelerator")
        if config["model"].get("fused_cross_entropy") and isinstance(accelerator, str | None):
            # Before the model imports liger-kernel: a CPU trainer cannot run it, installed or not.
            check_fused_loss_runs_on(trainer_device_type(accelerator), True)

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except MisconfigurationException as err:
            # A Trainer/callback combination Lightning refuses that the checks above do not know: still one line.
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise LitFlashError(f"a trainer/checkpoint setting Lightning refuses: {first}") from err

    def _run_config(self, config: Any) -> Any:
        """The subcommand's part of `config` (all of it when run without a subcommand)."""
        return config.get(str(self.subcommand), config)

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        config = {**self._run_config(self.config_init).get("trainer", {}), **kwargs}
        device_type = trainer_device_type(config.get("accelerator"))
        check_precision_supported(config.get("precision"), device_type, bf16_supported())
        check_multi_node_launch(config.get("num_nodes"))
        root = config.get("default_root_dir") or os.getcwd()
        check_output_dir(root)
        export = self._run_config(self.config_init).get("export")
        if self.subcommand == "fit" and isinstance(export, HFExport):  # before the loggers write anything
            export.check_target(root)
        config["logger"] = with_default_loggers(config.get("logger"), root)
        # Atomic checkpoint files, weights_only loads; exact resume (RNG states, a checkpoint on SIGTERM).
        plugins = _as_list(config.get("plugins"))
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            config["plugins"] = [*plugins, *trainer_plugins()]
        sections = [self._run_config(self.config_init)[key] for key in CALLBACK_SECTIONS]
        if config.get("enable_checkpointing") is False:  # the user turned our always-on checkpointing off
            sections = [c for c in sections if not isinstance(c, ModelCheckpoint)]
        if config["logger"] is False:  # nothing to log the learning rate to: Lightning would refuse to start
            sections = [c for c in sections if not isinstance(c, LearningRateMonitor)]
        callbacks = [*_as_list(config.get("callbacks")), *fixed_callbacks(), *sections]
        config["callbacks"] = console_callbacks(callbacks, config.get("enable_progress_bar"))
        try:
            return super().instantiate_trainer(**config)
        except LitFlashError:
            raise
        except (MisconfigurationException, ValueError, ImportError) as err:
            # Lightning refuses a trainer setting lit_flash does not check itself (an unknown strategy name, an
            # accelerator whose package is missing): its own reason, on one line, instead of a traceback.
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            named = [k for k in ("strategy", "accelerator", "devices", "precision", "plugins", "num_nodes")
                     if re.search(rf"\b{k}\b", first) and config.get(k) is not None]
            where = f"trainer.{named[0]}={config[named[0]]!r}" if named else "a trainer.* setting"
            raise LitFlashError(f"{where}: Lightning refuses it ({first[:200]})") from err

    def _parse_ckpt_path(self) -> None:
        # An override of LightningCLI's protected method: it has no public hook around this step (Lightning#20801;
        # a public `adapt_checkpoint_hparams` hook is proposed in Lightning#21408). LightningCLI reads a given
        # checkpoint file's hyperparameters here, with a bare torch.load, and lets them replace the user's model.*
        # values. The user's own values are checked first (a bad one must not pass just because the checkpoint's
        # replaces it), and each one replaced is said.
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not ckpt_path or not Path(ckpt_path).is_file():
            return super()._parse_ckpt_path()
        user_model = self.config[subcommand]["model"].clone()
        check_model_config(user_model.get("model_config"), from_scratch=user_model.get("model_name_or_path") is None)
        check_is_lightning_checkpoint(ckpt_path)
        try:
            super()._parse_ckpt_path()
        except LOAD_ERRORS as err:
            raise load_error(ckpt_path, err) from err
        warn_replaced_model_values(user_model, self.config[subcommand]["model"], ckpt_path)

    def _resolve_ckpt_path(self) -> None:
        """`ckpt_path: auto` -> `last.ckpt` of this run's folder if there is one; never a fresh `fit` over old ones."""
        config = self.config_init[self.subcommand]
        if "ckpt_path" in config:
            ckpt_dir = os.path.dirname(last_checkpoint_path(self.trainer))
            config["ckpt_path"] = resolve_resume(config["ckpt_path"], ckpt_dir, self.subcommand, self.trainer.strategy)

    def before_fit(self) -> None:
        # The checkpoint first: a refused fresh fit over an earlier run's folder leaves that folder as it was.
        self._resolve_ckpt_path()
        # Rank 0 only: the other ranks of this run write into the same folder by design.
        if self.trainer.is_global_zero:
            acquire_run_lock(self.trainer.default_root_dir)
        self._new_log_dirs = new_log_dirs(self.trainer.loggers) if self.trainer.is_global_zero else []

    before_validate = before_test = before_predict = _resolve_ckpt_path

    def after_fit(self) -> None:
        """As the reference's evaluation after training: validate the final weights (unless the last step just
        did), and make `last.ckpt` hold them (ModelCheckpoint leaves it at the last periodic save)."""
        trainer = self.trainer
        if trainer.interrupted or trainer.state.status != TrainerStatus.FINISHED:
            return
        record = next((c for c in trainer.callbacks if isinstance(c, LastValidatedStep)), None)
        if record is not None and not record.trained and self._run_config(self.config_init).get("ckpt_path"):
            if trainer.is_global_zero:
                say_nothing_trained(trainer.global_step, remove_unused_log_dirs(self._new_log_dirs))
            return
        validated = record is not None and record.step == trainer.global_step
        if sum(trainer.num_val_batches) > 0 and not validated and not interrupt.received():  # Ctrl-C: be quick
            trainer.validate(self.model, datamodule=self.datamodule, verbose=False)
        checkpoint = trainer.checkpoint_callback
        if isinstance(checkpoint, ModelCheckpoint) and checkpoint.save_last and checkpoint.dirpath:
            if last_saved_step(checkpoint) != trainer.global_step:
                trainer.save_checkpoint(os.path.join(checkpoint.dirpath, "last.ckpt"), weights_only=False)


def _as_list(value: Any) -> list[Any]:
    return [] if value is None else list(value) if isinstance(value, list | tuple) else [value]


def cli_main(args: list[str] | None = None, run: bool = True) -> LitFlashCLI | None:
    """Run the CLI in-process (tests, notebooks) or from the shell; `args` as on the command line.

    Without `--config`, the trainer subcommands run the offline demo (`configs/demo.yaml`).
    """
    args = list(sys.argv[1:] if args is None else args)
    show_own_warnings_as_lines()
    if not args or args[0] in ("-h", "--help"):  # LightningCLI's own list names the Trainer subcommands only
        (sys.stdout if args else sys.stderr).write(OVERVIEW)
        raise SystemExit(0 if args else 2)
    try:
        if args and args[0] in FUNCTION_SUBCOMMANDS:
            import importlib

            from jsonargparse import CLI

            module, name = FUNCTION_SUBCOMMANDS[args[0]].split(":")
            if args[0] == "generate":
                from lit_flash.generate import expand_prompts_flag

                args = args[:1] + expand_prompts_flag(args[1:])
            function = getattr(importlib.import_module(module), name)
            CLI(function, args=args[1:], as_positional=args[0] == "plot", parser_class=OneLineToolParser,
                prog=f"python -m lit_flash {args[0]}")
            return None
        if args and args[0] == "predict":
            raise LitFlashError("to generate text: python -m lit_flash generate --model_name_or_path <run>/model ...")
        known = [s for s in (*TRAINER_SUBCOMMANDS, *FUNCTION_SUBCOMMANDS) if s != "predict"]  # predict: above
        if run and not args[0].startswith("-") and args[0] not in known:  # LightningCLI would list fit/validate/test
            raise LitFlashError(f"unknown subcommand {args[0]!r}: choose one of {', '.join(known)} (see --help)")
        if args and args[0] in TRAINER_SUBCOMMANDS and not any(a in ("-c", "--config") or a.startswith("--config=")
                                                               for a in args):
            if not any(a in ("-h", "--help", "--print_config") or a.startswith("--print_config") for a in args):
                print(f"lit_flash: no --config given, running the offline demo ({config_path(DEFAULT_CONFIG)})")
            args[1:1] = ["--config", str(config_path(DEFAULT_CONFIG))]
        check_config_files(args)
        previous = interrupt.install()
        try:
            cli = LitFlashCLI(
                FlashGPT2LM,
                WikitextDataModule,
                args=args,
                run=run,
                parser_class=OneLineErrorParser,
                parser_kwargs=PARSER_KWARGS,
                save_config_kwargs={"overwrite": False},
                auto_configure_optimizers=False,  # FlashGPT2LM owns AdamW and its schedule (model.* keys)
            )
        except SystemExit as exit_:
            # Lightning turns a KeyboardInterrupt inside a Trainer call (a Ctrl-C before its handlers are up)
            # into exit status 1.
            if interrupt.received() and exit_.code == 1:
                raise KeyboardInterrupt from None
            raise
        finally:
            interrupt.restore(previous)
        if interrupt.received():
            sys.stderr.write("lit_flash: Ctrl-C came as the run was ending; it ended normally\n")
        return cli
    except LitFlashError as err:
        sys.stderr.write(f"error: {one_line(err)}\n")
        raise SystemExit(2) from None
    except SIGTERMException:
        # Lightning finished the running batch and ExactResume saved last.ckpt (when fitting); 128+15 (SIGTERM) or
        # 128+2 (Ctrl-C), as a killed process.
        # Written here, not logged: the one line a user sees last, whatever the logging set-up.
        saved = interrupt.saved_checkpoint()
        what = (
            f" at step {saved[0]}: saved {saved[1]}; resume with --ckpt_path last (or auto) added to this same "
            "command"
            if saved
            else "; nothing new was saved (checkpoints already written are intact: resume with --ckpt_path auto)"
        )
        sys.stderr.write(f"lit_flash: stopped by {interrupt.signal_name()}{what}\n")
        raise SystemExit(interrupt.EXIT_CODE if interrupt.received() else 143) from None
    except KeyboardInterrupt:
        sys.stderr.write(
            "lit_flash: stopped by Ctrl-C outside the training loop; nothing new was saved (checkpoints already "
            "written are intact: resume with --ckpt_path auto)\n"
        )
        raise SystemExit(interrupt.EXIT_CODE) from None
    finally:
        release_all()


def main() -> None:
    """Console entry point (`lit-flash`)."""
    try:
        cli_main()
    except KeyboardInterrupt:  # before a Trainer ran (during one, Ctrl-C takes the SIGTERM path: see interrupt.py)
        raise interrupt.stopped_while_starting() from None
