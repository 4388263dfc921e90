"""The training loss: GPT-2's head and the next-token cross-entropy over a batch's hidden states.

Two ways to compute the same loss (`model.fused_cross_entropy`): torch's matmul + cross-entropy, compiled with
the forward when `model.compile` is on (false); or liger-kernel's fused linear cross-entropy (true), which never
holds the whole batch's logits (batch x seq x vocab). Cut Cross-Entropy was measured as a third and left out:
benchmarks/RESULTS.md.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.nn.functional as F

from lit_flash.blocks import IGNORE_INDEX
from lit_flash.errors import LitFlashError


class FusedLoss(Protocol):
    def __call__(
        self, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, bias: torch.Tensor
    ) -> torch.Tensor: ...


def causal_lm_loss(
    model: Any,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None,
    attention_kwargs: dict[str, Any],
    vocab_size: int,
    vocab_bias: torch.Tensor,
    fused: FusedLoss | None,
) -> torch.Tensor:
    """Mean cross-entropy of each token's prediction of the next one (labels equal to `IGNORE_INDEX` left out).

    `vocab_size`: the real vocabulary; rows of the head beyond it are padding, masked by `vocab_bias` (0 for real
    ids, a huge negative for pad ids), in the fused kernel as in torch's.
    """
    if fused is None and model.config.vocab_size == vocab_size:
        return model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **attention_kwargs).loss
    out = model.base_model(input_ids=input_ids, attention_mask=attention_mask, **attention_kwargs)
    hidden = out.last_hidden_state.reshape(-1, out.last_hidden_state.shape[-1])
    # Shift the labels, not the hidden states (as transformers' own loss does): the last position predicts
    # nothing (ignored), and the head's matmul keeps all batch x seq rows, contiguous, with no slice copy.
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).reshape(-1)
    head = model.get_output_embeddings()
    if fused is not None:
        return fused(hidden, head.weight, targets, vocab_bias)
    # Masking the pad ids with the bias keeps the logits' aligned width (a slice to 50257 would not).
    logits = (head(hidden) + vocab_bias).float()
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX)


def fused_loss(fused_cross_entropy: bool) -> FusedLoss | None:
    """liger's kernel when asked (imported now, so a missing package stops the run at once), else None."""
    return _liger_cross_entropy() if fused_cross_entropy else None


_CUDA_ONLY = "model.fused_cross_entropy=true runs on CUDA GPUs only (Triton kernels)"


def check_fused_loss_runs_on(device: torch.device | str, fused_cross_entropy: bool) -> None:
    """liger's kernels are Triton code for CUDA GPUs. `device`: the trainer's device, or its type ("cpu")."""
    if fused_cross_entropy and getattr(device, "type", device) != "cuda":
        raise LitFlashError(f"{_CUDA_ONLY}: set it false on this machine")


def liger_fused_ce() -> torch.nn.Module:
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError as err:
        if not torch.cuda.is_available():
            # Installing it would not help here: say the requirement that cannot be met first.
            raise LitFlashError(
                f"{_CUDA_ONLY} and this machine has none: set it false (on a GPU machine it also needs liger-kernel: "
                "pip install 'lit-flash[fast]')"
            ) from err
        raise LitFlashError(
            f"model.fused_cross_entropy=true needs liger-kernel ({err}): pip install 'lit-flash[fast]', or set it "
            "false"
        ) from err
    return LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX)


def _liger_cross_entropy() -> FusedLoss:
    kernel = liger_fused_ce()

    def loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        # liger wants the head weight in the activations' dtype (bf16/fp16 under autocast), not fp32.
        return kernel(weight.to(hidden.dtype), hidden, targets, bias=bias.to(hidden.dtype))

    return loss

