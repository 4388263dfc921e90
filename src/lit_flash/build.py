"""The causal LM lit_flash trains: transformers' own model, loaded from a hub id or a local folder or built from a
config, with lit_flash's settings (dropout, attention) and its training-time changes (vocabulary padding, a 16-bit
residual stream)."""

from __future__ import annotations

from typing import Any

import torch

from lit_flash.errors import LitFlashError
from lit_flash.guards import as_declared_types, check_model_config


def load_causal_lm(
    model_name_or_path: str | None,
    model_config: dict[str, Any] | None,
    dropout: float | None,
    attn_implementation: str,
    trust_remote_code: bool,
) -> torch.nn.Module:
    """`model.model_name_or_path` with `model.model_config`'s overrides, or (null) a fresh model of that config;
    fp32 weights, in train mode. Every refusal names the key to fix."""
    from transformers import AutoConfig, AutoModelForCausalLM

    overrides = dict(model_config or {})
    if dropout is not None:
        overrides.update(resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)
    common = {"attn_implementation": attn_implementation, "trust_remote_code": trust_remote_code}
    if model_name_or_path is None:
        if not model_config:
            raise LitFlashError("model.model_name_or_path is null: give model.model_config to build a model")
        check_model_config(model_config)
        model_type = overrides.pop("model_type", "gpt2")
        defaults = AutoConfig.for_model(model_type)  # a config keeps unknown keys as attributes: typos pass
        unknown = sorted(k for k in overrides if not hasattr(defaults, k))
        if unknown:
            flag = "model.model_config" if set(unknown) & set(model_config) else "model.dropout (GPT-2's keys)"
            raise LitFlashError(f"{flag}: {unknown} is not a setting of {model_type} models")
        config = AutoConfig.for_model(model_type, **as_declared_types(overrides, defaults))
        return AutoModelForCausalLM.from_config(config, **common)
    from lit_flash.generate import check_model_source, pretrained_load_errors

    check_model_source(model_name_or_path, "model.model_name_or_path")
    try:
        check_shapes_kept(model_name_or_path, overrides, model_config or {}, trust_remote_code)
        # fp32 master weights: Lightning's 16-mixed autocasts; fp16 weights would break its GradScaler.
        model = AutoModelForCausalLM.from_pretrained(
            model_name_or_path, dtype=torch.float32, **overrides, **common
        )
    except LitFlashError:  # check_shapes_kept's own line (a ValueError), not wrapped in "cannot load it"
        raise
    except pretrained_load_errors() as err:  # ValueError: e.g. custom code without trust_remote_code
        first = str(err).splitlines()[0]
        raise LitFlashError(f"model.model_name_or_path={model_name_or_path}: cannot load it ({first})") from err
    except TypeError as err:  # a key the model's config does not know reaches the model's __init__
        raise LitFlashError(f"model.model_config or model.dropout: not a setting of this model ({err})") from err
    # from_pretrained returns eval mode (dropout off), and Lightning >= 2.6 keeps each submodule's mode when fit
    # starts: a fine-tune would silently run without the model's dropout (on_fit_start sets train mode too).
    return model.train()


def check_shapes_kept(
    model_name_or_path: str, overrides: dict[str, Any], model_config: dict[str, Any], trust_remote_code: bool
) -> None:
    """Refuse `model.model_config` overrides that change the shape of the pretrained weights (n_embd, n_layer,
    vocab_size, ...): transformers printed a table of every mismatched weight, then a traceback. Both models are
    built on the meta device (no memory), only when an override differs from the pretrained config."""
    if not set(overrides) & set(model_config):  # the usual fine-tune: no config read twice at start-up
        return
    from transformers import AutoConfig, AutoModelForCausalLM

    pretrained = AutoConfig.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code)
    changed = {k: v for k, v in overrides.items() if k in model_config and getattr(pretrained, k, v) != v}
    if not changed:
        return
    changed_config = AutoConfig.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code, **changed)
    shapes = []
    for config in (pretrained, changed_config):
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code,
                                                     attn_implementation="eager")
        shapes.append({name: tuple(t.shape) for name, t in model.state_dict().items()})
    if shapes[0] != shapes[1]:
        was = ", ".join(f"{k}={getattr(pretrained, k)!r}" for k in changed)
        raise LitFlashError(
            f"model.model_config: {changed} changes the shape of model.model_name_or_path={model_name_or_path}'s "
            f"weights (it has {was}): leave those keys out to fine-tune it, or set model.model_name_or_path: null "
            "to train a fresh model of that size"
        )


def adapt_for_training(model: torch.nn.Module, pad_vocab_to_multiple_of: int | None,
                       low_precision_residual: bool) -> torch.Tensor:
    """Pad the vocabulary (faster matmuls) and cast the embeddings' output to the autocast dtype if asked; return
    the logits' bias: 0 for real ids, a huge negative for pad ids (probability exactly 0, no gradient)."""
    if getattr(model, "loss_type", "") is None:  # GPT-2's class name does not tell transformers its loss
        model.loss_type = "ForCausalLM"  # (it would guess this one, with a warning at the first step)
    real = model.config.vocab_size
    if pad_vocab_to_multiple_of:
        model.resize_token_embeddings(real, pad_to_multiple_of=pad_vocab_to_multiple_of)
    if low_precision_residual:
        for module in model.base_model.modules():
            if isinstance(module, torch.nn.Embedding):  # GPT-2: tokens (wte) and positions (wpe)
                module.register_forward_hook(_to_autocast_dtype)
    bias = torch.zeros(model.config.vocab_size)
    bias[real:] = -1e4
    return bias


def _to_autocast_dtype(module: torch.nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
    # Embeddings are not autocast ops: their fp32 output would make every later residual add fp32 too.
    device = output.device.type
    return output.to(torch.get_autocast_dtype(device)) if torch.is_autocast_enabled(device) else output
