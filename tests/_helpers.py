"""Plain helpers shared by the tests (the fixtures are in conftest.py): tiny modules and CPU trainers, a tiny
tokenized dataset and YAML config for whole CLI runs, the CLI in a subprocess or a fork, and the losses a run logged.

A test config can name `_helpers.SlowSteps` as a callback: the CLI subprocesses get this folder on PYTHONPATH."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import yaml

from lit_flash.cli import cli_main, config_path
from lit_flash.module import FlashGPT2LM


def tiny_module(config: dict, **kwargs) -> FlashGPT2LM:
    """A from-config FlashGPT2LM with sdpa attention (runs anywhere); `kwargs` override any argument."""
    return FlashGPT2LM(**{"model_name_or_path": None, "model_config": config, "attn_implementation": "sdpa", **kwargs})


def cpu_trainer(**kwargs) -> L.Trainer:
    """A quiet one-process CPU Trainer: no logger, checkpoints, progress bar or summary unless `kwargs` say so."""
    defaults = {
        "accelerator": "cpu", "devices": 1, "logger": False, "enable_checkpointing": False,
        "enable_progress_bar": False, "enable_model_summary": False,
    }
    return L.Trainer(**{**defaults, **kwargs})


class RecordLosses(L.Callback):
    """The training loss of every step, as floats."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def print_config(*configs: str, capsys: pytest.CaptureFixture) -> dict:
    """The complete config `fit --config A --config B ... --print_config` prints, as a dict (no hub, no data)."""
    args = ["fit"] + [a for name in configs for a in ("--config", str(config_path(name)))] + ["--print_config"]
    with pytest.raises(SystemExit):
        cli_main(args)
    return yaml.safe_load(capsys.readouterr().out)

SRC = str(Path(__file__).resolve().parents[1] / "src")
TESTS = str(Path(__file__).resolve().parent)
VOCAB = 300
BLOCK = 32


def token_rows(n_rows: int, seed: int, vocab: int = VOCAB, block: int = BLOCK) -> list[list[int]]:
    """Learnable rows: arithmetic progressions mod `vocab` with a random start and stride."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, vocab, (n_rows, 1), generator=g)
    stride = torch.randint(1, 8, (n_rows, 1), generator=g)
    return ((start + stride * torch.arange(block)) % vocab).tolist()


COLUMNS = ("attention_mask", "labels")


def save_blocks(path: Path, splits: dict[str, list[list[int]]], columns: tuple[str, ...] = COLUMNS) -> Path:
    """A reference-format `DatasetDict` (input_ids, attention_mask, labels) saved with `save_to_disk`."""
    import datasets

    def split(rows: list[list[int]]) -> Any:
        data: dict[str, Any] = {"input_ids": rows}
        if "attention_mask" in columns:
            data["attention_mask"] = [[1] * len(r) for r in rows]
        if "labels" in columns:
            data["labels"] = [list(r) for r in rows]
        return datasets.Dataset.from_dict(data)

    datasets.DatasetDict({name: split(rows) for name, rows in splits.items()}).save_to_disk(str(path))
    return path


def make_dataset(path: Path, n_train: int = 160, n_val: int = 16) -> Path:
    return save_blocks(path, {"train": token_rows(n_train, 0), "test": token_rows(n_val, 1)})


def tiny_run_config(root: Path, data_dir: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    """A CPU run of a 1-layer, 32-wide GPT-2 on `data_dir`, writing to `root`; `sections` update the defaults."""
    config: dict[str, Any] = {
        "seed_everything": 7,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "precision": "32-true",
            "max_steps": 60,
            "val_check_interval": 25,
            "check_val_every_n_epoch": None,
            "log_every_n_steps": 1,
            "default_root_dir": str(root),
            "num_sanity_val_steps": 0,
            "enable_progress_bar": False,
            "enable_model_summary": False,
        },
        "checkpoint": {"every_n_train_steps": 10},
        "export": {"dirname": "model"},
        "model": {
            "model_name_or_path": None,
            "model_config": {"vocab_size": VOCAB, "n_positions": BLOCK, "n_embd": 32, "n_layer": 1, "n_head": 2},
            "attn_implementation": "sdpa",
            "learning_rate": 3e-3,
            "warmup_steps": 5,
            "lr_scheduler": "cosine",
            "dropout": 0.1,  # on purpose: an exact resume must also restore the RNG (dropout masks)
        },
        "data": {
            "tokenized_dataset_load_dir": str(data_dir),
            "tokenizer_name": None,
            "batch_size": 4,
            "eval_batch_size": 8,
        },
    }
    for key, values in sections.items():
        if isinstance(values, dict):
            config.setdefault(key, {}).update(values)
        else:
            config[key] = values
    return config


def write_config(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def cli_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([SRC, TESTS, env.get("PYTHONPATH", "")])
    env.update(extra)
    return env


def cli_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "lit_flash", *args]


def run_cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(cli_command(*args), env=cli_env(), capture_output=True, text=True, timeout=timeout)


def start_cli(*args: str, log: Path) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen(cli_command(*args), env=cli_env(), stdout=out, stderr=subprocess.STDOUT)


def logged(root: Path, key: str = "train_loss") -> dict[int, float]:
    """`key` per step from every `logs/version_*/metrics.csv` of a run; a later version (a resume) wins."""
    values: dict[int, float] = {}
    versions = sorted((root / "logs").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    for version in versions:
        metrics = version / "metrics.csv"
        if not metrics.is_file():
            continue
        with open(metrics) as f:
            for row in csv.DictReader(f):
                if row.get(key):
                    values[int(row["step"])] = float(row[key])
    return values


def checkpoint_step(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` with its content hash: what a failing command must leave as it was."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


class SlowSteps(L.Callback):
    """Test-only: sleep after each training batch, so a watcher can kill the run between two checkpoints."""

    def __init__(self, seconds: float = 0.05) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, *args: Any) -> None:
        time.sleep(self.seconds)


class SigtermAt(L.Callback):
    """Test-only: the process sends itself SIGTERM (a preemption) right after the training batch of `step`."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def fork_cli(*args: str) -> Any:
    """`cli_main(args)` in a forked child (no second 10-30 s of imports), on one CPU thread as the parent's twin
    runs would be: same thread count, same floating-point sums. Returns the `multiprocessing.Process`."""
    import multiprocessing

    def target() -> None:
        torch.set_num_threads(1)
        cli_main(list(args))

    proc = multiprocessing.get_context("fork").Process(target=target)
    proc.start()
    return proc


def wait_for_file(path: Path, proc: Any, timeout: float = 180) -> None:
    """Poll until `path` (its name may be a glob) exists; `proc` is a `subprocess.Popen` or a
    `multiprocessing.Process`."""
    deadline = time.monotonic() + timeout
    while not any(path.parent.glob(path.name)):
        alive = proc.poll() is None if isinstance(proc, subprocess.Popen) else proc.is_alive()
        if not alive:
            raise AssertionError(f"the run ended before {path} appeared")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {path}")
        time.sleep(0.01)


@contextlib.contextmanager
def small_disk(path: Path, size: int) -> Iterator[Path]:
    """A real filesystem of `size` bytes (tmpfs) at `path`, unmounted afterwards; the test is skipped where
    mounting is not allowed (not root, or a container without CAP_SYS_ADMIN)."""
    import pytest

    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True
    )
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mount.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill_disk(folder: Path, leave: int) -> None:
    """Fill the filesystem of `folder` until about `leave` bytes are free."""
    free = shutil.disk_usage(folder).free
    with open(folder / "filler", "wb") as f:
        f.write(b"\0" * max(free - leave, 0))


def ctrl_c_trial(
    args: list[str], delay: float, log: Path, timeout: float = 30, presses: int = 1, signum: int | None = None
) -> tuple[int | None, float]:
    """`cli_main(args)` in a forked child leading its own process group (as a shell runs a job); `delay` seconds
    after the start, SIGINT to the whole group (what Ctrl-C at a terminal does; `signum`: another signal, e.g. the
    SIGTERM `timeout` or Slurm send to the group), `presses` times 0.1 s apart.
    Returns the exit status (None if it did not end within `timeout`; the child is then killed) and the seconds
    from the first Ctrl-C to the exit."""
    import signal

    from lit_flash.cli import cli_main

    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            os.setpgid(0, 0)
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            # line-buffered onto the log: os._exit (a second Ctrl-C) skips flushing Python's buffers
            sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
            sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
            torch.set_num_threads(1)
            cli_main(list(args))
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
        except BaseException:  # noqa: BLE001 - a traceback in the log, status 1
            import traceback

            traceback.print_exc()
        finally:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # a late press must not raise into pytest's code
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    time.sleep(delay)
    sent = time.monotonic()
    for press in range(presses):
        try:
            os.killpg(pid, signal.SIGINT if signum is None else signum)
        except ProcessLookupError:
            break
        if press + 1 < presses:
            time.sleep(0.1)
    deadline = sent + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status), time.monotonic() - sent
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return None, time.monotonic() - sent


class RecordRows(L.Callback):
    """Test-only: append `[epoch, row]` for every training row to a JSON-lines file."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, idx: int) -> None:
        import json

        with open(self.path, "a") as f:
            for row in batch["input_ids"].tolist():
                f.write(json.dumps([trainer.current_epoch, row]) + "\n")
