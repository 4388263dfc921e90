"""Configs that reproduce a run (`--print_config`, the saved `config.yaml`), the plot command, W&B offline."""

from __future__ import annotations

import logging
import re
import sysconfig
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from lit_flash.cli import cli_main, config_path
from lit_flash.errors import LitFlashError
from lit_flash.plot import plot_metrics, read_metrics
from lit_flash.trainer_setup import trainer_kwargs, with_default_loggers


def print_config(args: list[str], capsys) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", *args, "--print_config"])
    assert exit_info.value.code in (0, None)
    return capsys.readouterr().out


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """4 steps of the demo on two small stdlib files: a real run folder with logs, config.yaml and model."""
    root = tmp_path_factory.mktemp("run")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    args = [
        "--data.text_files", f"{{train: {stdlib / 'argparse.py'}, validation: {stdlib / 'ast.py'}}}",
        "--data.cache_dir", str(root / "cache"), "--data.max_eval_samples", "8",
        "--trainer.default_root_dir", str(root / "run"), "--trainer.max_steps", "4",
        "--trainer.val_check_interval", "2", "--trainer.log_every_n_steps", "1",
    ]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cli_main(["fit", *args])
    finally:
        torch.set_num_threads(threads)
    return root / "run", args


def test_print_config_is_complete_and_feeds_back(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    printed = print_config([], capsys)
    demo = yaml.safe_load(config_path("demo.yaml").read_text())
    for key in ("trainer:", "model:", "data:", "checkpoint:", "export:", "lr_monitor:", "throughput:",
                "seed_everything:", f"  max_steps: {demo['trainer']['max_steps']}",
                f"  block_size: {demo['data']['block_size']}"):
        assert key in printed
    saved = tmp_path / "my.yaml"
    saved.write_text(printed)
    assert print_config(["--config", str(saved)], capsys) == printed
    # And a changed value survives the trip.
    changed = print_config(["--config", str(saved), "--model.learning_rate", "0.01"], capsys)
    assert "  learning_rate: 0.01" in changed


@pytest.mark.slow
def test_saved_config_of_a_run_reproduces_it(short_run, capsys):
    run_dir, args = short_run
    (saved,) = run_dir.glob("logs/version_*/config.yaml")
    assert print_config(["--config", str(saved)], capsys) == print_config(
        ["--config", str(config_path("demo.yaml")), *args], capsys
    )


def test_run_writes_csv_tensorboard_and_plot(short_run, capsys):
    run_dir, _ = short_run
    version = next(run_dir.glob("logs/version_*"))
    assert list(version.glob("tensorboard/events.out.tfevents.*"))
    series = read_metrics(run_dir)
    assert series["train_loss"][0] == [0, 1, 2, 3]
    assert series["val_ppl"][0] == [1, 3] and all(v > 1 for v in series["val_ppl"][1])
    assert {"lr-AdamW/pg1", "train/samples", "val_loss"} <= set(series)  # LR and throughput monitors
    cli_main(["plot", str(run_dir)])
    png = version / "plot.png"
    assert png.read_bytes()[:4] == b"\x89PNG"
    # An explicit --output is never overwritten.
    with pytest.raises(SystemExit):
        cli_main(["plot", str(run_dir), "--output", str(png)])
    assert "--output" in capsys.readouterr().err


def test_read_metrics_and_plot_errors(tmp_path, monkeypatch):
    csv = tmp_path / "metrics.csv"
    csv.write_text("epoch,step,train_loss,val_ppl\n0,0,5.0,\n0,1,4.0,\n0,1,,30.5\n0,2,3.5,\n")
    assert read_metrics(csv) == {"train_loss": ([0, 1, 2], [5.0, 4.0, 3.5]), "val_ppl": ([1], [30.5])}
    with pytest.raises(LitFlashError, match="test_ppl"):
        plot_metrics(csv, ["train_loss", "test_ppl"])
    with pytest.raises(LitFlashError, match="no metrics.csv"):
        read_metrics(tmp_path / "nothing")
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)
    with pytest.raises(LitFlashError, match="lit-flash\\[plot\\]"):
        plot_metrics(csv)


def test_read_metrics_joins_a_resumed_runs_logs(tmp_path):
    # A run stopped after step 3 (logged up to 3) and resumed from its step-2 checkpoint: version_1 redoes step 3.
    import os

    for version, text, mtime in (("version_0", "epoch,step,train_loss\n0,0,5.0\n0,1,4.0\n0,2,3.5\n0,3,3.4\n", 1000),
                                 ("version_1", "epoch,step,train_loss\n0,3,3.3\n0,4,3.0\n", 2000)):
        folder = tmp_path / "logs" / version
        folder.mkdir(parents=True)
        (folder / "metrics.csv").write_text(text)
        os.utime(folder / "metrics.csv", (mtime, mtime))
    assert read_metrics(tmp_path) == {"train_loss": ([0, 1, 2, 3, 4], [5.0, 4.0, 3.5, 3.3, 3.0])}


@pytest.mark.slow
def test_wandb_is_added_to_csv_and_tensorboard_and_offline_without_key(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cli = cli_main(["--config", str(config_path("demo.yaml")), "--trainer.logger+=WandbLogger",
                    "--trainer.logger.init_args.project=lit-flash"], run=False)
    loggers = cli.trainer.loggers
    assert [type(lg) for lg in loggers] == [CSVLogger, TensorBoardLogger, WandbLogger]
    assert loggers[2]._project == "lit-flash"
    assert __import__("os").environ["WANDB_MODE"] == "offline"
    # With a key, the mode is left to wandb; a config's own CSVLogger replaces the defaults; false means none.
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    wandb_logger = WandbLogger(project="p", save_dir=str(tmp_path))
    assert len(with_default_loggers([wandb_logger], tmp_path)) == 3
    assert "WANDB_MODE" not in __import__("os").environ
    own = CSVLogger(tmp_path)
    assert with_default_loggers([own, wandb_logger], tmp_path) == [own, wandb_logger]
    assert with_default_loggers(False, tmp_path) is False


@pytest.mark.slow  # a whole CLI run in a subprocess
def test_a_fit_prints_no_library_notice_its_user_cannot_act_on(tmp_path: Path) -> None:
    """Lightning's cloud-logger advertisement, transformers' guess at GPT-2's loss, torch's LeafSpec deprecation
    (raised from Lightning at every step): a newcomer read them as problems with their run."""
    from _helpers import make_dataset, run_cli, tiny_run_config, write_config

    data = make_dataset(tmp_path / "blocks", n_train=16, n_val=8)
    config = write_config(tmp_path / "c.yaml", tiny_run_config(tmp_path / "run", data, trainer={"max_steps": 2}))
    proc = run_cli("fit", "--config", str(config))
    assert proc.returncode == 0, proc.stderr
    for notice in ("litlogger", "loss_type", "LeafSpec"):
        assert notice not in proc.stderr, notice


def test_a_trainer_from_trainer_kwargs_prints_what_the_cli_prints(
    tmp_path, tiny_model_config, make_token_dataset, monkeypatch, capsys
) -> None:
    """The Python API's console is the CLI's: no cloud-logger tip, no LeafSpec deprecation at each step, and a run
    bounded by steps shows `Epoch 0` on its progress bar, not Lightning 2.6's `Epoch 0/-2` (Lightning#21925)."""
    pytest.importorskip("rich")
    import lightning as L
    from _helpers import tiny_module

    from lit_flash.datamodule import WikitextDataModule

    tips = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    monkeypatch.setattr(tips, "filters", [])  # as in a new process: no filter left by an earlier test's CLI run
    logged: list[str] = []
    recorder = logging.Handler()
    recorder.emit = lambda record: logged.append(record.getMessage())  # type: ignore[method-assign]
    tips.addHandler(recorder)
    data = WikitextDataModule(tokenized_dataset_load_dir=str(make_token_dataset(n_rows=4, seq_len=16)),
                              tokenizer_name=None, batch_size=2)
    try:
        with warnings.catch_warnings(record=True) as caught:  # the filters trainer_kwargs adds end with the block
            trainer = L.Trainer(accelerator="cpu", max_steps=1, limit_val_batches=0, enable_model_summary=False,
                                **trainer_kwargs(tmp_path / "run", export_dirname=None))
            trainer.fit(tiny_module(tiny_model_config), datamodule=data)
    finally:
        tips.removeHandler(recorder)
    assert logged and not [m for m in logged if "litlogger" in m], logged
    assert not [w for w in caught if "LeafSpec" in str(w.message)]
    out, err = capsys.readouterr()
    assert set(re.findall(r"Epoch \d+(?:/-?\d+)?", out + err)) == {"Epoch 0"}, out + err


def test_lit_flash_warnings_print_as_one_line_and_other_warnings_as_before(monkeypatch) -> None:
    from lit_flash.errors import LitFlashWarning, show_own_warnings_as_lines, warn_user

    monkeypatch.setattr(warnings, "formatwarning", lambda message, *args, **kwargs: f"as before: {message}\n")
    show_own_warnings_as_lines()
    show_own_warnings_as_lines()  # again (each Trainer from trainer_kwargs calls it): the same format
    text = "model.warmup_steps=9 is not below the 4 training steps"
    assert warnings.formatwarning(LitFlashWarning(text), LitFlashWarning, "optim.py", 118) == f"lit_flash: {text}\n"
    other = UserWarning("something else")
    assert warnings.formatwarning(other, UserWarning, "x.py", 1) == "as before: something else\n"
    with pytest.warns(LitFlashWarning, match="not below"):  # code that records warnings still gets them
        warn_user(text)


@pytest.mark.parametrize("case", ["root is a file", "checkpoints is a file", "every_n_train_steps=-1",
                                  "every_n_train_steps=2.5", "every_n_train_steps=True", "callbacks not a list",
                                  "a bar with the bar off"])
def test_trainer_kwargs_refuses_what_would_fail_later_in_one_line(tmp_path, case) -> None:
    from lightning.pytorch.callbacks import TQDMProgressBar

    root = tmp_path / "run"
    kwargs: dict = {}
    if case == "root is a file":
        root.write_text("notes")
    elif case == "checkpoints is a file":
        root.mkdir()
        (root / "checkpoints").write_text("notes")
    elif case.startswith("every_n_train_steps"):
        kwargs["every_n_train_steps"] = {"-1": -1, "2.5": 2.5, "True": True}[case.split("=")[1]]
    elif case == "callbacks not a list":
        kwargs["callbacks"] = TQDMProgressBar()
    else:
        kwargs.update(callbacks=[TQDMProgressBar()], enable_progress_bar=False)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises(LitFlashError) as err:
        trainer_kwargs(root, **kwargs)
    assert str(err.value).startswith("trainer_kwargs") and "\n" not in str(err.value)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing created or written over


@pytest.mark.parametrize("end", [["--trainer.max_steps=3"], ["--trainer.max_steps=-1", "--trainer.max_epochs=1"]],
                         ids=["max_steps", "max_epochs"])
def test_a_resume_that_trains_nothing_leaves_no_new_log_version(tiny_config, run_cli, end) -> None:
    root = Path(yaml.safe_load(tiny_config.read_text())["trainer"]["default_root_dir"])
    fit = ["fit", "--config", str(tiny_config), *end]
    assert run_cli(fit)[0] == 0
    assert sorted(p.name for p in (root / "logs").iterdir()) == ["version_0"]
    code, _, err = run_cli([*fit, "--ckpt_path", "last"])  # already at the run's end
    assert code == 0 and "nothing to train" in err
    assert f"its empty log folder {root / 'logs' / 'version_1'} is removed" in err
    assert sorted(p.name for p in (root / "logs").iterdir()) == ["version_0"]
    # A resume that trains keeps its folder, with its metrics.
    longer = ["--trainer.max_steps=8"] if "--trainer.max_steps=3" in end else ["--trainer.max_epochs=2"]
    code, _, err = run_cli([*fit, *longer, "--ckpt_path", "last"])
    assert code == 0, err
    assert (root / "logs" / "version_1" / "metrics.csv").stat().st_size > 0
