"""A resume's model config: a key written out on one side only, at the model's default, is the same model; a real
difference is still refused, and the refusal's advice works when followed."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from _helpers import tiny_module

from lit_flash.ckpt_file import check_same_model_config, model_defaults
from lit_flash.errors import LitFlashError

CONFIG = {"vocab_size": 300, "n_positions": 32, "n_embd": 32, "n_layer": 1, "n_head": 2}
GPT2_DEFAULT = "gelu_new"  # transformers' GPT2Config.activation_function


def _checkpoint(config: dict) -> dict:
    saved = tiny_module(config)
    return {"state_dict": saved.state_dict(), "hyper_parameters": dict(saved.hparams)}


def test_a_key_written_out_at_its_default_on_one_side_only_resumes() -> None:
    older = _checkpoint(CONFIG)  # a config (or version) that left the default out
    tiny_module({**CONFIG, "activation_function": GPT2_DEFAULT}).on_load_checkpoint(dict(older))
    tiny_module({**CONFIG, "model_type": "gpt2"}).on_load_checkpoint(dict(older))
    newer = _checkpoint({**CONFIG, "activation_function": GPT2_DEFAULT})  # and the other way round
    tiny_module(CONFIG).on_load_checkpoint(dict(newer))


def test_a_key_on_one_side_only_that_is_not_the_default_is_refused_with_advice_that_works() -> None:
    older = _checkpoint(CONFIG)
    with pytest.raises(LitFlashError, match=(
        r"saved without model\.model_config\.activation_function \(the model's default, 'gelu_new'\), this run "
        r"has 'relu': resume without model\.model_config\.activation_function"
    )):
        tiny_module({**CONFIG, "activation_function": "relu"}).on_load_checkpoint(dict(older))
    tiny_module(CONFIG).on_load_checkpoint(dict(older))  # the advice, followed
    relu = _checkpoint({**CONFIG, "activation_function": "relu"})
    with pytest.raises(LitFlashError, match=(
        r"saved with model\.model_config\.activation_function='relu', this run leaves it out \(the model's "
        r"default, 'gelu_new'\): resume with model\.model_config\.activation_function='relu'"
    )):
        tiny_module(CONFIG).on_load_checkpoint(dict(relu))
    tiny_module({**CONFIG, "activation_function": "relu"}).on_load_checkpoint(dict(relu))  # the advice, followed


def test_a_checkpoint_without_model_type_is_gpt2_whatever_type_this_run_has() -> None:
    # From scratch, no model_type builds GPT-2: a run of another type is another model, not that type's default.
    llama = {"model_type": "llama"}
    default = model_defaults(SimpleNamespace(model_name_or_path=None, model_config=llama, trust_remote_code=False))
    older = {"hyper_parameters": {"model_config": dict(CONFIG)}}
    with pytest.raises(LitFlashError, match=r"saved without model\.model_config\.model_type \(the model's default, "
                                            r"'gpt2'\), this run has 'llama'"):
        check_same_model_config({**CONFIG, **llama}, older, "x.ckpt", default)
    check_same_model_config({**CONFIG, "model_type": "gpt2"}, older, "x.ckpt", default)


def test_cli_resume_of_a_run_without_the_key_accepts_the_default_written_out(tiny_config, run_cli) -> None:
    assert run_cli(["fit", "--config", str(tiny_config), "--trainer.max_steps=3"])[0] == 0
    resume = ["fit", "--config", str(tiny_config), "--ckpt_path", "last", "--trainer.max_steps=6"]
    code, _, err = run_cli([*resume, "--model.model_config.activation_function=relu"])
    assert code == 2 and "Traceback" not in err
    assert "error: " in err and "saved without model.model_config.activation_function" in err
    code, _, err = run_cli([*resume, f"--model.model_config.activation_function={GPT2_DEFAULT}"])
    assert code == 0, err


LLAMA = {"model_type": "llama", "vocab_size": 300, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
         "num_attention_heads": 4, "max_position_embeddings": 32}


@pytest.mark.parametrize("key", ["num_key_value_heads", "head_dim"])
def test_a_default_derived_from_other_keys_is_this_models_not_the_model_types(key) -> None:
    """Llama derives num_key_value_heads and head_dim from the heads and width: a checkpoint that wrote the derived
    value out resumes without it, and a value written on one side that is not the derived one is refused."""
    derived = getattr(tiny_module(LLAMA).model.config, key)  # 4 and 8 here; LlamaConfig()'s own: 32 and 128
    tiny_module(LLAMA).on_load_checkpoint(_checkpoint({**LLAMA, key: derived}))
    tiny_module({**LLAMA, key: derived}).on_load_checkpoint(_checkpoint(LLAMA))
    other = {"num_key_value_heads": 2, "head_dim": 16}[key]
    with pytest.raises(LitFlashError, match=rf"{key}={other}, this run leaves it out \(the model's default, "
                                            rf"{derived}\)"):
        tiny_module(LLAMA).on_load_checkpoint(_checkpoint({**LLAMA, key: other}))
