"""Generation on a tiny random GPT-2 and a word-level tokenizer built here (CPU, float64: exact ties)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import get_args

import pytest
import torch
from _helpers import SRC

from lit_flash.cli import cli_main
from lit_flash.errors import LitFlashError
from lit_flash.generate import expand_prompts_flag, generate, load_for_generation

VOCAB = ["<eos>"] + [f"w{i}" for i in range(60)]


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece()  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


@pytest.fixture(scope="module")
def tiny():
    from transformers import GPT2Config, GPT2LMHeadModel

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: threads only add overhead (and contention on a shared CPU)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(VOCAB), n_positions=32, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=0, eos_token_id=0, attn_implementation="sdpa")
    yield GPT2LMHeadModel(config).double().eval(), make_tokenizer()
    torch.set_num_threads(threads)


def argmax_loop(model, tokenizer, prompt: str, steps: int) -> str:
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    new: list[int] = []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.cat([ids, torch.tensor([new], dtype=torch.long)], dim=1)).logits
            token = int(logits[0, -1].argmax())
            if token == tokenizer.eos_token_id:
                break
            new.append(token)
    return tokenizer.decode(new)


def test_greedy_matches_manual_argmax_loop(tiny):
    model, tokenizer = tiny
    for prompt in ("w1 w2 w3", "w7", "w40 w41 w42 w43 w44 w45"):
        assert generate(model, tokenizer, prompt, max_new_tokens=8, temperature=0) == [
            argmax_loop(model, tokenizer, prompt, 8)
        ]


def test_left_padded_batch_equals_one_prompt_at_a_time(tiny):
    model, tokenizer = tiny
    prompts = ["w1 w2 w3 w4 w5 w6", "w9", "w20 w21", "w33 w34 w35"]
    one_by_one = [generate(model, tokenizer, p, max_new_tokens=6, temperature=0)[0] for p in prompts]
    assert generate(model, tokenizer, prompts, max_new_tokens=6, temperature=0, batch_size=4) == one_by_one
    assert tokenizer.padding_side == "left"
    # Sampling, too: one batch of prompts with a seed is reproducible and leaves the caller's RNG alone.
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = generate(model, tokenizer, prompts, max_new_tokens=6, seed=7, top_k=20, top_p=0.95)
    assert torch.equal(torch.rand(3), expected_next)
    assert generate(model, tokenizer, prompts, max_new_tokens=6, seed=7, top_k=20, top_p=0.95) == a
    assert generate(model, tokenizer, prompts, max_new_tokens=6, seed=8, top_k=20, top_p=0.95) != a


def test_top_k_one_is_greedy(tiny):
    model, tokenizer = tiny
    prompts = ["w3 w4", "w50"]
    assert generate(model, tokenizer, prompts, max_new_tokens=5, top_k=1, seed=0) == generate(
        model, tokenizer, prompts, max_new_tokens=5, temperature=0
    )


@pytest.mark.parametrize(
    ("kwargs", "flag"),
    [
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": 0}, "top_k"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": 40}, "context"),
    ],
)
def test_bad_options_name_the_flag(tiny, kwargs, flag):
    model, tokenizer = tiny
    with pytest.raises(LitFlashError, match=flag):
        generate(model, tokenizer, ["w1"], **kwargs)


def test_cli_reads_a_prompts_file_and_writes_jsonl(tiny, tmp_path, capsys):
    model, tokenizer = tiny
    export = tmp_path / "model"
    model.save_pretrained(export)
    tokenizer.save_pretrained(export)
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("w1 w2\n\nw3 w4 w5\n")
    out = tmp_path / "out" / "completions.jsonl"
    args = ["generate", "--model_name_or_path", str(export), "--prompts", "w8", "w9 w10", "--prompts_file",
            str(prompts_file), "--max_new_tokens", "5", "--temperature", "0", "--device", "cpu",
            "--output", str(out)]
    cli_main(args)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    reloaded, reloaded_tokenizer = load_for_generation(str(export), device="cpu")
    prompts = ["w8", "w9 w10", "w1 w2", "w3 w4 w5"]
    assert [r["prompt"] for r in rows] == prompts
    expected = generate(reloaded, reloaded_tokenizer, prompts, 5, temperature=0)
    assert [r["completion"] for r in rows] == expected
    # Never overwrite: the same command again stops with a one-line error naming --output.
    with pytest.raises(SystemExit) as exit_info:
        cli_main(args)
    assert exit_info.value.code == 2
    assert "--output" in capsys.readouterr().err


def test_cli_input_str_prints_and_predict_points_to_generate(tiny, tmp_path, capsys):
    model, tokenizer = tiny
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    cli_main(["generate", "--model_name_or_path", str(tmp_path), "--input_str", "w5 w6",
              "--max_new_tokens", "3", "--seed", "1", "--device", "cpu"])
    assert capsys.readouterr().out.startswith("w5 w6")
    with pytest.raises(SystemExit):
        cli_main(["predict"])
    assert "lit_flash generate" in capsys.readouterr().err


def test_expand_prompts_flag():
    assert expand_prompts_flag(["--prompts", "a b", "c", "--seed", "1"]) == [
        "--prompts+=a b", "--prompts+=c", "--seed", "1"
    ]
    assert expand_prompts_flag(["--prompts", '["a"]']) == ["--prompts", '["a"]']


def test_ids_beyond_the_tokenizer_are_never_generated(tiny):
    """A model whose vocabulary is padded past the tokenizer (model.pad_vocab_to_multiple_of) never emits a pad id,
    even where the pad rows would win the argmax."""
    from transformers import GPT2LMHeadModel

    base, tokenizer = tiny
    model = GPT2LMHeadModel(base.config).double().eval()
    model.load_state_dict(base.state_dict())
    model.resize_token_embeddings(len(VOCAB) + 7)
    ids = tokenizer("w1 w2 w3", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        hidden = model.transformer(ids).last_hidden_state[0, -1]
        model.get_output_embeddings().weight[len(VOCAB) :] = 1e3 * hidden / hidden.norm()  # the pad ids win
        assert int(model(ids).logits[0, -1].argmax()) >= len(VOCAB)  # so the check below can fail
    produced = []
    original = model.generate

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        produced.append(out)
        return out

    model.generate = spy
    generate(model, tokenizer, "w1 w2 w3", max_new_tokens=4, temperature=0)
    generate(model, tokenizer, "w1 w2 w3", max_new_tokens=4, temperature=1.0, seed=0)
    assert produced and all(int(out.max()) < len(VOCAB) for out in produced)


@pytest.mark.slow
def test_importing_generate_loads_no_training_code() -> None:
    """Inference alone (a served model, a notebook) must not pay for Lightning, nor for importing lit_flash."""
    code = (
        "import sys, lit_flash, lit_flash.generate; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'transformers') "
        "or m in ('lit_flash.module', 'lit_flash.cli', 'lit_flash.datamodule')))"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_generate_offers_the_models_attention_choices() -> None:
    from lit_flash import attention as model_module
    from lit_flash import generate as generate_module

    assert get_args(generate_module.AttnImplementation) == get_args(model_module.AttnImplementation)


@pytest.mark.parametrize(("value", "said"), [("flash_attention_2", "cannot run"), ("flash3", "is unknown")])
def test_attention_errors_name_generates_own_flag(tiny, tmp_path, value, said):
    """generate's flag is --attn_implementation: its errors named the fit CLI's model.attn_implementation and
    told to set model.attn_fallback, which generate does not have."""
    model, tokenizer = tiny
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(LitFlashError) as err:  # --device cpu: flash attention cannot run there on any machine
        load_for_generation(str(tmp_path), device="cpu", attn_implementation=value)
    line = str(err.value)
    assert line.startswith(f"--attn_implementation {value} {said}") and "model." not in line, line
    assert "attn_fallback" not in line and "trainer" not in line, line


@pytest.mark.parametrize(("value", "guess"), [("Flash_attention_3", "flash_attention_3"), (" sdpa", "sdpa"),
                                           ("flash-attention-2", "flash_attention_2")])
def test_a_misspelt_attention_choice_is_quoted_with_a_guess(value, guess, capsys):
    """A choice differing by case, a space or a dash: the line quotes the value (a stray space shows) and names the
    choice it likely meant."""
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["generate", "--model_name_or_path", "m", "--input_str", "w1", "--attn_implementation", value])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"error: attn_implementation={value!r}: must be one of 'flash_attention_2'"), err
    assert f"did you mean {guess!r}?" in err, err


def test_the_cli_refuses_flash_on_the_cpu_in_one_line_naming_its_flag(tiny, tmp_path, capsys):
    model, tokenizer = tiny
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    capsys.readouterr()  # save_pretrained's progress bar
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["generate", "--model_name_or_path", str(tmp_path), "--input_str", "w1", "--device", "cpu",
                  "--attn_implementation", "flash_attention_2"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("error: --attn_implementation flash_attention_2 cannot run") and "sdpa" in err, err
    assert "model.attn" not in err, err
