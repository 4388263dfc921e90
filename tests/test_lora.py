"""LoRA adapters (`model.lora`, lit_flash/lora.py): only the adapter trains, checkpoints hold only it and resume
exactly, compile works with it, and the export is the merged plain model or the adapter alone."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import yaml
from _helpers import BLOCK, VOCAB, cpu_trainer, logged, save_blocks, token_rows

from lit_flash import FlashGPT2LM, LoraSettings, WikitextDataModule
from lit_flash.checkpointing import load_checkpoint_file
from lit_flash.cli import cli_main
from lit_flash.errors import LitFlashError
from lit_flash.lora import check_strategy
from lit_flash.optim import weight_decay_groups

pytest.importorskip("peft")

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
N_TRAIN = 23  # batch 2: 12 batches an epoch, the last one short
N_EMBD, N_LAYER = 32, 2


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny GPT-2 (Conv1D layers, GPT-2's dropout) saved as hub weights are: `save_pretrained`."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_positions=BLOCK, n_embd=N_EMBD, n_layer=N_LAYER, n_head=2)
    path = tmp_path_factory.mktemp("hub") / "gpt2-tiny"
    GPT2LMHeadModel(config).save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def other_bases(tmp_path_factory: pytest.TempPathFactory, pretrained: Path) -> dict[str, Path]:
    """GPT-2s of `pretrained`'s config but other weights: another initialisation, and a copy with one LayerNorm
    nudged by 1e-3 (as another fine-tune of the same model differs)."""
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    folder = tmp_path_factory.mktemp("other_bases")
    torch.manual_seed(1)
    GPT2LMHeadModel(GPT2Config.from_pretrained(str(pretrained))).save_pretrained(str(folder / "another"))
    nudged = AutoModelForCausalLM.from_pretrained(str(pretrained))
    with torch.no_grad():
        nudged.transformer.h[1].ln_2.weight.add_(1e-3)
    nudged.save_pretrained(str(folder / "nudged"))
    return {"another": folder / "another", "nudged": folder / "nudged"}


@pytest.fixture(scope="module")
def blocks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("input") / "blocks"
    return save_blocks(path, {"train": token_rows(N_TRAIN, 0), "test": token_rows(8, 1)})


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", sys.argv[:1])


def lora_module(pretrained: Path, **kwargs: Any) -> FlashGPT2LM:
    settings = kwargs.pop("lora", LoraSettings())
    return FlashGPT2LM(model_name_or_path=str(pretrained), attn_implementation="sdpa", lora=settings, **kwargs)


def datamodule(blocks: Path) -> WikitextDataModule:
    return WikitextDataModule(tokenized_dataset_load_dir=str(blocks), tokenizer_name=None, batch_size=2,
                              eval_batch_size=4, num_workers=0)


def randomize_adapter(module: FlashGPT2LM, seed: int = 1) -> None:
    """A trained-looking adapter (PEFT starts lora_B at zero: the update would be nothing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.2)


def trainable(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


# ------------------------------------------------------------------------------------------ what trains


def test_only_the_adapter_trains_and_adamw_gets_only_it(pretrained: Path, recwarn: pytest.WarningsRecorder) -> None:
    r = 4
    module = lora_module(pretrained, lora=LoraSettings(r=r, target_modules=["c_attn", "c_fc"]))
    # GPT-2's Conv1D stores (in, out): lit_flash tells PEFT so (fan_in_fan_out) instead of PEFT warning about it.
    assert not [w for w in recwarn if "fan_in_fan_out" in str(w.message)]
    assert module.model.transformer.h[0].attn.c_attn.fan_in_fan_out
    names = set(trainable(module))
    assert names and all("lora_A" in n or "lora_B" in n for n in names)
    # Every targeted layer of every block has A (r x in) and B (out x r); nothing else trains.
    per_layer = {"c_attn": (N_EMBD, 3 * N_EMBD), "c_fc": (N_EMBD, 4 * N_EMBD)}
    expected = N_LAYER * sum(r * (fan_in + fan_out) for fan_in, fan_out in per_layer.values())
    assert sum(p.numel() for p in module.parameters() if p.requires_grad) == expected
    assert not module.model.get_output_embeddings().weight.requires_grad
    assert not module.model.transformer.wpe.weight.requires_grad
    in_adamw = {id(p) for group in weight_decay_groups(module.model, 0.1) for p in group["params"]}
    assert in_adamw == {id(p) for p in module.parameters() if p.requires_grad}
    # The transformers model stays what the loss and generation call (not a PeftModel).
    assert type(module.model).__name__ == "GPT2LMHeadModel"


def test_a_fresh_adapter_leaves_the_model_unchanged_and_a_trained_one_changes_it(pretrained: Path) -> None:
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(pretrained)).eval()
    module = lora_module(pretrained).eval()
    ids = torch.tensor(token_rows(2, 3))
    with torch.no_grad():
        assert torch.equal(module(ids).logits, base(input_ids=ids).logits)
        randomize_adapter(module)
        assert not torch.allclose(module(ids).logits, base(input_ids=ids).logits)


def test_the_settings_default_to_litgpts_and_are_plain_hyperparameters(pretrained: Path) -> None:
    settings = LoraSettings()
    assert (settings.r, settings.alpha, settings.dropout, settings.target_modules, settings.export) == (
        8, 16.0, 0.05, ["c_attn"], "merged"
    )
    module = lora_module(pretrained, lora={"r": 4, "target_modules": ["c_proj"]})  # as a checkpoint holds it
    assert module.lora == LoraSettings(r=4, target_modules=["c_proj"])
    assert module.hparams["lora"] == {"r": 4, "alpha": 16.0, "dropout": 0.05, "target_modules": ["c_proj"],
                                      "export": "merged"}
    assert FlashGPT2LM(model_name_or_path=str(pretrained), attn_implementation="sdpa").hparams["lora"] is None


# ------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("values", "flag"),
    [({"r": 0}, "model.lora.r=0"), ({"r": 2.5}, "model.lora.r=2.5"), ({"alpha": 0}, "model.lora.alpha=0"),
     ({"dropout": 1.0}, "model.lora.dropout=1.0"), ({"target_modules": []}, "model.lora.target_modules"),
     ({"export": "both"}, "model.lora.export='both'")],
)
def test_bad_settings_are_one_line_naming_the_key(values: dict, flag: str) -> None:
    from lit_flash.lora import as_settings

    with pytest.raises(LitFlashError, match=rf"^{flag}"):
        as_settings(LoraSettings(**values))  # as FlashGPT2LM takes them


def test_target_modules_naming_no_layer_says_which_exist(pretrained: Path) -> None:
    with pytest.raises(LitFlashError, match=r"model.lora.target_modules: \['q_proj'\].*\['c_attn', 'c_fc', 'c_proj'\]"):
        lora_module(pretrained, lora=LoraSettings(target_modules=["c_attn", "q_proj"]))
    with pytest.raises(LitFlashError, match="model.lora.target_modules: \\['lm_head'\\]"):  # tied to the embeddings
        lora_module(pretrained, lora=LoraSettings(target_modules=["lm_head"]))


def test_a_from_scratch_model_is_refused(tiny_model_config: dict) -> None:
    with pytest.raises(LitFlashError, match="model.lora needs pretrained weights"):
        FlashGPT2LM(model_name_or_path=None, model_config=tiny_model_config, attn_implementation="sdpa",
                    lora=LoraSettings())


def test_without_peft_the_error_names_the_extra(pretrained: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` raises ImportError
    with pytest.raises(LitFlashError, match=r"pip install 'lit-flash\[lora\]'"):
        lora_module(pretrained)
    FlashGPT2LM(model_name_or_path=str(pretrained), attn_implementation="sdpa")  # no LoRA: no peft needed


@pytest.mark.slow  # a fresh interpreter's imports
def test_lit_flash_imports_without_peft() -> None:
    import subprocess

    from _helpers import cli_env

    code = "import sys; sys.modules['peft'] = None; import lit_flash.cli, lit_flash.module; print('ok')"
    proc = subprocess.run([sys.executable, "-c", code], env=cli_env(), capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_fsdp_is_refused() -> None:
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

    with pytest.raises(LitFlashError, match="model.lora does not run under FSDP"):
        check_strategy(FSDPStrategy())
    check_strategy(DDPStrategy())


@pytest.mark.parametrize(
    ("flag", "value", "said"),
    [("--model.lora.r", "0", "model.lora.r=0: must be an integer >= 1"),
     ("--model.lora.dropout", "1", "model.lora.dropout=1: must be"),
     ("--model.lora.alpha", "-2", "model.lora.alpha=-2: must be")],
)
def test_the_cli_refuses_bad_values_in_one_line(run_cli: Any, flag: str, value: str, said: str) -> None:
    code, _, err = run_cli(["fit", "--config", str(CONFIGS / "gpt2_flash.yaml"), "--config",
                            str(CONFIGS / "lora.yaml"), flag, value, "--print_config"])
    assert code == 2 and said in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("names", ["[]", "['']", "[' ']"])
def test_no_layer_name_is_one_line_not_a_traceback(run_cli: Any, tmp_path: Path, names: str) -> None:
    """A refusal inside the settings' dataclass came out of the parser as two tracebacks."""
    code, _, err = run_cli(["fit", "--model.lora.target_modules", names, "--trainer.default_root_dir",
                            str(tmp_path / "run")])
    assert code == 2 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith("error: model.lora.target_modules=")
    assert not (tmp_path / "run").exists()


def test_the_overlay_sets_lora_and_its_learning_rate_only(capsys: pytest.CaptureFixture) -> None:
    from _helpers import print_config

    plain = print_config("gpt2_flash.yaml", capsys=capsys)
    lora = print_config("gpt2_flash.yaml", "lora.yaml", capsys=capsys)
    assert plain["model"]["lora"] is None
    assert lora["model"]["lora"]["target_modules"] == ["c_attn", "c_proj", "c_fc"]
    changed = {k for k in plain["model"] if plain["model"][k] != lora["model"][k]}
    assert changed == {"lora", "learning_rate"} and lora["model"]["learning_rate"] > plain["model"]["learning_rate"]


# ----------------------------------------------------------------------------------------- checkpoints


def fit_and_save(module: FlashGPT2LM, blocks: Path, path: Path, steps: int = 3) -> L.Trainer:
    L.seed_everything(0)
    trainer = cpu_trainer(max_steps=steps, limit_val_batches=0)
    trainer.fit(module, datamodule(blocks))
    trainer.save_checkpoint(path)
    return trainer


def test_checkpoints_hold_only_the_adapter_and_load_back(tmp_path: Path, pretrained: Path, blocks: Path) -> None:
    module = lora_module(pretrained)
    fit_and_save(module, blocks, tmp_path / "lora.ckpt")
    full = FlashGPT2LM(model_name_or_path=str(pretrained), attn_implementation="sdpa")
    fit_and_save(full, blocks, tmp_path / "full.ckpt")
    checkpoint = load_checkpoint_file(tmp_path / "lora.ckpt")  # weights_only: the hyperparameters are plain
    assert set(checkpoint["state_dict"]) == set(trainable(module))
    assert (tmp_path / "lora.ckpt").stat().st_size < (tmp_path / "full.ckpt").stat().st_size / 5
    (state,) = checkpoint["optimizer_states"]
    assert len(state["state"]) == len(trainable(module))  # AdamW's moments: the adapter's only
    # Loaded back: the frozen base from model_name_or_path, the adapter from the checkpoint.
    loaded = FlashGPT2LM.load_from_checkpoint(tmp_path / "lora.ckpt", weights_only=True)
    for name, value in trainable(module).items():
        assert torch.equal(loaded.state_dict()[name], value), name
    assert any(not torch.equal(v, 0 * v) for n, v in trainable(module).items() if "lora_B" in n)  # it trained


def test_loading_refuses_a_checkpoint_without_the_adapter_or_of_another_shape(
    tmp_path: Path, pretrained: Path, blocks: Path
) -> None:
    fit_and_save(lora_module(pretrained), blocks, tmp_path / "lora.ckpt", steps=1)
    fit_and_save(FlashGPT2LM(model_name_or_path=str(pretrained), attn_implementation="sdpa"), blocks,
                 tmp_path / "full.ckpt", steps=1)
    checkpoint = torch.load(tmp_path / "lora.ckpt", weights_only=True)
    module = lora_module(pretrained)
    lacking = {**checkpoint, "state_dict": {k: v for k, v in checkpoint["state_dict"].items() if "h.1." not in k}}
    with pytest.raises(LitFlashError, match="the checkpoint is from a different model: it lacks .*lora_"):
        module.on_load_checkpoint(lacking)
    with pytest.raises(LitFlashError, match="model.lora.r=8 and this run has 4: resume with model.lora.r=8"):
        lora_module(pretrained, lora=LoraSettings(r=4)).on_load_checkpoint(checkpoint)
    module.on_load_checkpoint(checkpoint)  # the adapter alone is what a LoRA checkpoint holds


def test_a_checkpoint_trained_with_or_without_lora_says_which_and_how_to_fix(
    tmp_path: Path, pretrained: Path, blocks: Path
) -> None:
    """It said 'the checkpoint is from a different model: it lacks <a weight>' (a resume with --ckpt_path last or
    auto keeps the user's model.lora: LightningCLI takes a checkpoint's hyperparameters only from a file path)."""
    fit_and_save(lora_module(pretrained), blocks, tmp_path / "lora.ckpt", steps=1)
    plain = FlashGPT2LM(model_name_or_path=str(pretrained), attn_implementation="sdpa")
    fit_and_save(plain, blocks, tmp_path / "full.ckpt", steps=1)
    full = torch.load(tmp_path / "full.ckpt", weights_only=True)
    with pytest.raises(LitFlashError, match=r"^the checkpoint was trained without model.lora .*: remove model.lora"):
        lora_module(pretrained).on_load_checkpoint(full)
    lora = torch.load(tmp_path / "lora.ckpt", weights_only=True)
    with pytest.raises(LitFlashError, match=r"^the checkpoint was trained with model.lora .*configs/lora.yaml"):
        plain.on_load_checkpoint(lora)
    # Through a trainer the line names the checkpoint file.
    trainer = cpu_trainer(max_steps=2, limit_val_batches=0)
    with pytest.raises(LitFlashError, match=rf"^ckpt_path={tmp_path / 'lora.ckpt'} was trained with model.lora"):
        trainer.fit(FlashGPT2LM(model_name_or_path=str(pretrained), attn_implementation="sdpa"), datamodule(blocks),
                    ckpt_path=tmp_path / "lora.ckpt")


@pytest.mark.parametrize("other", ["another", "nudged"])
def test_a_lora_checkpoint_on_another_base_of_the_same_shape_is_refused(
    tmp_path: Path, pretrained: Path, other_bases: dict[str, Path], blocks: Path, other: str
) -> None:
    """The checkpoint holds only the adapter: on another base model of the same shape it loaded silently and sat
    on weights it was not trained with. The checkpoint now holds a fingerprint of its base."""
    from lit_flash.lora import BASE_KEY

    fit_and_save(lora_module(pretrained), blocks, tmp_path / "lora.ckpt", steps=1)
    checkpoint = torch.load(tmp_path / "lora.ckpt", weights_only=True)
    lora_module(pretrained).on_load_checkpoint(checkpoint)  # its own base
    lora_module(pretrained, pad_vocab_to_multiple_of=64).on_load_checkpoint(checkpoint)  # padded: the same base
    base = other_bases[other]
    said = rf"^model.model_name_or_path={base}: .*not the base model the checkpoint was trained on .*{pretrained}"
    with pytest.raises(LitFlashError, match=said):
        lora_module(base).on_load_checkpoint(checkpoint)
    with pytest.raises(LitFlashError, match=rf"^model.model_name_or_path={base}: .*ckpt_path="):
        cpu_trainer(max_steps=2, limit_val_batches=0).fit(lora_module(base), datamodule(blocks),
                                                          ckpt_path=tmp_path / "lora.ckpt")
    with pytest.raises(LitFlashError, match=rf"^model.model_name_or_path={base}: "):
        FlashGPT2LM.load_from_checkpoint(tmp_path / "lora.ckpt", weights_only=True, model_name_or_path=str(base))
    # A checkpoint from before lit_flash saved the fingerprint loads as it did.
    lora_module(base).on_load_checkpoint({k: v for k, v in checkpoint.items() if k != BASE_KEY})


def test_a_lora_checkpoint_whose_base_folder_was_written_over_is_refused(
    tmp_path: Path, pretrained: Path, other_bases: dict[str, Path], blocks: Path
) -> None:
    """The same model.model_name_or_path (LightningCLI brings it back from a checkpoint file), other weights."""
    import shutil

    base = shutil.copytree(pretrained, tmp_path / "base")
    fit_and_save(lora_module(base), blocks, tmp_path / "lora.ckpt", steps=1)
    shutil.copy(other_bases["nudged"] / "model.safetensors", base / "model.safetensors")
    with pytest.raises(LitFlashError, match=rf"^model.model_name_or_path={base}: its weights changed since the "
                                            r"checkpoint was trained on them \(transformer.h.1.ln_2.weight differs\)"):
        FlashGPT2LM.load_from_checkpoint(tmp_path / "lora.ckpt", weights_only=True)


def test_the_cli_resuming_a_lora_run_on_another_base_is_one_line(
    tmp_path: Path, pretrained: Path, other_bases: dict[str, Path], blocks: Path, run_cli: Any
) -> None:
    overlay = tmp_path / "cpu.yaml"
    overlay.write_text(yaml.safe_dump(cpu_overlay(tmp_path / "run", pretrained, blocks, max_steps=2)))
    args = ["fit", "--config", str(RECIPE), "--config", str(CONFIGS / "lora.yaml"), "--config", str(overlay)]
    code, _, err = run_cli(args)
    assert code == 0, err
    # --ckpt_path last keeps the user's model.* values (a file path would bring the checkpoint's back).
    code, _, err = run_cli([*args, "--model.model_name_or_path", str(other_bases["nudged"]), "--ckpt_path", "last",
                            "--trainer.max_steps", "4"])
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert errors[0].startswith(f"error: model.model_name_or_path={other_bases['nudged']}: "), err
    assert f"ckpt_path={tmp_path / 'run' / 'checkpoints' / 'last.ckpt'}" in errors[0], err


@pytest.mark.parametrize("lora_first", [True, False], ids=["lora run resumed plain", "plain run resumed with lora"])
def test_the_cli_resuming_last_with_lora_switched_is_one_line(
    tmp_path: Path, pretrained: Path, blocks: Path, run_cli: Any, lora_first: bool
) -> None:
    overlay = tmp_path / "cpu.yaml"
    overlay.write_text(yaml.safe_dump(cpu_overlay(tmp_path / "run", pretrained, blocks, max_steps=2)))
    with_lora = ["--config", str(CONFIGS / "lora.yaml")]
    first, second = (with_lora, []) if lora_first else ([], with_lora)
    code, _, err = run_cli(["fit", "--config", str(RECIPE), *first, "--config", str(overlay)])
    assert code == 0, err
    code, _, err = run_cli(["fit", "--config", str(RECIPE), *second, "--config", str(overlay), "--ckpt_path", "last",
                            "--trainer.max_steps", "4"])
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    fix = "set model.lora as that run did (e.g. --config configs/lora.yaml)" if lora_first else "remove model.lora"
    assert f"was trained {'with' if lora_first else 'without'} model.lora" in errors[0] and fix in errors[0], err


# ---------------------------------------------------------------------------------------------- export


def test_the_merged_export_is_a_plain_model_with_the_modules_logits(
    tmp_path: Path, pretrained: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import AutoModelForCausalLM

    module = lora_module(pretrained, pad_vocab_to_multiple_of=64, lora=LoraSettings(target_modules=["c_attn", "c_fc"]))
    randomize_adapter(module)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    module.export_hf(tmp_path / "merged")
    # The training module is unchanged: same tensors, adapters still separate (not merged into the base).
    assert all(torch.equal(v, before[k]) for k, v in module.state_dict().items())
    assert not module.model.transformer.h[0].attn.c_attn.merged
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    monkeypatch.setitem(sys.modules, "peft", None)  # loading the export needs no peft
    exported = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    assert exported.config.vocab_size == VOCAB  # the padding sliced back off
    assert not any("lora" in k or "base_layer" in k for k in exported.state_dict())
    ids = torch.tensor(token_rows(2, 4))
    module.eval()
    with torch.no_grad():
        want = module(ids).logits[..., :VOCAB]
        torch.testing.assert_close(exported(input_ids=ids).logits, want, rtol=1e-4, atol=1e-4)


def test_the_adapter_export_loads_with_peft(tmp_path: Path, pretrained: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    module = lora_module(pretrained, pad_vocab_to_multiple_of=64, lora=LoraSettings(r=4, export="adapter"))
    randomize_adapter(module)
    module.export_hf(tmp_path / "adapter")
    files = {p.name for p in (tmp_path / "adapter").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files and "model.safetensors" not in files
    base = AutoModelForCausalLM.from_pretrained(str(pretrained))
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    ids = torch.tensor(token_rows(2, 4))
    module.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, module(ids).logits[..., :VOCAB])
    assert not module.model.transformer.h[0].attn.c_attn.merged


def test_generate_on_an_adapter_export_says_it_is_one_and_how_to_merge(tmp_path: Path, pretrained: Path,
                                                                        run_cli) -> None:
    module = lora_module(pretrained, lora=LoraSettings(r=4, export="adapter"))
    module.export_hf(tmp_path / "adapter")
    code, _, err = run_cli(["generate", "--model_name_or_path", str(tmp_path / "adapter"), "--prompts", "a"])
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1, err
    assert "LoRA adapter alone" in errors[0] and "model.lora.export=merged" in errors[0]
    assert f"from_pretrained('{pretrained}')" in errors[0]  # the base its adapter_config.json names


# ---------------------------------------------------------------------------------------- whole runs

RECIPE = CONFIGS / "gpt2_flash.yaml"


def cpu_overlay(root: Path, pretrained: Path, blocks: Path, **trainer: Any) -> dict[str, Any]:
    """test_recipe's CPU changes to the recipe: sizes, the device, the paths, no torch.compile."""
    return {
        "trainer": {"accelerator": "cpu", "precision": "32-true", "val_check_interval": 4, "log_every_n_steps": 1,
                    "default_root_dir": str(root), "enable_progress_bar": False, **trainer},
        "checkpoint": {"every_n_train_steps": 4},
        "model": {"model_name_or_path": str(pretrained), "learning_rate": 1e-2, "compile": False,
                  "compile_mode": "default"},
        "data": {"tokenized_dataset_load_dir": str(blocks), "tokenizer_name": None, "batch_size": 2,
                 "eval_batch_size": 4, "num_workers": 0},
    }


def run_lora_recipe(tmp: Path, name: str, overlay: dict[str, Any], *args: str) -> Any:
    """The recipe, then configs/lora.yaml, then the CPU overlay, as a user layers them."""
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(overlay))
    return cli_main(["fit", "--config", str(RECIPE), "--config", str(CONFIGS / "lora.yaml"), "--config", str(path),
                     *args])


@pytest.mark.slow
def test_resume_from_a_mid_epoch_lora_checkpoint_is_bit_identical_and_exports_a_plain_model(
    tmp_path: Path, pretrained: Path, blocks: Path
) -> None:
    from transformers import AutoModelForCausalLM

    whole = tmp_path / "whole"
    cli = run_lora_recipe(tmp_path, "whole", cpu_overlay(whole, pretrained, blocks, max_epochs=2))
    adapter = {f"model.{n}" for n, p in cli.model.model.named_parameters() if p.requires_grad}
    checkpoint = next((whole / "checkpoints").glob("*step=8.ckpt"))  # 12 batches an epoch: mid-epoch
    assert set(torch.load(checkpoint, weights_only=True)["state_dict"]) == adapter
    resumed = tmp_path / "resumed"
    run_lora_recipe(tmp_path, "resumed", cpu_overlay(resumed, pretrained, blocks, max_epochs=2), "--ckpt_path",
                    str(checkpoint))
    for key in ("train_loss", "val_loss", "lr-AdamW/pg1"):
        expected, got = logged(whole, key), logged(resumed, key)
        after = {step: value for step, value in expected.items() if step >= 8}
        assert after and got == after, key  # bit-identical
    weights = "model/model.safetensors"
    assert (whole / weights).read_bytes() == (resumed / weights).read_bytes()
    # validate a LoRA checkpoint without the overlay: its hyperparameters bring model.lora back, the hub the base.
    last_val = logged(whole, "val_loss")[max(logged(whole, "val_loss"))]
    cli = cli_main(["validate", "--config", str(RECIPE), "--config", str(tmp_path / "whole.yaml"), "--ckpt_path",
                    str(whole / "checkpoints" / "last.ckpt")])
    assert cli.model.lora is not None
    assert float(cli.trainer.callback_metrics["val_loss"]) == pytest.approx(last_val, rel=1e-6)
    exported = AutoModelForCausalLM.from_pretrained(str(whole / "model"))
    assert not any("lora" in k for k in exported.state_dict())
    first = AutoModelForCausalLM.from_pretrained(str(pretrained))
    c_attn = "transformer.h.0.attn.c_attn.weight"
    assert not torch.equal(exported.state_dict()[c_attn], first.state_dict()[c_attn])  # the update is merged in


@pytest.mark.slow
def test_compiled_lora_trains_as_uncompiled(tmp_path: Path, pretrained: Path, blocks: Path) -> None:
    losses: dict[bool, list[float]] = {}
    for compile in (False, True):
        L.seed_everything(0)
        module = lora_module(pretrained, compile=compile, dropout=0.0, learning_rate=1e-2,
                             lora=LoraSettings(dropout=0.0))
        from _helpers import RecordLosses

        record = RecordLosses()
        trainer = cpu_trainer(max_steps=6, limit_val_batches=0, callbacks=[record])
        trainer.fit(module, datamodule(blocks))
        assert module._compiled == compile
        losses[compile] = record.losses
    assert losses[True] != losses[True][:1] * 6  # it learns
    torch.testing.assert_close(losses[True], losses[False], rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_lora_under_ddp_trains_checkpoints_and_exports_once(tmp_path: Path, pretrained: Path, blocks: Path) -> None:
    import subprocess

    from _helpers import cli_env

    ddp = yaml.safe_load((CONFIGS / "ddp.yaml").read_text())["trainer"]["strategy"]
    root = tmp_path / "run"
    overlay = cpu_overlay(root, pretrained, blocks, max_epochs=1, devices=2, strategy=ddp)
    (tmp_path / "ddp.yaml").write_text(yaml.safe_dump(overlay))
    proc = subprocess.run(
        [sys.executable, "-m", "lit_flash", "fit", "--config", str(RECIPE), "--config", str(CONFIGS / "lora.yaml"),
         "--config", str(tmp_path / "ddp.yaml")],
        env=cli_env(OMP_NUM_THREADS="1"), cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    assert output.count("Exported the Hugging Face model") == 1
    keys = set(torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"])
    # lora.yaml's four layers a block (c_attn, attn.c_proj, c_fc, mlp.c_proj), A and B each
    assert len(keys) == N_LAYER * 4 * 2 and all("lora_" in k for k in keys)
    assert (root / "model" / "model.safetensors").is_file()


@pytest.mark.parametrize(
    ("user", "saved", "said"),
    [({"lora": None}, {"lora": {"r": 8}}, "model.lora=None is ignored"),
     ({"lora": {"r": 8}}, {"lora": None}, "model.lora={'r': 8} is ignored"),
     ({"lora": {"r": 4}}, {"lora": {"r": 8}}, "model.lora.r=4 is ignored")],
    ids=["lora off, checkpoint on", "lora on, checkpoint off", "another rank"],
)
def test_a_checkpoint_turning_lora_on_or_off_is_said(user: dict, saved: dict, said: str,
                                                     capsys: pytest.CaptureFixture) -> None:
    """LightningCLI lets a checkpoint's hyperparameters replace the user's: LoRA switched on or off said nothing."""
    from lit_flash.ckpt_file import warn_replaced_model_values

    warn_replaced_model_values(user, saved, "run/last.ckpt")
    err = capsys.readouterr().err
    assert said in err and "--ckpt_path run/last.ckpt" in err


@pytest.mark.parametrize(("typo", "meant"), [("alhpa", "alpha"), ("target_module", "target_modules")])
def test_a_typo_under_model_lora_gets_the_key_it_likely_meant(run_cli: Any, typo: str, meant: str) -> None:
    code, _, err = run_cli(["fit", f"--model.lora.{typo}", "3", "--print_config"])
    assert code == 2 and f"did you mean --model.lora.{meant}?" in err, err


@pytest.mark.parametrize(("key", "then", "now", "refused"), [
    ("alpha", 16.0, 64.0, True),  # the same shapes, another scale (alpha / r): was resumed silently
    ("r", 8, 4, True),
    ("target_modules", ["c_attn"], ["c_attn", "c_proj"], True),
    ("dropout", 0.05, 0.1, False),  # training-time only: the adapter computes the same function
    ("export", "merged", "adapter", False),
])
def test_a_lora_resume_with_other_adapter_settings_names_the_key(key, then, now, refused) -> None:
    from lit_flash.lora import LoraSettings, as_hparam, check_checkpoint_lora

    saved = {"hyper_parameters": {"lora": as_hparam(LoraSettings(**{key: then}))}}
    here = as_hparam(LoraSettings(**{key: now}))
    if not refused:
        check_checkpoint_lora(here, saved, "ckpt_path=last.ckpt")
        return
    with pytest.raises(LitFlashError) as err:
        check_checkpoint_lora(here, saved, "ckpt_path=last.ckpt")
    assert str(err.value).startswith(f"ckpt_path=last.ckpt was trained with model.lora.{key}={then!r}")
    assert f"resume with model.lora.{key}={then!r}" in str(err.value) and "\n" not in str(err.value)
