"""`data.streaming=true` resumes where it stopped: no block repeated or skipped, the same batches in the same order,
with and without loader workers, per rank (offline: local text files, one shard per file, as test_streaming.py).

Unit tests drive the DataModule's loader by hand (a batch counts as trained on when the DataModule's
`on_before_batch_transfer` sees it, as in Lightning's loop); the slow ones run the CLI: a resume from a mid-stream
checkpoint, and a run SIGKILLed after a checkpoint and resumed with `--ckpt_path last`.
"""

from __future__ import annotations

import json
import os
import random
import signal
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import pytest
from _helpers import (
    checkpoint_step,
    fork_cli,
    logged,
    print_config,
    run_cli,
    tiny_run_config,
    wait_for_file,
    write_config,
)
from test_streaming import word_level_tokenizer

from lit_flash.cli import cli_main
from lit_flash.datamodule import WikitextDataModule
from lit_flash.errors import LitFlashError
from lit_flash.resume import ResumableDataLoader, ResumableSampler
from lit_flash.stream import POSITION_KEY

BLOCK = 4
BATCH = 3


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], str]:
    """3 files (shards) of unique words in lines of 0-9 words: blocks straddle lines, blank lines are dropped, and
    2 workers get unequal shares (2 files and 1), so one runs out first."""
    tmp = tmp_path_factory.mktemp("shards")
    rng = random.Random(0)
    words, files = [], []
    for f in range(3):
        lines = []
        for i in range(60):
            line = [f"f{f}l{i}w{j}" for j in range(rng.randint(0, 9))]
            words += line
            lines.append(" ".join(line))
        path = tmp / f"part{f}.txt"
        path.write_text("\n".join(lines) + "\n")
        files.append(str(path))
    return files, word_level_tokenizer(tmp, words)


def _datamodule(shards, workers: int, rank: int = 0, world_size: int = 1, **kwargs) -> WikitextDataModule:
    files, tokenizer = shards
    kwargs = {"block_size": BLOCK, "batch_size": BATCH, "num_workers": workers, **kwargs}
    dm = WikitextDataModule(text_files={"train": files}, tokenizer_name=tokenizer, streaming=True, **kwargs)
    # A fitting trainer's public state, as the DataModule reads it (a resume is checked only when fitting).
    dm.trainer = SimpleNamespace(global_rank=rank, world_size=world_size, max_steps=10, state=SimpleNamespace(fn="fit"))
    dm.prepare_data()
    dm.setup("fit")
    return dm


def _train(dm: WikitextDataModule, loader, batches: int | None = None) -> list[list[tuple[int, ...]]]:
    """The blocks of each batch trained on: `batches` of them (all when None), then one more fetched and left, as
    Lightning's loop prefetches it."""
    out, it = [], iter(loader)
    for batch in it:
        dm.on_before_batch_transfer(batch, 0)  # what Lightning calls on the batch it is about to train on
        assert POSITION_KEY not in batch
        out.append([tuple(row.tolist()) for row in batch["input_ids"]])
        if batches is not None and len(out) == batches:
            next(it, None)  # prefetched, never trained on: must come again after a resume
            break
    return out


def _resumed(shards, state: dict, workers: int, **kwargs) -> list[list[tuple[int, ...]]]:
    dm = _datamodule(shards, workers, **kwargs)
    loader = dm.train_dataloader()
    loader.load_state_dict(state)
    return _train(dm, loader)


@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_a_resumed_stream_continues_with_the_next_blocks(shards, workers: int) -> None:
    dm = _datamodule(shards, workers)
    full = _train(dm, dm.train_dataloader())
    blocks = [b for batch in full for b in batch]
    assert len(blocks) == len(set(blocks)) > 40  # unique blocks: a repeat or a skip shows
    for stop in (1, 2, 5, len(full) - 1):  # 2 workers: stops after worker 0 (1, 5) and after worker 1 (2)
        dm = _datamodule(shards, workers)
        loader = dm.train_dataloader()
        first = _train(dm, loader, stop)
        assert first + _resumed(shards, loader.state_dict(), workers) == full, f"stopped after {stop}"
    # a state saved after the last batch: the pass is over, the next one starts the stream again
    dm = _datamodule(shards, workers)
    loader = dm.train_dataloader()
    _train(dm, loader)
    resumed = _datamodule(shards, workers).train_dataloader()
    resumed.load_state_dict(loader.state_dict())
    assert [*resumed] == [] and len([*resumed]) == len(full)
    # stopped in the next pass (epoch): that pass's position, not the last one's
    first = _train(dm, loader, 1)
    assert first + _resumed(shards, loader.state_dict(), workers) == full


def test_each_rank_resumes_its_own_share_of_the_stream(shards) -> None:
    """Rank 1 of 2 (one process playing each rank): the checkpoint holds both ranks' positions, each takes its own."""
    full = [_train(dm, dm.train_dataloader()) for dm in (_datamodule(shards, 0, r, 2) for r in range(2))]
    assert full[0] and full[1] and not set(sum(full[0], [])) & set(sum(full[1], []))
    states = []
    for rank, stop in ((0, 4), (1, 2)):
        dm = _datamodule(shards, 0, rank, 2)
        loader = dm.train_dataloader()
        _train(dm, loader, stop)
        states.append(loader.state_dict())
    assert [s["world_size"] for s in states] == [2, 2]
    saved = {**states[0], "ranks": [states[0]["ranks"][0], states[1]["ranks"][0]]}  # what the gather gives
    assert full[1][:2] + _resumed(shards, saved, 0, rank=1, world_size=2) == full[1]
    assert full[0][:4] + _resumed(shards, saved, 0, rank=0, world_size=2) == full[0]
    with pytest.raises(LitFlashError, match="saved by 2 processes and this run has 1"):
        _resumed(shards, saved, 0)


def test_a_resume_that_cannot_continue_the_stream_says_why(shards) -> None:
    dm = _datamodule(shards, 0)
    loader = dm.train_dataloader()
    first = _train(dm, loader, 5)
    state = loader.state_dict()
    with pytest.raises(LitFlashError, match="data.num_workers=0 and this run has 2: .* resume with data.num_workers=0"):
        _datamodule(shards, 2).train_dataloader().load_state_dict(state)
    with pytest.raises(LitFlashError, match="data.block_size=4 and this run has 8"):
        _datamodule(shards, 0, block_size=8).train_dataloader().load_state_dict(state)
    with pytest.raises(LitFlashError, match="did not stream"):  # a map-style loader's state
        loader.load_state_dict({"epoch": 0, "batches": 3, "rows": 12})
    rows = list(range(12))
    with pytest.raises(LitFlashError, match="saved while streaming: resume it with data.streaming=true"):
        ResumableDataLoader(rows, sampler=ResumableSampler(rows)).load_state_dict(state)
    # another batch size: every block once, in new batches (with a warning)
    with pytest.warns(UserWarning, match="no block skipped or repeated"):
        rest = _resumed(shards, state, 0, batch_size=2)
    full = _train(dm, _datamodule(shards, 0).train_dataloader())
    assert sum(first, []) + sum(rest, []) == sum(full, [])


def test_a_checkpoint_of_a_run_that_did_not_stream_is_refused_by_a_streaming_resume(shards) -> None:
    """Lightning restores no loader state from such a checkpoint, so the stream silently started over: the
    DataModule's own state says how the run read its data."""
    from lit_flash.datamodule import WikitextDataModule

    plain = WikitextDataModule(tokenized_dataset_load_dir="anywhere", tokenizer_name=None)
    assert plain.state_dict() == {"streaming": False, "packing": False}  # in every checkpoint: a resume can tell
    with pytest.raises(LitFlashError, match="the checkpoint was saved by a run that did not stream"):
        _datamodule(shards, 0).load_state_dict(plain.state_dict())
    _datamodule(shards, 0).load_state_dict(_datamodule(shards, 0).state_dict())  # streaming to streaming: fine


def test_a_loader_whose_batches_nobody_records_says_its_position_is_not_tracked(shards) -> None:
    loader = _datamodule(shards, 0).train_dataloader()
    it = iter(loader)
    next(it), next(it)  # Lightning's loop records each batch (the DataModule's hook); one is prefetched
    with pytest.warns(UserWarning, match="position is not tracked"):
        loader.state_dict()


def test_a_checkpoint_from_before_stream_positions_says_the_stream_restarts(shards) -> None:
    dm = _datamodule(shards, 0)
    assert dm.state_dict() == {"streaming": True, "stream_position": True, "packing": False}
    with pytest.warns(UserWarning, match="restarts from its first block"):
        dm.load_state_dict({"streaming": True})
    plain = WikitextDataModule(text_files={"train": shards[0]}, tokenizer_name=shards[1])
    assert plain.state_dict() == {"streaming": False, "packing": False}


# ------------------------------------------------------------------------------------------------ through the CLI

STEPS, EVERY = 24, 7  # 7: the checkpoint falls mid-turn of 2 workers (after worker 0)


@pytest.fixture(scope="module")
def cli_shards(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], str]:
    """4 files of random words from a 200-word vocabulary: ~1,900 tokens, ~240 blocks of 8, all different."""
    tmp = tmp_path_factory.mktemp("cli_shards")
    rng = random.Random(1)
    vocab = [f"w{i}" for i in range(200)]
    files = []
    for f in range(4):
        lines = [" ".join(rng.choices(vocab, k=rng.randint(0, 12))) for _ in range(80)]
        (tmp / f"part{f}.txt").write_text("\n".join(lines) + "\n")
        files.append(str(tmp / f"part{f}.txt"))
    return files, word_level_tokenizer(tmp, vocab)


def _stream_config(tmp: Path, name: str, root: Path, shards, workers: int, record: Path, slow: float = 0.0) -> str:
    files, tokenizer = shards
    callbacks = [{"class_path": "_helpers.RecordRows", "init_args": {"path": str(record)}}]
    if slow:
        callbacks.append({"class_path": "_helpers.SlowSteps", "init_args": {"seconds": slow}})
    config = tiny_run_config(root, tmp, trainer={"max_steps": STEPS, "callbacks": callbacks, "max_epochs": -1})
    config["trainer"].pop("val_check_interval")
    config["checkpoint"] = {"every_n_train_steps": EVERY}
    config["data"] = {
        "text_files": {"train": files}, "tokenizer_name": tokenizer, "streaming": True, "block_size": 8,
        "batch_size": 2, "num_workers": workers,
    }
    return str(write_config(tmp / name, config))


def _rows(path: Path) -> list[tuple[int, ...]]:
    return [tuple(json.loads(line)[1]) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def uninterrupted_stream(tmp_path_factory: pytest.TempPathFactory, cli_shards) -> SimpleNamespace:
    tmp = tmp_path_factory.mktemp("uninterrupted_stream")
    config = _stream_config(tmp, "run.yaml", tmp / "run", cli_shards, 2, tmp / "rows.jsonl")
    cli_main(["fit", "--config", config])
    rows = _rows(tmp / "rows.jsonl")
    assert len(rows) == STEPS * 2 and len(set(rows)) == len(rows)  # unique blocks: a repeat or a skip shows
    return SimpleNamespace(root=tmp / "run", rows=rows, losses=logged(tmp / "run"))


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_a_streaming_run_resumed_mid_stream_trains_on_the_blocks_an_uninterrupted_run_does(
    tmp_path: Path, cli_shards, uninterrupted_stream: SimpleNamespace, workers: int
) -> None:
    """From the uninterrupted run's step-7 checkpoint (2 workers); with 0 workers both runs are this test's own."""
    reference = uninterrupted_stream
    if workers == 0:
        config = _stream_config(tmp_path, "u.yaml", tmp_path / "u", cli_shards, 0, tmp_path / "u.jsonl")
        cli_main(["fit", "--config", config])
        rows, losses = _rows(tmp_path / "u.jsonl"), logged(tmp_path / "u")
        reference = SimpleNamespace(root=tmp_path / "u", rows=rows, losses=losses)
        assert reference.rows != uninterrupted_stream.rows  # 2 workers interleave their shards: another order
    (ckpt,) = (reference.root / "checkpoints").glob(f"*step={EVERY}.ckpt")
    config = _stream_config(tmp_path, "r.yaml", tmp_path / "r", cli_shards, workers, tmp_path / "r.jsonl")
    cli_main(["fit", "--config", config, "--ckpt_path", str(ckpt)])
    assert reference.rows[: EVERY * 2] + _rows(tmp_path / "r.jsonl") == reference.rows
    resumed = logged(tmp_path / "r")
    assert set(resumed) == set(range(EVERY, STEPS))
    assert all(resumed[s] == reference.losses[s] for s in resumed)  # bit-identical: same blocks, same RNG


@pytest.mark.slow
def test_a_streaming_run_killed_after_a_checkpoint_resumes_without_repeating_or_skipping_a_block(
    tmp_path: Path, cli_shards, uninterrupted_stream: SimpleNamespace
) -> None:
    """A real process with 2 loader workers, SIGKILLed after its step-7 checkpoint, resumed with `--ckpt_path last`."""
    root = tmp_path / "run"
    killed = _stream_config(tmp_path, "a.yaml", root, cli_shards, 2, tmp_path / "a.jsonl", slow=0.05)
    proc = fork_cli("fit", "--config", killed)
    wait_for_file(root / "checkpoints" / f"*step={EVERY}.ckpt", proc)
    wait_for_file(root / "checkpoints" / "last.ckpt", proc)  # written just after
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(60)
    assert proc.exitcode == -signal.SIGKILL
    step = checkpoint_step(root / "checkpoints" / "last.ckpt")
    assert EVERY <= step < STEPS
    before = _rows(tmp_path / "a.jsonl")
    assert len(before) >= step * 2  # it trained on past the checkpoint: those blocks must come again, once

    resume = _stream_config(tmp_path, "b.yaml", root, cli_shards, 2, tmp_path / "b.jsonl")
    cli_main(["fit", "--config", resume, "--ckpt_path", "last"])
    trained = before[: step * 2] + _rows(tmp_path / "b.jsonl")
    assert trained == uninterrupted_stream.rows
    assert not [row for row, n in Counter(trained).items() if n > 1]
    losses = logged(root)
    # The rows above are the exact property; the losses agree to within the reliability tests' tolerance (one CI run
    # under heavy load differed in the last digits).
    assert all(abs(losses[s] - uninterrupted_stream.losses[s]) <= 1e-6 for s in range(step, STEPS))


def test_the_streaming_overlay_streams_fineweb_on_the_recipe(capsys: pytest.CaptureFixture) -> None:
    config = print_config("gpt2_flash.yaml", "streaming.yaml", capsys=capsys)
    assert config["data"]["streaming"] is True and config["data"]["dataset_name"] == "HuggingFaceFW/fineweb"
    assert config["trainer"]["max_steps"] > 0 and config["data"]["num_workers"] > 0
    assert config["model"]["model_name_or_path"] == "openai-community/gpt2"  # the recipe's, kept


class RecordRankRows(L.Callback):
    """Test-only (in the DDP subprocesses): each rank appends the rows it trains on to `<prefix><rank>.jsonl`."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, idx: int) -> None:
        with open(f"{self.prefix}{trainer.global_rank}.jsonl", "a") as f:
            for row in batch["input_ids"].tolist():
                f.write(json.dumps([trainer.current_epoch, row]) + "\n")


@pytest.mark.slow
def test_two_ddp_ranks_resume_each_their_own_place_in_the_stream(tmp_path: Path, cli_shards) -> None:
    """A real 2-rank DDP run (gloo; `python -m lit_flash`, Lightning starts rank 1): the checkpoint holds both
    ranks' positions, gathered when it is saved; resumed on 2 ranks, each continues its own share exactly."""
    def run(name: str, *args: str) -> list[list[tuple[int, ...]]]:
        config = _stream_config(tmp_path, f"{name}.yaml", tmp_path / name, cli_shards, 0, tmp_path / "unused.jsonl")
        recorder = {"class_path": "test_stream_resume.RecordRankRows", "init_args": {"prefix": str(tmp_path / name)}}
        proc = run_cli("fit", "--config", config, "--trainer.devices", "2", "--trainer.strategy", "ddp",
                       f"--trainer.callbacks+={json.dumps(recorder)}", *args, timeout=400)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
        return [_rows(tmp_path / f"{name}{rank}.jsonl") for rank in range(2)]

    full = run("full")
    assert all(len(rows) == STEPS * 2 for rows in full) and not set(full[0]) & set(full[1])
    (ckpt,) = (tmp_path / "full" / "checkpoints").glob(f"*step={EVERY}.ckpt")
    import torch

    (saved,) = torch.load(ckpt, weights_only=True)["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert saved["world_size"] == 2 and [r["positions"][0][0] for r in saved["ranks"]] == [EVERY, EVERY]
    resumed = run("resumed", "--ckpt_path", str(ckpt))
    for rank in range(2):
        assert full[rank][: EVERY * 2] + resumed[rank] == full[rank], f"rank {rank}"
