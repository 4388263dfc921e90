"""The training loss: GPT-2's head and the next-token cross-entropy over a batch's hidden states.

Three ways to compute the same loss (`model.fused_cross_entropy`): torch's matmul + cross-entropy, compiled
with the forward when `model.compile` is on (`false`); or a fused kernel that never holds the whole batch's
logits (batch x seq x vocab): liger-kernel's fused linear cross-entropy (`liger`, or `true`), or Cut
Cross-Entropy (`cut`, Apple's `cut-cross-entropy`), which computes each logit tile in on-chip memory.
"""

from __future__ import annotations

from typing import Any, Literal, Protocol

import torch
import torch.nn.functional as F

from lit_flash.blocks import IGNORE_INDEX
from lit_flash.errors import LitFlashError

FusedCrossEntropy = bool | Literal["liger", "cut"]


class FusedLoss(Protocol):
    def __call__(
        self, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, bias: torch.Tensor, vocab_size: int
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
    ids, a huge negative for pad ids) or left out by the fused kernels.
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
        return fused(hidden, head.weight, targets, vocab_bias, vocab_size)
    # Masking the pad ids with the bias keeps the logits' aligned width (a slice to 50257 would not).
    logits = (head(hidden) + vocab_bias).float()
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX)


def fused_loss(choice: FusedCrossEntropy) -> FusedLoss | None:
    """The kernel `model.fused_cross_entropy` names (imported now, so a missing package stops the run at once)."""
    if choice is False:
        return None
    if choice == "cut":
        return _cut_cross_entropy()
    return _liger_cross_entropy()


def check_fused_loss_runs_on(device: torch.device, choice: FusedCrossEntropy) -> None:
    """Both kernels are Triton code for CUDA GPUs."""
    if choice is not False and device.type != "cuda":
        raise LitFlashError(
            f"model.fused_cross_entropy={str(choice).lower()} runs on CUDA GPUs only (Triton kernels): set it false "
            "on this machine"
        )


def liger_fused_ce() -> torch.nn.Module:
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError as err:
        raise LitFlashError(
            f"model.fused_cross_entropy=liger needs liger-kernel ({err}): pip install 'lit-flash[fast]', or set it "
            "false"
        ) from err
    return LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX)


def _liger_cross_entropy() -> FusedLoss:
    kernel = liger_fused_ce()

    def loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, bias: torch.Tensor,
             vocab_size: int) -> torch.Tensor:
        # liger wants the head weight in the activations' dtype (bf16/fp16 under autocast), not fp32.
        return kernel(weight.to(hidden.dtype), hidden, targets, bias=bias.to(hidden.dtype))

    return loss


def _cut_cross_entropy() -> FusedLoss:
    try:
        from cut_cross_entropy import linear_cross_entropy
    except ImportError as err:
        raise LitFlashError(
            f"model.fused_cross_entropy=cut needs cut-cross-entropy ({err}): pip install 'lit-flash[fast]', or set "
            "it false"
        ) from err

    def loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, bias: torch.Tensor,
             vocab_size: int) -> torch.Tensor:
        # Its kernel takes no bias: the padded rows are left out instead (the first rows of a row-major weight
        # are a view, no copy). It wants both operands in one 16-bit dtype: the autocast one, as a matmul gets.
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        return linear_cross_entropy(hidden.to(dtype), weight[:vocab_size].to(dtype), targets,
                                    ignore_index=IGNORE_INDEX)

    return loss
