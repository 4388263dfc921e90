"""lit_flash.module: building/loading, the flash -> sdpa fallback, token-weighted perplexity, the optimizer and
schedule, the host-side data checks and the Hugging Face export. Tiny GPT-2s on CPU."""

from __future__ import annotations

import math
import re
import sys
import warnings

import lightning as L
import pytest
import torch
from _helpers import cpu_trainer, tiny_module
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

from lit_flash import attention
from lit_flash.attention import flash_attention_unavailable_reason, resolve_attn_implementation
from lit_flash.datamodule import WikitextDataModule
from lit_flash.errors import LitFlashError
from lit_flash.guards import check_data_fits_model
from lit_flash.metrics import flops_per_token
from lit_flash.module import FlashGPT2LM
from lit_flash.nonfinite import check_skip_supported

FLASH_REASON = flash_attention_unavailable_reason()


def _fallback_warnings(caught: list[warnings.WarningMessage], attn: str = "flash_attention_2") -> list[str]:
    return [str(w.message) for w in caught if f"{attn} cannot run" in str(w.message)]


def _fit_one_cpu_step(model_config: dict, make_token_dataset, attn: str) -> tuple[FlashGPT2LM, list]:
    """A one-step CPU fit of a tiny model asking for `attn`, with the warnings it gave."""
    dm = WikitextDataModule(
        tokenized_dataset_load_dir=str(make_token_dataset(n_rows=4, seq_len=16)), tokenizer_name=None, batch_size=2
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = tiny_module(model_config, attn_implementation=attn)
        cpu_trainer(max_steps=1, limit_val_batches=1, num_sanity_val_steps=0).fit(module, dm)
    return module, caught


# -------------------------------------------------------------------------------------------- building


def test_builds_from_a_config_and_loads_a_local_folder(tiny_model_config, tmp_path):
    built = tiny_module(tiny_model_config)
    assert built.model.config.n_embd == tiny_model_config["n_embd"]
    assert built.model.config._attn_implementation == "sdpa"
    built.model.save_pretrained(str(tmp_path / "pretrained"))
    loaded = FlashGPT2LM(model_name_or_path=str(tmp_path / "pretrained"), attn_implementation="eager", dropout=0.0)
    assert loaded.model.config._attn_implementation == "eager" and loaded.model.config.resid_pdrop == 0.0
    for (name, a), (_, b) in zip(built.model.state_dict().items(), loaded.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_model_errors_name_the_key(tmp_path):
    with pytest.raises(LitFlashError, match="model.model_config"):
        FlashGPT2LM(model_name_or_path=None, attn_implementation="sdpa")
    with pytest.raises(LitFlashError, match=f"model.model_name_or_path={tmp_path / 'missing'}"):
        FlashGPT2LM(model_name_or_path=str(tmp_path / "missing"), attn_implementation="sdpa")
    with pytest.raises(LitFlashError, match="model.attn_implementation='flash3' is unknown"):
        resolve_attn_implementation("flash3")
    with pytest.raises(LitFlashError, match=r"model.model_config: \['n_layers'\] is not a setting of gpt2"):
        FlashGPT2LM(model_name_or_path=None, model_config={"n_layers": 2}, attn_implementation="sdpa")
    with pytest.raises(LitFlashError, match=r"model.dropout \(GPT-2's keys\): \['attn_pdrop'.* of llama models"):
        FlashGPT2LM(model_name_or_path=None, model_config={"model_type": "llama", "num_hidden_layers": 1},
                    dropout=0.0, attn_implementation="sdpa")
    with pytest.raises(LitFlashError, match="model.lr_scheduler=constant has no warm-up.*constant_with_warmup"):
        FlashGPT2LM(model_name_or_path=None, model_config={"n_layer": 1}, lr_scheduler="constant", warmup_steps=5)


def test_skipping_a_step_under_fsdp_fp16_is_refused():
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

    with pytest.raises(LitFlashError, match="model.on_nonfinite=skip cannot skip a step under FSDP"):
        check_skip_supported("skip", "16-mixed", FSDPStrategy())
    check_skip_supported("skip", "bf16-mixed", FSDPStrategy())  # no GradScaler
    check_skip_supported("skip", "16-mixed", DDPStrategy())  # its plugin skips the unscale too
    check_skip_supported("stop", "16-mixed", FSDPStrategy())


def test_a_typo_in_model_config_of_a_saved_model_names_the_key(tiny_model_config, tmp_path):
    AutoModelForCausalLM.from_config(GPT2Config(**tiny_model_config)).save_pretrained(tmp_path)
    with pytest.raises(LitFlashError, match="model.model_config or model.dropout.*resid_pdrp"):
        FlashGPT2LM(model_name_or_path=str(tmp_path), model_config={"resid_pdrp": 0.0}, attn_implementation="sdpa")


def test_flops_per_token_reads_any_models_config():
    # Llama names its sizes num_hidden_layers/hidden_size; GPT-2 maps these names onto n_layer/n_embd.
    config = LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                         num_key_value_heads=2, vocab_size=100, max_position_embeddings=16)
    n_params = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    assert flops_per_token(config, 16) == 6 * n_params + 12 * 2 * 32 * 16
    assert flops_per_token(config, 16, training=False) == flops_per_token(config, 16) / 3


def test_a_nan_batch_makes_the_validation_loss_nan(tiny_model_config):
    module = tiny_module(tiny_model_config)
    module.val_loss.update(torch.tensor(2.0), weight=10)
    module.val_loss.update(torch.tensor(float("nan")), weight=10)
    assert module.val_loss.compute().isnan()  # not 2.0, as if the bad batch had not happened


# -------------------------------------------------------------------------------------------- fallback


@pytest.mark.skipif(FLASH_REASON is None, reason="flash attention can run here")
def test_flash_falls_back_to_sdpa_once_naming_the_reason(tiny_model_config, make_token_dataset):
    module, caught = _fit_one_cpu_step(tiny_model_config, make_token_dataset, "flash_attention_2")
    messages = _fallback_warnings(caught)
    assert len(messages) == 1, messages
    assert FLASH_REASON in messages[0] and "sdpa" in messages[0]
    assert module.attn_implementation == "sdpa" and module.model.config._attn_implementation == "sdpa"
    assert module.hparams.attn_implementation == "flash_attention_2"  # what was asked stays in the checkpoint


@pytest.mark.parametrize("flash", ["flash_attention_2", "flash_attention_3"])
def test_flash_on_a_cpu_trainer_is_refused_when_the_fallback_is_off(flash):
    assert "cpu" in flash_attention_unavailable_reason(torch.device("cpu"), flash)
    with pytest.raises(LitFlashError, match=f"{flash} cannot run.*cpu.*model.attn_fallback=true"):
        resolve_attn_implementation(flash, fallback=False, device=torch.device("cpu"))


# (capability, whether flash-attn-3's module imports) -> what each FlashAttention says; None: it runs.
GPUS = {
    "ampere": ((8, 0), True, {"flash_attention_2": None, "flash_attention_3": "needs Hopper (sm_90)"}),
    "hopper": ((9, 0), True, {"flash_attention_2": None, "flash_attention_3": None}),
    "blackwell": ((10, 0), True, {"flash_attention_2": None, "flash_attention_3": "needs Hopper (sm_90)"}),
    "turing": ((7, 5), True, {"flash_attention_2": "needs sm_80 (Ampere)", "flash_attention_3": "needs Hopper"}),
    "hopper_without_fa3": ((9, 0), False, {"flash_attention_2": None, "flash_attention_3": "flash-attn-3 cannot be"}),
    # Not "build flash-attn-3": that cannot help on a GPU it does not run on
    "ampere_without_fa3": ((8, 0), False, {"flash_attention_2": None, "flash_attention_3": "needs Hopper (sm_90)"}),
}


@pytest.mark.parametrize("gpu", list(GPUS))
def test_which_flash_attention_runs_on_which_gpu(gpu, monkeypatch):
    """Each GPU generation and install against each FlashAttention: why it cannot run, and what the fallback picks
    (FlashAttention-3 falls back to FlashAttention-2 where that runs, else sdpa)."""
    import importlib

    capability, fa3_installed, expected = GPUS[gpu]
    real_import = importlib.import_module

    def fake_import(name, *args):
        if name == "flash_attn" or (name == "flash_attn_interface" and fa3_installed):
            return object()
        if name == "flash_attn_interface":
            raise ImportError("No module named 'flash_attn_interface'")
        return real_import(name, *args)

    monkeypatch.setattr(importlib, "import_module", fake_import)
    monkeypatch.setattr(attention, "transformers_finds", lambda attn: attn != "flash_attention_3" or fa3_installed)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: f"GPU {gpu}")
    for flash, needle in expected.items():
        reason = flash_attention_unavailable_reason(None, flash)
        assert (reason is None) if needle is None else (needle in reason), (flash, reason)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = resolve_attn_implementation(flash, fallback=True)
        if needle is None:
            assert got == flash and not caught
        else:
            fa2_runs = expected["flash_attention_2"] is None
            assert got == ("flash_attention_2" if flash == "flash_attention_3" and fa2_runs else "sdpa")
            assert len(caught) == 1 and f"Using {got} instead" in str(caught[0].message)
            # the fix names what the fallback would use (flash_attention_2 for -3 where it runs), not always sdpa
            with pytest.raises(LitFlashError, match=f"{flash} cannot run.*attn_fallback=true to use {got} instead"):
                resolve_attn_implementation(flash, fallback=False)
            with pytest.raises(LitFlashError, match=f"pass --attn_implementation {got}, or leave it out"):
                resolve_attn_implementation(flash, fallback=False, flag="--attn_implementation")


@pytest.mark.parametrize("flash", ["flash_attention_2", "flash_attention_3"])
def test_without_a_cuda_gpu_the_reason_is_the_gpu_not_an_install(flash, monkeypatch):
    """On a machine without CUDA, building flash-attn-3 (or installing flash-attn) cannot help: the reason says
    there is no GPU, whatever is installed."""
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # import -> ImportError
    monkeypatch.setitem(sys.modules, "flash_attn_interface", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    reason = flash_attention_unavailable_reason(None, flash)
    assert reason == "no CUDA GPU is available", reason


def test_a_flash_attention_3_that_imports_but_transformers_does_not_find_falls_back(tmp_path, monkeypatch,
                                                                                     tiny_model_config):
    """flash_attn_interface importable without a 'flash-attn-3' distribution (a copied flash_attn_interface.py,
    an older 'flashattn-hopper' build): transformers refuses to load the model with an ImportError. lit_flash must
    say so and fall back (one warning), not pass it on as a traceback from inside transformers."""
    (tmp_path / "flash_attn_interface.py").write_text("def flash_attn_func(*args, **kwargs):\n    raise RuntimeError\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # no FlashAttention-2 either: sdpa
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "H100")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = tiny_module(tiny_model_config, attn_implementation="flash_attention_3")
    said = [str(w.message) for w in caught if "flash_attention_3 cannot run" in str(w.message)]
    assert len(said) == 1 and "transformers does not find it" in said[0] and "Using sdpa" in said[0], said
    assert module.model.config._attn_implementation == "sdpa"
    with pytest.raises(LitFlashError, match="flash_attention_3 cannot run.*transformers does not find it"):
        tiny_module(tiny_model_config, attn_implementation="flash_attention_3", attn_fallback=False)


def test_flash_attention_3_in_a_cpu_fit_falls_back_to_sdpa(tiny_model_config, make_token_dataset):
    module, caught = _fit_one_cpu_step(tiny_model_config, make_token_dataset, "flash_attention_3")
    said = _fallback_warnings(caught, "flash_attention_3")
    assert len(said) == 1 and "Using sdpa instead" in said[0], said
    assert module.model.config._attn_implementation == "sdpa"
    assert module.hparams.attn_implementation == "flash_attention_3"


@pytest.mark.parametrize("fallback", [True, False])
def test_a_flash_attention_chosen_at_init_is_resolved_again_for_a_cpu_trainer(tiny_model_config, make_token_dataset,
                                                                              fallback):
    """Built on a GPU machine (here: FlashAttention-3 asked, FlashAttention-2 chosen, as on an Ampere GPU), fit on a
    CPU trainer: setup resolves what was asked again, for the trainer's device, and names that setting."""
    dm = WikitextDataModule(
        tokenized_dataset_load_dir=str(make_token_dataset(n_rows=4, seq_len=16)), tokenizer_name=None, batch_size=2
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # init's own fallback on this machine
        module = tiny_module(tiny_model_config, attn_implementation="flash_attention_3")
    module.attn_implementation = "flash_attention_2"  # what init picks on an Ampere GPU with flash-attn installed
    module.hparams.attn_fallback = fallback
    trainer = cpu_trainer(max_steps=1, limit_val_batches=1, num_sanity_val_steps=0)
    if not fallback:
        with pytest.raises(LitFlashError, match="model.attn_implementation=flash_attention_3 cannot run.*cpu"):
            trainer.fit(module, dm)
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, dm)
    said = [str(w.message) for w in caught if "cannot run" in str(w.message)]
    assert len(said) == 1 and said[0].startswith("flash_attention_3 cannot run") and "cpu" in said[0], said
    assert module.attn_implementation == "sdpa" and module.model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize(("attn", "dropout", "key", "fix"), [
    ("flash_attention_3", 0.1, "attn_pdrop", "model.dropout=0.0"),
    ("flash_attention_3", 0.1, "attention_dropout", "model.model_config.attention_dropout=0.0"),  # Llama's key
    ("flash_attention_3", 0.0, "attn_pdrop", None), ("flash_attention_2", 0.1, "attn_pdrop", None),
    ("sdpa", 0.1, "attention_dropout", None),
])
def test_flash_attention_3_refuses_attention_dropout(attn, dropout, key, fix):
    """FlashAttention-3 has no dropout argument, and transformers drops the model's attention dropout without a
    word: a fit must not train a different model than the config says. The fix named is the key that sets it."""
    from lit_flash.attention import check_attention_dropout_runs

    if fix is not None:
        with pytest.raises(LitFlashError, match=rf"no attention dropout.*{key}={dropout}: set {re.escape(fix)},"):
            check_attention_dropout_runs(attn, dropout, key)
    else:
        check_attention_dropout_runs(attn, dropout, key)


@pytest.mark.skipif(FLASH_REASON is None, reason="flash attention can run here")
def test_flash_without_fallback_is_a_clear_error(tiny_model_config):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(LitFlashError) as err:
            tiny_module(tiny_model_config, attn_implementation="flash_attention_2", attn_fallback=False)
    assert FLASH_REASON in str(err.value) and "model.attn_fallback" in str(err.value)
    assert "\n" not in str(err.value) and not _fallback_warnings(caught)


@pytest.mark.gpu
def test_flash_attention_runs_on_a_gpu_and_matches_sdpa(tiny_model_config):
    if FLASH_REASON is not None:
        pytest.skip(FLASH_REASON)
    flash = tiny_module(tiny_model_config, attn_implementation="flash_attention_2").cuda()
    sdpa = tiny_module(tiny_model_config).cuda()
    sdpa.model.load_state_dict(flash.model.state_dict())
    ids = torch.randint(0, tiny_model_config["vocab_size"], (2, 32), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        a, b = flash.model(input_ids=ids).logits.float(), sdpa.model(input_ids=ids).logits.float()
    assert flash.model.config._attn_implementation == "flash_attention_2"
    torch.testing.assert_close(a, b, atol=5e-2, rtol=5e-2)


# ------------------------------------------------------------------------------------------ perplexity


def test_val_ppl_is_token_weighted_across_unequal_batches(tiny_model_config, make_token_dataset):
    seq = 12
    # Rows with 11, 6, 11, 3 and 8 predicted tokens (-100 labels are not predicted), in batches of 2, 2 and 1.
    ignored = {0: 0, 1: 5, 2: 0, 3: 8, 4: 3}
    path = make_token_dataset(splits=("train", "test"), n_rows=5, seq_len=seq)
    import datasets

    ds = datasets.load_from_disk(str(path))
    ds["test"] = ds["test"].map(lambda ex, i: {"labels": [-100] * ignored[i] + ex["labels"][ignored[i] :]},
                                with_indices=True)
    ds.save_to_disk(str(path.with_name("masked")))
    dm = WikitextDataModule(tokenized_dataset_load_dir=str(path.with_name("masked")), tokenizer_name=None,
                            eval_batch_size=2)
    torch.manual_seed(0)
    module = tiny_module(tiny_model_config)
    with torch.no_grad():  # peaky logits: per-token losses differ widely, so the weighting shows (not by luck of init)
        module.model.get_output_embeddings().weight.mul_(20)
    metrics = cpu_trainer().validate(module, dm, verbose=False)[0]

    module.eval()
    losses, counts = [], []
    with torch.no_grad():
        for row in ds["test"].with_format("torch"):
            logits = module.model(input_ids=row["input_ids"][None]).logits[0, :-1]
            target = row["labels"][1:]
            losses.append(torch.nn.functional.cross_entropy(logits, target, ignore_index=-100, reduction="sum"))
            counts.append(int((target != -100).sum()))
    token_mean = float(sum(losses)) / sum(counts)
    assert metrics["val_loss"] == pytest.approx(token_mean, rel=1e-5)
    assert metrics["val_ppl"] == pytest.approx(math.exp(token_mean), rel=1e-5)
    # The plain mean of the three batch means differs by far more than the tolerance above: the weighting matters.
    batch_means = [float(sum(losses[i : i + 2])) / sum(counts[i : i + 2]) for i in (0, 2, 4)]
    assert abs(sum(batch_means) / 3 - token_mean) > 100 * 1e-5 * token_mean

    test_metrics = cpu_trainer().test(module, dm, verbose=False)[0]
    assert test_metrics["test_ppl"] == pytest.approx(math.exp(token_mean), rel=1e-5)


# --------------------------------------------------------------------------------------- optimization


def test_adamw_groups_and_warmup_then_decay(tiny_model_config):
    module = tiny_module(tiny_model_config, learning_rate=1e-3, weight_decay=0.1, warmup_steps=4, lr_scheduler="linear")
    module.trainer = cpu_trainer(max_steps=10, max_epochs=-1)
    config = module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert isinstance(optimizer, torch.optim.AdamW) and config["lr_scheduler"]["interval"] == "step"
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim == 2 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(module.model.parameters()))
    lrs = []
    for _ in range(10):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    warmup = [1e-3 * s / 4 for s in range(4)]
    decay = [1e-3 * (10 - s) / 6 for s in range(4, 10)]
    assert lrs == pytest.approx(warmup + decay)


@pytest.mark.slow
def test_gradient_accumulation_equals_the_larger_batch(tiny_model_config, make_token_dataset):
    # The reference's --gradient_accumulation_steps is trainer.accumulate_grad_batches: 2 micro-batches of 4 full
    # blocks must train exactly as one batch of 8 (same rows, same optimizer and schedule steps).
    data = str(make_token_dataset(n_rows=32, seq_len=32))
    def flat(module: FlashGPT2LM, grad: bool = False) -> torch.Tensor:
        return torch.cat([(p.grad if grad else p).detach().flatten() for p in module.model.parameters()])

    class RecordGrads(L.Callback):  # AdamW would hide a wrongly scaled gradient: compare the gradients themselves
        def __init__(self) -> None:
            self.grads: list[torch.Tensor] = []

        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            self.grads.append(flat(pl_module, grad=True).clone())

    weights, lrs, grads = [], [], []
    for batch_size, accumulate in ((8, 1), (4, 2)):
        L.seed_everything(0)
        module = tiny_module(tiny_model_config, dropout=0.0, learning_rate=1e-2, warmup_steps=1, lr_scheduler="linear")
        start = flat(module)
        dm = WikitextDataModule(tokenized_dataset_load_dir=data, tokenizer_name=None, batch_size=batch_size)
        record = RecordGrads()
        trainer = cpu_trainer(max_steps=3, max_epochs=-1, limit_val_batches=0, accumulate_grad_batches=accumulate,
                              callbacks=[record])
        trainer.fit(module, dm)
        grads.append(torch.stack(record.grads))
        assert trainer.global_step == 3  # optimizer steps, not micro-batches
        weights.append(flat(module))
        assert not torch.allclose(weights[-1], start)  # it trained
        lrs.append(trainer.lr_scheduler_configs[0].scheduler.get_last_lr())
    assert lrs[0] == lrs[1]
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(weights[1], weights[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("schedule", ["cosine", "cosine_with_min_lr", "constant", "constant_with_warmup"])
def test_every_schedule_builds(tiny_model_config, schedule):
    warmup = 0 if schedule == "constant" else 2  # constant has no warm-up (refused: test_model_errors_name_the_key)
    module = tiny_module(tiny_model_config, learning_rate=1e-3, warmup_steps=warmup, lr_scheduler=schedule)
    module.trainer = cpu_trainer(max_steps=10, max_epochs=-1)
    config = module.configure_optimizers()
    for _ in range(9):
        config["optimizer"].step()
        config["lr_scheduler"]["scheduler"].step()
    last = config["optimizer"].param_groups[0]["lr"]
    if schedule.startswith("constant"):
        assert last == pytest.approx(1e-3)
    elif schedule == "cosine_with_min_lr":
        assert 1e-4 <= last < 1e-3 / 2  # decays to a floor of 10%
    else:
        assert 0 <= last < 1e-4


# ------------------------------------------------------------------------------------ data vs model checks


def test_check_data_fits_model(tiny_model_config):
    from transformers import GPT2Config

    config = GPT2Config(**{k: v for k, v in tiny_model_config.items() if k != "model_type"})
    check_data_fits_model(config, seq_len=config.n_positions, max_token_id=config.vocab_size - 1)
    with pytest.raises(LitFlashError, match=r"data.block_size: rows have 65 tokens.*context is 64"):
        check_data_fits_model(config, seq_len=65)
    with pytest.raises(LitFlashError, match=r"token id 320 .* 320 ids"):
        check_data_fits_model(config, max_token_id=320)
    with pytest.raises(LitFlashError, match="data.tokenizer_name"):
        check_data_fits_model(config, tokenizer_size=321)


# -------------------------------------------------------------------------------------------- export


def test_export_hf_reloads_with_the_same_logits(tiny_model_config, tokenizer, tmp_path):
    module = tiny_module(tiny_model_config).eval()
    path = module.export_hf(tmp_path / "model", tokenizer)
    assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(str(path)).eval()
    ids = torch.tensor([tokenizer("the river of the city")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, module.model(input_ids=ids).logits)


def test_predict_scores_each_row(tiny_model_config, make_token_dataset):
    dm = WikitextDataModule(
        tokenized_dataset_load_dir=str(make_token_dataset(n_rows=5, seq_len=12)), tokenizer_name=None, eval_batch_size=2
    )
    module = tiny_module(tiny_model_config)
    batches = cpu_trainer().predict(module, dm)
    loss = torch.cat([b["loss"] for b in batches])
    assert loss.shape == (5,) and torch.cat([b["n_tokens"] for b in batches]).tolist() == [11] * 5
    torch.testing.assert_close(torch.cat([b["ppl"] for b in batches]), loss.exp())
    # Rows of equal length: the mean of the rows' losses is the test loss.
    test_loss = cpu_trainer().test(module, dm, verbose=False)[0]["test_loss"]
    assert loss.mean().item() == pytest.approx(test_loss, rel=1e-5)


def test_token_mean_weights_each_batch_by_its_tokens_and_keeps_a_nan():
    from lit_flash.metrics import TokenMean

    metric = TokenMean()
    metric.update(torch.tensor(2.0), torch.tensor(1))
    metric.update(torch.tensor(5.0), torch.tensor(3))
    assert metric.compute().item() == pytest.approx((2.0 * 1 + 5.0 * 3) / 4)
    metric.update(torch.tensor(float("nan")), torch.tensor(0))  # a batch with nothing to predict: 0/0
    assert torch.isnan(metric.compute())
    metric.reset()
    metric.update(torch.tensor(3.0), torch.tensor(2))
    assert metric.compute().item() == pytest.approx(3.0)


@pytest.mark.parametrize("attn", ["flash_attention_2", "flash_attention_3"])
@pytest.mark.parametrize("precision", ["32-true", "64-true", "16-mixed", "bf16-mixed"])
def test_flash_attention_runs_in_half_precision_only(attn, precision):
    from lit_flash.attention import check_precision_fits

    if precision.startswith(("32", "64")):
        with pytest.raises(LitFlashError, match=f"trainer.precision={precision}: {attn} runs in fp16/bf16 only"):
            check_precision_fits(attn, precision)
    else:
        check_precision_fits(attn, precision)
    check_precision_fits("sdpa", precision)
