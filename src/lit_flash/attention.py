"""Attention backends: whether FlashAttention-2 can run here, and which backend to use instead.

Shared by training (`module.py`) and inference (`generate.py`); importing it loads neither Lightning nor
transformers.
"""

from __future__ import annotations

import importlib
from typing import Literal, get_args

import torch

from lit_flash.errors import LitFlashError

AttnImplementation = Literal["flash_attention_2", "sdpa", "eager"]
SDPABackend = Literal["cudnn", "flash", "efficient", "math"]
SDPA_BACKENDS = {
    "cudnn": "CUDNN_ATTENTION", "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "math": "MATH"
}


def flash_attention_unavailable_reason(device: torch.device | None = None) -> str | None:
    """Why FlashAttention-2 cannot run here, or None when it can."""
    if device is not None and device.type != "cuda":
        return f"the trainer runs on {device.type}, and flash-attn needs a CUDA GPU"
    try:  # an import, not a find_spec: a wheel built for another torch/CUDA fails here, not mid-training
        importlib.import_module("flash_attn")
    except ImportError as err:
        return f"flash-attn cannot be imported ({err}); pip install 'lit-flash[flash]' on a CUDA machine"
    if not torch.cuda.is_available():
        return "no CUDA GPU is available"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        name = torch.cuda.get_device_name(device)
        return f"the GPU {name} is sm_{major}{minor}; flash-attn needs sm_80 (Ampere) or newer"
    return None


def resolve_attn_implementation(
    requested: str, fallback: bool = True, device: torch.device | None = None
) -> str:
    """The attention backend to load: `requested`, or `sdpa` (said once, with the reason) when flash cannot run."""
    if requested not in get_args(AttnImplementation):
        raise LitFlashError(
            f"model.attn_implementation={requested!r} is unknown: choose one of "
            + ", ".join(get_args(AttnImplementation))
        )
    if requested != "flash_attention_2":
        return requested
    reason = flash_attention_unavailable_reason(device)
    if reason is None:
        return requested
    if not fallback:
        raise LitFlashError(
            f"model.attn_implementation=flash_attention_2 cannot run: {reason}; "
            "set model.attn_fallback=true to use sdpa instead"
        )
    from lightning.pytorch.utilities import rank_zero_warn  # here: generate.py imports this module without Lightning

    rank_zero_warn(f"flash_attention_2 cannot run: {reason}. Using sdpa instead (model.attn_fallback=false to stop).")
    return "sdpa"
