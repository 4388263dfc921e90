"""A killed run resumes exactly, checkpoints never corrupt, a NaN loss never trains on.

The runs are the CLI (`cli_main`) on a 1-layer, 32-wide GPT-2 on CPU with dropout on, each in a forked child that
the test kills with SIGKILL or SIGTERM; one run goes through `python -m lit_flash` as a real job would. Losses are
compared step by step with an uninterrupted run: CPU kernels on one thread are deterministic, so they must match
to 1e-6 (they are in fact bit-identical).
"""

from __future__ import annotations

import errno
import math
import multiprocessing
import os
import re
import shutil
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from _helpers import (
    RecordLosses,
    SlowSteps,
    checkpoint_step,
    cli_command,
    cli_env,
    ctrl_c_trial,
    fill_disk,
    fork_cli,
    logged,
    make_dataset,
    small_disk,
    snapshot,
    tiny_run_config,
    wait_for_file,
    write_config,
)

from lit_flash import checkpointing
from lit_flash.checkpointing import AtomicCheckpointIO, atomic_torch_save, load_checkpoint_file, partial_path
from lit_flash.cli import cli_main
from lit_flash.datamodule import WikitextDataModule
from lit_flash.errors import LitFlashError, NonFiniteLossError
from lit_flash.module import FlashGPT2LM
from lit_flash.resume import ExactResume, ResumableDataLoader, ResumableSampler

TOLERANCE = 1e-6  # absolute, per logged loss; the runs are in fact bit-identical


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data") / "blocks")


def _config(tmp: Path, root: Path, data_dir: Path, name: str = "run.yaml", slow: float | None = 0.03, **sections):
    config = tiny_run_config(root, data_dir, **sections)
    if slow:  # a little time per step, so that a kill lands between two checkpoints
        slow_steps = {"class_path": "_helpers.SlowSteps", "init_args": {"seconds": slow}}
        config["trainer"]["callbacks"] = [slow_steps]
    return str(write_config(tmp / name, config))


def _finish(proc: multiprocessing.Process, timeout: float = 300) -> int:
    proc.join(timeout)
    assert proc.exitcode is not None, "the run did not finish"
    return proc.exitcode


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    """The reference: 60 steps (1.5 epochs of 40 batches) without interruption."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    root = tmp / "run"
    assert _finish(fork_cli("fit", "--config", _config(tmp, root, data_dir, slow=None))) == 0
    return root


def _assert_same_losses(run: Path, reference: Path, key: str = "train_loss", resumed_at: tuple[int, ...] = ()) -> None:
    """Every step the run logged has the reference's value; only the metrics of the very step a kill interrupted
    (the one before a resume point, logged just after its checkpoint was written) may be missing."""
    got, want = logged(run, key), logged(reference, key)
    assert set(got) <= set(want) and set(want) - set(got) <= {step - 1 for step in resumed_at}, f"{key}: steps differ"
    worst = max(abs(got[s] - want[s]) for s in got)
    assert worst <= TOLERANCE, f"{key} differs by up to {worst} after the resume"


def _assert_same_weights(run: Path, reference: Path) -> None:
    from safetensors.torch import load_file

    got, want = load_file(run / "model" / "model.safetensors"), load_file(reference / "model" / "model.safetensors")
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=TOLERANCE)


# ------------------------------------------------------------------------------------------------ resume


@pytest.mark.slow
def test_sigkill_twice_then_resume_matches_uninterrupted(
    tmp_path: Path, data_dir: Path, uninterrupted: Path, capfd: pytest.CaptureFixture
) -> None:
    root = tmp_path / "run"
    config = _config(tmp_path, root, data_dir)
    ckpts = root / "checkpoints"

    # 1. killed mid-epoch (epoch 0 has 40 batches) some time after the step-20 checkpoint
    proc = fork_cli("fit", "--config", config)
    wait_for_file(ckpts / "epoch=0-step=20.ckpt", proc)
    os.kill(proc.pid, signal.SIGKILL)
    assert _finish(proc) == -signal.SIGKILL
    first_resume = checkpoint_step(ckpts / "last.ckpt")  # step 10 if the kill fell between step=20.ckpt and last
    assert first_resume >= 10

    # 2. `--ckpt_path last` (Lightning's), killed again after the epoch boundary
    proc = fork_cli("fit", "--config", config, "--ckpt_path", "last")
    wait_for_file(ckpts / "epoch=1-step=50.ckpt", proc)
    os.kill(proc.pid, signal.SIGKILL)
    assert _finish(proc) == -signal.SIGKILL
    newest = max(ckpts.glob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    second_resume = checkpoint_step(newest)
    assert second_resume >= 50

    # 3. the automatic mode a restarted job uses: picks up the newest checkpoint by itself, and says so
    capfd.readouterr()
    assert _finish(fork_cli("fit", "--config", config, "--ckpt_path", "auto")) == 0
    assert f"resuming from {newest}" in capfd.readouterr().out

    # each resume starts at the checkpoint's step: its log's first step is that one
    versions = sorted((root / "logs").glob("version_*"))
    assert len(versions) == 3
    assert min(logged_version(versions[1])) == first_resume
    assert min(logged_version(versions[2])) == second_resume
    _assert_same_losses(root, uninterrupted, resumed_at=(first_resume, second_resume))
    # Validation: equal wherever it ran. Lightning does not re-run a validation that was due at the very step of
    # the checkpoint a run resumes from, so that one may be missing.
    _assert_same_losses(root, uninterrupted, "val_loss", resumed_at=(first_resume, second_resume))
    _assert_same_weights(root, uninterrupted)
    # the export is safetensors only
    assert not list((root / "model").glob("*.bin"))


def logged_version(version: Path) -> list[int]:
    import csv

    with open(version / "metrics.csv") as f:
        return [int(row["step"]) for row in csv.DictReader(f) if row.get("train_loss")]


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_the_resume_matches(tmp_path: Path, data_dir: Path, uninterrupted: Path) -> None:
    """A preemption's SIGTERM on the real entry point (`python -m lit_flash`): the running batch finishes,
    `last.ckpt` is written at that step, the exit status is 143; the resumed run matches the uninterrupted one."""
    import subprocess

    root = tmp_path / "run"
    config = _config(tmp_path, root, data_dir, slow=0.1)
    log = tmp_path / "job.log"
    with open(log, "w") as out:
        job = subprocess.Popen(
            cli_command("fit", "--config", config),
            env=cli_env(OMP_NUM_THREADS="1"),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for_file(root / "checkpoints" / "epoch=0-step=10.ckpt", job, timeout=300)
        time.sleep(0.5)  # a few steps (0.1 s each) past that checkpoint
        job.send_signal(signal.SIGTERM)
        assert job.wait(timeout=120) == 143
    finally:
        job.kill()
    output = log.read_text()
    assert "stopped by SIGTERM" in output
    stopped_at = checkpoint_step(root / "checkpoints" / "last.ckpt")
    # saved after the last batch that ran: every logged step is before it, nothing was lost
    assert stopped_at > 10 and max(logged(root)) == stopped_at - 1
    assert f"SIGTERM at step {stopped_at}" in output

    assert _finish(fork_cli("fit", "--config", config, "--ckpt_path", "auto")) == 0
    _assert_same_losses(root, uninterrupted)
    _assert_same_weights(root, uninterrupted)


@pytest.mark.slow
def test_sigterm_on_an_epochs_last_batch_resumes_with_the_whole_next_epoch(
    tmp_path: Path, data_dir: Path, uninterrupted: Path
) -> None:
    """Step 40 is epoch 0's last batch: Lightning finishes the epoch before it stops, so `last.ckpt` holds an ended
    epoch. The resume must train all of epoch 1 (Lightning 2.6 alone ended it after one batch, two epochs on)."""
    root = tmp_path / "run"
    stop = tiny_run_config(root, data_dir)
    stop["trainer"]["callbacks"] = [{"class_path": "_helpers.SigtermAt", "init_args": {"step": 40}}]
    assert _finish(fork_cli("fit", "--config", str(write_config(tmp_path / "stop.yaml", stop)))) != 0
    assert checkpoint_step(root / "checkpoints" / "last.ckpt") == 40
    assert _finish(fork_cli("fit", "--config", _config(tmp_path, root, data_dir, slow=None), "--ckpt_path",
                            "last")) == 0
    assert logged(root, "epoch") == logged(uninterrupted, "epoch")
    _assert_same_losses(root, uninterrupted)
    _assert_same_weights(root, uninterrupted)


@pytest.mark.slow
def test_a_run_ended_by_max_steps_on_an_epochs_last_batch_trains_longer_through_the_whole_next_epoch(
    tmp_path: Path, data_dir: Path
) -> None:
    """The `last.ckpt` a finished run leaves (written after fit, its epoch ended), trained longer: every batch of
    the next epoch runs, in the next epoch."""
    root = tmp_path / "run"
    every_15 = {"every_n_train_steps": 15}  # step 40 is no periodic checkpoint: last.ckpt is written after fit
    assert _finish(fork_cli("fit", "--config", _config(tmp_path, root, data_dir, slow=None, checkpoint=every_15,
                                                        trainer={"max_steps": 40}))) == 0
    assert _finish(fork_cli("fit", "--config", _config(tmp_path, root, data_dir, slow=None, checkpoint=every_15,
                                                        trainer={"max_steps": 80}), "--ckpt_path", "last")) == 0
    epochs = logged(root, "epoch")
    assert [s for s in epochs if epochs[s] == 1] == list(range(40, 80))  # 40 batches an epoch


def test_fresh_fit_refuses_to_overwrite_an_earlier_runs_checkpoints(
    tmp_path: Path, uninterrupted: Path, data_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    root = tmp_path / "run"
    shutil.copytree(uninterrupted, root)
    before = snapshot(root)
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", _config(tmp_path, root, data_dir, slow=None)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--ckpt_path last (or auto)" in err and "already holds checkpoints" in err
    assert snapshot(root) == before


def _fake_checkpoint(path: Path, step: int, weights_only: bool = False) -> Path:
    state = {"global_step": step, "state_dict": {"w": torch.zeros(4)}}
    torch.save(state if weights_only else {**state, "optimizer_states": [{}]}, path)
    return path


def test_auto_without_a_checkpoint_starts_from_scratch(tmp_path: Path, data_dir: Path, capsys) -> None:
    from lit_flash.checkpointing import resolve_ckpt_path

    assert resolve_ckpt_path("auto", tmp_path / "none", "fit") is None
    assert "starting from scratch" in capsys.readouterr().out
    _fake_checkpoint(tmp_path / "last.ckpt", 10)
    assert resolve_ckpt_path("auto", tmp_path, "fit") == str(tmp_path / "last.ckpt")
    _fake_checkpoint(tmp_path / "step=20.ckpt", 20)  # a kill fell between this one and last.ckpt
    assert resolve_ckpt_path("auto", tmp_path, "fit") == str(tmp_path / "step=20.ckpt")
    assert resolve_ckpt_path("last", tmp_path, "fit") == "last"  # Lightning resolves this one
    with pytest.raises(LitFlashError, match="--ckpt_path last: no checkpoint in .*none yet; use --ckpt_path auto"):
        resolve_ckpt_path("last", tmp_path / "none", "fit")  # unlike auto, last means: resume


def test_auto_picks_the_highest_step_not_the_newest_file_time(tmp_path: Path, capsys) -> None:
    """A copy or a restore from backup reshuffles file times: `auto` goes by the step stored inside (issue 16, 8)."""
    from lit_flash.checkpointing import resolve_ckpt_path

    for step in (2, 4, 6):
        _fake_checkpoint(tmp_path / f"step={step}.ckpt", step)
    _fake_checkpoint(tmp_path / "last.ckpt", 6)
    now = time.time()
    for age, name in enumerate(("step=2.ckpt", "step=4.ckpt", "last.ckpt", "step=6.ckpt")):
        os.utime(tmp_path / name, (now - 100 * age, now - 100 * age))  # step=2 now looks the newest
    assert resolve_ckpt_path("auto", tmp_path, "fit") == str(tmp_path / "last.ckpt")  # step 6; last wins a tie


def test_auto_skips_a_zero_byte_or_corrupt_checkpoint_and_says_so(tmp_path: Path, capsys) -> None:
    from lit_flash.checkpointing import resolve_ckpt_path

    _fake_checkpoint(tmp_path / "step=4.ckpt", 4)
    good = _fake_checkpoint(tmp_path / "step=6.ckpt", 6)
    (tmp_path / "last.ckpt").write_bytes(b"")  # a crash of the filesystem, not of the atomic save
    (tmp_path / "step=8.ckpt").write_bytes(good.read_bytes()[:100])  # truncated
    capsys.readouterr()
    assert resolve_ckpt_path("auto", tmp_path, "fit") == str(good)
    err = capsys.readouterr().err
    assert f"skipping {tmp_path / 'last.ckpt'}" in err and f"skipping {tmp_path / 'step=8.ckpt'}" in err
    for path in tmp_path.glob("step=[46].ckpt"):
        path.write_bytes(b"junk")
    with pytest.raises(LitFlashError, match="none of the 4 checkpoints .* can be read"):
        resolve_ckpt_path("auto", tmp_path, "fit")


@pytest.mark.slow
def test_a_second_fit_into_the_same_folder_names_the_process_holding_it(
    tmp_path: Path, data_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    """Issue 16, item 7: two fits into one folder interleaved their checkpoints; now the second one stops at once.
    A lock left by a killed run does not block the resume."""
    root = tmp_path / "run"
    config = _config(tmp_path, root, data_dir, slow=0.5, trainer={"max_steps": 30})
    first = fork_cli("fit", "--config", config)
    try:
        wait_for_file(root / "checkpoints" / "epoch=0-step=10.ckpt", first)
        with pytest.raises(SystemExit) as exit_info:
            cli_main(["fit", "--config", config, "--ckpt_path", "auto"])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and len(err.strip().splitlines()) == 1
        assert f"in use by another lit_flash fit (PID {first.pid} " in err and "trainer.default_root_dir" in err
        assert not list((root / "checkpoints").glob("*-v1.ckpt"))
    finally:
        os.kill(first.pid, signal.SIGKILL)
        first.join()
    # the killed run's lock file is still there, but the kernel released its lock
    assert (root / ".lit_flash.lock").is_file()
    assert _finish(fork_cli("fit", "--config", config, "--ckpt_path", "auto", "--trainer.callbacks=[]")) == 0
    assert checkpoint_step(root / "checkpoints" / "last.ckpt") == 30


@pytest.mark.slow
def test_a_run_folder_moved_elsewhere_resumes_into_last_ckpt_not_last_v1(
    tmp_path: Path, uninterrupted: Path, data_dir: Path
) -> None:
    root = tmp_path / "moved"
    shutil.copytree(uninterrupted, root)
    config = _config(tmp_path, root, data_dir, slow=None, trainer={"max_steps": 70})
    cli_main(["fit", "--config", config, "--ckpt_path", "last"])
    checkpoints = root / "checkpoints"
    assert not list(checkpoints.glob("*-v*.ckpt"))
    assert checkpoint_step(checkpoints / "last.ckpt") == 70


def test_help_explains_ckpt_path_auto_last_and_weights_only_unset(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        cli_main(["fit", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "`auto`: the intact checkpoint with the highest step" in text and "`last`: that folder's last.ckpt" in text
    assert "Unset (null) or true: the checkpoint is loaded with torch.load(weights_only=True)" in text


CTRL_C_TRIALS = int(os.environ.get("LIT_FLASH_CTRL_C_TRIALS", "3"))  # 100 for the report in docs/reliability.md


@pytest.mark.slow
def test_ctrl_c_at_random_moments_saves_says_how_to_resume_and_exits_within_seconds(
    tmp_path: Path, data_dir: Path
) -> None:
    """Issue 16, item 4: SIGINT to the process group at random moments (set-up, training, right after a checkpoint)
    used to hang in TensorBoard's writer. Every trial must exit with 130 within 30 s, say how to resume, and leave
    a loadable last.ckpt whenever training had started; the last trial's folder must resume to the end."""
    import random

    rng = random.Random(16)
    slow_results = []
    saved = 0
    for trial in range(CTRL_C_TRIALS):
        root = tmp_path / f"trial{trial}"
        config = _config(tmp_path, root, data_dir, name=f"trial{trial}.yaml", slow=0.05, trainer={"max_steps": 200})
        log = tmp_path / f"trial{trial}.log"
        code, seconds = ctrl_c_trial(["fit", "--config", config], delay=rng.uniform(0.3, 4.0), log=log)
        output = log.read_text()
        slow_results.append(seconds)
        assert code == 130, f"trial {trial}: exit {code} after {seconds:.1f} s\n{output[-3000:]}"
        assert "stopped by Ctrl-C" in output and "Traceback" not in output, output[-3000:]
        last = root / "checkpoints" / "last.ckpt"
        if "stopped by Ctrl-C at step" in output:  # stopped inside the training loop: last.ckpt holds that step
            step = int(output.split("stopped by Ctrl-C at step ")[1].split(":")[0])
            assert checkpoint_step(last) == step and "--ckpt_path last (or auto) added to this same" in output
            saved += 1
        else:
            assert "nothing new was saved" in output, output[-3000:]
        assert not list(root.rglob(".*.partial"))
    print(
        f"{CTRL_C_TRIALS} Ctrl-C trials passed ({saved} saved last.ckpt mid-training, {CTRL_C_TRIALS - saved} "
        f"stopped before training); slowest exit {max(slow_results):.1f} s"
    )
    assert _finish(fork_cli("fit", "--config", config, "--ckpt_path", "auto", "--trainer.callbacks=[]")) == 0
    assert checkpoint_step(root / "checkpoints" / "last.ckpt") == 200


@pytest.mark.slow  # a whole CLI run in a subprocess
def test_sigterm_to_the_process_group_with_loader_workers_saves_and_exits_143(tmp_path: Path, data_dir: Path) -> None:
    """`timeout`, systemd and Slurm send SIGTERM to the whole group: the DataLoader workers died of it, the batch
    being fetched failed (`DataLoader worker ... is killed by signal: Terminated`, exit 1) and nothing was saved."""
    import signal

    root = tmp_path / "run"
    config = _config(tmp_path, root, data_dir, slow=0.05, trainer={"max_steps": 400}, data={"num_workers": 2})
    log = tmp_path / "term.log"
    code, _ = ctrl_c_trial(["fit", "--config", config], delay=12.0, log=log, signum=signal.SIGTERM)
    output = log.read_text()
    assert code == 143, output[-3000:]
    assert "stopped by SIGTERM at step" in output and "Traceback" not in output, output[-3000:]
    step = int(output.split("stopped by SIGTERM at step ")[1].split(":")[0])
    assert step > 0 and checkpoint_step(root / "checkpoints" / "last.ckpt") == step


@pytest.mark.slow  # a whole CLI run in a subprocess
def test_a_fit_with_loader_workers_exits_when_it_ends(tmp_path: Path, data_dir: Path) -> None:
    """The workers ignore SIGTERM (above); multiprocessing's exit hook stops daemonic children with SIGTERM and waits
    for them, so a finished fit with persistent workers never exited."""
    import subprocess

    config = _config(tmp_path, tmp_path / "run", data_dir, slow=None, trainer={"max_steps": 3},
                     data={"num_workers": 2})
    proc = subprocess.run(cli_command("fit", "--config", config), env=cli_env(), capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_ctrl_c_while_the_cli_imports_is_one_line_and_exit_130(tmp_path: Path) -> None:
    """A Ctrl-C in the first seconds, while torch and Lightning import, printed the import's traceback."""
    import signal
    import subprocess

    proc = subprocess.Popen(cli_command("fit", "--trainer.default_root_dir", str(tmp_path / "run")),
                            env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.8)  # Python is up (its SIGINT handler installed); torch and Lightning take seconds to import
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    # 130, or ended by the signal itself (a library's import may re-raise it): a shell shows 130 for both
    assert proc.returncode in (130, -signal.SIGINT), err[-3000:]
    assert "Traceback" not in err and "nothing was saved" in err.strip().splitlines()[-1]
    assert not (tmp_path / "run").exists()


@pytest.mark.slow  # a whole CLI run in a subprocess
def test_a_second_ctrl_c_exits_at_once(tmp_path: Path, data_dir: Path) -> None:
    """Steps of 2 s: the first Ctrl-C waits for the running one; the second, 0.1 s later, does not."""
    config = _config(tmp_path, tmp_path / "run", data_dir, slow=2.0, trainer={"max_steps": 200})
    log = tmp_path / "twice.log"
    code, seconds = ctrl_c_trial(["fit", "--config", config], delay=6.0, log=log, presses=2)
    output = log.read_text()
    assert code == 130 and seconds < 1.5, output[-3000:]
    assert "second Ctrl-C: exiting now without saving" in output, output[-3000:]


# ------------------------------------------------------------------------------------- data position


def test_resumable_loader_continues_mid_epoch_with_the_same_batches() -> None:
    data = torch.arange(50)
    full = ResumableDataLoader(data, batch_size=4, sampler=ResumableSampler(data, seed=3))
    full.sampler.set_epoch(2)
    reference = [b.tolist() for b in full]
    assert sorted(sum(reference, [])) == list(range(50))  # a permutation of the epoch
    full.sampler.set_epoch(3)
    assert [b.tolist() for b in full] != reference  # a new order each epoch

    stopped = ResumableDataLoader(data, batch_size=4, sampler=ResumableSampler(data, seed=3))
    stopped.sampler.set_epoch(2)
    it = iter(stopped)
    seen = [next(it).tolist() for _ in range(5)]
    state = stopped.state_dict()
    assert state == {"epoch": 2, "batches": 5, "rows": 20, "batch_size": 4, "replicas": 1}

    resumed = ResumableDataLoader(data, batch_size=4, sampler=ResumableSampler(data, seed=3))
    resumed.load_state_dict(state)
    assert seen + [b.tolist() for b in resumed] == reference
    assert len([*resumed]) == len(reference)  # only the first pass after a restore skips

    # saved after the epoch's last batch: the next pass is the next epoch from its start
    resumed.load_state_dict({"epoch": 2, "batches": len(reference)})
    assert resumed.sampler.epoch == 3 and len([*resumed]) == len(reference)

    # another number of processes shards the epoch differently: that epoch starts over, with a warning
    with pytest.warns(UserWarning, match="starts over"):
        resumed.load_state_dict({"epoch": 2, "batches": 5, "replicas": 2})
    assert len([*resumed]) == len(reference)

    # another batch size: the epoch continues at the same row (issue 16, item 9); Lightning, which restores its
    # count of 5 batches, gets a length that covers them plus the 3 batches of 10 left
    larger = ResumableDataLoader(data, batch_size=10, sampler=ResumableSampler(data, seed=3))
    with pytest.warns(UserWarning, match="continues at row 20 of 50"):
        larger.load_state_dict(state)
    assert len(larger) == 5 + 3
    assert sum(seen, []) + sum((b.tolist() for b in larger), []) == sum(reference, [])


def test_datamodule_trains_through_the_resumable_loader(tmp_path: Path, data_dir: Path) -> None:
    dm = WikitextDataModule(tokenized_dataset_load_dir=str(data_dir), tokenizer_name=None, batch_size=4)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert isinstance(loader, ResumableDataLoader) and isinstance(loader.sampler, ResumableSampler)
    assert loader.sampler.num_replicas == 1 and len(loader) == 40


def _rows_of_epoch_0(path: Path) -> list[tuple[int, ...]]:
    import json

    return [tuple(row) for line in path.read_text().splitlines() for epoch, row in [json.loads(line)] if epoch == 0]


@pytest.mark.slow
def test_resume_with_a_larger_batch_size_continues_at_the_same_row(tmp_path: Path, data_dir: Path) -> None:
    """Issue 16, item 9: resumed mid-epoch with another batch size, every row of the epoch is trained on exactly
    once (it skipped the rest of the epoch: Lightning's restored batch count already equalled the new length)."""
    from collections import Counter

    import datasets

    root = tmp_path / "run"
    record = {"class_path": "_helpers.RecordRows", "init_args": {"path": str(tmp_path / "a.jsonl")}}
    config = tiny_run_config(root, data_dir, trainer={"max_steps": 20, "callbacks": [record]})
    cli_main(["fit", "--config", str(write_config(tmp_path / "a.yaml", config))])  # 20 batches of 4: 80 of 160 rows
    record["init_args"]["path"] = str(tmp_path / "b.jsonl")
    config["trainer"].update(max_steps=35)  # 10 batches of 8 end epoch 0, 5 more in epoch 1
    config["data"]["batch_size"] = 8
    with pytest.warns(UserWarning, match="continues at row 80 of 160"):
        cli_main(["fit", "--config", str(write_config(tmp_path / "b.yaml", config)), "--ckpt_path", "last"])
    rows = _rows_of_epoch_0(tmp_path / "a.jsonl") + _rows_of_epoch_0(tmp_path / "b.jsonl")
    train = datasets.load_from_disk(str(data_dir))["train"]["input_ids"]
    assert Counter(rows) == Counter(tuple(row) for row in train)


@pytest.mark.slow
def test_train_longer_continues_the_learning_rate_schedule_without_a_jump(
    tmp_path: Path, uninterrupted: Path, data_dir: Path
) -> None:
    """Issue 16, item 9: resumed at step 20 of a 60-step cosine schedule with max_steps=100, the learning rate
    went from the old schedule's value to the value a 100-step schedule has at step 20 (a jump). Now it goes on
    from where it was, and the rest of the decay is stretched to end at step 100."""
    root = tmp_path / "longer"
    shutil.copytree(uninterrupted, root)
    for path in (root / "checkpoints").glob("*.ckpt"):
        if checkpoint_step(path) > 20:
            path.unlink()
    shutil.rmtree(root / "model")
    config = _config(tmp_path, root, data_dir, slow=None, trainer={"max_steps": 100})
    with pytest.warns(UserWarning, match="stretched to end at step 100"):
        cli_main(["fit", "--config", config, "--ckpt_path", str(root / "checkpoints" / "epoch=0-step=20.ckpt")])
    key = "lr-AdamW/pg1"
    before, after = logged(uninterrupted, key), logged(root, key)
    assert after[20] == pytest.approx(before[20], rel=1e-6)  # the same learning rate at the resume step
    steps = sorted(s for s in after if s >= 6)  # after the warm-up
    changes = [after[a] - after[b] for b, a in zip(steps, steps[1:], strict=False)]
    largest_before = max(abs(before[a] - before[a - 1]) for a in range(7, 60))
    assert all(-largest_before <= change <= 0 for change in changes)  # decays, never faster than the original
    assert after[max(after)] < 0.01 * max(after.values())  # and ends at step 100


def test_a_finished_run_trained_longer_runs_its_schedule_again_from_zero(
    tmp_path: Path, uninterrupted: Path, data_dir: Path
) -> None:
    """Issue 16, item 9: "train longer" after a finished run (cosine, ended at a rate of 0) kept the rate at 0, so
    the extra steps trained nothing. Now the schedule runs once more over the new steps: its warm-up from 0 (no
    jump), its peak, and its decay to the new end; and the weights move."""
    root = tmp_path / "finished"
    shutil.copytree(uninterrupted, root)
    shutil.rmtree(root / "model")
    config = _config(tmp_path, root, data_dir, slow=None, trainer={"max_steps": 120})
    with pytest.warns(UserWarning, match="runs once more over steps 61-120"):
        cli_main(["fit", "--config", config, "--ckpt_path", "last"])
    key = "lr-AdamW/pg1"
    before, after = logged(uninterrupted, key), logged(root, key)
    peak, first_new = max(before.values()), min(s for s in after if s >= 60)
    assert after[first_new] <= before[1] + 1e-12  # starts from the bottom, as the first run's warm-up did
    rates = [after[s] for s in sorted(after) if s >= 60]
    top = rates.index(max(rates))
    assert max(rates) == pytest.approx(peak, rel=0.05)  # the same peak
    assert all(a <= b for a, b in zip(rates[:top], rates[1 : top + 1], strict=True))  # rises, then
    assert all(a >= b for a, b in zip(rates[top:], rates[top + 1 :], strict=False))  # decays
    assert rates[-1] < 0.01 * peak  # to the new end
    assert logged(root)[max(logged(root))] != logged(uninterrupted)[max(logged(uninterrupted))]


def test_resuming_a_finished_run_at_its_end_says_there_is_nothing_to_train(
    tmp_path: Path, uninterrupted: Path, data_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    """A finished run resumed with the same length ended at once and silently (a restarted job, a repeated
    command): it says so, and neither validates nor rewrites its checkpoint."""
    root = tmp_path / "done"
    shutil.copytree(uninterrupted, root)
    last = (root / "checkpoints" / "last.ckpt").read_bytes()
    rows = len(logged(root, "val_loss"))
    cli_main(["fit", "--config", _config(tmp_path, root, data_dir, slow=None), "--ckpt_path", "auto"])
    assert "lit_flash: nothing to train: the checkpoint is at step 60" in capsys.readouterr().err
    assert (root / "checkpoints" / "last.ckpt").read_bytes() == last
    assert len(logged(root, "val_loss")) == rows  # no validation was run again


# ------------------------------------------------------------------------------------- atomic saves


def _save_forever(path: str) -> None:
    torch.set_num_threads(1)  # OpenMP threads do not survive a fork
    version = 0
    while True:
        version += 1
        atomic_torch_save({"version": version, "weights": torch.full((4_000_000,), float(version))}, path)


@pytest.mark.slow
def test_a_kill_at_any_moment_of_a_save_leaves_a_loadable_checkpoint(tmp_path: Path) -> None:
    """A child saves 16 MB checkpoints over the same file in a loop; it is SIGKILLed 12 times at random moments.
    Every time the file loads and is one whole version; the kills did land mid-write (a `.partial` was left)."""
    path = tmp_path / "last.ckpt"
    atomic_torch_save({"version": 0, "weights": torch.zeros(4_000_000)}, path)
    generator = torch.Generator().manual_seed(0)
    partial_seen, versions = 0, set()
    for _ in range(12):
        child = multiprocessing.get_context("fork").Process(target=_save_forever, args=(str(path),))
        child.start()
        time.sleep(0.05 + 0.3 * torch.rand(1, generator=generator).item())
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        partial_seen += partial_path(path).exists()
        state = load_checkpoint_file(path)
        assert bool((state["weights"] == float(state["version"])).all()), "a checkpoint mixes two saves"
        versions.add(state["version"])
    assert partial_seen >= 1, "no kill landed during a write; the test proves nothing"
    assert len(versions) >= 2


@pytest.mark.slow
def test_disk_full_during_a_save_is_one_line_and_keeps_the_previous_checkpoint(
    tmp_path: Path, uninterrupted: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    root = tmp_path / "run"
    shutil.copytree(uninterrupted, root)
    last = root / "checkpoints" / "last.ckpt"
    before = last.read_bytes()
    real_save = torch.save

    def save_until_full(obj, f, *args, **kwargs):  # writes half, then the disk is full
        real_save(obj, f, *args, **kwargs)
        f.truncate(f.tell() // 2)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpointing.torch, "save", save_until_full)
    config = _config(tmp_path, root, data_dir, slow=None, trainer={"max_steps": 70})
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", config, "--ckpt_path", "last"])
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "is full" in errors[0] and "already there are intact" in errors[0]
    assert last.read_bytes() == before and checkpoint_step(last) == 60
    assert not partial_path(last).exists()


@pytest.mark.slow
def test_a_really_full_disk_during_a_save_is_one_line_and_leaves_no_partial_file(
    tmp_path: Path, uninterrupted: Path, data_dir: Path, capsys
) -> None:
    """On a real full filesystem torch's zip writer fails with a RuntimeError, not an OSError (issue 16, item 5)."""
    with small_disk(tmp_path / "disk", size=16 << 20) as disk:
        root = disk / "run"
        shutil.copytree(uninterrupted, root)
        last = root / "checkpoints" / "last.ckpt"
        before = last.read_bytes()
        fill_disk(disk, leave=len(before) // 2)  # room for the logs, not for another checkpoint
        config = _config(tmp_path, root, data_dir, slow=None, trainer={"max_steps": 70})
        with pytest.raises(SystemExit) as exit_info:
            cli_main(["fit", "--config", config, "--ckpt_path", "last"])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "is full" in errors[0] and "free space" in errors[0], err
        assert "Traceback" not in err
        assert last.read_bytes() == before
        assert not list((root / "checkpoints").glob(".*.partial"))


def test_truncated_or_corrupted_checkpoint_is_a_clear_error(tmp_path: Path, uninterrupted: Path) -> None:
    data = (uninterrupted / "checkpoints" / "last.ckpt").read_bytes()
    (tmp_path / "truncated.ckpt").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.ckpt").write_bytes(b"not a checkpoint" * 100)
    for name in ("truncated.ckpt", "garbage.ckpt"):
        with pytest.raises(LitFlashError, match="truncated or corrupted"):
            AtomicCheckpointIO().load_checkpoint(tmp_path / name)


def test_checkpoints_load_with_weights_only(tmp_path: Path, uninterrupted: Path) -> None:
    # What the CLI writes loads with weights_only=True (the default here); a pickle of arbitrary objects does not.
    assert load_checkpoint_file(uninterrupted / "checkpoints" / "last.ckpt")["global_step"] == 60
    torch.save({"state_dict": {}, "evil": SlowSteps()}, tmp_path / "objects.ckpt")
    with pytest.raises(LitFlashError, match="--weights_only false"):
        load_checkpoint_file(tmp_path / "objects.ckpt")
    assert isinstance(load_checkpoint_file(tmp_path / "objects.ckpt", weights_only=False)["evil"], SlowSteps)


# ------------------------------------------------------------------------------------ non-finite loss


class NaNAtBatch(FlashGPT2LM):
    """The training loss is NaN on one batch."""

    nan_batch = 3

    def training_step(self, batch, batch_idx):
        self._batch_idx = batch_idx
        return super().training_step(batch, batch_idx)

    def _loss(self, batch, training):
        loss, n = super()._loss(batch, training)
        if training and self._batch_idx == self.nan_batch:
            loss = loss * float("nan")
        return loss, n


def _tiny_trainer(tmp_path: Path, data_dir: Path, on_nonfinite: str, callbacks=()):
    model = NaNAtBatch(
        model_name_or_path=None,
        model_config={"vocab_size": 300, "n_positions": 32, "n_embd": 32, "n_layer": 1, "n_head": 2},
        attn_implementation="sdpa",
        on_nonfinite=on_nonfinite,
    )
    dm = WikitextDataModule(tokenized_dataset_load_dir=str(data_dir), tokenizer_name=None, batch_size=4)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=6, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, limit_val_batches=0, callbacks=list(callbacks),
    )
    return trainer, model, dm


def test_nonfinite_loss_stops_before_the_update_naming_the_step(tmp_path: Path, data_dir: Path) -> None:
    trainer, model, dm = _tiny_trainer(tmp_path, data_dir, "stop")
    with pytest.raises(NonFiniteLossError, match=r"train_loss is nan at step 3 .*model.on_nonfinite=skip"):
        trainer.fit(model, dm)
    assert trainer.global_step == 3
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.slow
def test_nonfinite_loss_on_gpu_stops_at_the_next_log_step_or_checkpoint(
    tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The deferred check the GPU takes (simulated on CPU): the NaN at step 3 is named at the next logging step
    (step 4 with log_every_n_steps=5), or at the next checkpoint, which is then not written."""
    monkeypatch.setattr(FlashGPT2LM, "_host_reads_stall", staticmethod(lambda tensor: True))
    trainer, model, dm = _tiny_trainer(tmp_path, data_dir, "stop")
    trainer.log_every_n_steps = 5
    with pytest.raises(NonFiniteLossError, match=r"NaN/inf at step 3 .*model.on_nonfinite=skip"):
        trainer.fit(model, dm)
    assert trainer.global_step == 4  # not stopped at step 3: no per-step sync

    trainer, model, dm = _tiny_trainer(tmp_path, data_dir, "stop")
    trainer.log_every_n_steps = 5

    def save(*args) -> None:
        trainer.save_checkpoint(tmp_path / f"{trainer.global_step}.ckpt")

    model.on_train_batch_end = save
    with pytest.raises(NonFiniteLossError, match=r"NaN/inf at step 3"):
        trainer.fit(model, dm)
    assert sorted(p.name for p in tmp_path.glob("*.ckpt")) == ["1.ckpt", "2.ckpt", "3.ckpt"]
    # Each rank keeps its own record: DDP overwrites every buffer with rank 0's before each forward.
    assert int(model.first_nonfinite_step) == 3
    assert all(b is not model.first_nonfinite_step for b in model.buffers())
    # The same module fitted again (a notebook after the error: weights reloaded from the last good checkpoint, no
    # NaN batch) does not stop on the old record.
    model.load_state_dict(torch.load(tmp_path / "3.ckpt", weights_only=True)["state_dict"])
    model.nan_batch = -1
    trainer, _, dm = _tiny_trainer(tmp_path / "again", data_dir, "stop")
    trainer.log_every_n_steps = 1
    trainer.fit(model, dm)
    assert trainer.global_step == 6


def test_deferred_nonfinite_check_runs_before_the_export(
    tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A NaN after the last logging step (GPU's deferred check, simulated) stops the run before the HF export."""
    from lit_flash.callbacks import HFExport

    monkeypatch.setattr(FlashGPT2LM, "_host_reads_stall", staticmethod(lambda tensor: True))
    trainer, model, dm = _tiny_trainer(tmp_path, data_dir, "stop", [HFExport(dirname=str(tmp_path / "model"))])
    trainer.log_every_n_steps = 50  # no logging step in these 6 steps
    with pytest.raises(NonFiniteLossError, match=r"NaN/inf at step 3"):
        trainer.fit(model, dm)
    assert not (tmp_path / "model").exists()


class RecordParams(L.Callback):
    def __init__(self, batch: int) -> None:
        self.batch, self.before, self.after = batch, None, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.batch:
            self.before = [p.detach().clone() for p in pl_module.parameters()]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == self.batch:
            self.after = [p.detach().clone() for p in pl_module.parameters()]


def test_nonfinite_loss_skip_mode_skips_only_that_batch(tmp_path: Path, data_dir: Path) -> None:
    record = RecordParams(NaNAtBatch.nan_batch)
    trainer, model, dm = _tiny_trainer(tmp_path, data_dir, "skip", [record])
    with pytest.warns(UserWarning, match=r"train_loss is nan at step 3 .*skipped the batch"):
        trainer.fit(model, dm)
    assert trainer.global_step == 6  # 7 batches, one skipped
    assert all(torch.equal(a, b) for a, b in zip(record.before, record.after, strict=True))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_nonfinite_loss_through_the_cli_is_one_line(
    tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.setattr(FlashGPT2LM, "_loss", lambda self, batch, training: (torch.tensor(math.inf), torch.tensor(1)))
    config = _config(tmp_path, tmp_path / "run", data_dir, slow=None)
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", config])
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert errors == [errors[0]] and "train_loss is inf at step 0" in errors[0]


# --------------------------------------------------------------------------------------------- safety


def test_trust_remote_code_is_off_unless_set(tmp_path: Path) -> None:
    """A local model folder whose config asks for its own code: without trust_remote_code, the code never runs."""
    folder = tmp_path / "remote"
    folder.mkdir()
    marker = tmp_path / "code-ran"
    (folder / "config.json").write_text(
        '{"model_type": "evil", "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.Evil"}}'
    )
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    with pytest.raises(LitFlashError, match="model.model_name_or_path"):
        FlashGPT2LM(model_name_or_path=str(folder), attn_implementation="sdpa")
    assert not marker.exists()
    assert ExactResume  # the callbacks the CLI adds import cleanly


# ----------------------------------------------------------------------------------------------- soak


@pytest.mark.slow
def test_soak_2000_steps_on_the_demo_with_kills_ends_like_an_uninterrupted_run(tmp_path: Path) -> None:
    """The demo config (stdlib text, a BPE tokenizer trained on it), shrunk to a tiny model: 2,000 steps straight,
    and 2,000 steps SIGKILLed four times at checkpoints and resumed with `ckpt_path=auto` each time."""
    import yaml

    from lit_flash.cli import config_path

    def config(name: str) -> str:
        demo = yaml.safe_load(config_path("demo.yaml").read_text())
        demo["trainer"].update(
            max_steps=2000, val_check_interval=500, log_every_n_steps=1, default_root_dir=str(tmp_path / name),
            enable_progress_bar=False, enable_model_summary=False,
        )
        demo["checkpoint"] = {"every_n_train_steps": 100}
        demo["model"]["model_config"].update(vocab_size=512, n_positions=32, n_embd=32, n_layer=1, n_head=2)
        demo["model"]["dropout"] = 0.1
        demo["data"].update(
            text_files={"train": "{stdlib}/[a-b]*.py", "validation": "{stdlib}/s[a-h]*.py"},
            train_tokenizer_vocab_size=512, block_size=32, batch_size=8, max_eval_samples=64,
            cache_dir=str(tmp_path / "cache"),
        )
        demo["ckpt_path"] = "auto"
        return str(write_config(tmp_path / f"{name}.yaml", demo))

    straight, killed = config("straight"), config("killed")
    assert _finish(fork_cli("fit", "--config", straight), timeout=600) == 0
    ckpts = tmp_path / "killed" / "checkpoints"
    for step in (400, 900, 1300, 1700):
        proc = fork_cli("fit", "--config", killed)
        wait_for_file(ckpts / f"epoch=*-step={step}.ckpt", proc, timeout=600)
        os.kill(proc.pid, signal.SIGKILL)
        assert _finish(proc) == -signal.SIGKILL
    assert _finish(fork_cli("fit", "--config", killed), timeout=600) == 0

    final_straight, final_killed = logged(tmp_path / "straight"), logged(tmp_path / "killed")
    assert max(final_killed) == max(final_straight) == 1999
    assert abs(final_killed[1999] - final_straight[1999]) <= TOLERANCE
    assert logged(tmp_path / "killed", "val_loss")[1999] == pytest.approx(
        logged(tmp_path / "straight", "val_loss")[1999], abs=TOLERANCE
    )
    _assert_same_weights(tmp_path / "killed", tmp_path / "straight")
    assert len(list((tmp_path / "killed" / "logs").glob("version_*"))) == 5


@pytest.mark.slow
def test_grad_scaler_state_is_restored_on_resume(tmp_path: Path, data_dir: Path) -> None:
    """16-mixed's GradScaler (here on CPU, growing its scale every 2 steps) resumes from a step-5 checkpoint with
    its scale and growth tracker, and the losses after the resume equal the uninterrupted run's."""
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.plugins import MixedPrecision

    def run(ckpt: str | None = None) -> tuple[torch.amp.GradScaler, list[float]]:
        torch.manual_seed(0)
        config = {"vocab_size": 300, "n_positions": 32, "n_embd": 32, "n_layer": 1, "n_head": 2}
        model = FlashGPT2LM(model_name_or_path=None, attn_implementation="sdpa", model_config=config)
        dm = WikitextDataModule(tokenized_dataset_load_dir=str(data_dir), tokenizer_name=None, batch_size=4)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
        record = RecordLosses()
        every5 = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=5, save_top_k=-1)
        trainer = L.Trainer(
            accelerator="cpu", max_steps=8, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)],
            logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
            limit_val_batches=0, callbacks=[ExactResume(), record] + ([every5] if ckpt is None else []),
        )
        trainer.fit(model, dm, ckpt_path=ckpt)
        return scaler, record.losses

    straight, straight_losses = run()
    (step5,) = (tmp_path / "ckpt").glob("*step=5.ckpt")
    resumed, resumed_losses = run(str(step5))
    assert straight.get_scale() > 2.0**10  # it grew: there is state to restore
    assert resumed.state_dict() == straight.state_dict()
    assert resumed_losses == pytest.approx(straight_losses[5:], abs=1e-6)


@pytest.mark.parametrize(("world_size", "saved"), [(2, "state"), (2, "old_list"), (1, "old_list")])
def test_each_rank_restores_rank_0s_gpu_rng_state_on_its_own_gpu(monkeypatch, world_size, saved) -> None:
    """Rank 0 saves its own GPU's RNG state; every rank restores it on its current GPU (the ranks are seeded
    alike and draw alike). Checkpoints that held every device's state restore rank 0's own device's entry. The
    CUDA calls are stand-ins here (no GPU on CI): what is checked is which state goes to which call."""
    rank0_gpu, stale_gpu1 = torch.tensor([1], dtype=torch.uint8), torch.tensor([2], dtype=torch.uint8)
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda: rank0_gpu)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state: restored.append(state))
    states = ExactResume().state_dict()
    assert states["cuda"] is rank0_gpu
    if saved == "old_list":
        states["cuda"] = [rank0_gpu, stale_gpu1]
    resumed = ExactResume()
    resumed.load_state_dict(states)
    resumed.on_train_batch_start(SimpleNamespace(world_size=world_size), None, None, 0)
    assert restored == [rank0_gpu]


def test_last_without_a_last_ckpt_is_refused_naming_the_checkpoints_there(tmp_path: Path) -> None:
    """Attack: `--ckpt_path last` over a folder holding step checkpoints but no last.ckpt (deleted, or
    `checkpoint.save_last false`): Lightning warned and restarted at step 0, overwriting them and the export."""
    from lit_flash.checkpointing import resolve_ckpt_path
    from lit_flash.trainer_setup import resume_path

    _fake_checkpoint(tmp_path / "epoch=0-step=3.ckpt", 3)
    _fake_checkpoint(tmp_path / "epoch=0-step=6.ckpt", 6)
    for subcommand in ("fit", "validate"):
        with pytest.raises(LitFlashError, match=r"--ckpt_path last: .* has no last.ckpt, only .*epoch=0-step=6.ckpt"
                           r".*--ckpt_path auto"):
            resolve_ckpt_path("last", tmp_path, subcommand)
    root = tmp_path / "run"
    (root / "checkpoints").mkdir(parents=True)
    _fake_checkpoint(root / "checkpoints" / "epoch=0-step=3.ckpt", 3)
    with pytest.raises(LitFlashError, match="has no last.ckpt"):
        resume_path(root, "last")
    _fake_checkpoint(tmp_path / "last.ckpt", 6)
    assert resolve_ckpt_path("last", tmp_path, "fit") == "last"


def test_a_weights_only_checkpoint_cannot_resume_a_fit(tmp_path: Path) -> None:
    """Attack: after `fit --checkpoint.save_weights_only true`, `fit --ckpt_path auto` picked a weights-only
    checkpoint and Lightning stopped with a KeyError traceback (no optimizer state to restore)."""
    from lit_flash.checkpointing import resolve_ckpt_path

    for name in ("epoch=0-step=3.ckpt", "last.ckpt"):
        _fake_checkpoint(tmp_path / name, 3, weights_only=True)  # no optimizer_states: save_weights_only's
    for how in ("auto", "last", str(tmp_path / "epoch=0-step=3.ckpt")):
        with pytest.raises(LitFlashError, match=rf"--ckpt_path {re.escape(how)}: .*\.ckpt holds the weights only"):
            resolve_ckpt_path(how, tmp_path, "fit")
    assert resolve_ckpt_path("auto", tmp_path, "validate") == str(tmp_path / "last.ckpt")  # fine to evaluate
    _fake_checkpoint(tmp_path / "last.ckpt", 3)
    assert resolve_ckpt_path("last", tmp_path, "fit") == "last"


def test_a_checkpoint_of_another_model_config_is_refused_on_load(tiny_config) -> None:
    """Attack: `fit --ckpt_path auto --model.model_config.n_head 4` over a run trained with n_head 2 loaded the
    same-shaped weights into a different model and trained on, unsaid (a file path warns: LightningCLI swaps)."""
    from _helpers import tiny_module

    config = {"vocab_size": 300, "n_positions": 32, "n_embd": 32, "n_layer": 1, "n_head": 2}
    saved = tiny_module(config)
    checkpoint = {"state_dict": saved.state_dict(), "hyper_parameters": dict(saved.hparams)}
    tiny_module({**config, "resid_pdrop": 0.0}).on_load_checkpoint(dict(checkpoint))  # dropout may change
    with pytest.raises(LitFlashError, match=r"saved with model\.model_config\.n_head=2, this run has 4"):
        tiny_module({**config, "n_head": 4}).on_load_checkpoint(dict(checkpoint))


@pytest.mark.parametrize("count", [1, 3, 5])
def test_a_refused_fresh_fit_names_the_newest_checkpoints_and_how_many_more(tmp_path, count):
    import os

    from lit_flash.checkpointing import resolve_ckpt_path

    for i in range(count):
        path = tmp_path / f"step={i}.ckpt"
        path.write_bytes(b"x")
        os.utime(path, (1000 + i, 1000 + i))  # written in step order
    with pytest.raises(LitFlashError, match="already holds checkpoints of an earlier run") as err:
        resolve_ckpt_path(None, tmp_path, "fit")
    newest = ", ".join(f"step={i}.ckpt" for i in range(max(0, count - 3), count))
    more = f" and {count - 3} more" if count > 3 else ""
    assert f"({newest}{more})" in str(err.value)
