"""lit_flash.cli: fit/validate/test and prepare through `cli_main`, the run's files (checkpoints, logs, the HF export),
and bad input: one line on stderr naming what to fix, exit code 2, no file written over."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lit_flash.cli import cli_main
from lit_flash.module import FlashGPT2LM

SRC = Path(__file__).resolve().parents[1] / "src"


def _metrics(version_dir: Path) -> list[dict[str, str]]:
    with open(version_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def _by_step(rows: list[dict[str, str]], key: str) -> dict[int, float]:
    return {int(r["step"]): float(r[key]) for r in rows if r.get(key)}


def _values(version_dir: Path, key: str) -> list[float]:
    return [float(r[key]) for r in _metrics(version_dir) if r.get(key)]


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------- a whole run


@pytest.mark.slow
def test_fit_writes_checkpoints_logs_and_a_reloadable_export(tiny_config, run_cli, tmp_path):
    code, _, err = run_cli(["fit", "--config", str(tiny_config)])
    assert code == 0, err
    root = tmp_path / "run"

    # Checkpoints every 3 steps plus last.ckpt, which holds the final step.
    ckpts = sorted(p.name for p in (root / "checkpoints").iterdir())
    assert "last.ckpt" in ckpts and len([c for c in ckpts if "step=" in c]) == 2, ckpts
    assert torch.load(root / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 6

    # CSV metrics by step (train_loss, val_loss, val_ppl, the learning rate) and TensorBoard beside them.
    version = root / "logs" / "version_0"
    rows = _metrics(version)
    assert len(_by_step(rows, "train_loss")) == 6
    val_loss, val_ppl = _by_step(rows, "val_loss"), _by_step(rows, "val_ppl")
    assert sorted(val_ppl) == [2, 5]  # validation after steps 3 and 6 (0-based step of the last batch)
    for step, ppl in val_ppl.items():
        assert ppl == pytest.approx(math.exp(val_loss[step]), rel=1e-4)
    lr = _by_step(rows, "lr-AdamW/pg1")  # warm-up over 2 steps to 1e-2, then linear decay to 0 at step 6
    assert [lr[s] for s in range(6)] == pytest.approx([0, 5e-3, 1e-2, 7.5e-3, 5e-3, 2.5e-3])
    assert list((version / "tensorboard").glob("events.out.tfevents.*"))
    assert (version / "config.yaml").is_file()

    # The HF export (safetensors + tokenizer) and last.ckpt are the same model as the one trained.
    export = root / "model"
    assert (export / "model.safetensors").is_file() and (export / "tokenizer.json").is_file()
    hf = AutoModelForCausalLM.from_pretrained(str(export)).eval()
    from_ckpt = FlashGPT2LM.load_from_checkpoint(root / "checkpoints" / "last.ckpt", map_location="cpu").eval()
    ids = torch.tensor([AutoTokenizer.from_pretrained(str(export))("the king of the north")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, from_ckpt.model(input_ids=ids).logits)

    # validate/test from the checkpoint: the same val loss as the last validation of fit; a test_ppl.
    last = str(root / "checkpoints" / "last.ckpt")
    code, _, err = run_cli(["validate", "--config", str(tiny_config), "--ckpt_path", last])
    assert code == 0, err
    assert _values(root / "logs" / "version_1", "val_loss") == pytest.approx([val_loss[5]], rel=1e-5)
    code, _, err = run_cli(["test", "--config", str(tiny_config), "--ckpt_path", last])
    assert code == 0, err
    (test_ppl,) = _values(root / "logs" / "version_2", "test_ppl")
    assert test_ppl > 1
    code, _, err = run_cli(["predict", "--config", str(tiny_config), "--ckpt_path", last])
    assert code == 2 and "lit_flash generate" in err  # text generation is `generate`


@pytest.mark.slow
def test_fit_ends_with_a_validation_and_last_ckpt_of_the_final_weights(tiny_config, run_cli, tmp_path):
    """7 steps, validation and checkpoints every 3: as the reference's evaluation after training, the final weights
    are validated once more (step 7) and last.ckpt holds them, not step 6's."""
    code, _, err = run_cli(["fit", "--config", str(tiny_config), "--trainer.max_steps", "7"])
    assert code == 0, err
    root = tmp_path / "run"
    assert torch.load(root / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 7
    assert len(_values(root / "logs" / "version_0", "val_ppl")) == 3  # after steps 3, 6 and the final 7
    rows = _metrics(root / "logs" / "version_0")
    assert max(_by_step(rows, "val_ppl")) == 7  # logged at the final global step


@pytest.mark.slow
def test_fit_without_a_logger(tiny_config, run_cli, tmp_path):
    # No logger, so no learning-rate monitor either (Lightning refuses one without a logger).
    code, _, err = run_cli(["fit", "--config", str(tiny_config), "--trainer.logger=false", "--trainer.max_steps=2"])
    assert code == 0, err
    root = tmp_path / "run"
    assert not (root / "logs").exists() and (root / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.slow
def test_fit_with_checkpointing_off_writes_no_checkpoint(tiny_config, run_cli, tmp_path):
    # lit_flash's always-on ModelCheckpoint is left out (Lightning refuses one beside enable_checkpointing=false).
    code, _, err = run_cli(["fit", "--config", str(tiny_config), "--trainer.enable_checkpointing=false",
                            "--trainer.max_steps=2"])
    assert code == 0, err
    root = tmp_path / "run"
    assert not list(root.rglob("*.ckpt")) and (root / "logs").is_dir()


def test_prepare_output_feeds_tokenized_dataset_load_dir(tiny_config, text_files, tokenizer_dir, run_cli, tmp_path):
    prepared = tmp_path / "prepared"
    files = json.dumps({"train": text_files["train"], "test": text_files["test"]})
    code, _, err = run_cli(
        ["prepare", "--save_dir", str(prepared), "--text_files", files, "--tokenizer_name", str(tokenizer_dir),
         "--block_size", "32"]
    )
    assert code == 0, err
    assert sorted(p.name for p in prepared.iterdir()) == ["dataset_dict.json", "test", "train"]
    code, _, err = run_cli(
        ["validate", "--config", str(tiny_config), "--data.tokenized_dataset_load_dir", str(prepared)]
    )
    assert code == 0, err
    (ppl,) = _values(tmp_path / "run" / "logs" / "version_0", "val_ppl")
    assert 100 < ppl < 1000  # an untrained model over a ~320-token vocabulary
    # prepare never writes over a folder that has something in it.
    code, _, err = run_cli(["prepare", "--save_dir", str(prepared), "--text_files", files,
                            "--tokenizer_name", str(tokenizer_dir)])
    assert code == 2 and str(prepared) in err and err.count("\n") == 1


# ------------------------------------------------------------------------------------------- bad input


def _bad_dir(make_token_dataset, tmp_path: Path, case: str) -> Path:
    import datasets

    if case == "missing":
        return tmp_path / "no_such_dir"
    if case == "single_dataset":
        path = tmp_path / "single"
        datasets.Dataset.from_dict({"input_ids": [[1, 2], [3, 4]]}).save_to_disk(str(path))
        return path
    if case == "plain_folder":
        path = tmp_path / "plain"
        path.mkdir()
        (path / "train.txt").write_text("some text\n")
        return path
    if case == "no_train_split":
        return make_token_dataset(splits=("test",))
    if case == "no_eval_split":
        return make_token_dataset(splits=("train",))
    if case == "no_input_ids":
        return make_token_dataset(columns=("attention_mask", "labels"))
    if case == "unequal_rows":
        return make_token_dataset(rows={"train": [[1, 2, 3, 4], [5, 6, 7]] * 4})
    if case == "ids_outside_vocab":
        return make_token_dataset(rows={"train": [[1, 2, 3, 400]] * 4})
    raise ValueError(case)


BAD_LOAD_DIRS = {
    "missing": "no such directory",
    "single_dataset": "not a DatasetDict",
    "plain_folder": "not a DatasetDict",
    "no_train_split": "no 'train' split",
    "no_eval_split": "no 'validation' or 'test' split",
    "no_input_ids": "no 'input_ids' column",
    "unequal_rows": "rows of unequal length",
    "ids_outside_vocab": "token id 400",
}


def _assert_one_line_error(code: int, err: str, *needles: str) -> None:
    """Exit code 2 and one `error: ...` line (the last; warnings may come before it), no traceback."""
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: "), err
    assert sum(line.startswith("error") for line in lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[-1], (needle, lines[-1])


@pytest.fixture
def existing_run(tmp_path: Path) -> Path:
    """A previous run's files in the output dir, which a failing command must leave as they are. (No checkpoints:
    a fresh fit over those is refused before anything else, tested in test_bad_input.py.)"""
    root = tmp_path / "run"
    # The export carries lit_flash's marker, as every export does: a folder without it is refused before the data
    # checks these tests are about (tests/test_export.py).
    marker = json.dumps({"run_dir": os.path.realpath(root)}).encode()
    for name, content in {"logs/version_0/metrics.csv": b"step,train_loss\n", "model/model.safetensors": b"old model",
                          "model/lit_flash_export.json": marker, "notes.txt": b"mine"}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(content)
    return root


@pytest.mark.parametrize("case", list(BAD_LOAD_DIRS))
def test_bad_load_dir(case, tiny_config, make_token_dataset, run_cli, existing_run, tmp_path):
    path = _bad_dir(make_token_dataset, tmp_path, case)
    before = _snapshot(existing_run)
    code, _, err = run_cli(["fit", "--config", str(tiny_config), "--data.tokenized_dataset_load_dir", str(path)])
    _assert_one_line_error(code, err, BAD_LOAD_DIRS[case])
    if case != "ids_outside_vocab":
        assert str(path) in err  # the folder to fix (the vocabulary case names the keys instead)
    after = _snapshot(existing_run)
    assert {k: v for k, v in after.items() if k in before} == before
    assert not [k for k in after if k.endswith((".ckpt", ".safetensors")) and k not in before]


BAD_OPTIONS = {
    "block_size_over_context": (["--data.block_size", "128"], ["data.block_size", "128", "64"]),
    "unknown_attn_implementation": (["--model.attn_implementation", "flash3"], ["model.attn_implementation", "flash3"]),
    "bad_value": (["--model.learning_rate", "abc"], ["model.learning_rate", "abc"]),
    "unknown_key": (["--model.nope", "0.1"], ["--model.nope"]),
    # A prefix of a real key is a typo too (argparse's abbreviations would take it for learning_rate).
    "abbreviated_key": (["--model.learning_rat", "0.1"], ["--model.learning_rat"]),
    "flash_without_fallback": (
        ["--model.attn_implementation", "flash_attention_2", "--model.attn_fallback", "false"],
        ["flash_attention_2", "model.attn_fallback"],
    ),
    # A choice's value is quoted (jsonargparse's line showed 'flash_attention_3 ' as flash_attention_3), with a guess
    "choice_with_a_trailing_space": (
        ["--model.attn_implementation", "flash_attention_3 "],
        ["model.attn_implementation='flash_attention_3 ': must be one of", "did you mean 'flash_attention_3'"],
    ),
    "choice_in_capitals": (
        ["--model.attn_implementation", "FLASH_ATTENTION_3"],
        ["model.attn_implementation='FLASH_ATTENTION_3'", "did you mean 'flash_attention_3'"],
    ),
    "choice_in_a_list": (
        ["--model.sdpa_backends", "[flash, Math]"],
        ["model.sdpa_backends=['flash', 'Math']: 'Math' is not one of", "did you mean 'math'"],
    ),
    "choice_capitalized": (
        ["--model.lr_scheduler", "Cosine"], ["model.lr_scheduler='Cosine'", "did you mean 'cosine'"]
    ),
    "choice_with_an_underscore_for_a_dash": (  # the choice holds the dash
        ["--model.compile_mode", "Reduce_Overhead"],
        ["model.compile_mode='Reduce_Overhead'", "did you mean 'reduce-overhead'"],
    ),
    "flash3_without_fallback": (
        ["--model.attn_implementation", "flash_attention_3", "--model.attn_fallback", "false"],
        ["flash_attention_3", "model.attn_fallback"],
    ),
}


@pytest.mark.parametrize("case", list(BAD_OPTIONS))
def test_bad_option(case, tiny_config, run_cli, existing_run):
    args, needles = BAD_OPTIONS[case]
    before = _snapshot(existing_run)
    code, _, err = run_cli(["fit", "--config", str(tiny_config), *args])
    _assert_one_line_error(code, err, *needles)
    after = _snapshot(existing_run)
    assert {k: v for k, v in after.items() if k in before} == before


def test_unknown_key_in_a_config_file(tiny_config, run_cli, tmp_path):
    config = tmp_path / "typo.yaml"
    config.write_text(tiny_config.read_text() + "\nbogus_section:\n  x: 1\n")
    code, _, err = run_cli(["fit", "--config", str(config)])
    _assert_one_line_error(code, err, "bogus_section")


def test_missing_test_split_for_the_test_subcommand(tiny_config, make_token_dataset, run_cli):
    path = make_token_dataset(splits=("train", "validation"))
    code, _, err = run_cli(["test", "--config", str(tiny_config), "--data.tokenized_dataset_load_dir", str(path)])
    _assert_one_line_error(code, err, "no 'test' split", str(path))


# ---------------------------------------------------------------------------------------- entry points


@pytest.mark.slow
def test_main_runs_as_a_plain_script(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, str(SRC / "lit_flash" / "__main__.py"), "--help"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert all(f"  {sub} " in result.stdout for sub in ("fit", "validate", "test", "prepare", "generate", "plot"))


def test_no_subcommand_lists_them_all(run_cli):
    code, _, err = run_cli([])
    assert code == 2 and "  generate " in err and "<subcommand> --help" in err


def test_console_script_points_at_main():
    from importlib.metadata import entry_points

    from lit_flash.cli import main

    (script,) = [ep for ep in entry_points(group="console_scripts") if ep.name == "lit-flash"]
    assert script.value == "lit_flash.cli:main" and script.load() is main


def test_shell_arguments_do_not_warn_about_args_and_argv(monkeypatch, capsys):
    # From the shell cli_main hands sys.argv to LightningCLI as `args`; Lightning's "args and command line arguments"
    # warning would print on every run.
    monkeypatch.setattr(sys, "argv", ["lit_flash", "fit", "--print_config"])
    with warnings.catch_warnings(record=True) as caught, pytest.raises(SystemExit):
        warnings.simplefilter("always")
        cli_main()
    assert "model:" in capsys.readouterr().out  # it did parse and print the demo config
    assert not [w for w in caught if "args parameter" in str(w.message)]


@pytest.mark.parametrize("bound", ["steps", "epochs"])
def test_progress_bar_shows_no_negative_epoch_total(bound, tiny_config, run_cli):
    # A run bounded by steps alone has max_epochs=-1; Lightning 2.6's Rich bar showed "Epoch 2/-2" (Lightning#21925).
    pytest.importorskip("rich")
    length = ["--trainer.max_steps=1"] if bound == "steps" else ["--trainer.max_steps=-1", "--trainer.max_epochs=3",
                                                                 "--trainer.limit_train_batches=1"]
    code, out, err = run_cli(["fit", "--config", str(tiny_config), "--trainer.enable_progress_bar=true",
                              "--trainer.limit_val_batches=0", *length])
    assert code == 0, err
    shown = re.findall(r"Epoch \d+(?:/-?\d+)?", out + err)
    assert shown, out + err
    assert all(s.endswith("/2") for s in shown) if bound == "epochs" else set(shown) == {"Epoch 0"}
