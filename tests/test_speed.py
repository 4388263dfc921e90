"""lit_flash's speed levers (configs/gpt2_fast.yaml) on CPU: the padded vocabulary, torch.compile, liger's fused
cross-entropy (its error without liger), dropout, fused AdamW with gradient clipping, and the TokenThroughput
callback. Tiny GPT-2s; the GPU timings are benchmarks/bench.py's."""

from __future__ import annotations

import sys
import time
import types
from typing import Any

import lightning as L
import pytest
import torch
from _helpers import RecordLosses, cpu_trainer, tiny_module
from lightning.fabric.utilities.throughput import Throughput
from lightning.pytorch.loggers import Logger
from transformers import AutoModelForCausalLM

import lit_flash.loss as loss_module
from lit_flash.blocks import IGNORE_INDEX
from lit_flash.callbacks import TokenThroughput
from lit_flash.checkpointing import check_state_dict_fits
from lit_flash.ckpt_file import check_same_vocab_padding
from lit_flash.datamodule import WikitextDataModule
from lit_flash.errors import LitFlashError
from lit_flash.lightning_adapters import is_log_step, steps_optimizer
from lit_flash.metrics import flops_per_token
from lit_flash.module import FlashGPT2LM

REAL_VOCAB, PAD_TO, PADDED_VOCAB = 300, 64, 320  # 300 is not a multiple of 64: padding really happens


def _datamodule(make_token_dataset, n_rows: int = 16, seq_len: int = 16, batch_size: int = 4, **kwargs):
    path = make_token_dataset(splits=("train", "validation"), n_rows=n_rows, seq_len=seq_len, **kwargs)
    return WikitextDataModule(tokenized_dataset_load_dir=str(path), tokenizer_name=None, batch_size=batch_size)


def _small_config(tiny_model_config: dict, **overrides) -> dict:
    """No dropout (losses must be comparable call to call), a vocabulary of 300 unless overridden."""
    return {**tiny_model_config, "vocab_size": REAL_VOCAB, "resid_pdrop": 0.0, "embd_pdrop": 0.0,
            "attn_pdrop": 0.0, **overrides}


def _batch(vocab: int, rows: int = 3, seq: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (rows, seq), generator=gen)
    labels = ids.clone()
    labels[1, :5] = IGNORE_INDEX  # some tokens not predicted: the mean must skip them the same way
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _padded_twin(plain: FlashGPT2LM, config: dict, **kwargs) -> FlashGPT2LM:
    """A module padded to a multiple of `PAD_TO` holding `plain`'s weights in its real rows."""
    padded = tiny_module(config, pad_vocab_to_multiple_of=PAD_TO, **kwargs)
    state = padded.model.state_dict()
    for name, value in plain.model.state_dict().items():
        state[name][: value.shape[0]].copy_(value)  # the vocabulary is dim 0 of wte (and of the tied lm_head)
    return padded


# ------------------------------------------------------------------------------------------ padded vocabulary


def _load_checks(module: FlashGPT2LM, checkpoint: dict[str, Any]) -> None:
    # FlashGPT2LM.on_load_checkpoint's order: the padding named first, then any other shape difference.
    check_same_vocab_padding(module.hparams.pad_vocab_to_multiple_of, checkpoint, "ckpt_path=x.ckpt",
                             module.state_dict())
    check_state_dict_fits(module.state_dict(), checkpoint["state_dict"])


def test_a_checkpoint_padded_otherwise_names_pad_vocab_to_multiple_of(tiny_model_config) -> None:
    config = _small_config(tiny_model_config)  # 300 tokens: padding to 64 adds rows
    saved = tiny_module(config, pad_vocab_to_multiple_of=PAD_TO)
    checkpoint = {"state_dict": saved.state_dict(), "hyper_parameters": dict(saved.hparams)}
    with pytest.raises(LitFlashError) as error:
        _load_checks(tiny_module(config), checkpoint)
    assert str(error.value).startswith(f"ckpt_path=x.ckpt was saved with model.pad_vocab_to_multiple_of={PAD_TO}, "
                                       "this run has None: resume with the checkpoint's value")
    _load_checks(tiny_module(config, pad_vocab_to_multiple_of=PAD_TO), checkpoint)  # the same value: loads
    # Padded to 4 (300 is a multiple of 4, no row added): the same shapes as no padding, so it loads.
    four = tiny_module(config, pad_vocab_to_multiple_of=4)
    _load_checks(tiny_module(config), {"state_dict": four.state_dict(), "hyper_parameters": dict(four.hparams)})


class _LigerStandIn(torch.nn.Module):
    """liger's LigerFusedLinearCrossEntropyLoss call signature, computed plainly: checks our wiring to it."""

    def forward(self, weight, hidden, targets, bias=None):
        logits = torch.nn.functional.linear(hidden, weight, bias).float()
        return torch.nn.functional.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX)


@pytest.mark.parametrize("cross_entropy", ["torch", "liger_stand_in"])
def test_padded_vocab_trains_exactly_as_the_unpadded_model(tiny_model_config, monkeypatch, cross_entropy):
    if cross_entropy == "liger_stand_in":
        monkeypatch.setattr(loss_module, "liger_fused_ce", _LigerStandIn)
    config = _small_config(tiny_model_config)
    plain = tiny_module(config)
    padded = _padded_twin(plain, config, fused_cross_entropy=cross_entropy != "torch")
    assert plain.vocab_size == padded.vocab_size == REAL_VOCAB
    assert padded.model.config.vocab_size == PADDED_VOCAB
    assert padded.model.get_input_embeddings().weight is padded.model.get_output_embeddings().weight  # still tied
    batch = _batch(REAL_VOCAB)

    plain_loss = plain._loss(batch, training=True)[0]
    padded_loss = padded._loss(batch, training=True)[0]
    torch.testing.assert_close(padded_loss, plain_loss, rtol=1e-6, atol=1e-6)
    plain_loss.backward()
    padded_loss.backward()
    plain_grads = dict(plain.model.named_parameters())
    for name, param in padded.model.named_parameters():
        real = plain_grads[name].grad
        torch.testing.assert_close(
            param.grad[: real.shape[0]], real, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}"
        )
        if name == "transformer.wte.weight":
            assert param.grad[:REAL_VOCAB].abs().sum() > 0
            assert torch.equal(param.grad[REAL_VOCAB:], torch.zeros_like(param.grad[REAL_VOCAB:]))  # pad rows


def test_pad_ids_get_probability_exactly_zero(tiny_model_config):
    padded = tiny_module(_small_config(tiny_model_config), pad_vocab_to_multiple_of=PAD_TO).eval()
    assert padded.vocab_bias.shape == (PADDED_VOCAB,)
    assert torch.equal(padded.vocab_bias[:REAL_VOCAB], torch.zeros(REAL_VOCAB))
    with torch.no_grad():
        # Make the pad rows as likely as can be: the bias must still win.
        padded.model.get_output_embeddings().weight[REAL_VOCAB:] = padded.model.get_output_embeddings().weight[:1] * 3
        logits = padded.model(input_ids=_batch(REAL_VOCAB)["input_ids"]).logits
        probs = torch.softmax(logits + padded.vocab_bias, dim=-1)
    assert torch.equal(probs[..., REAL_VOCAB:], torch.zeros_like(probs[..., REAL_VOCAB:]))
    assert torch.softmax(logits, dim=-1)[..., REAL_VOCAB:].min() > 0  # without the bias they would be likely


def test_padded_predict_scores_as_the_unpadded_model(tiny_model_config):
    config = _small_config(tiny_model_config)
    plain = tiny_module(config).eval()
    padded = _padded_twin(plain, config).eval()
    batch = _batch(REAL_VOCAB)
    with torch.no_grad():
        a, b = plain.predict_step(batch, 0), padded.predict_step(batch, 0)
    torch.testing.assert_close(b["loss"], a["loss"], rtol=1e-6, atol=1e-6)
    assert torch.equal(a["n_tokens"], b["n_tokens"])


def test_padded_export_has_the_real_vocab_and_the_same_logits(tiny_model_config, tmp_path):
    padded = tiny_module(_small_config(tiny_model_config), pad_vocab_to_multiple_of=PAD_TO).eval()
    path = padded.export_hf(tmp_path / "model")
    assert padded.model.config.vocab_size == PADDED_VOCAB  # the module itself stays padded
    reloaded = AutoModelForCausalLM.from_pretrained(str(path)).eval()
    assert reloaded.config.vocab_size == REAL_VOCAB
    assert reloaded.get_input_embeddings().weight.shape[0] == REAL_VOCAB
    assert reloaded.get_output_embeddings().weight.shape[0] == REAL_VOCAB
    ids = _batch(REAL_VOCAB)["input_ids"]
    with torch.no_grad():
        expected = padded.model(input_ids=ids).logits[..., :REAL_VOCAB]
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected)


# ------------------------------------------------------------------------------------------------ compile


class _CompileSpy:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, dict[str, Any]]] = []

    def __call__(self, fn: Any, **kwargs: Any) -> Any:
        self.calls.append((fn, kwargs))
        return fn


@pytest.mark.parametrize(("compile_mode", "expected_mode"), [("default", None), ("max-autotune", "max-autotune")])
def test_compile_mode_reaches_torch_compile(tiny_model_config, monkeypatch, compile_mode, expected_mode):
    spy = _CompileSpy()
    monkeypatch.setattr(torch, "compile", spy)
    module = tiny_module(_small_config(tiny_model_config), compile=True, compile_mode=compile_mode)
    assert not spy.calls  # nothing compiles before setup
    module.trainer = cpu_trainer(max_steps=2, max_epochs=-1)
    module.setup("fit")
    module.setup("validate")  # setup again (fit then validate in the CLI): compiled once
    assert len(spy.calls) == 1
    fn, kwargs = spy.calls[0]
    assert fn == module._loss_impl and kwargs == {"dynamic": False, "mode": expected_mode}


def test_compile_with_fused_cross_entropy_compiles_only_the_base_model(tiny_model_config, monkeypatch):
    spy = _CompileSpy()
    monkeypatch.setattr(torch, "compile", spy)
    monkeypatch.setattr(loss_module, "liger_fused_ce", _LigerStandIn)
    monkeypatch.setattr(loss_module, "check_fused_loss_runs_on", lambda *args: None)  # Triton kernels: CUDA only
    module = tiny_module(_small_config(tiny_model_config), compile=True, compile_mode="max-autotune-no-cudagraphs",
                     fused_cross_entropy=True)
    module.trainer = cpu_trainer(max_steps=2, max_epochs=-1)
    module.setup("fit")
    assert len(spy.calls) == 1
    fn, kwargs = spy.calls[0]
    assert getattr(fn, "__self__", None) is module.model.base_model  # nn.Module.compile: its _call_impl
    assert kwargs == {"mode": "max-autotune-no-cudagraphs"}
    assert module._compute_loss == module._loss_impl  # the loss (liger's kernel) stays eager


@pytest.mark.slow
def test_compiled_loss_matches_eager_in_a_cpu_fit(tiny_model_config, make_token_dataset):
    config = _small_config(tiny_model_config, n_layer=1, n_embd=32)
    module = tiny_module(config, compile=True, pad_vocab_to_multiple_of=PAD_TO, learning_rate=1e-3)
    dm = _datamodule(make_token_dataset, n_rows=8, seq_len=16, batch_size=4, vocab_size=REAL_VOCAB)
    start = time.perf_counter()
    cpu_trainer(max_steps=2, limit_val_batches=0, num_sanity_val_steps=0).fit(module, dm)
    assert module._compiled and module._compute_loss != module._loss_impl
    batch = _batch(REAL_VOCAB, rows=4, seq=16)  # the training shapes: the graph compiled in fit is reused
    module.zero_grad()  # the fit's last gradients are still there
    compiled = module._compute_loss(batch["input_ids"], batch["labels"], batch["attention_mask"])
    compiled.backward()
    compiled_grads = {n: p.grad.clone() for n, p in module.named_parameters()}
    module.zero_grad()
    eager = module._loss_impl(batch["input_ids"], batch["labels"], batch["attention_mask"])
    eager.backward()
    elapsed = time.perf_counter() - start
    print(f"compile fit + comparison: {elapsed:.1f} s")
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    for name, param in module.named_parameters():
        torch.testing.assert_close(
            compiled_grads[name], param.grad, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}"
        )


# ------------------------------------------------------------------------------------ fused cross-entropy


def test_fused_cross_entropy_off_cuda_is_a_one_line_error_before_the_first_step(tiny_model_config, monkeypatch):
    monkeypatch.setattr(loss_module, "liger_fused_ce", _LigerStandIn)
    module = tiny_module(_small_config(tiny_model_config), fused_cross_entropy=True)
    module.trainer = cpu_trainer(max_steps=2, max_epochs=-1)
    with pytest.raises(LitFlashError, match="model.fused_cross_entropy=true runs on CUDA") as err:
        module.setup("fit")
    assert "\n" not in str(err.value)


def _without_liger(monkeypatch: pytest.MonkeyPatch) -> None:
    # A None entry in sys.modules makes `import liger_kernel...` raise ImportError, installed or not.
    monkeypatch.setitem(sys.modules, "liger_kernel", None)
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", None)


def test_fused_cross_entropy_without_liger_on_a_gpu_machine_names_the_install(tiny_model_config, monkeypatch):
    _without_liger(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(LitFlashError, match=r"model\.fused_cross_entropy=true needs liger-kernel") as err:
        tiny_module(_small_config(tiny_model_config), fused_cross_entropy=True)
    assert "\n" not in str(err.value) and "pip install 'lit-flash[fast]'" in str(err.value)


def test_fused_cross_entropy_without_liger_or_a_gpu_names_cuda_first(tiny_model_config, monkeypatch):
    """Installing liger-kernel would not make it run on CPU: the error names the CUDA requirement first."""
    _without_liger(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(LitFlashError) as err:
        tiny_module(_small_config(tiny_model_config), fused_cross_entropy=True)
    message = str(err.value)
    assert message.startswith("model.fused_cross_entropy=true runs on CUDA GPUs only") and "\n" not in message
    assert message.index("CUDA") < message.index("liger-kernel")


@pytest.mark.parametrize("liger", ["missing", "installed"])
def test_cli_fused_cross_entropy_on_a_cpu_trainer_names_cuda_installed_or_not(tiny_config, run_cli, monkeypatch,
                                                                             liger):
    if liger == "missing":
        _without_liger(monkeypatch)
    else:  # a stand-in module: the CLI must refuse before the model imports it
        fake = types.ModuleType("liger_kernel.transformers")
        fake.LigerFusedLinearCrossEntropyLoss = lambda **kwargs: _LigerStandIn()
        monkeypatch.setitem(sys.modules, "liger_kernel", types.ModuleType("liger_kernel"))
        monkeypatch.setitem(sys.modules, "liger_kernel.transformers", fake)
    code, _, err = run_cli(["fit", "--config", str(tiny_config), "--trainer.accelerator=cpu",
                            "--model.fused_cross_entropy=true"])
    assert code == 2 and "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert errors == ["error: model.fused_cross_entropy=true runs on CUDA GPUs only (Triton kernels): set it false "
                      "on this machine"]


# ----------------------------------------------------------------------------------------------- dropout


def test_dropout_sets_all_three_and_null_keeps_the_config(tiny_model_config, tmp_path):
    config = {**tiny_model_config, "resid_pdrop": 0.3, "embd_pdrop": 0.2, "attn_pdrop": 0.1}
    for dropout in (0.25, 0.0):  # 0.0 (gpt2_fast.yaml's) is not "unset"
        model = tiny_module(config, dropout=dropout).model
        assert (model.config.resid_pdrop, model.config.embd_pdrop, model.config.attn_pdrop) == (dropout,) * 3
        block = model.transformer.h[0]
        assert model.transformer.drop.p == block.attn.resid_dropout.p == block.mlp.dropout.p == dropout
        assert block.attn.attn_dropout.p == dropout
    kept = tiny_module(config).model
    assert (kept.config.resid_pdrop, kept.config.embd_pdrop, kept.config.attn_pdrop) == (0.3, 0.2, 0.1)
    assert kept.transformer.drop.p == 0.2 and kept.transformer.h[0].attn.attn_dropout.p == 0.1
    # A pretrained model: the same override of its saved config.
    kept.save_pretrained(str(tmp_path / "pretrained"))
    loaded = FlashGPT2LM(model_name_or_path=str(tmp_path / "pretrained"), attn_implementation="sdpa", dropout=0.05)
    assert (loaded.model.config.resid_pdrop, loaded.model.config.embd_pdrop, loaded.model.config.attn_pdrop) == (
        0.05, 0.05, 0.05)
    loaded = FlashGPT2LM(model_name_or_path=str(tmp_path / "pretrained"), attn_implementation="sdpa")
    assert loaded.model.config.embd_pdrop == 0.2


# ------------------------------------------------------------------------------- fused AdamW and clipping


def _optimizer_for(module: FlashGPT2LM, **trainer_kwargs) -> torch.optim.Optimizer:
    module.trainer = cpu_trainer(max_steps=4, max_epochs=-1, **trainer_kwargs)
    return module.configure_optimizers()["optimizer"]


def test_fused_adamw_choice(tiny_model_config, monkeypatch):
    config = _small_config(tiny_model_config)
    assert not _optimizer_for(tiny_module(config)).defaults["fused"]  # null on CPU: not fused
    assert _optimizer_for(tiny_module(config, fused_adamw=True), gradient_clip_val=0.5).defaults["fused"]
    assert not _optimizer_for(tiny_module(config, fused_adamw=False)).defaults["fused"]

    # Null on CUDA: fused, with or without clipping, under any precision. The device and precision are mocked (CPU
    # here; a CPU Trainer turns 16-mixed into bf16-mixed).
    from lightning.pytorch.strategies import SingleDeviceStrategy

    monkeypatch.setattr(SingleDeviceStrategy, "root_device", property(lambda self: torch.device("cuda")))
    assert _optimizer_for(tiny_module(config), gradient_clip_val=0.5, precision="bf16-mixed").defaults["fused"]
    module = tiny_module(config)
    module.trainer = cpu_trainer(max_steps=4, max_epochs=-1, gradient_clip_val=0.5)
    module.trainer.strategy.precision_plugin.precision = "16-mixed"
    assert module.configure_optimizers()["optimizer"].defaults["fused"]


def _set_large_grads(module: FlashGPT2LM) -> None:
    gen = torch.Generator().manual_seed(0)
    for param in module.parameters():
        param.grad = torch.randn(param.shape, generator=gen) * 10


@pytest.mark.parametrize("fused", [True, False])
def test_configure_gradient_clipping_norm_and_value(tiny_model_config, fused):
    module = tiny_module(_small_config(tiny_model_config), fused_adamw=fused)
    optimizer = _optimizer_for(module, precision="bf16-mixed")
    assert optimizer.defaults["fused"] is fused
    _set_large_grads(module)
    module.configure_gradient_clipping(optimizer, 0.5, "norm")
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in module.parameters()]))
    assert norm.item() == pytest.approx(0.5, rel=1e-4)
    _set_large_grads(module)
    module.configure_gradient_clipping(optimizer, 0.5, "value")
    largest = max(p.grad.abs().max().item() for p in module.parameters())
    assert largest == pytest.approx(0.5)
    _set_large_grads(module)
    before = [p.grad.clone() for p in module.parameters()]
    module.configure_gradient_clipping(optimizer, None, None)  # no clipping asked: gradients untouched
    assert all(torch.equal(a, p.grad) for a, p in zip(before, module.parameters(), strict=True))


class _GradNorms(L.Callback):
    """Total gradient norm before clipping (on_before_optimizer_step) and as the optimizer stepped with it (a
    post-step hook: Lightning runs the forward/backward closure inside `optimizer.step`, after any pre-step hook)."""

    def __init__(self) -> None:
        self.before: list[float] = []
        self.at_step: list[float] = []

    @staticmethod
    def _norm(module: L.LightningModule) -> float:
        grads = [p.grad.norm() for p in module.parameters() if p.grad is not None]
        return torch.linalg.vector_norm(torch.stack(grads)).item()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.optimizers[0].register_step_post_hook(lambda *_: self.at_step.append(self._norm(pl_module)))

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        self.before.append(self._norm(pl_module))


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16-mixed", "32-true"])
def test_fused_adamw_clips_and_trains_in_a_cpu_fit(tiny_model_config, make_token_dataset, precision):
    module = tiny_module(_small_config(tiny_model_config), fused_adamw=True, learning_rate=1e-2)
    dm = _datamodule(make_token_dataset, vocab_size=REAL_VOCAB)
    start = {n: p.detach().clone() for n, p in module.named_parameters()}
    norms = _GradNorms()
    trainer = cpu_trainer(max_steps=4, limit_val_batches=0, num_sanity_val_steps=0, gradient_clip_val=0.5,
                       precision=precision, callbacks=[norms])
    trainer.fit(module, dm)
    assert trainer.optimizers[0].defaults["fused"]
    assert len(norms.before) == len(norms.at_step) == 4
    assert min(norms.before) > 0.5  # clipping had work to do
    assert max(norms.at_step) == pytest.approx(0.5, rel=1e-3)
    moved = [n for n, p in module.named_parameters() if not torch.equal(p.detach(), start[n])]
    assert len(moved) == len(start)


def _fp16_scaler_plugin() -> Any:
    """16-mixed with its GradScaler on the CPU (a CPU Trainer given `precision="16-mixed"` makes it bf16)."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    return MixedPrecision("16-mixed", "cpu")


@pytest.mark.slow
def test_fused_adamw_clips_true_scale_gradients_under_16_mixed_grad_scaler(tiny_model_config, make_token_dataset):
    """The recipe's step (16-mixed, GradScaler, clipping 1.0) with fused AdamW: the clip sees unscaled gradients,
    and the optimizer steps with them (not with gradients scaled by 2**16 or unscaled twice)."""
    module = tiny_module(_small_config(tiny_model_config), fused_adamw=True, learning_rate=1e-2)
    dm = _datamodule(make_token_dataset, vocab_size=REAL_VOCAB)
    start = {n: p.detach().clone() for n, p in module.named_parameters()}
    norms = _GradNorms()
    plugin = _fp16_scaler_plugin()
    trainer = cpu_trainer(max_steps=4, limit_val_batches=0, num_sanity_val_steps=0, gradient_clip_val=0.5,
                          plugins=[plugin], callbacks=[norms])
    trainer.fit(module, dm)
    assert trainer.optimizers[0].defaults["fused"]
    assert plugin.scaler.get_scale() > 1  # a real GradScaler scaled the loss
    assert len(norms.at_step) == 4
    assert min(norms.before) > 0.5  # clipping had work to do
    assert max(norms.at_step) == pytest.approx(0.5, rel=1e-3)  # the step saw unscaled, clipped gradients
    moved = [n for n, p in module.named_parameters() if not torch.equal(p.detach(), start[n])]
    assert len(moved) == len(start)


class _InfGradAt(L.Callback):
    """Turns one parameter's gradient to inf on step `at`, right after the backward (as an fp16 overflow would)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step == self.at:
            next(pl_module.parameters()).grad.fill_(float("inf"))


@pytest.mark.parametrize("fused", [True, False])
def test_an_overflowed_step_is_skipped_and_the_scale_halves_under_16_mixed(
    tiny_model_config, make_token_dataset, fused
):
    module = tiny_module(_small_config(tiny_model_config), fused_adamw=fused, learning_rate=1e-2)
    dm = _datamodule(make_token_dataset, vocab_size=REAL_VOCAB)
    plugin = _fp16_scaler_plugin()
    weights: list[torch.Tensor] = []

    class Snapshot(L.Callback):
        def on_train_batch_end(self, *args: Any) -> None:
            weights.append(torch.cat([p.detach().flatten() for p in module.parameters()]))

    trainer = cpu_trainer(max_steps=3, limit_val_batches=0, num_sanity_val_steps=0, gradient_clip_val=1.0,
                          plugins=[plugin], callbacks=[_InfGradAt(1), Snapshot()])
    start_scale = plugin.scaler.get_scale()
    trainer.fit(module, dm)
    assert torch.equal(weights[0], weights[1])  # step 1 had an inf gradient: no update
    assert not torch.equal(weights[1], weights[2])  # step 2 updates again
    assert torch.isfinite(weights[2]).all()
    assert plugin.scaler.get_scale() < start_scale


# ------------------------------------------------------------------------------------------ TokenThroughput


class _ListLogger(Logger):
    """Keeps every `log_metrics` call as (step, metrics)."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int | None, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "list"

    @property
    def version(self) -> str:
        return "0"

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.rows.append((step, dict(metrics)))


def _spy_on_throughput_updates(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Every `Throughput.update` call's arguments, in order (the real update still runs)."""
    updates: list[dict[str, Any]] = []
    real_update = Throughput.update

    def spy(self: Throughput, **kwargs: Any) -> None:
        updates.append(kwargs)
        real_update(self, **kwargs)

    monkeypatch.setattr(Throughput, "update", spy)
    return updates


def test_token_throughput_logs_rates_flops_and_mfu_on_log_steps(tiny_model_config, make_token_dataset, monkeypatch):
    updates = _spy_on_throughput_updates(monkeypatch)
    rows, seq, steps, every, peak_tflops = 4, 16, 8, 2, 0.5
    module = tiny_module(_small_config(tiny_model_config))
    dm = _datamodule(make_token_dataset, n_rows=32, seq_len=seq, batch_size=rows, vocab_size=REAL_VOCAB)
    logger = _ListLogger()
    trainer = cpu_trainer(max_steps=steps, limit_val_batches=0, num_sanity_val_steps=0, log_every_n_steps=every,
                       logger=logger, callbacks=[TokenThroughput(window_size=2, peak_tflops=peak_tflops)])
    trainer.fit(module, dm)

    # Counted every batch, handed to Throughput on the log steps only, with the FLOPs of the batches since.
    expected_flops = 6 * sum(p.numel() for p in module.model.parameters())
    expected_flops += 12 * tiny_model_config["n_layer"] * tiny_model_config["n_embd"] * seq
    assert flops_per_token(module.model.config, seq) == expected_flops
    assert module.flops_per_batch == expected_flops * rows * seq
    assert [u["batches"] for u in updates] == list(range(every, steps + 1, every))
    assert [u["samples"] for u in updates] == [b * rows for b in range(every, steps + 1, every)]
    assert [u["lengths"] for u in updates] == [b * rows * seq for b in range(every, steps + 1, every)]
    assert all(u["flops"] == pytest.approx(every * module.flops_per_batch) for u in updates)

    logged = [m for _, m in logger.rows if "train/time" in m]
    assert len(logged) == steps // every
    full = [m for m in logged if "train/device/items_per_sec" in m]  # the window (2 log steps) is full
    assert len(full) == steps // every - 1
    for previous, row in zip(logged, logged[1:], strict=False):
        elapsed = row["train/time"] - previous["train/time"]
        assert row["train/device/samples_per_sec"] == pytest.approx(every * rows / elapsed, rel=1e-6)
        assert row["train/device/items_per_sec"] == pytest.approx(every * rows * seq / elapsed, rel=1e-6)
        assert row["train/device/flops_per_sec"] == pytest.approx(every * module.flops_per_batch / elapsed, rel=1e-6)
        assert row["train/device/mfu"] == pytest.approx(row["train/device/flops_per_sec"] / (peak_tflops * 1e12))


class _Clock(L.Callback):
    """A fake `time.perf_counter`: every training or validation batch takes exactly one second."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def on_train_batch_start(self, *_: Any) -> None:
        self.now += 1.0

    def on_validation_batch_start(self, *_: Any) -> None:
        self.now += 1.0


def test_token_throughput_rate_across_a_validation(tiny_model_config, make_token_dataset, monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(time, "perf_counter", clock)
    rows = 4
    module = tiny_module(_small_config(tiny_model_config))
    dm = _datamodule(make_token_dataset, n_rows=32, seq_len=16, batch_size=rows, vocab_size=REAL_VOCAB)
    logger = _ListLogger()
    # Logs at steps 4 and 8, validates (2 batches) after step 6.
    trainer = cpu_trainer(max_steps=8, log_every_n_steps=4, val_check_interval=6, check_val_every_n_epoch=None,
                       limit_val_batches=2, num_sanity_val_steps=0, logger=logger,
                       callbacks=[clock, TokenThroughput(window_size=2)])
    trainer.fit(module, dm)
    assert clock.now == 10  # 8 training + 2 validation batches
    rates = [m["train/device/samples_per_sec"] for _, m in logger.rows if "train/device/samples_per_sec" in m]
    assert rates and rates[-1] == pytest.approx(rows / 1.0)  # the window of steps 4-8: 4 s of training


def test_token_throughput_records_evaluation_on_its_log_batches_only(
    tiny_model_config, make_token_dataset, monkeypatch
):
    """A record syncs the GPU: evaluation records its start and the batches that log, not every batch."""
    clock = _Clock()
    monkeypatch.setattr(time, "perf_counter", clock)
    updates = _spy_on_throughput_updates(monkeypatch)
    rows, every = 4, 2
    module = tiny_module(_small_config(tiny_model_config))
    dm = _datamodule(make_token_dataset, n_rows=32, seq_len=16, batch_size=rows, vocab_size=REAL_VOCAB)
    dm.hparams.eval_batch_size = rows
    logger = _ListLogger()
    trainer = cpu_trainer(max_steps=2, log_every_n_steps=every, val_check_interval=2, check_val_every_n_epoch=None,
                          limit_val_batches=7, num_sanity_val_steps=0, logger=logger,
                          callbacks=[clock, TokenThroughput(window_size=2)])
    trainer.fit(module, dm)
    assert [u["batches"] for u in updates] == [2, 0, 2, 4, 6]  # training's log step, then the validation's points
    val_rows = [m for _, m in logger.rows if "validate/time" in m]
    assert len(val_rows) == 3  # batches 2, 4 and 6 log; the 7th is counted but not logged
    assert all(m["validate/device/samples_per_sec"] == pytest.approx(rows / 1.0) for m in val_rows)


class _LoopDecisions(L.Callback):
    """Per batch: lit_flash's public-state answers next to Lightning's private ones they stand for."""

    def __init__(self) -> None:
        self.log_steps: list[tuple[bool, bool]] = []
        self.optimizer_steps: list[tuple[bool, bool]] = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        private = trainer._logger_connector.should_update_logs
        self.log_steps.append((is_log_step(trainer, before_optimizer_step=True), private))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        private = not trainer.fit_loop._should_accumulate()
        self.optimizer_steps.append((steps_optimizer(trainer, batch_idx), private))


def test_log_and_optimizer_steps_from_public_state_match_lightnings(tiny_model_config, make_token_dataset):
    """5 batches an epoch, 2 accumulated: the epoch's last batch steps alone; logs every 2 optimizer steps."""
    module = tiny_module(_small_config(tiny_model_config))
    dm = _datamodule(make_token_dataset, n_rows=20, batch_size=4, vocab_size=REAL_VOCAB)
    decisions = _LoopDecisions()
    trainer = cpu_trainer(max_epochs=2, limit_val_batches=0, num_sanity_val_steps=0, log_every_n_steps=2,
                          accumulate_grad_batches=2, logger=_ListLogger(), callbacks=[decisions])
    trainer.fit(module, dm)
    assert len(decisions.optimizer_steps) == 10 and trainer.global_step == 6
    assert [public for public, _ in decisions.optimizer_steps] == [False, True, False, True, True] * 2
    assert [public for public, _ in decisions.optimizer_steps] == [private for _, private in decisions.optimizer_steps]
    assert [public for public, _ in decisions.log_steps] == [private for _, private in decisions.log_steps]
    assert any(public for public, _ in decisions.log_steps)


def test_token_throughput_records_whole_accumulated_steps(tiny_model_config, make_token_dataset, monkeypatch):
    updates = _spy_on_throughput_updates(monkeypatch)
    module = tiny_module(_small_config(tiny_model_config))
    dm = _datamodule(make_token_dataset, n_rows=32, batch_size=4, vocab_size=REAL_VOCAB)
    logger = _ListLogger()
    trainer = cpu_trainer(max_steps=4, limit_val_batches=0, num_sanity_val_steps=0, log_every_n_steps=2,
                          accumulate_grad_batches=2, logger=logger, callbacks=[TokenThroughput(window_size=2)])
    trainer.fit(module, dm)
    # Optimizer steps 2 and 4 log: after batches 4 and 8, each point holding the FLOPs of its 4 batches.
    assert [u["batches"] for u in updates] == [4, 8]
    assert all(u["flops"] == pytest.approx(4 * module.flops_per_batch) for u in updates)
    rows = [(step, m) for step, m in logger.rows if "train/time" in m]
    assert [step for step, _ in rows] == [1, 3]  # the rows of steps 2 and 4, as Lightning numbers them
    assert "train/device/items_per_sec" in rows[-1][1]


# ---------------------------------------------------------------------------------- one shape per step (compile)


def test_pad_last_batch_keeps_one_shape_and_the_same_loss(tiny_model_config, make_token_dataset):
    """10 rows in batches of 4: the short last batch is filled with ignored rows, its loss unchanged."""
    module = tiny_module(_small_config(tiny_model_config))
    shapes, losses = {}, {}
    for pad in (False, True):
        dm = _datamodule(make_token_dataset, n_rows=10, batch_size=4, vocab_size=REAL_VOCAB)
        dm.hparams.pad_last_batch, dm.hparams.eval_batch_size = pad, 4
        dm.trainer = cpu_trainer()
        dm.setup("fit")
        batches = list(dm.train_dataloader())
        val = list(dm.val_dataloader())
        shapes[pad] = [tuple(b["input_ids"].shape) for b in batches + val]
        losses[pad] = [module._loss(b, training=False) for b in val]
        predict_rows = [len(b["input_ids"]) for b in dm._loader(dm.val_dataset, 4, shuffle=False, predict=True)]
        assert predict_rows == [4, 4, 2]  # scoring rows never gets fake ones
    assert shapes[False] == [(4, 16), (4, 16), (2, 16)] * 2
    assert shapes[True] == [(4, 16)] * 6
    for (plain_loss, plain_n), (padded_loss, padded_n) in zip(losses[False], losses[True], strict=True):
        assert padded_n == plain_n  # the filler rows predict nothing
        torch.testing.assert_close(padded_loss, plain_loss, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------ attention kernels


def test_sdpa_backends_reach_scaled_dot_product_attention(tiny_model_config):
    config = _small_config(tiny_model_config)
    batch = _batch(REAL_VOCAB)
    plain = tiny_module(config)
    math_only = tiny_module(config, sdpa_backends=["math"])
    math_only.load_state_dict(plain.state_dict())
    torch.testing.assert_close(math_only._loss(batch, True)[0], plain._loss(batch, True)[0], rtol=1e-5, atol=1e-5)
    cudnn_only = tiny_module(config, sdpa_backends=["cudnn"])  # no cuDNN attention on a CPU: proof the choice applies
    with pytest.raises(RuntimeError, match="No viable backend"):
        cudnn_only._loss(batch, True)


BACKEND_LISTS = [["flash"], ["efficient"], ["cudnn"], ["math"], ["flash", "efficient"], ["cudnn", "efficient"],
                 ["efficient", "math"]]


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("backends", BACKEND_LISTS, ids=["+".join(b) for b in BACKEND_LISTS])
def test_the_cpu_sdpa_backends_check_agrees_with_what_torch_runs(backends: list[str], dropout: float) -> None:
    """`[flash]` passed the check on CPU, then failed at step 1 ("No available kernel"): the CPU's flash kernel takes
    no dropout. The check's verdict must be torch's own, for a causal step with its backward."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from lit_flash.attention import SDPA_BACKENDS, check_sdpa_backends_run_on

    q = torch.randn(2, 2, 8, 16, requires_grad=True)
    try:
        with sdpa_kernel([getattr(SDPBackend, SDPA_BACKENDS[b]) for b in backends]):
            out = torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True, dropout_p=dropout)
            out.sum().backward()
        runs = True
    except RuntimeError:
        runs = False
    if runs:
        check_sdpa_backends_run_on(torch.device("cpu"), backends, dropout)
    else:
        with pytest.raises(LitFlashError, match=r"model.sdpa_backends=.*none of these runs on cpu.*add math"):
            check_sdpa_backends_run_on(torch.device("cpu"), backends, dropout)


@pytest.mark.slow
def test_compiled_step_keeps_the_sdpa_choice(tiny_model_config):
    module = tiny_module(_small_config(tiny_model_config, n_layer=1), sdpa_backends=["cudnn"], compile=True)
    module._compute_loss = torch.compile(module._loss_impl, dynamic=False)  # what setup does, minus its CPU check
    with pytest.raises(Exception, match="No viable backend"):
        module._loss(_batch(REAL_VOCAB), True)


def test_speed_options_that_cannot_apply_are_one_line_errors(tiny_model_config, make_token_dataset):
    config = _small_config(tiny_model_config)
    with pytest.raises(LitFlashError, match=r"model.compile_mode=max-autotune needs model.compile=true"):
        tiny_module(config, compile_mode="max-autotune")
    with pytest.raises(LitFlashError, match=r"model.sdpa_backends is for model.attn_implementation=sdpa, not eager"):
        tiny_module(config, sdpa_backends=["cudnn"], attn_implementation="eager")
    with pytest.raises(LitFlashError, match=r"model.sdpa_backends\[0\]='fast': must be one of 'cudnn', 'flash'"):
        tiny_module(config, sdpa_backends=["fast"])
    module = tiny_module(config, sdpa_backends=["cudnn", "efficient"])
    dm = _datamodule(make_token_dataset, vocab_size=REAL_VOCAB)
    with pytest.raises(LitFlashError, match=r"model.sdpa_backends=\['cudnn', 'efficient'\]: none of these runs on cpu"):
        cpu_trainer(max_steps=1).fit(module, dm)
    # Without autocast there is no 16-bit dtype: the stream stays in the weights' dtype, and the run goes on.
    module = tiny_module(config, low_precision_residual=True)
    cpu_trainer(max_steps=1, precision="32-true", limit_val_batches=0).fit(module, dm)
    assert module.model.transformer.wte(torch.zeros(1, 2, dtype=torch.long)).dtype == torch.float32


# --------------------------------------------------------------------------------- no per-step host sync


@pytest.mark.parametrize("on_gpu", [True, False], ids=["gpu_simulated", "cpu"])
def test_progress_bar_gets_host_copies_of_the_loss(tiny_model_config, make_token_dataset, monkeypatch, on_gpu):
    # Lightning converts every progress-bar value to a Python number after each batch: on a GPU a sync. There the
    # bar must get a host copy made on the log steps only; on the CPU (no sync) a new value every step.
    from lightning.pytorch.trainer.connectors.logger_connector import result

    monkeypatch.setattr(FlashGPT2LM, "_host_reads_stall", staticmethod(lambda tensor: on_gpu))
    converted: list[torch.Tensor] = []
    real = result.convert_tensors_to_scalars
    monkeypatch.setattr(result, "convert_tensors_to_scalars", lambda v: converted.append(v) or real(v))
    losses = RecordLosses()
    module = tiny_module(_small_config(tiny_model_config), learning_rate=1e-2)
    dm = _datamodule(make_token_dataset, n_rows=32, seq_len=16, batch_size=4, vocab_size=REAL_VOCAB)
    logger = _ListLogger()
    trainer = cpu_trainer(max_steps=6, limit_val_batches=0, num_sanity_val_steps=0, log_every_n_steps=3,
                          logger=logger, callbacks=[losses])
    trainer.fit(module, dm)

    assert len(converted) >= 6, "Lightning no longer converts progress-bar values per batch: revisit training_step"
    # Lightning hands out a fresh detached view each batch: a stored value is told apart by its storage (alive,
    # hence unique, while `converted` holds it).
    distinct = list({v.untyped_storage().data_ptr(): v for v in converted}.values())
    shown = [losses.losses[2], losses.losses[5]] if on_gpu else losses.losses
    assert [float(v) for v in distinct] == pytest.approx(shown)
    assert float(trainer.progress_bar_metrics["loss"]) == pytest.approx(losses.losses[5])
    assert "train_loss" not in trainer.progress_bar_metrics
    # The logger and callbacks still get train_loss: the logger on its steps, callbacks every step.
    assert [m["train_loss"] for _, m in logger.rows if "train_loss" in m] == pytest.approx(
        [losses.losses[2], losses.losses[5]]
    )
    assert float(trainer.callback_metrics["train_loss"]) == pytest.approx(losses.losses[5])


# ------------------------------------------------------------------------------------ 16-bit residual stream


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16-mixed", "16-mixed"])
def test_low_precision_residual_carries_the_stream_in_the_autocast_dtype(tiny_model_config, dtype):
    config = _small_config(tiny_model_config)
    seen: dict[bool, list[torch.dtype]] = {}
    batch = _batch(REAL_VOCAB)
    losses = {}
    for low in (False, True):
        torch.manual_seed(0)
        module = tiny_module(config, low_precision_residual=low)
        seen[low] = []
        for block in module.model.transformer.h:
            block.register_forward_pre_hook(lambda m, args, s=seen[low]: s.append(args[0].dtype))
        with torch.autocast("cpu", dtype=dtype):
            losses[low] = module._loss_impl(batch["input_ids"], batch["labels"], None)
        losses[low].backward()
        assert module.model.transformer.wte.weight.grad.dtype == torch.float32  # fp32 weights and gradients
        with torch.no_grad():  # without autocast the hook changes nothing
            assert module.model.transformer.wte(batch["input_ids"]).dtype == torch.float32
    n_blocks = config["n_layer"]
    assert seen == {False: [torch.float32] * n_blocks, True: [dtype] * n_blocks}
    torch.testing.assert_close(losses[True], losses[False], rtol=2e-2, atol=0)
