"""The fused cross-entropy kernels on a real GPU: the same loss and gradients as compiled torch cross-entropy.

Run on the GPU machine: `pytest -m gpu tests/gpu/test_loss_gpu.py -v -s` (needs CUDA and the extra `fast`).
"""

from __future__ import annotations

import pytest
import torch

from lit_flash import FlashGPT2LM

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# GPT-2's vocabulary (padded to 50304 for the torch loss) and width, 2 layers: the head and loss dominate.
CONFIG = {"model_type": "gpt2", "n_layer": 2, "n_head": 12, "n_embd": 768, "n_positions": 1024, "vocab_size": 50257}


def rel(x: torch.Tensor, y: torch.Tensor) -> float:
    return ((x.float() - y.float()).norm() / y.float().norm()).item()


def loss_and_grads(fused: bool | str, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    module = FlashGPT2LM(model_name_or_path=None, model_config=CONFIG, attn_implementation="sdpa", dropout=0.0,
                         pad_vocab_to_multiple_of=64, low_precision_residual=True, fused_cross_entropy=fused).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = module._loss(batch, training=True)[0]
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in module.model.named_parameters()}


@pytest.mark.parametrize("fused", ["cut"])
def test_fused_cross_entropy_matches_torch_under_bf16(fused):
    pytest.importorskip("cut_cross_entropy")
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 50257, (4, 1024), generator=generator).cuda()
    labels = ids.clone()
    labels[0, :100] = -100  # ignored positions count in neither loss
    batch = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}
    loss, grads = loss_and_grads(False, batch)
    fused_loss, fused_grads = loss_and_grads(fused, batch)
    print(f"{fused}: loss {fused_loss.item():.6f} vs {loss.item():.6f}")
    assert rel(fused_loss, loss) < 2e-3
    errors = {name: rel(fused_grads[name], grad) for name, grad in grads.items()}
    print("  grad rel. errors:", {name: f"{error:.1e}" for name, error in errors.items()})
    # The tied embedding/head holds the head's gradient, which Cut Cross-Entropy filters by design (entries of
    # the softmax below bf16's resolution are skipped: its default filter_eps="high"), so it gets a wider bound.
    head = "transformer.wte.weight"
    assert errors[head] < 0.15
    assert all(error < 5e-2 for name, error in errors.items() if name != head), errors
    # The pad rows (50257..50303) of the tied embedding/head get no gradient from either loss.
    assert fused_grads["transformer.wte.weight"][50257:].abs().max().item() == 0.0
