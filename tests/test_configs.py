"""configs/: every shipped config parses (without the hub), and the offline demo really learns.

The demo run is the suite's one long CPU test (about 90 s on 2 cores): it is what `python -m lit_flash fit` does
with no arguments, so it must keep working offline and keep its promise (validation perplexity falls >= 2x)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml
from _helpers import print_config

from lit_flash.callbacks import HFExport
from lit_flash.cli import cli_main, config_path

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_there_are_configs():
    assert {"demo.yaml", "gpt2_flash.yaml"} <= {c.name for c in CONFIGS}
    assert config_path("demo.yaml").read_text() == (CONFIGS[0].parent / "demo.yaml").read_text()


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_config_parses(config, run_cli):
    # --print_config parses and type-checks every key, instantiating nothing: no hub access, no data.
    code, out, err = run_cli(["fit", "--config", str(config), "--print_config"])
    assert code == 0, err
    printed, written = yaml.safe_load(out), yaml.safe_load(config.read_text())
    for section in ("model", "data"):
        for key, value in (written.get(section) or {}).items():
            assert printed[section][key] == value, (section, key)


def test_reference_recipe_keys():
    # The reference job's flags, as configs/gpt2_flash.yaml maps them.
    config = yaml.safe_load(config_path("gpt2_flash.yaml").read_text())
    assert config["model"]["model_name_or_path"] == "openai-community/gpt2"
    assert config["model"]["attn_implementation"] == "flash_attention_2"
    assert config["trainer"]["default_root_dir"] == "/output"
    assert (config["data"]["batch_size"], config["data"]["eval_batch_size"]) == (8, 8)
    assert (config["trainer"]["log_every_n_steps"], config["trainer"]["val_check_interval"]) == (50, 500)
    assert config["checkpoint"]["every_n_train_steps"] == 500


@pytest.mark.slow
def test_demo_runs_offline_and_learns(run_cli, tmp_path):
    root = tmp_path / "demo"
    code, _, err = run_cli(
        ["fit", "--config", str(config_path("demo.yaml")), "--trainer.default_root_dir", str(root),
         "--data.cache_dir", str(tmp_path / "cache")]
    )
    assert code == 0, err
    with open(root / "logs" / "version_0" / "metrics.csv") as f:
        ppl = [float(r["val_ppl"]) for r in csv.DictReader(f) if r.get("val_ppl")]
    assert len(ppl) >= 3 and ppl[0] / ppl[-1] >= 2, ppl
    assert (root / "checkpoints" / "last.ckpt").is_file()
    assert (root / "model" / "model.safetensors").is_file() and (root / "model" / "tokenizer.json").is_file()


def test_reference_recipe_writes_under_output(tiny_model_config, tokenizer_dir, text_files, monkeypatch):
    # Instantiate gpt2_flash.yaml with the hub parts swapped for tiny local ones: where would the run write?
    monkeypatch.setattr("sys.argv", ["lit-flash"])
    cli = cli_main(
        ["--config", str(config_path("gpt2_flash.yaml")), "--trainer.precision", "32-true",
         "--model.model_name_or_path", "null", "--model.model_config", json.dumps(tiny_model_config),
         "--data.text_files", json.dumps(text_files), "--data.tokenizer_name", str(tokenizer_dir)],
        run=False,
    )
    trainer = cli.trainer
    assert trainer.checkpoint_callback.dirpath == "/output/checkpoints"
    assert trainer.checkpoint_callback.save_last and trainer.checkpoint_callback._every_n_train_steps == 500
    (export,) = [c for c in trainer.callbacks if isinstance(c, HFExport)]
    assert str(export.export_path(trainer)) == "/output/model"
    assert {type(lg).__name__: lg.save_dir for lg in trainer.loggers} == {
        "CSVLogger": "/output", "TensorBoardLogger": "/output"
    }


def test_batch64_overlay_doubles_the_batch_and_keeps_the_spacing_in_rows(capsys):
    fast = print_config("gpt2_fast.yaml", capsys=capsys)
    b64 = print_config("gpt2_fast.yaml", "batch64.yaml", capsys=capsys)
    assert (b64["data"]["batch_size"], b64["data"]["eval_batch_size"]) == (64, 64)
    assert b64["model"]["learning_rate"] == pytest.approx(fast["model"]["learning_rate"] * 2**0.5, rel=0.02)
    rows = lambda c, key: c["data"]["batch_size"] * key(c)  # noqa: E731
    for key in (lambda c: c["trainer"]["val_check_interval"], lambda c: c["checkpoint"]["every_n_train_steps"],
                lambda c: c["trainer"]["log_every_n_steps"]):
        assert rows(b64, key) == pytest.approx(rows(fast, key), rel=0.01)
    # Everything else is gpt2_fast.yaml's: the overlay only changes the batch and what follows from it.
    for section in ("model", "data", "trainer"):
        changed = {k for k in fast[section] if fast[section][k] != b64[section][k]}
        assert changed <= {"learning_rate", "batch_size", "eval_batch_size", "val_check_interval", "log_every_n_steps"}
