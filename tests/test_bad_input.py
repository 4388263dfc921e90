"""The bad-input matrix: each mistake is one `error:` line naming what to fix, a non-zero exit, and every file the
user had (data, configs, an earlier run's output) is left exactly as it was.

Every case goes through the CLI (`cli_main`, in-process) on a tiny CPU config that otherwise trains fine.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning
import pytest
import torch
import yaml
from _helpers import (
    BLOCK,
    VOCAB,
    make_dataset,
    save_blocks,
    snapshot,
    tiny_run_config,
    token_rows,
    write_config,
)

from lit_flash import cli as cli_module
from lit_flash.cli import cli_main, config_path
from lit_flash.errors import LitFlashError
from lit_flash.module import FlashGPT2LM
from lit_flash.preflight import check_precision_supported

TINY_MODEL = {"vocab_size": VOCAB, "n_positions": BLOCK, "n_embd": 32, "n_layer": 1, "n_head": 2}


# Each case: (name, set-up returning the extra CLI arguments, a piece of the one error line). The set-up gets the
# test's folder (holding `data/` and `run/`, which must survive) and may write more user files into it.
def _load_dir(path: str) -> Callable[[Path], list[str]]:
    return lambda tmp: [f"--data.tokenized_dataset_load_dir={tmp / path}"]


def _blocks(name: str, splits: dict, columns=("attention_mask", "labels")) -> Callable[[Path], list[str]]:
    def setup(tmp: Path) -> list[str]:
        save_blocks(tmp / name, splits, columns)
        return [f"--data.tokenized_dataset_load_dir={tmp / name}"]

    return setup


def _not_a_dataset(tmp: Path) -> list[str]:
    (tmp / "texts").mkdir()
    (tmp / "texts" / "a.txt").write_text("hello")
    return [f"--data.tokenized_dataset_load_dir={tmp / 'texts'}"]


def _ragged(tmp: Path) -> list[str]:
    rows = token_rows(8, 0)
    rows[3] = rows[3][:20]
    return _blocks("ragged", {"train": rows, "test": token_rows(4, 1)}, columns=())(tmp)


def _bad_labels(tmp: Path) -> list[str]:
    import datasets

    rows = token_rows(8, 0)
    train = datasets.Dataset.from_dict({"input_ids": rows, "labels": [r[:10] for r in rows]})
    datasets.DatasetDict({"train": train, "test": train}).save_to_disk(str(tmp / "bad_labels"))
    return [f"--data.tokenized_dataset_load_dir={tmp / 'bad_labels'}"]


def _file_as_output_parent(tmp: Path) -> list[str]:
    (tmp / "a_file").write_text("user data")
    return [f"--trainer.default_root_dir={tmp / 'a_file' / 'run'}"]


def _checkpoint(tmp: Path, data: bytes) -> list[str]:
    (tmp / "given.ckpt").write_bytes(data)
    return ["--ckpt_path", str(tmp / "given.ckpt")]


def _truncated_checkpoint(tmp: Path) -> list[str]:
    path = tmp / "whole.ckpt"
    torch.save(_checkpoint_of(TINY_MODEL), path)
    return _checkpoint(tmp, path.read_bytes()[:-2000])


def _checkpoint_of(model_config: dict) -> dict:
    model = FlashGPT2LM(model_name_or_path=None, model_config=model_config, attn_implementation="sdpa")
    # A full checkpoint (optimizer state included): a weights-only one is refused earlier, for another reason.
    return {"state_dict": model.state_dict(), "pytorch-lightning_version": lightning.__version__, "global_step": 0,
            "optimizer_states": [{}]}


def _other_shape_checkpoint(tmp: Path) -> list[str]:
    # The run's last.ckpt is of a narrower model (the config was changed between a run and its restart).
    (tmp / "run" / "checkpoints").mkdir(parents=True)
    torch.save(_checkpoint_of({**TINY_MODEL, "n_embd": 16}), tmp / "run" / "checkpoints" / "last.ckpt")
    return ["--ckpt_path", "auto"]


def _typo_config(tmp: Path) -> list[str]:
    config = yaml.safe_load((tmp / "config.yaml").read_text())
    config["trainer"]["max_stepz"] = 5
    write_config(tmp / "typo.yaml", config)
    return ["--config", str(tmp / "typo.yaml")]


def _big_tokenizer(tmp: Path) -> list[str]:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    words = {f"w{i}": i for i in range(VOCAB + 100)}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(words, unk_token="w0")), unk_token="w0")
    tokenizer.save_pretrained(str(tmp / "tokenizer"))
    return [f"--data.tokenizer_name={tmp / 'tokenizer'}"]


def _model_folder_as_tokenizer(tmp: Path) -> list[str]:
    """Raw text tokenized by a model's folder (config.json, no tokenizer files): it ended in 'the split is empty'."""
    from transformers import GPT2Config

    GPT2Config(n_embd=8, n_layer=1, n_head=2).save_pretrained(str(tmp / "a_model"))
    (tmp / "train.txt").write_text("the king of the north .\n" * 200)
    text = {"train": str(tmp / "train.txt"), "validation": str(tmp / "train.txt")}
    overlay = {"data": {"tokenized_dataset_load_dir": None, "text_files": text, "tokenizer_name": str(tmp / "a_model"),
                        "cache_dir": str(tmp / "cache")}}
    write_config(tmp / "text.yaml", overlay)
    return ["--config", str(tmp / "config.yaml"), "--config", str(tmp / "text.yaml")]


def _earlier_run(tmp: Path) -> list[str]:
    (tmp / "run" / "checkpoints").mkdir(parents=True)
    torch.save(_checkpoint_of(TINY_MODEL), tmp / "run" / "checkpoints" / "last.ckpt")
    return []


def _no_input_ids(tmp: Path) -> list[str]:
    import datasets

    split = datasets.Dataset.from_dict({"tokens": token_rows(8, 0)})
    datasets.DatasetDict({"train": split, "test": split}).save_to_disk(str(tmp / "cols"))
    return [f"--data.tokenized_dataset_load_dir={tmp / 'cols'}"]


CASES = [
    ("missing load dir", _load_dir("nowhere"), "tokenized_dataset_load_dir="),
    ("load dir that is no dataset", _not_a_dataset, "not a DatasetDict"),
    ("wrong split names", _blocks("splits", {"training": token_rows(8, 0), "test": token_rows(4, 1)}), "'train'"),
    ("no input_ids column", _no_input_ids, "'input_ids'"),
    ("ragged rows", _ragged, "unequal length"),
    ("a column shorter than input_ids", _bad_labels, "'labels'"),
    ("token ids past the vocabulary", lambda tmp: ["--model.model_config.vocab_size=100"], "vocabulary has 100"),
    ("block_size past the context", lambda tmp: ["--model.model_config.n_positions=16"], "data.block_size"),
    ("max_train_samples=0", lambda tmp: ["--data.max_train_samples=0"], "data.max_train_samples=0"),
    ("AdamW eps of 0 (NaN where a gradient is 0)", lambda tmp: ["--model.eps=0"], "model.eps=0"),
    ("a block of one token", lambda tmp: ["--data.block_size=1"], "data.block_size=1"),
    ("an empty split", _blocks("blocks2", {"train": token_rows(8, 0), "test": []}), "split 'test': the split is empty"),
    ("unknown attention implementation", lambda tmp: ["--model.attn_implementation=flash3"], "attn_implementation"),
    (
        "flash without fallback on CPU",
        lambda tmp: ["--model.attn_implementation=flash_attention_2", "--model.attn_fallback=false"],
        "model.attn_fallback=true",
    ),
    ("fp16 on CPU", lambda tmp: ["--trainer.precision=16-mixed"], "trainer.precision=16-mixed"),
    ("output dir not writable", _file_as_output_parent, "trainer.default_root_dir="),
    ("missing checkpoint", lambda tmp: ["--ckpt_path", str(tmp / "no.ckpt")], "no such file"),
    ("corrupted checkpoint", lambda tmp: _checkpoint(tmp, b"\x00garbage" * 1000), "truncated or corrupted"),
    ("truncated checkpoint", _truncated_checkpoint, "truncated or corrupted"),
    ("checkpoint of another model shape", _other_shape_checkpoint, "from a different model"),
    ("YAML with a typo'd key", _typo_config, "max_stepz"),
    ("missing config file", lambda tmp: ["--config", str(tmp / "nope.yaml")], "nope.yaml"),
    ("tokenizer larger than the model", _big_tokenizer, "data.tokenizer_name"),
    ("a model folder as the tokenizer", _model_folder_as_tokenizer, "data.tokenizer_name="),
    ("fresh fit over an earlier run", _earlier_run, "--ckpt_path last"),
]
if not torch.cuda.is_available():  # a GPU overlay on a machine without a GPU
    CASES.append(("ddp.yaml without a GPU",
                  lambda tmp: ["--config", str(tmp / "config.yaml"), "--config", str(config_path("ddp.yaml"))],
                  "trainer.accelerator=gpu: this machine has no CUDA GPU"))




@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data") / "blocks", n_train=16, n_val=8)


@pytest.mark.parametrize(("setup", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_deletes_nothing(
    setup: Callable[[Path], list[str]], expected: str, dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    # The user's things: a dataset, a config, an output folder with notes in it.
    import shutil

    shutil.copytree(dataset, tmp_path / "data")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("my notes")
    config = tiny_run_config(tmp_path / "run", tmp_path / "data", trainer={"max_steps": 2})
    write_config(tmp_path / "config.yaml", config)
    extra = setup(tmp_path)
    args = ["fit"] + ([] if "--config" in extra else ["--config", str(tmp_path / "config.yaml")]) + extra
    before = snapshot(tmp_path)

    with pytest.raises(SystemExit) as exit_info:
        cli_main(args)

    assert exit_info.value.code not in (0, None)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    assert expected in errors[0]
    assert "Traceback" not in err
    after = snapshot(tmp_path)
    assert {name: after.get(name) for name in before} == before, "a user file was deleted or changed"


def test_bf16_on_a_gpu_without_it_is_one_line(
    dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No such GPU here: the CLI is told it runs on CUDA without bf16 (a V100, a T4).
    monkeypatch.setattr(cli_module, "trainer_device_type", lambda accelerator: "cuda")
    monkeypatch.setattr(cli_module, "bf16_supported", lambda: False)
    config = write_config(tmp_path / "c.yaml", tiny_run_config(tmp_path / "run", dataset))
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", str(config), "--trainer.precision=bf16-mixed"])
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "trainer.precision=bf16-mixed" in errors[0] and "16-mixed" in errors[0]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("precision", "device", "bf16", "ok"),
    [
        ("16-mixed", "cpu", False, False),
        ("16-true", "cpu", False, False),
        ("bf16-mixed", "cpu", False, True),
        ("32-true", "cpu", False, True),
        ("16-mixed", "cuda", False, True),
        ("bf16-mixed", "cuda", False, False),
        ("bf16-true", "cuda", True, True),
    ],
)
def test_precision_check(precision: str, device: str, bf16: bool, ok: bool) -> None:
    if ok:
        check_precision_supported(precision, device, bf16)
    else:
        with pytest.raises(ValueError, match=f"trainer.precision={precision}"):
            check_precision_supported(precision, device, bf16)


class _RefusingRows(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> Any:
        raise LitFlashError("data.packing: the rows' position_ids do not start at 0: prepare them again")


@pytest.mark.slow  # a loader worker process
def test_an_error_raised_in_a_loader_worker_is_still_its_one_line() -> None:
    """torch re-raises a worker's error wrapped in "Caught ... in DataLoader worker" and the worker's traceback."""
    from lit_flash.errors import one_line

    loader = torch.utils.data.DataLoader(_RefusingRows(), num_workers=1)
    with pytest.raises(LitFlashError) as caught:
        next(iter(loader))
    assert "Traceback" in str(caught.value)  # what the CLI printed before
    assert one_line(caught.value) == "data.packing: the rows' position_ids do not start at 0: prepare them again"
