"""data.packing on a real GPU: flash-attn's variable-length path gives each packed document the logits, loss and
gradients it has alone; padded (empty) `cu_seq_lens` entries change nothing; a compiled training step compiles once
over batches with different document counts and never syncs the host.

Run on the GPU machine: `pytest -m gpu tests/gpu/test_packing_gpu.py -v -s` (CUDA, flash-attn, an sm_80+ GPU).
"""

from __future__ import annotations

import pytest
import torch

from lit_flash import FlashGPT2LM
from lit_flash.attention import flash_attention_unavailable_reason
from lit_flash.packing import collate_packed, cu_seq_lens, packed_attention_kwargs

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or flash_attention_unavailable_reason() is not None,
        reason="needs a CUDA GPU (sm_80+) with flash-attn",
    ),
]

CONFIG = {"model_type": "gpt2", "n_layer": 4, "n_head": 8, "n_embd": 512, "n_positions": 1024, "vocab_size": 50257}
BLOCK = 1024
# bf16 keeps 8 mantissa bits: relative error by norm allowed between a packed document and the same one alone.
TOLERANCE = {"logits": 2e-2, "loss": 5e-3, "grads": 5e-2}


def rel(x: torch.Tensor, y: torch.Tensor) -> float:
    return ((x.float() - y.float()).norm() / y.float().norm()).item()


def build() -> FlashGPT2LM:
    torch.manual_seed(0)
    module = FlashGPT2LM(model_name_or_path=None, model_config=CONFIG, attn_implementation="flash_attention_2",
                         attn_fallback=False, dropout=0.0)
    assert module.attn_implementation == "flash_attention_2"
    return module.cuda()


def packed_batch(lengths_per_row: list[list[int]], cu_length: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for lengths in lengths_per_row:
        assert sum(lengths) == BLOCK
        rows.append({
            "input_ids": torch.randint(0, 50257, (BLOCK,), generator=g),
            "position_ids": torch.cat([torch.arange(n) for n in lengths]),
        })
    return collate_packed(rows, eos_id=None, cu_length=cu_length)


def to_cuda(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.cuda(non_blocking=True) for k, v in batch.items()}


ROWS = [[100, 300, 57, 567], [1024], [1, 1023]]


def test_packed_documents_match_each_document_alone_logits_loss_and_grads():
    module = build()
    batch = to_cuda(packed_batch(ROWS, cu_length=4 + 1 + 2 + 9))  # 9 padded (empty) sequences at the end
    with torch.autocast("cuda", dtype=torch.bfloat16):
        kwargs = packed_attention_kwargs(batch["position_ids"], batch["cu_seq_lens"], module.attn_implementation)
        packed = module(batch["input_ids"], None, **kwargs).logits.float()
    alone, starts = [], []
    for r, lengths in enumerate(ROWS):
        offset = 0
        for n in lengths:
            ids = batch["input_ids"][r : r + 1, offset : offset + n]
            with torch.autocast("cuda", dtype=torch.bfloat16):
                alone.append(module(ids).logits.float()[0])
            starts.append((r, offset, n))
            offset += n
    packed_docs = [packed[r, o : o + n] for r, o, n in starts]
    error = rel(torch.cat(packed_docs), torch.cat(alone))
    print(f"packed vs alone logits, rel. error {error:.2e}")
    assert error < TOLERANCE["logits"]
    # Without the boundaries, the same rows attend across documents: far off (the test can fail).
    with torch.autocast("cuda", dtype=torch.bfloat16):
        plain = module(batch["input_ids"]).logits.float()
    assert rel(plain[0, 100:400], alone[1]) > 10 * TOLERANCE["logits"]

    # Loss and gradients: the packed batch's loss is the token-weighted mean of the documents' own losses.
    module.zero_grad()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss, n_tokens = module._loss(batch, training=True)
    loss.backward()
    packed_grads = [p.grad.clone() for p in module.parameters() if p.grad is not None]
    module.zero_grad()
    total = torch.zeros((), device="cuda")
    for r, o, n in starts:
        if n < 2:
            continue  # a one-token document has nothing to predict
        ids = batch["input_ids"][r : r + 1, o : o + n]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            total = total + module.model(input_ids=ids, labels=ids).loss.float() * (n - 1)
    reference = total / n_tokens
    reference.backward()
    alone_grads = [p.grad for p in module.parameters() if p.grad is not None]
    print(f"loss {loss.item():.5f} vs {reference.item():.5f}")
    assert rel(loss, reference) < TOLERANCE["loss"]
    grad_error = rel(torch.cat([g.flatten() for g in packed_grads]), torch.cat([g.flatten() for g in alone_grads]))
    print(f"grads rel. error {grad_error:.2e}")
    assert grad_error < TOLERANCE["grads"]


def test_empty_padding_sequences_change_nothing():
    module = build()
    tight = to_cuda(packed_batch(ROWS, cu_length=8))
    padded = {**tight, "cu_seq_lens": cu_seq_lens(tight["position_ids"].cpu(), 64).cuda()}
    out = []
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        for b in (tight, padded):
            kwargs = packed_attention_kwargs(b["position_ids"], b["cu_seq_lens"], module.attn_implementation)
            out.append(module(b["input_ids"], None, **kwargs))
    torch.testing.assert_close(out[0].logits, out[1].logits, rtol=0, atol=0)


def test_a_compiled_packed_step_compiles_once_and_never_syncs():
    from torch._inductor.compile_fx import compile_fx

    torch._dynamo.reset()
    compiles = []

    def backend(gm, example_inputs):
        compiles.append(len(example_inputs))
        return compile_fx(gm, example_inputs)

    module = build()
    module._compute_loss = torch.compile(module._loss_impl, dynamic=False, backend=backend)
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4, fused=True)
    layouts = [[[1024], [512, 512]], [[10] * 100 + [24], [1024]], [[300, 724], [1, 2, 1021]], [[1024], [1024]]]
    cu_length = 2 * 100 + 1  # the loader's bound: one shape whatever a batch holds
    counts = []
    try:
        for step in range(8):
            batch = to_cuda(packed_batch(layouts[step % 4], cu_length, seed=step))
            if step >= 2:
                torch.cuda.set_sync_debug_mode("error")
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss, _ = module._loss(batch, training=True)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            torch.cuda.set_sync_debug_mode("default")
            counts.append(len(compiles))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    print(f"graphs compiled after each step: {counts}")
    assert counts[1:] == [counts[0]] * 7  # everything compiled at the first step, never again
    assert torch.isfinite(loss).item()
