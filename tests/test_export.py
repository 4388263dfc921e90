"""The Hugging Face export: it never overwrites what it did not write, is refused before training when it cannot
be written, and is written atomically (a failure leaves the target as it was, and no temporary folder behind).

The unit tests drive `lit_flash.export` directly; the CLI tests run a tiny fit in-process (`run_cli`).
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from _helpers import make_dataset, snapshot, tiny_run_config, write_config

from lit_flash.errors import LitFlashError
from lit_flash.export import MARKER, check_export_target, write_export
from lit_flash.module import FlashGPT2LM

FLAG = "export.dirname=model"
TINY_MODEL = {"vocab_size": 300, "n_positions": 32, "n_embd": 32, "n_layer": 1, "n_head": 2}


def _fake_model(folder: Path, weights: bytes = b"weights") -> None:
    """What `save_pretrained` writes, in miniature."""
    (folder / "config.json").write_text('{"model_type": "gpt2"}')
    (folder / "model.safetensors").write_bytes(weights)


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".lit_flash-" in p.name)


# ------------------------------------------------------------------------------------------ the target rule


def test_a_file_as_target_is_refused(tmp_path: Path) -> None:
    (tmp_path / "model").write_text("my notes")
    with pytest.raises(LitFlashError, match=r"export\.dirname=model: .* is a file, not a folder"):
        check_export_target(tmp_path / "model", tmp_path, FLAG)


def test_a_folder_holding_another_model_is_refused(tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    _fake_model(tmp_path / "model")
    with pytest.raises(LitFlashError, match=r"export\.dirname=model: .* lit_flash did not export"):
        check_export_target(tmp_path / "model", tmp_path, FLAG)


def test_another_runs_export_is_refused_and_this_runs_own_is_not(tmp_path: Path) -> None:
    shared = tmp_path / "models" / "gpt2-ft"  # an absolute export.dirname outside both runs
    write_export(shared, _fake_model, tmp_path / "run_a", FLAG)
    assert json.loads((shared / MARKER).read_text())["run_dir"] == os.path.realpath(tmp_path / "run_a")
    with pytest.raises(LitFlashError, match=r"holds the export of another run"):
        check_export_target(shared, tmp_path / "run_b", FLAG)
    check_export_target(shared, tmp_path / "run_a", FLAG)


def test_new_or_empty_folders_and_a_moved_runs_own_export_are_accepted(tmp_path: Path) -> None:
    check_export_target(tmp_path / "new" / "model", tmp_path, FLAG)
    (tmp_path / "empty").mkdir()
    check_export_target(tmp_path / "empty", tmp_path, FLAG)
    write_export(tmp_path / "old_place" / "model", _fake_model, tmp_path / "old_place", FLAG)
    os.rename(tmp_path / "old_place", tmp_path / "new_place")  # the whole run folder was moved
    check_export_target(tmp_path / "new_place" / "model", tmp_path / "new_place", FLAG)


def test_export_hf_outside_a_run_does_not_overwrite_a_run_export(tmp_path: Path) -> None:
    module = FlashGPT2LM(model_name_or_path=None, model_config=TINY_MODEL, attn_implementation="sdpa")
    module.export_hf(tmp_path / "run" / "model", run_dir=tmp_path / "run")
    before = snapshot(tmp_path)
    with pytest.raises(LitFlashError, match=r"path=.*holds the export of another run"):
        module.export_hf(tmp_path / "run" / "model")
    assert snapshot(tmp_path) == before
    module.export_hf(tmp_path / "mine")
    module.export_hf(tmp_path / "mine")  # its own earlier export (no run either): replaced


# -------------------------------------------------------------------------------------------- atomic write


@pytest.fixture
def earlier_export(tmp_path: Path) -> Path:
    """`tmp_path/model`: this run's export, already written once."""
    write_export(tmp_path / "model", lambda f: _fake_model(f, b"old weights"), tmp_path, FLAG)
    return tmp_path / "model"


def test_this_runs_export_is_replaced_leaving_nothing_beside_it(tmp_path: Path, earlier_export: Path) -> None:
    write_export(earlier_export, lambda f: _fake_model(f, b"new weights"), tmp_path, FLAG)
    assert (earlier_export / "model.safetensors").read_bytes() == b"new weights"
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize(
    "failure",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        PermissionError(errno.EROFS, "Read-only file system"),
        "safetensors",  # safetensors reports a full disk as its own error type, not OSError
    ],
    ids=["disk full", "read-only", "safetensors I/O error"],
)
def test_a_failed_write_is_one_error_and_keeps_the_earlier_export(
    tmp_path: Path, earlier_export: Path, failure: Exception | str
) -> None:
    if failure == "safetensors":
        from safetensors import SafetensorError

        failure = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    before = snapshot(earlier_export)

    def write(folder: Path) -> None:
        (folder / "config.json").write_text("{}")  # half written, as a full disk leaves it
        raise failure

    with pytest.raises(LitFlashError, match=r"export\.dirname=model: writing the export .* failed .*--ckpt_path last"):
        write_export(earlier_export, write, tmp_path, FLAG)
    assert snapshot(earlier_export) == before
    assert _leftovers(tmp_path) == []


def test_a_bug_while_writing_propagates_and_leaves_no_orphans(tmp_path: Path, earlier_export: Path) -> None:
    before = snapshot(earlier_export)

    def write(folder: Path) -> None:
        (folder / "model.safetensors").write_bytes(b"x" * 1000)
        raise KeyError("a bug, not the user's disk")

    with pytest.raises(KeyError):
        write_export(earlier_export, write, tmp_path, FLAG)
    assert snapshot(earlier_export) == before
    assert _leftovers(tmp_path) == []


def test_a_save_that_writes_no_weights_is_not_called_an_export(tmp_path: Path) -> None:
    # transformers' save_pretrained only logs (no exception) when it cannot write: check what it left.
    with pytest.raises(LitFlashError, match=r"without config\.json or weights .*nothing was exported"):
        write_export(tmp_path / "model", lambda folder: None, tmp_path, FLAG)
    assert not (tmp_path / "model").exists() and _leftovers(tmp_path) == []


def test_temporaries_of_a_killed_export_are_removed_by_the_next(tmp_path: Path) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()  # a process id that is free now
    stale = tmp_path / f".model.lit_flash-tmp-{dead.pid}-abc"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    write_export(tmp_path / "model", _fake_model, tmp_path, FLAG)
    assert _leftovers(tmp_path) == []


# ------------------------------------------------------------------------------ a real full / read-only disk


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs (a disk that fills up); skipped where mounting is not allowed (not root, a container)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root and mount rights)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_a_really_full_disk_is_one_error_and_leaves_nothing(small_tmpfs: Path) -> None:
    module = FlashGPT2LM(model_name_or_path=None, model_config=TINY_MODEL, attn_implementation="sdpa")  # ~70 KB
    with pytest.raises(LitFlashError, match=r"writing the export .* failed \(.*No space left on device"):
        module.export_hf(small_tmpfs / "model", run_dir=small_tmpfs, flag=FLAG)
    assert list(small_tmpfs.iterdir()) == []


def test_a_read_only_target_is_refused_before_writing(small_tmpfs: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(small_tmpfs)], check=True)
    with pytest.raises(LitFlashError, match=r"export\.dirname=model: cannot write in .*Read-only file system"):
        check_export_target(small_tmpfs / "model", small_tmpfs, FLAG)


# --------------------------------------------------------------------------------------------- through the CLI


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data") / "blocks", n_train=16, n_val=8)


def _config(tmp_path: Path, dataset: Path, max_steps: int = 2) -> str:
    config = tiny_run_config(tmp_path / "run", dataset, trainer={"max_steps": max_steps, "val_check_interval": 2},
                         checkpoint={"every_n_train_steps": 2})
    return str(write_config(tmp_path / "config.yaml", config))


def _one_error(code: int, err: str) -> str:
    assert code == 2, err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    return errors[0]


def _user_model(folder: Path) -> Path:
    folder.mkdir(parents=True)
    _fake_model(folder, b"someone's fine-tuned weights")
    return folder


@pytest.mark.parametrize("target", ["a file", "a folder holding a model"])
def test_cli_refuses_an_export_target_it_did_not_write_before_training(
    target: str, tmp_path: Path, dataset: Path, run_cli
) -> None:
    if target == "a file":
        (tmp_path / "notes.txt").write_text("my notes")
        dirname = str(tmp_path / "notes.txt")
    else:
        dirname = str(_user_model(tmp_path / "their_model"))
    before = snapshot(tmp_path)
    code, _, err = run_cli(["fit", "--config", _config(tmp_path, dataset), f"--export.dirname={dirname}"])
    line = _one_error(code, err)
    assert f"export.dirname={dirname}" in line and "choose another export.dirname" in line
    assert {name: snapshot(tmp_path).get(name) for name in before} == before
    assert not list((tmp_path / "run").rglob("*.ckpt")), "it trained before refusing"
    assert not (tmp_path / "run" / "logs").exists(), "a refused run left a logs folder behind"


@pytest.mark.parametrize("dirname", ["x/../../mine", "checkpoints", "logs", "model/../checkpoints", "logs/m", ""])
def test_cli_refuses_export_targets_that_resolve_onto_user_or_run_folders(
    dirname: str, tmp_path: Path, dataset: Path, run_cli
) -> None:
    """`x/..` resolved only after `x` was created: the export replaced the user's folder `mine`, or the run's
    own checkpoints. Judged on the path the rename will use, before training."""
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("precious")
    before = snapshot(tmp_path)
    code, _, err = run_cli(["fit", "--config", _config(tmp_path, dataset), f"--export.dirname={dirname}"])
    assert f"export.dirname={dirname}" in _one_error(code, err)
    assert {name: snapshot(tmp_path).get(name) for name in before} == before
    assert not list((tmp_path / "run").rglob("*.ckpt")), "it trained before refusing"


def test_cli_refuses_an_unwritable_export_parent_before_training(tmp_path: Path, dataset: Path, run_cli) -> None:
    (tmp_path / "a_file").write_text("user data")
    code, _, err = run_cli(["fit", "--config", _config(tmp_path, dataset), f"--export.dirname={tmp_path}/a_file/m"])
    assert "export.dirname=" in _one_error(code, err)
    assert (tmp_path / "a_file").read_text() == "user data"
    assert not list((tmp_path / "run").rglob("*.ckpt")) and not (tmp_path / "run" / "logs").exists()


@pytest.mark.slow
def test_cli_resume_replaces_its_own_export(tmp_path: Path, dataset: Path, run_cli) -> None:
    config = _config(tmp_path, dataset)
    assert run_cli(["fit", "--config", config])[0] == 0
    model = tmp_path / "run" / "model"
    first = (model / "model.safetensors").read_bytes()
    assert (model / MARKER).is_file()
    code, _, err = run_cli(["fit", "--config", config, "--trainer.max_steps=4", "--ckpt_path=last"])
    assert code == 0, err
    assert (model / "model.safetensors").read_bytes() != first  # trained 2 more steps: new weights
    assert _leftovers(model.parent) == []


def test_cli_export_failing_at_the_end_is_one_line_and_a_rerun_exports(
    tmp_path: Path, dataset: Path, run_cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import PreTrainedModel

    config = _config(tmp_path, dataset)
    real_save = PreTrainedModel.save_pretrained

    def disk_full(self, folder, *args, **kwargs):
        real_save(self, folder, *args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", disk_full)
    line = _one_error(*run_cli(["fit", "--config", config])[::2])
    assert "export.dirname=model" in line and "No space left on device" in line
    model = tmp_path / "run" / "model"
    assert not model.exists() and _leftovers(model.parent) == []
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()  # the training is not lost
    monkeypatch.setattr(PreTrainedModel, "save_pretrained", real_save)
    code, _, err = run_cli(["fit", "--config", config, "--ckpt_path=last"])  # as the message says
    assert code == 0, err
    assert (model / "model.safetensors").is_file()


def test_generate_from_an_export_without_a_tokenizer_says_so(
    tmp_path: Path, tiny_model_config: dict, tokenizer_dir: Path, run_cli
) -> None:
    # A run with data.tokenizer_name: null exports no tokenizer; transformers then builds an empty one, and every
    # prompt used to be "empty".
    module = FlashGPT2LM(model_name_or_path=None, model_config=tiny_model_config, attn_implementation="sdpa")
    export = module.export_hf(tmp_path / "model")
    args = ["generate", "--model_name_or_path", str(export), "--input_str", "the city", "--max_new_tokens", "3",
            "--device", "cpu", "--temperature", "0"]
    line = _one_error(*run_cli(args)[::2])
    assert f"--model_name_or_path {export} has no tokenizer" in line and "--tokenizer" in line
    code, out, err = run_cli([*args, "--tokenizer", str(tokenizer_dir)])
    assert code == 0, err
    assert out.startswith("the city")


def test_a_parent_that_cannot_be_created_at_export_time_is_one_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The target passed the check before training; by the end the disk is full, so even its folder cannot be made.
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("tempfile.mkdtemp", full)
    with pytest.raises(LitFlashError, match=r"export\.dirname=model: writing the export .*No space left on device"):
        write_export(tmp_path / "new" / "model", _fake_model, tmp_path, FLAG)


def test_files_the_user_added_to_this_runs_export_are_refused_not_deleted(tmp_path: Path, earlier_export: Path) -> None:
    """Attack: a resumed fit replaced the whole `<run>/model`, deleting the NOTES.md and tokenizer files the user
    had put there. The marker lists the files the export wrote; any other file there is refused, naming it."""
    check_export_target(earlier_export, tmp_path, FLAG)
    (earlier_export / "NOTES.md").write_text("my notes")
    before = snapshot(tmp_path)
    with pytest.raises(LitFlashError, match=r"export\.dirname=model: .*NOTES\.md was not written by the export"):
        write_export(earlier_export, lambda f: _fake_model(f, b"new weights"), tmp_path, FLAG)
    assert snapshot(tmp_path) == before


def test_an_export_from_before_the_file_list_is_judged_by_export_file_names(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    _fake_model(model)
    (model / MARKER).write_text(json.dumps({"run_dir": os.path.realpath(tmp_path), "written_by": "lit_flash"}))
    (model / "tokenizer.json").write_text("{}")
    check_export_target(model, tmp_path, FLAG)
    (model / "NOTES.md").write_text("my notes")
    with pytest.raises(LitFlashError, match=r"NOTES\.md was not written by the export"):
        check_export_target(model, tmp_path, FLAG)


@pytest.mark.slow
def test_cli_resume_refuses_user_files_in_the_export_and_nothing_to_train_keeps_it(
    tmp_path: Path, dataset: Path, run_cli
) -> None:
    config = _config(tmp_path, dataset)
    assert run_cli(["fit", "--config", config])[0] == 0
    model = tmp_path / "run" / "model"
    (model / "NOTES.md").write_text("my notes")
    before = snapshot(tmp_path / "run" / "checkpoints")
    code, _, err = run_cli(["fit", "--config", config, "--trainer.max_steps=4", "--ckpt_path=last"])
    line = _one_error(code, err)
    assert "NOTES.md" in line and "export.dirname" in line
    assert (model / "NOTES.md").read_text() == "my notes"
    assert snapshot(tmp_path / "run" / "checkpoints") == before, "it trained before refusing"
    (model / "NOTES.md").unlink()
    exported = snapshot(model)
    os.utime(model / "model.safetensors", (1, 1))
    code, _, err = run_cli(["fit", "--config", config, "--ckpt_path=last"])  # already at max_steps
    assert code == 0, err
    assert "nothing to train" in err
    assert snapshot(model) == exported and (model / "model.safetensors").stat().st_mtime == 1, "re-exported"
