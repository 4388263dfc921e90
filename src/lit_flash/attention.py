"""Attention backends: whether FlashAttention-2 or -3 can run here, which backend to use instead, and what each
backend cannot run (precision, dropout, sdpa kernels on a CPU).

Shared by training (`module.py`) and inference (`generate.py`); importing it loads neither Lightning nor
transformers.
"""

from __future__ import annotations

import contextlib
import importlib
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from lit_flash.errors import LitFlashError, warn_user

AttnImplementation = Literal["flash_attention_2", "flash_attention_3", "sdpa", "eager"]
SDPABackend = Literal["cudnn", "flash", "efficient", "math"]
SDPA_BACKENDS = {
    "cudnn": "CUDNN_ATTENTION", "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "math": "MATH"
}


@dataclass(frozen=True)
class _FlashPackage:
    module: str  # what to import
    package: str  # its pip name
    install: str  # how to get it
    lowest: tuple[int, int]  # the oldest GPU capability it runs on
    only_major: int | None = None  # the one GPU generation it runs on (kernels written for one architecture)


_FLASH = {
    "flash_attention_2": _FlashPackage("flash_attn", "flash-attn", "pip install 'lit-flash[flash]' on a CUDA machine",
                                       (8, 0)),
    # FlashAttention-3 is Hopper's kernel (wgmma/TMA), built from flash-attention's hopper/ folder (not on PyPI).
    "flash_attention_3": _FlashPackage("flash_attn_interface", "flash-attn-3",
                                       "build flash-attn-3 from flash-attention's hopper/ folder", (9, 0), 9),
}


def is_flash(attn_implementation: str) -> bool:
    """Whether the backend is a FlashAttention package (fp16/bf16 only; variable-length rows through cu_seqlens)."""
    return attn_implementation in _FLASH


def flash_attention_unavailable_reason(
    device: torch.device | None = None, attn_implementation: str = "flash_attention_2"
) -> str | None:
    """Why `attn_implementation` (a FlashAttention version) cannot run here, or None when it can."""
    flash = _FLASH[attn_implementation]
    # The GPU first: installing a package cannot help where there is no GPU, or not one it runs on.
    if device is not None and device.type != "cuda":
        return f"{flash.package} needs a CUDA GPU, and this runs on {device.type}"
    if not torch.cuda.is_available():
        return "no CUDA GPU is available"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < flash.lowest or flash.only_major not in (None, major):
        name = torch.cuda.get_device_name(device)
        needs = "Hopper (sm_90)" if flash.only_major else f"sm_{flash.lowest[0]}{flash.lowest[1]} (Ampere) or newer"
        return f"the GPU {name} is sm_{major}{minor}; {flash.package} needs {needs}"
    try:  # an import, not a find_spec: a wheel built for another torch/CUDA fails here, not mid-training
        importlib.import_module(flash.module)
    except ImportError as err:
        return f"{flash.package} cannot be imported ({err}); {flash.install}"
    if not transformers_finds(attn_implementation):
        return (f"{flash.package} imports, but transformers does not find it (it looks for the installed "
                f"distribution {flash.package}; a copied module or an older build is not found); {flash.install}")
    return None


def transformers_finds(attn_implementation: str) -> bool:
    """Whether transformers loads a model with this FlashAttention: it checks the installed distribution's name
    (and flash-attn >= 2.3.3), not the import, and raises an ImportError where it finds none."""
    from transformers.utils import is_flash_attn_2_available, is_flash_attn_3_available

    check = is_flash_attn_3_available if attn_implementation == "flash_attention_3" else is_flash_attn_2_available
    return bool(check())


def resolve_attn_implementation(
    requested: str, fallback: bool = True, device: torch.device | None = None, flag: str = "model.attn_implementation"
) -> str:
    """The attention backend to load: `requested`, or (said once, with the reason) when a FlashAttention cannot run,
    `flash_attention_2` for `flash_attention_3` where that runs, else `sdpa`.

    `flag`: how errors name the setting: the fit CLI's key (`model.attn_implementation`, whose fallback is
    `model.attn_fallback`) or a tool's own flag (`--attn_implementation` of `generate`, which has no fallback key).
    """
    tool = flag.startswith("--")
    named = f"{flag} " if tool else f"{flag}="  # `--flag value` as typed, or the config's `key=value`
    if requested not in get_args(AttnImplementation):
        value = requested if tool else repr(requested)
        raise LitFlashError(f"{named}{value} is unknown: choose one of " + ", ".join(get_args(AttnImplementation)))
    if not is_flash(requested):
        return requested
    reason = flash_attention_unavailable_reason(device, requested)
    if reason is None:
        return requested
    # FlashAttention-3 falls back to FlashAttention-2 where that runs (the same attention, also fp16/bf16), then sdpa.
    instead = "sdpa"
    if requested == "flash_attention_3" and flash_attention_unavailable_reason(device, "flash_attention_2") is None:
        instead = "flash_attention_2"
    if not fallback:
        fix = f"pass {flag} {instead}, or leave it out (flash_attention_2 where it can run, else sdpa)" if tool else (
            f"set model.attn_fallback=true to use {instead} instead")
        raise LitFlashError(f"{named}{requested} cannot run: {reason}; {fix}")
    warn_user(f"{requested} cannot run: {reason}. Using {instead} instead (model.attn_fallback=false to stop).")
    return instead


def sdpa_priority(names: list[str] | None) -> list[SDPBackend]:
    """`model.sdpa_backends` as torch's backends, in that order (resolved once, not at every step)."""
    return [getattr(SDPBackend, SDPA_BACKENDS[name]) for name in names or ()]


def sdpa_kernels_in_order(priority: list[SDPBackend]) -> contextlib.AbstractContextManager:
    """torch's attention kernels to try, in this order, for the block (none given: torch's own choice)."""
    # The backward runs outside this block: eager autograd and torch.compile both keep the forward's kernel.
    return sdpa_kernel(priority, set_priority=True) if priority else contextlib.nullcontext()


def check_sdpa_backends_run_on(device: torch.device, backends: list[str] | None, attn_dropout: float = 0.0) -> None:
    """Refuse a list of SDPA kernels none of which runs on `device`: math and flash are the CPU's only two, and the
    CPU's flash kernel takes no dropout ("No available kernel" at the first training step). `attn_dropout`: the
    attention dropout the steps run with (0 when not training)."""
    if device.type == "cuda" or not backends:
        return
    runs = {"math"} if attn_dropout else {"math", "flash"}
    if not runs & set(backends):
        why = f" with attention dropout {attn_dropout} (its flash kernel takes none)" if "flash" in backends else ""
        raise LitFlashError(
            f"model.sdpa_backends={list(backends)}: none of these runs on {device.type}{why}; add math, or set "
            "model.sdpa_backends=null"
        )


def check_attention_dropout_runs(attn_implementation: str, attn_dropout: float, key: str = "attn_pdrop") -> None:
    """FlashAttention-3 has no dropout, and transformers then drops the model's attention dropout silently. `key`:
    the model config's attention-dropout key (GPT-2's `attn_pdrop` is what `model.dropout` sets)."""
    if attn_implementation == "flash_attention_3" and attn_dropout:
        fix = "model.dropout=0.0" if key == "attn_pdrop" else f"model.model_config.{key}=0.0"
        raise LitFlashError(
            f"model.attn_implementation=flash_attention_3 has no attention dropout, and this model trains with "
            f"{key}={attn_dropout}: set {fix}, or use flash_attention_2"
        )


def check_precision_fits(attn_implementation: str, precision: str) -> None:
    """Refuse a trainer precision the model's settings cannot run in."""
    if is_flash(attn_implementation) and precision in ("32-true", "32", "64-true", "64"):
        raise LitFlashError(
            f"trainer.precision={precision}: {attn_implementation} runs in fp16/bf16 only; "
            "use 16-mixed or bf16-mixed, or model.attn_implementation=sdpa"
        )
