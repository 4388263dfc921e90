"""`configs/gpt2_flash.yaml` as shipped (16-mixed, GradScaler, clipping, fused AdamW, torch.compile with CUDA graphs,
padded vocabulary, one batch shape) on a GPU: compile and graphs cost no correctness.

Run on the GPU machine: `pytest -m gpu tests/gpu/test_recipe_gpu.py -v -s`.
"""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import yaml

from lit_flash.cli import cli_main
from lit_flash.errors import LitFlashError
from lit_flash.synthetic import save_synthetic_dataset

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

RECIPE = Path(__file__).resolve().parents[2] / "configs" / "gpt2_flash.yaml"
VOCAB, BLOCK, N_TRAIN = 1000, 128, 23  # 1000 pads to 1024; batch 2: 12 batches an epoch, the last one short


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_positions=BLOCK, n_embd=128, n_layer=2, n_head=2)
    path = tmp_path_factory.mktemp("hub") / "gpt2-small"
    GPT2LMHeadModel(config).save_pretrained(str(path))  # dropout 0.1, as GPT-2's
    return path


@pytest.fixture(scope="module")
def blocks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("input") / "blocks"
    return save_synthetic_dataset(path, n_train=N_TRAIN, n_test=8, block_size=BLOCK, vocab_size=VOCAB)


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", sys.argv[:1])


def recipe_args(tmp: Path, root: Path, pretrained: Path, blocks: Path, **trainer: Any) -> list[str]:
    overlay = {
        "trainer": {"val_check_interval": 4, "log_every_n_steps": 1, "default_root_dir": str(root),
                    "enable_progress_bar": False, **trainer},
        "checkpoint": {"every_n_train_steps": 4},
        "model": {"model_name_or_path": str(pretrained), "learning_rate": 1e-3},
        "data": {"tokenized_dataset_load_dir": str(blocks), "tokenizer_name": None, "batch_size": 2,
                 "eval_batch_size": 2, "num_workers": 0},
    }
    path = tmp / f"{root.name}.yaml"
    path.write_text(yaml.safe_dump(overlay))
    return ["--config", str(RECIPE), "--config", str(path)]  # after "fit" for a run, alone with run=False


def logged(root: Path, key: str) -> dict[int, float]:
    values: dict[int, float] = {}
    for metrics in sorted(root.glob("logs/version_*/metrics.csv")):
        for row in csv.DictReader(open(metrics)):
            if row.get(key):
                values[int(row["step"])] = float(row[key])
    return values


class ClippedNorms(L.Callback):
    """The gradient norm the optimizer stepped with (a post-step hook: after unscaling and clipping)."""

    def __init__(self) -> None:
        self.norms: list[float] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        def record(*_: Any) -> None:
            grads = [p.grad.float().norm() for p in pl_module.parameters() if p.grad is not None]
            self.norms.append(torch.linalg.vector_norm(torch.stack(grads)).item())

        trainer.optimizers[0].register_step_post_hook(record)


def test_recipe_validates_checkpoints_clips_resumes_and_exports(tmp_path: Path, pretrained: Path, blocks: Path):
    whole = tmp_path / "whole"
    cli = cli_main(recipe_args(tmp_path, whole, pretrained, blocks, max_epochs=2), run=False)
    norms = ClippedNorms()
    cli.trainer.callbacks.append(norms)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    model = cli.model
    assert model.hparams.compile and model.hparams.compile_mode == "reduce-overhead"
    assert str(cli.trainer.precision) == "16-mixed" and cli.trainer.optimizers[0].defaults["fused"]
    assert model.attn_implementation == "flash_attention_2"
    assert cli.trainer.global_step == 24
    val = logged(whole, "val_loss")
    assert len(val) == 6, val  # every 4 batches (12 an epoch, so the last at each epoch's end), 2 epochs
    assert all(math.isfinite(v) for v in val.values())
    assert len(norms.norms) == 24 and max(norms.norms) <= 1.0 + 1e-3, norms.norms  # clipped, true scale
    steps = sorted(int(p.stem.split("step=")[1]) for p in (whole / "checkpoints").glob("*step=*.ckpt"))
    assert steps == [4, 8, 12, 16, 20, 24]

    resumed = tmp_path / "resumed"
    checkpoint = next((whole / "checkpoints").glob("*step=8.ckpt"))
    cli_main(["fit", *recipe_args(tmp_path, resumed, pretrained, blocks, max_epochs=2), "--ckpt_path", str(checkpoint)])
    want, got = logged(whole, "train_loss"), logged(resumed, "train_loss")
    after = {s: v for s, v in want.items() if s >= 8}
    assert sorted(got) == sorted(after)
    # The same batches and dropout masks; GPU kernels with atomics add run-to-run noise of ~1e-4 here.
    diffs = [abs(got[s] - after[s]) for s in after]
    print("resume: max |train_loss diff| =", max(diffs))
    assert max(diffs) < 5e-3, diffs

    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(whole / "model", attn_implementation="flash_attention_2",
                                                    dtype=torch.float16).cuda()
    assert exported.config.vocab_size == VOCAB  # the padding is sliced back off
    ids = torch.tensor([[1, 2, 3, 4]], device="cuda")
    out = exported.generate(ids, max_new_tokens=8, do_sample=False)
    assert out.shape == (1, 12) and int(out.max()) < VOCAB


def test_recipe_never_syncs_the_gpu_between_log_steps(tmp_path: Path, pretrained: Path, blocks: Path):
    """16-mixed's GradScaler, clipping and the fused step included: torch raises on any host-device sync."""
    every, steps, settle = 5, 11, 2

    class NoSync(L.Callback):
        def on_train_batch_start(self, trainer: L.Trainer, *_: object) -> None:
            torch.cuda.set_sync_debug_mode("default")
            step = trainer.global_step
            if step >= settle and (step + 1) % every and step + 1 < steps:
                torch.cuda.set_sync_debug_mode("error")

        def on_train_end(self, *_: object) -> None:
            torch.cuda.set_sync_debug_mode("default")

    args = recipe_args(tmp_path, tmp_path / "run", pretrained, blocks, max_steps=steps, log_every_n_steps=every,
                       limit_val_batches=0)
    # A checkpoint reads the GradScaler's scale on the host (a sync by design): none falls inside the checked steps.
    cli = cli_main([*args, "--export.dirname=null", f"--checkpoint.every_n_train_steps={steps}"], run=False)
    cli.trainer.callbacks.insert(0, NoSync())
    try:
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert cli.trainer.global_step == steps


def test_recipe_evaluation_never_syncs_the_gpu_between_batches(tmp_path: Path, pretrained: Path, blocks: Path):
    """The token-weighted validation mean accumulates on the device, and the CLI's callbacks (throughput included)
    read nothing back between batches that do not log: the host queues batch after batch."""

    class NoSync(L.Callback):
        def on_validation_batch_start(self, trainer: L.Trainer, *_: object, **__: object) -> None:
            torch.cuda.set_sync_debug_mode("error" if not trainer.sanity_checking else "default")

        def on_validation_batch_end(self, *_: object, **__: object) -> None:
            torch.cuda.set_sync_debug_mode("default")  # Lightning's own per-batch bookkeeping is not ours to judge

    # No evaluation batch logs (4 batches, logging every 50): then no callback may read the GPU.
    args = recipe_args(tmp_path, tmp_path / "run", pretrained, blocks, max_steps=2, log_every_n_steps=50)
    cli = cli_main([*args, "--export.dirname=null"], run=False)
    cli.trainer.callbacks.append(NoSync())  # its batch-end hook runs after every other callback's
    try:
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert math.isfinite(float(cli.trainer.callback_metrics["val_loss"]))


class NaNWeightsAt(L.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *_: Any) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                pl_module.model.transformer.ln_f.weight.fill_(float("nan"))


def test_recipe_stops_on_a_nan_loss_and_no_checkpoint_holds_it(tmp_path: Path, pretrained: Path, blocks: Path):
    root = tmp_path / "run"
    cli = cli_main(recipe_args(tmp_path, root, pretrained, blocks, max_epochs=2, log_every_n_steps=2), run=False)
    cli.trainer.callbacks.append(NaNWeightsAt(5))
    with pytest.raises(LitFlashError, match="NaN/inf at step 5"):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    for path in (root / "checkpoints").glob("*.ckpt"):
        state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()), path
