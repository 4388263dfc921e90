"""Generation with flash_attention_2 on fp32 weights (as `fit` exports them): needs the half-precision autocast.
Run on a CUDA machine with flash-attn: `pytest -m gpu tests/gpu/test_generate_gpu.py`."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from lit_flash.generate import generate

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="needs flash-attn"),
]


def word_tokenizer(vocab: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token=vocab[0]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=vocab[0])


def test_flash_attention_generation_on_fp32_weights():
    from transformers import GPT2Config, GPT2LMHeadModel

    vocab = ["<eos>"] + [f"w{i}" for i in range(60)]

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(vocab), n_positions=64, n_embd=64, n_layer=2, n_head=2,
                        bos_token_id=0, eos_token_id=0)
    flash = GPT2LMHeadModel._from_config(config, attn_implementation="flash_attention_2").cuda().eval()
    assert flash.config._attn_implementation == "flash_attention_2"
    assert next(flash.parameters()).dtype == torch.float32
    tokenizer = word_tokenizer(vocab)
    prompts = ["w1 w2 w3 w4 w5", "w9", "w20 w21"]
    # lit_flash's own behaviour (generate's autocast): the weights stay fp32 and the forward passes run in 16 bits
    # (flash-attn takes fp16/bf16 only), so an attention block's output is 16-bit; without it, it would be fp32.
    half = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    seen: list[torch.dtype] = []
    attention = flash.transformer.h[0].attn
    hook = attention.register_forward_hook(lambda module, args, output: seen.append(output[0].dtype))
    try:
        generate(flash, tokenizer, prompts[:1], max_new_tokens=2, temperature=0)
    finally:
        hook.remove()
    assert seen and set(seen) == {half}
    assert next(flash.parameters()).dtype == torch.float32
    out = generate(flash, tokenizer, prompts, max_new_tokens=10, temperature=0.7, seed=3)
    assert len(out) == 3 and all(isinstance(text, str) for text in out)
    assert generate(flash, tokenizer, prompts, max_new_tokens=10, temperature=0.7, seed=3) == out
    # Left padding under flash attention: the batch matches one prompt at a time (greedy).
    greedy = generate(flash, tokenizer, prompts, max_new_tokens=8, temperature=0)
    assert greedy == [generate(flash, tokenizer, p, max_new_tokens=8, temperature=0)[0] for p in prompts]
