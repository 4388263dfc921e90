"""The command lit_flash exists for, in the shape users run it: `configs/gpt2_flash.yaml` (sizes overridden for the
CPU) on a model saved with `save_pretrained` and loaded back as hub weights arrive, on reference-format blocks,
bounded by epochs as the recipe is. Dropout must be on while training and off while evaluating; a resume from any
checkpoint, mid-epoch included, must log bit-identical losses."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import yaml
from _helpers import BLOCK, VOCAB, logged, save_blocks, token_rows
from lightning.pytorch.callbacks import ModelSummary, ProgressBar
from lightning.pytorch.cli import SaveConfigCallback

import lit_flash
from lit_flash import FlashGPT2LM, WikitextDataModule
from lit_flash.cli import cli_main
from lit_flash.errors import LitFlashError
from lit_flash.optim import planned_optimizer_steps

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "gpt2_flash.yaml"
N_TRAIN = 23  # batch 2: 12 batches an epoch, the last one short


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny GPT-2 with GPT-2's dropout (0.1), saved as hub weights are: `save_pretrained`."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_positions=BLOCK, n_embd=32, n_layer=1, n_head=2)
    assert config.resid_pdrop == config.embd_pdrop == config.attn_pdrop == 0.1
    path = tmp_path_factory.mktemp("hub") / "gpt2-tiny"
    GPT2LMHeadModel(config).save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def blocks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference's /input: train/test splits of input_ids, attention_mask, labels."""
    path = tmp_path_factory.mktemp("input") / "blocks"
    return save_blocks(path, {"train": token_rows(N_TRAIN, 0), "test": token_rows(8, 1)})


def cpu_overlay(root: Path, pretrained: Path, blocks: Path, compile: bool = False, **trainer: Any) -> dict[str, Any]:
    """What a CPU run of the recipe changes: sizes, the device, the paths, and (unless `compile`) no torch.compile,
    whose CPU compile takes longer than these runs. Everything else is gpt2_flash.yaml's."""
    model = {} if compile else {"compile": False, "compile_mode": "default"}
    return {
        "trainer": {"accelerator": "cpu", "precision": "32-true", "val_check_interval": 4, "log_every_n_steps": 1,
                    "default_root_dir": str(root), "enable_progress_bar": False, **trainer},
        "checkpoint": {"every_n_train_steps": 4},
        "model": {"model_name_or_path": str(pretrained), "learning_rate": 1e-3, **model},
        "data": {"tokenized_dataset_load_dir": str(blocks), "tokenizer_name": None, "batch_size": 2,
                 "eval_batch_size": 4, "num_workers": 0},
    }


def run_recipe(tmp: Path, name: str, overlay: dict[str, Any], *args: str) -> Any:
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(overlay))
    return cli_main(["fit", "--config", str(RECIPE), "--config", str(path), *args])


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", sys.argv[:1])


# ---------------------------------------------------------------------------------------------- train mode


class DropoutModes(L.Callback):
    """Whether every dropout module was in train mode, per training and per validation batch."""

    def __init__(self) -> None:
        self.train: list[bool] = []
        self.val: list[bool] = []

    @staticmethod
    def _modes(module: L.LightningModule) -> list[bool]:
        return [m.training for m in module.modules() if isinstance(m, torch.nn.Dropout)]

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self.train.append(all(self._modes(pl_module)))

    def on_validation_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self.val.append(not any(self._modes(pl_module)))


def test_a_pretrained_model_trains_with_dropout_and_validates_without_it_in_the_python_api(
    tmp_path: Path, pretrained: Path, blocks: Path
) -> None:
    module = FlashGPT2LM(model_name_or_path=str(pretrained), attn_implementation="sdpa")
    assert module.model.training  # from_pretrained returns eval mode; a fine-tune wants train mode
    dropouts = [m for m in module.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts and all(m.p == 0.1 for m in dropouts)
    module.eval()  # e.g. a notebook scored or generated with it first
    modes = DropoutModes()
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=6, val_check_interval=3,
                        callbacks=[modes], logger=False, enable_checkpointing=False, enable_progress_bar=False)
    dm = WikitextDataModule(tokenized_dataset_load_dir=str(blocks), tokenizer_name=None, batch_size=2)
    with pytest.warns() as caught:
        trainer.fit(module, dm)
    assert not [w for w in caught if "eval mode" in str(w.message)]
    assert len(modes.train) == 6 and all(modes.train)
    assert modes.val and all(modes.val)  # the sanity check and both validations


@pytest.mark.slow
def test_the_recipe_through_the_cli_trains_with_dropout(tmp_path: Path, pretrained: Path, blocks: Path) -> None:
    overlay = cpu_overlay(tmp_path / "run", pretrained, blocks, max_epochs=1)
    overlay["trainer"]["callbacks"] = [{"class_path": "test_recipe.DropoutModes"}]
    cli = run_recipe(tmp_path, "mode", overlay)
    modes = next(c for c in cli.trainer.callbacks if isinstance(c, DropoutModes))
    assert len(modes.train) == 12 and all(modes.train)
    assert modes.val and all(modes.val)


def test_dropout_changes_the_training_loss_of_a_pretrained_model(pretrained: Path, blocks: Path) -> None:
    """Behaviour, not flags: two training-mode losses of one batch differ (dropout draws), two eval losses agree."""
    module = FlashGPT2LM(model_name_or_path=str(pretrained), attn_implementation="sdpa")
    ids = torch.tensor(token_rows(2, 5))
    batch = {"input_ids": ids, "labels": ids}
    module.on_fit_start()
    first, second = (module._loss(batch, training=True)[0] for _ in range(2))
    assert not torch.equal(first, second)
    module.eval()
    first, second = (module._loss(batch, training=False)[0] for _ in range(2))
    assert torch.equal(first, second)


# ------------------------------------------------------------------------------------------- exact resume

BOUNDS = {
    "epochs": {"max_epochs": 3},  # the recipe's own bound
    "steps": {"max_epochs": -1, "max_steps": 20},
    "both": {"max_epochs": 3, "max_steps": 15},
}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("bound", "accumulate", "compile", "step"),
    [(bound, accumulate, False, 8) for bound in BOUNDS for accumulate in (1, 2)]
    + [pytest.param("epochs", 1, True, 8, marks=pytest.mark.slow, id="epochs-1-compiled")]
    # Step 12: saved on an epoch's last batch (12 batches an epoch: the end of epoch 0, or of epoch 1 when
    # accumulating 2), the step a Ctrl-C or SIGTERM there saves too.
    + [pytest.param(bound, accumulate, False, 12, id=f"{bound}-{accumulate}-epoch-end")
       for bound in ("epochs", "steps") for accumulate in (1, 2)],
)
def test_resume_from_a_mid_epoch_checkpoint_logs_bit_identical_losses(
    tmp_path: Path, pretrained: Path, blocks: Path, bound: str, accumulate: int, compile: bool, step: int
) -> None:
    trainer = {**BOUNDS[bound], "accumulate_grad_batches": accumulate}
    whole = tmp_path / "whole"
    run_recipe(tmp_path, "whole", cpu_overlay(whole, pretrained, blocks, compile, **trainer))
    # Step 8: mid-epoch in every case (12 batches an epoch: 12 steps, or 6 when accumulating 2).
    checkpoint = next((whole / "checkpoints").glob(f"*step={step}.ckpt"))
    resumed = tmp_path / "resumed"
    run_recipe(tmp_path, "resumed", cpu_overlay(resumed, pretrained, blocks, compile, **trainer), "--ckpt_path",
               str(checkpoint))
    for key in ("train_loss", "val_loss", "lr-AdamW/pg1", "epoch"):
        expected, got = logged(whole, key), logged(resumed, key)
        after = {s: value for s, value in expected.items() if s >= step}
        assert after and got == after, key  # bit-identical: compared as floats written by the same code
    weights = "model/model.safetensors"
    assert (whole / weights).read_bytes() == (resumed / weights).read_bytes()


def fit_in_python(root: Path, pretrained: Path, blocks: Path, ckpt_path: str | None = None) -> L.Trainer:
    """A notebook's run of the recipe's shape (the sizes of `cpu_overlay`): the classes and an `L.Trainer` built
    in Python with `lit_flash.trainer_kwargs`, bounded by epochs, fitted from `ckpt_path`."""
    L.seed_everything(42)
    module = FlashGPT2LM(model_name_or_path=str(pretrained), attn_implementation="sdpa", learning_rate=1e-3)
    dm = WikitextDataModule(tokenized_dataset_load_dir=str(blocks), tokenizer_name=None, batch_size=2,
                            eval_batch_size=4, num_workers=0)
    trainer = L.Trainer(accelerator="cpu", precision="32-true", max_epochs=2, val_check_interval=4,
                        log_every_n_steps=1,
                        **lit_flash.trainer_kwargs(root, every_n_train_steps=4, enable_progress_bar=False))
    trainer.fit(module, dm, ckpt_path=ckpt_path)
    return trainer


@pytest.mark.slow
def test_the_python_api_keeps_the_clis_checkpoints_export_and_exact_resume(
    tmp_path: Path, pretrained: Path, blocks: Path
) -> None:
    whole = tmp_path / "whole"
    assert lit_flash.resume_path(whole) is None  # `auto` on a new folder: start fresh
    trainer = fit_in_python(whole, pretrained, blocks, lit_flash.resume_path(whole))
    assert isinstance(trainer.strategy.checkpoint_io, lit_flash.AtomicCheckpointIO)
    names = {p.name for p in (whole / "checkpoints").glob("*.ckpt")}
    assert "last.ckpt" in names and sum("step=" in n for n in names) == 6  # every 4 of 24 steps, all kept
    assert lit_flash.resume_path(whole) == str(whole / "checkpoints" / "last.ckpt")
    assert (whole / "model" / "model.safetensors").is_file()
    # Step 8 of 12 batches an epoch: mid-epoch.
    checkpoint = next((whole / "checkpoints").glob("*step=8.ckpt"))
    resumed = tmp_path / "resumed"
    fit_in_python(resumed, pretrained, blocks, lit_flash.resume_path(resumed, str(checkpoint)))
    for key in ("train_loss", "val_loss", "lr-AdamW/pg1"):
        expected, got = logged(whole, key), logged(resumed, key)
        after = {step: value for step, value in expected.items() if step >= 8}
        assert after and got == after, key  # bit-identical
    weights = "model/model.safetensors"
    assert (whole / weights).read_bytes() == (resumed / weights).read_bytes()


@pytest.mark.slow
def test_a_second_fresh_fit_in_python_refuses_to_write_over_the_first_run(
    tmp_path: Path, pretrained: Path, blocks: Path
) -> None:
    root = tmp_path / "run"
    fit_in_python(root, pretrained, blocks)
    before = {p.name: p.read_bytes() for p in [*(root / "checkpoints").iterdir(), *(root / "model").iterdir()]}
    with pytest.raises(LitFlashError, match="already holds checkpoints of an earlier run") as err:
        fit_in_python(root, pretrained, blocks)  # no ckpt_path: a fresh run, into the same folder
    assert "\n" not in str(err.value)
    after = {p.name: p.read_bytes() for p in [*(root / "checkpoints").iterdir(), *(root / "model").iterdir()]}
    assert after == before  # nothing of the first run written over
    fit_in_python(root, pretrained, blocks, lit_flash.resume_path(root))  # resuming it is what it says to do


def test_the_python_api_adds_what_the_cli_adds(tmp_path: Path, pretrained: Path, blocks: Path) -> None:
    root = tmp_path / "run"
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text(yaml.safe_dump(cpu_overlay(root, pretrained, blocks, max_epochs=1)))
    cli = cli_main(["--config", str(RECIPE), "--config", str(overlay)], run=False)
    python = L.Trainer(**lit_flash.trainer_kwargs(root, every_n_train_steps=4))
    for trainer in (cli.trainer, python):
        assert isinstance(trainer.strategy.checkpoint_io, lit_flash.AtomicCheckpointIO)
    # Lightning's own defaults (progress bar, model summary) and the CLI's config file aside, the same callbacks.
    lightnings = (SaveConfigCallback, ProgressBar, ModelSummary)
    cli_callbacks = {type(c) for c in cli.trainer.callbacks if not isinstance(c, lightnings)}
    assert {type(c) for c in lit_flash.trainer_callbacks(root)} == cli_callbacks
    assert {type(lg) for lg in python.loggers} == {type(lg) for lg in cli.trainer.loggers}
    for key in ("dirpath", "save_last", "save_top_k", "_every_n_train_steps"):
        assert getattr(python.checkpoint_callback, key) == getattr(cli.trainer.checkpoint_callback, key), key


@pytest.mark.parametrize("accumulate", [1, 2, 3])
@pytest.mark.parametrize("limit", [1.0, 0.5, 5])
@pytest.mark.parametrize("bound", [{"max_epochs": 2}, {"max_epochs": 3, "max_steps": 7}, {"max_steps": 9}])
def test_the_schedule_length_is_lightnings_count_without_building_its_loader(
    blocks: Path, bound: dict, limit: float | int, accumulate: int
) -> None:
    planned: list[float] = []

    class Compare(L.Callback):
        def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            planned.append(planned_optimizer_steps(trainer))
            planned.append(trainer.estimated_stepping_batches)  # the loader exists now: no early build
            trainer.should_stop = True  # nothing more to learn from this run

    dm = WikitextDataModule(tokenized_dataset_load_dir=str(blocks), tokenizer_name=None, batch_size=2)
    module = FlashGPT2LM(model_name_or_path=None, model_config={"vocab_size": VOCAB, "n_positions": BLOCK,
                         "n_embd": 16, "n_layer": 1, "n_head": 2}, attn_implementation="sdpa")
    trainer = L.Trainer(accelerator="cpu", limit_train_batches=limit, accumulate_grad_batches=accumulate,
                        callbacks=[Compare()], logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        num_sanity_val_steps=0, **bound)
    trainer.fit(module, dm)
    assert planned[0] == planned[1]
