"""FlashAttention-2 (and -3, where built) on a real GPU: it runs in every stage, agrees with sdpa and eager, falls
back and fails as said.

Run on the GPU machine: `pytest -m gpu tests/gpu -v -s` (needs CUDA, flash-attn, an sm_80+ GPU; FlashAttention-3's
tests need flash-attn-3 and a Hopper GPU).
Measured errors are printed and, with LIT_FLASH_GPU_REPORT=path, written there as JSON.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from _helpers import RecordLosses

from lit_flash import FlashGPT2LM, LitFlashError, WikitextDataModule
from lit_flash.attention import flash_attention_unavailable_reason, resolve_attn_implementation
from lit_flash.synthetic import save_synthetic_dataset, synthetic_blocks

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

ROOT = Path(__file__).resolve().parents[2]
GPT2_124M = {"model_type": "gpt2", "n_layer": 12, "n_head": 12, "n_embd": 768, "n_positions": 1024, "vocab_size": 50257}
BACKENDS = ("flash_attention_2", "sdpa", "eager")
FA3_REASON = flash_attention_unavailable_reason(None, "flash_attention_3") if torch.cuda.is_available() else "no GPU"
FLASH = [pytest.param("flash_attention_2", id="fa2"), pytest.param(
    "flash_attention_3", id="fa3", marks=pytest.mark.skipif(FA3_REASON is not None, reason=str(FA3_REASON)))]
# Relative error by norm, ||x - y|| / ||y||, allowed between two attention backends under autocast. bf16 keeps 8
# mantissa bits (eps 3.9e-3), fp16 11 (eps 4.9e-4); errors grow through 12 layers and the backward pass.
TOLERANCE = {
    torch.bfloat16: {"logits": 3e-2, "loss": 5e-3, "grads": 8e-2},
    torch.float16: {"logits": 5e-3, "loss": 1e-3, "grads": 2e-2},
}
REPORT: dict = {}


@pytest.fixture(scope="module", autouse=True)
def report():
    yield REPORT
    path = os.environ.get("LIT_FLASH_GPU_REPORT")
    if path:
        Path(path).write_text(json.dumps(REPORT, indent=1))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return save_synthetic_dataset(tmp_path_factory.mktemp("gpu") / "blocks", n_train=1200, n_test=64)


def rel(x: torch.Tensor, y: torch.Tensor) -> float:
    return ((x.float() - y.float()).norm() / y.float().norm()).item()


def build(attn: str = "flash_attention_2", **kwargs) -> FlashGPT2LM:
    torch.manual_seed(0)
    return FlashGPT2LM(model_name_or_path=None, model_config=GPT2_124M, attn_implementation=attn, dropout=0.0, **kwargs)


def run_backend(module: FlashGPT2LM, attn: str, batch: dict, dtype: torch.dtype) -> dict:
    module.model.set_attn_implementation(attn)
    module.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=dtype):
        out = module.model(**batch)
    out.loss.backward()
    grads = torch.cat([p.grad.flatten() for p in module.model.parameters() if p.grad is not None])
    return {"logits": out.logits.detach(), "loss": out.loss.detach(), "grads": grads}


def make_batch(kind: str) -> dict:
    ids = torch.from_numpy(synthetic_blocks(4, 1024, seed=3)).long().cuda()
    mask = torch.ones_like(ids)
    lengths = [1024, 700, 257, 1000]
    for row, n in enumerate(lengths):
        if kind == "right_pad":  # eval batches: real tokens first
            mask[row, n:] = 0
        elif kind == "left_pad":  # generation: real tokens last
            mask[row, : 1024 - n] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels} if kind != "full" else {
        "input_ids": ids, "labels": ids}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("kind", ["full", "right_pad", "left_pad"])
@pytest.mark.parametrize("flash_impl", FLASH)
def test_flash_agrees_with_sdpa_and_eager(kind: str, dtype: torch.dtype, flash_impl: str) -> None:
    module = build().cuda()
    batch = make_batch(kind)
    results = {attn: run_backend(module, attn, batch, dtype) for attn in (flash_impl, "sdpa", "eager")}
    valid = batch.get("attention_mask", torch.ones_like(batch["input_ids"])).bool()
    flash = results[flash_impl]
    for other in ("sdpa", "eager"):
        errs = {
            "logits": rel(flash["logits"][valid], results[other]["logits"][valid]),
            "loss": rel(flash["loss"], results[other]["loss"]),
            "grads": rel(flash["grads"], results[other]["grads"]),
        }
        REPORT[f"parity/{kind}/{str(dtype)[6:]}/{flash_impl}_vs_{other}"] = errs
        print(kind, dtype, f"flash vs {other}", errs)
        for what, err in errs.items():
            assert err < TOLERANCE[dtype][what], f"{what}: {err:.2e} >= {TOLERANCE[dtype][what]:.0e} ({other})"


class AttentionSpy:
    """Wraps transformers' flash attention entry and records the dtype it was called with."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        self.calls: list[torch.dtype] = []
        inner = ALL_ATTENTION_FUNCTIONS["flash_attention_2"]

        def spy(module, query, *args, **kwargs):
            self.calls.append(query.dtype)
            return inner(module, query, *args, **kwargs)

        monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS, "flash_attention_2", spy)

    def take(self) -> list[torch.dtype]:
        calls, self.calls = self.calls, []
        return calls


def trainer(tmp_path: Path, **kwargs) -> L.Trainer:
    defaults = dict(accelerator="gpu", devices=1, precision="16-mixed", default_root_dir=tmp_path, logger=False,
                    enable_checkpointing=False, enable_progress_bar=False, num_sanity_val_steps=0)
    return L.Trainer(**{**defaults, **kwargs})


def test_flash_runs_in_every_stage_under_16_mixed(tmp_path: Path, data_dir: Path, monkeypatch) -> None:
    """fit, validate and test all reach flash-attn, in fp16: never a silent fp32 attention, never
    'FlashAttention only supports fp16 and bf16'."""
    spy = AttentionSpy(monkeypatch)
    module = build()
    assert module.model.config._attn_implementation == "flash_attention_2"
    dm = WikitextDataModule(tokenized_dataset_load_dir=str(data_dir), tokenizer_name=None, batch_size=4,
                            eval_batch_size=4, max_eval_samples=8)
    t = trainer(tmp_path, max_steps=3, limit_val_batches=2)
    t.fit(module, datamodule=dm)
    assert set(spy.take()) == {torch.float16}
    t.validate(module, datamodule=dm, verbose=False)
    assert set(spy.take()) == {torch.float16}
    t.test(module, datamodule=dm, verbose=False)
    assert set(spy.take()) == {torch.float16}
    assert next(module.parameters()).dtype == torch.float32  # fp32 master weights: the GradScaler works on them

    # Generation outside the trainer (fp32 weights, flash): tests/gpu/test_generate_gpu.py.


def test_pretrained_fp16_weights_train_under_16_mixed(tmp_path: Path, data_dir: Path) -> None:
    """A checkpoint saved in fp16 (as the reference's --torch_dtype float16) is loaded in fp32: 16-mixed's
    GradScaler refuses fp16 gradients ('Attempting to unscale FP16 gradients')."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(GPT2_124M, n_layer=2)
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    AutoModelForCausalLM.from_config(config).half().save_pretrained(tmp_path / "fp16")
    module = FlashGPT2LM(model_name_or_path=str(tmp_path / "fp16"))
    assert next(module.parameters()).dtype == torch.float32
    dm = WikitextDataModule(tokenized_dataset_load_dir=str(data_dir), tokenizer_name=None, batch_size=4)
    t = trainer(tmp_path, max_steps=3, limit_val_batches=0)
    t.fit(module, datamodule=dm)
    assert t.global_step == 3


def test_loss_curves_agree_across_backends(tmp_path: Path, data_dir: Path) -> None:
    """100 steps of 16-mixed training from the same init on the same batches, one run per backend."""
    curves = {}
    for attn in BACKENDS:
        module = build(attn, learning_rate=6e-4, warmup_steps=10)
        dm = WikitextDataModule(tokenized_dataset_load_dir=str(data_dir), tokenizer_name=None, batch_size=8)
        record = RecordLosses()
        L.seed_everything(0)
        trainer(tmp_path / attn, max_steps=100, limit_val_batches=0, callbacks=[record]).fit(module, datamodule=dm)
        curves[attn] = torch.tensor(record.losses)
    flash = curves["flash_attention_2"]
    for other in ("sdpa", "eager"):
        diff = (flash - curves[other]).abs()
        REPORT[f"curves/flash_vs_{other}"] = {"max_abs": diff.max().item(), "mean_abs": diff.mean().item(),
                                              "first": flash[0].item(), "last": flash[-1].item()}
        print(f"loss curve flash vs {other}: max |d| {diff.max():.4f}, mean {diff.mean():.4f}")
        assert flash[-10:].mean() < flash[:10].mean() - 1.0  # it learns
        assert diff.mean() < 0.02 and diff.max() < 0.1  # in nats, per step


@pytest.fixture
def forget_flash_cache():
    """transformers caches whether flash-attn is installed: a test that hides it must leave no such answer behind."""
    from transformers.utils import import_utils

    def forget() -> None:
        for name in ("is_flash_attn_2_available", "is_flash_attn_3_available"):
            getattr(getattr(import_utils, name), "cache_clear", lambda: None)()

    forget()
    yield
    forget()


@pytest.mark.usefixtures("forget_flash_cache")
def test_fallback_when_flash_attn_is_absent(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # import flash_attn -> ImportError
    with pytest.warns(UserWarning, match="flash-attn cannot be imported"):
        assert resolve_attn_implementation("flash_attention_2", fallback=True) == "sdpa"
    with pytest.warns(UserWarning):
        module = FlashGPT2LM(model_name_or_path=None, model_config=dict(GPT2_124M, n_layer=1))
    assert module.model.config._attn_implementation == "sdpa"
    with pytest.raises(LitFlashError, match="attn_fallback=true"):
        FlashGPT2LM(model_name_or_path=None, model_config=dict(GPT2_124M, n_layer=1), attn_fallback=False)


@pytest.mark.skipif(FA3_REASON is not None, reason=str(FA3_REASON))
def test_flash_attention_3_trains_packed_rows_and_refuses_attention_dropout(tmp_path: Path, data_dir: Path) -> None:
    """FlashAttention-3 has no dropout: a fit with GPT-2's 0.1 is one line before the first step, not a run whose
    dropout transformers dropped. Without dropout it trains, and packed rows (variable-length kernel) give
    sdpa's (a block-diagonal mask from the position ids)."""
    from lit_flash.packing import cu_seq_lens, packed_attention_kwargs

    dm = WikitextDataModule(tokenized_dataset_load_dir=str(data_dir), tokenizer_name=None, batch_size=4)
    with pytest.raises(LitFlashError, match="flash_attention_3 has no attention dropout.*model.dropout=0.0"):
        trainer(tmp_path, max_steps=1, precision="bf16-mixed").fit(
            FlashGPT2LM(model_name_or_path=None, model_config=dict(GPT2_124M, n_layer=1),
                        attn_implementation="flash_attention_3"), datamodule=dm)
    module = build("flash_attention_3", learning_rate=6e-4)
    record = RecordLosses()
    trainer(tmp_path, max_steps=30, limit_val_batches=0, precision="bf16-mixed", callbacks=[record]).fit(
        module, datamodule=dm)
    assert module.model.config._attn_implementation == "flash_attention_3"
    assert sum(record.losses[-5:]) < sum(record.losses[:5]) - 1.0  # it learns
    positions = torch.cat([torch.arange(300), torch.arange(724)]).repeat(2, 1).cuda()
    ids = torch.from_numpy(synthetic_blocks(2, 1024, seed=5)).long().cuda()
    module.cuda()  # Lightning's teardown moved it back to the CPU
    logits = {}
    for attn in ("flash_attention_3", "sdpa"):
        module.model.set_attn_implementation(attn)
        kwargs = packed_attention_kwargs(positions, cu_seq_lens(positions, 4), attn)
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            logits[attn] = module.model(input_ids=ids, **kwargs).logits
    err = rel(logits["flash_attention_3"], logits["sdpa"])
    REPORT["fa3/packed_logits_vs_sdpa"] = err
    assert err < TOLERANCE[torch.bfloat16]["logits"], err


@pytest.mark.usefixtures("forget_flash_cache")
def test_fallback_from_flash_attention_3_to_2_when_flash_attn_3_is_absent(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "flash_attn_interface", None)  # import -> ImportError
    with pytest.warns(UserWarning, match="flash-attn-3 cannot be imported.*Using flash_attention_2"):
        assert resolve_attn_implementation("flash_attention_3", fallback=True) == "flash_attention_2"


def test_cli_fit_gpt2_flash_yaml_and_export_reloads_with_flash(tmp_path: Path, data_dir: Path) -> None:
    """The real recipe's config, a model built from config (no hub), the reference-format data: checkpoints,
    last.ckpt, the HF export, falling val_ppl; the export reloads with flash and gives the checkpoint's logits."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "lit_flash", "fit", "--config", str(ROOT / "configs" / "gpt2_flash.yaml"),
           "--model.model_name_or_path=null", f"--model.model_config={json.dumps(GPT2_124M)}",
           "--model.learning_rate=6e-4", "--model.warmup_steps=30",
           f"--data.tokenized_dataset_load_dir={data_dir}", "--data.tokenizer_name=null", "--data.max_eval_samples=64",
           "--trainer.max_steps=300", "--trainer.val_check_interval=100", "--checkpoint.every_n_train_steps=100",
           f"--trainer.default_root_dir={out}", "--data.num_workers=2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "checkpoints" / "last.ckpt").is_file()
    assert len(list((out / "checkpoints").glob("epoch=*.ckpt"))) == 3
    assert (out / "model" / "model.safetensors").is_file()
    rows = list(csv.DictReader(open(next(out.glob("logs/version_*/metrics.csv")))))
    ppl = [float(r["val_ppl"]) for r in rows if r.get("val_ppl")]
    REPORT["cli_fit/val_ppl"] = ppl
    print("val_ppl by validation:", ppl)
    assert len(ppl) == 3 and ppl[0] > ppl[1] > ppl[2]  # falling (300 steps from scratch: not yet by much)

    ckpt = FlashGPT2LM.load_from_checkpoint(out / "checkpoints" / "last.ckpt", map_location="cuda").eval()
    exported = AutoModelForCausalLM.from_pretrained(out / "model", attn_implementation="flash_attention_2",
                                                    dtype=torch.bfloat16).cuda().eval()
    assert exported.config._attn_implementation == "flash_attention_2"
    ids = torch.from_numpy(synthetic_blocks(2, 1024, seed=9)).long().cuda()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        got = exported(input_ids=ids).logits
        # The recipe trains with the vocabulary padded to a multiple of 64; the export is cut back to GPT-2's own.
        want = ckpt.model(input_ids=ids).logits[..., : exported.config.vocab_size]
    assert got.shape[-1] == exported.config.vocab_size == 50257
    err = rel(got, want)
    REPORT["cli_fit/export_vs_checkpoint_logits_rel"] = err
    assert err < 3e-2
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.98


def test_gpt2_fast_steps_between_log_steps_never_sync_the_gpu(tmp_path: Path, data_dir: Path) -> None:
    """A host-device sync stops the CPU from queueing the next step: under gpt2_fast.yaml, the steps between log
    steps (forward, backward, clipping, optimizer, scheduler, callbacks, Lightning's per-batch conversion of the
    progress-bar values, the bar's redraw) must have none. torch raises on any."""
    from lit_flash.cli import cli_main

    every, steps, settle = 5, 14, 2  # the first steps compile: not checked

    class NoSync(L.Callback):
        # From the start of a non-log step to the start of the next step: Lightning's own per-batch work included.
        def on_train_batch_start(self, trainer: L.Trainer, *_: object) -> None:
            torch.cuda.set_sync_debug_mode("default")
            step = trainer.global_step
            if step >= settle and (step + 1) % every and step + 1 < steps:
                torch.cuda.set_sync_debug_mode("error")

        def on_train_end(self, *_: object) -> None:
            torch.cuda.set_sync_debug_mode("default")

    small = dict(GPT2_124M, n_layer=2, n_embd=128, n_head=2)
    args = ["--config", str(ROOT / "configs" / "gpt2_fast.yaml"), "--model.model_name_or_path=null",
            f"--model.model_config={json.dumps(small)}", f"--data.tokenized_dataset_load_dir={data_dir}",
            "--data.tokenizer_name=null", "--data.batch_size=8", f"--trainer.max_steps={steps}",
            f"--trainer.log_every_n_steps={every}", "--trainer.limit_val_batches=0",
            f"--trainer.default_root_dir={tmp_path}", "--export.dirname=null"]
    cli = cli_main(args, run=False)
    # First: it must switch the check off at a log step's start before any other callback's log-step work runs.
    cli.trainer.callbacks.insert(0, NoSync())
    try:
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert cli.trainer.global_step == steps
