"""What training measures: the token-weighted mean loss, perplexity, and FLOPs per token."""

from __future__ import annotations

from typing import Any

import torch
from torchmetrics import Metric

from lit_flash.blocks import IGNORE_INDEX


def perplexity(mean_loss: torch.Tensor | float) -> torch.Tensor:
    """Perplexity from a token-weighted mean cross-entropy (natural log)."""
    return torch.exp(torch.as_tensor(mean_loss, dtype=torch.float64)).to(torch.float32)


class TokenMean(Metric):
    """The mean loss over predicted tokens, summed across batches and ranks.

    torchmetrics' MeanMetric looks for NaN in every update with a host read, which stalls the GPU at each evaluation
    batch. Here a NaN batch (e.g. one with no token to predict) simply makes the mean NaN, as it should: a dropped
    batch would give a finite, too-good val_ppl.
    """

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("tokens", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, loss: torch.Tensor, weight: torch.Tensor | int) -> None:
        """`loss`: a batch's mean over its predicted tokens; `weight`: how many tokens that mean is over."""
        self.total += loss.double() * weight
        self.tokens += weight

    def compute(self) -> torch.Tensor:
        return (self.total / self.tokens).float()


def row_scores(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each row's mean loss over its predicted tokens (labels not -100, shifted by one), its perplexity and count."""
    targets = labels[:, 1:]
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none"
    )
    n_tokens = (targets != IGNORE_INDEX).sum(dim=1)
    loss = nll.sum(dim=1) / n_tokens.clamp(min=1)
    return {"loss": loss, "ppl": perplexity(loss), "n_tokens": n_tokens}


def flops_per_token(config: Any, seq_len: int, training: bool = True) -> float:
    """FLOPs per token: 6N + 12·L·d·T for a training step (N parameters, L layers, width d, T tokens of context;
    PaLM's appendix B), a third of that for a forward pass alone."""
    n_params = sum(p.numel() for p in _params_of_config(config))
    layers, width = config.num_hidden_layers, config.hidden_size  # GPT-2's n_layer/n_embd, by any model's names
    train_flops = 6 * n_params + 12 * layers * width * seq_len
    return train_flops if training else train_flops / 3


def _params_of_config(config: Any) -> list[torch.Tensor]:
    # Parameter count without building the model: meta tensors cost nothing.
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return list(model.parameters())
