"""Refuse-early checks: what would otherwise fail deep inside transformers, a CUDA kernel or Lightning mid-run."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import torch

from lit_flash import loss
from lit_flash.attention import (
    SDPA_BACKENDS,
    check_attention_dropout_runs,
    check_precision_fits,
    check_sdpa_backends_run_on,
)
from lit_flash.errors import LitFlashError
from lit_flash.nonfinite import check_skip_supported


@dataclass(frozen=True)
class DataFacts:
    """What a DataModule tells the model about its blocks (`WikitextDataModule.data_facts()`); None: unknown."""

    seq_len: int | None = None
    max_token_id: int | None = None
    tokenizer_size: int | None = None
    max_token_where: str | None = None  # e.g. "labels of the 'train' rows in /input"
    tokenizer_trained: bool = False  # trained on the run's text (data.train_tokenizer_vocab_size), not loaded


def check_data_fits_model(
    config: Any,
    seq_len: int | None = None,
    max_token_id: int | None = None,
    tokenizer_size: int | None = None,
    vocab_size: int | None = None,
    max_token_where: str | None = None,
    tokenizer_trained: bool = False,
) -> None:
    """Catch on the host what would otherwise be a CUDA device-side assert deep inside the embedding."""
    vocab = vocab_size or config.vocab_size
    context = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    if seq_len is not None and context is not None and seq_len > context:
        raise LitFlashError(
            f"data.block_size: rows have {seq_len} tokens but the model's context is {context}; lower data.block_size"
        )
    if max_token_id is not None and max_token_id >= vocab:
        raise LitFlashError(
            f"{max_token_where or 'the data'}: holds token id {max_token_id} but the model's vocabulary has {vocab} "
            "ids: tokenize with the model's tokenizer (data.tokenizer_name) or raise model.model_config.vocab_size"
        )
    if tokenizer_size is not None and tokenizer_size > vocab:
        flag, fix = ("data.train_tokenizer_vocab_size", f"set it to at most {vocab}") if tokenizer_trained else (
            "data.tokenizer_name", "use the model's own tokenizer")
        raise LitFlashError(
            f"{flag}: the tokenizer has {tokenizer_size} tokens but the model only {vocab}: {fix} or set "
            "model.model_config.vocab_size"
        )


# A model's sizes under transformers' generic names (GPT-2 maps n_embd -> hidden_size etc. in `attribute_map`).
_SIZE_NAMES = ("vocab_size", "max_position_embeddings", "hidden_size", "num_hidden_layers", "num_attention_heads")


def check_model_config(model_config: Any, from_scratch: bool = True) -> None:
    """Refuse `model.model_config` values no model can be built from, naming the key, before anything is built:
    sizes below 1 or not integers, dropout outside [0, 1), and (from scratch, where every size is known) a width
    the heads do not divide. transformers would raise deep inside the model's `__init__`, or build a model that
    cannot train (zero layers, an empty vocabulary)."""
    if model_config is None:
        return
    if not isinstance(model_config, dict):
        raise LitFlashError(f"model.model_config must be a mapping of config keys to values, got {model_config!r}")
    from transformers import AutoConfig

    given = dict(model_config)
    model_type = given.pop("model_type", "gpt2")
    try:
        defaults = AutoConfig.for_model(model_type)
    except (ValueError, KeyError, TypeError) as err:
        raise LitFlashError(f"model.model_config.model_type={model_type!r}: not a transformers model type") from err
    own_name = dict(getattr(defaults, "attribute_map", {}))  # generic name -> this model type's own

    def key_of(generic: str) -> str:  # the name the user wrote, or else the model's own name for it
        return generic if generic in given else own_name.get(generic, generic)

    for generic in _SIZE_NAMES:
        key = key_of(generic)
        if key in given and not _is_count(given[key]):
            raise LitFlashError(f"model.model_config.{key}={given[key]!r}: must be an integer >= 1")
    for key in ("n_inner", "intermediate_size"):  # the MLP width: null means 4 x the width
        if given.get(key) is not None and not _is_count(given[key]):
            raise LitFlashError(f"model.model_config.{key}={given[key]!r}: must be an integer >= 1, or null")
    for key, value in given.items():
        if ("pdrop" in key or key.endswith("dropout")) and not _is_fraction_below_one(value):
            raise LitFlashError(f"model.model_config.{key}={value!r}: must be a dropout probability in [0, 1)")
        problem = _type_problem(value, getattr(defaults, key, None))
        if problem:
            raise LitFlashError(f"model.model_config.{key}={value!r}: {problem}")
        if ("epsilon" in key or key.endswith("_eps")) and not value > 0:
            raise LitFlashError(f"model.model_config.{key}={value!r}: must be a number > 0")
        if key in ("activation_function", "hidden_act") and isinstance(value, str):
            from transformers.activations import ACT2FN

            if value not in ACT2FN:  # transformers raises a bare KeyError when the model is built
                raise LitFlashError(
                    f"model.model_config.{key}={value!r}: not an activation transformers knows; one of "
                    + ", ".join(sorted(ACT2FN))
                )
    if not from_scratch:  # a pretrained model's other sizes are unknown until it loads
        return
    try:
        config = AutoConfig.for_model(model_type, **as_declared_types(given, defaults))
    except Exception as err:  # noqa: BLE001 - any refusal of the config (huggingface_hub's strict dataclasses raise
        # their own Exception subclass) is a bad model_config, said in one line
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise LitFlashError(f"model.model_config: cannot build a {model_type} config ({first})") from err
    width, heads = getattr(config, "hidden_size", None), getattr(config, "num_attention_heads", None)
    if _is_count(width) and _is_count(heads) and width % heads:
        raise LitFlashError(
            f"model.model_config.{key_of('hidden_size')}={width} is not divisible by "
            f"model.model_config.{key_of('num_attention_heads')}={heads}: choose a head count that divides the width"
        )
    check_model_fits_memory(config)


def check_model_fits_memory(config: Any) -> None:
    """Refuse a from-scratch model whose fp32 weights alone exceed this machine's memory: building it would fail
    deep inside torch's allocator, or drive the machine into swap. Counted on the meta device (nothing allocated)."""
    import copy

    from transformers import AutoModelForCausalLM

    def count(layers: int | None) -> int:
        shape = copy.deepcopy(config)
        if layers is not None:
            shape.num_hidden_layers = layers
        with torch.device("meta"):
            return sum(p.numel() for p in AutoModelForCausalLM.from_config(shape).parameters())

    layers = getattr(config, "num_hidden_layers", None)
    try:
        if isinstance(layers, int) and layers > 2:  # two layers built, the rest counted: a huge depth builds fast
            one, two = count(1), count(2)
            params = one + (layers - 1) * (two - one)
        else:
            params = count(None)
    except Exception:  # noqa: BLE001 - a config the model cannot be built from is said where it is built
        return
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if 4 * params > memory:
        raise LitFlashError(
            f"model.model_config: this {config.model_type} model has {params:.3g} parameters, {4 * params / 2**30:,.0f}"
            f" GiB in fp32 before any training state, more than this machine's {memory / 2**30:,.0f} GiB of memory: "
            "make its sizes (vocab_size, n_embd, n_layer, n_positions) smaller"
        )


def _type_problem(value: Any, default: Any) -> str | None:
    """What is wrong with `value` for a config key whose default is `default` (its declared kind), if anything."""
    if isinstance(default, bool):
        return None if isinstance(value, bool) else "must be true or false"
    if isinstance(default, int):
        return None if isinstance(value, int) and not isinstance(value, bool) else "must be an integer"
    if isinstance(default, float):
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        return None if ok else "must be a finite number"
    return None


def as_declared_types(given: dict[str, Any], defaults: Any) -> dict[str, Any]:
    """`layer_norm_epsilon: 1` is a float the YAML wrote as an int; transformers' strict configs refuse the int."""
    return {
        key: float(value)
        if isinstance(getattr(defaults, key, None), float) and isinstance(value, int) and not isinstance(value, bool)
        else value
        for key, value in given.items()
    }


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 2**63 - 1


def _is_fraction_below_one(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value < 1


def check_module_args(
    attn_implementation: str, sdpa_backends: list[str] | None, lr_scheduler: str, warmup_steps: int,
    compile: bool, compile_mode: str,
) -> None:
    """Refuse `FlashGPT2LM` arguments that contradict each other (each alone is checked by its type)."""
    if compile_mode != "default" and not compile:
        raise LitFlashError(f"model.compile_mode={compile_mode} needs model.compile=true")
    if sdpa_backends and attn_implementation != "sdpa":
        raise LitFlashError(
            f"model.sdpa_backends is for model.attn_implementation=sdpa, not {attn_implementation}: "
            "set model.attn_implementation=sdpa or model.sdpa_backends=null"
        )
    if lr_scheduler == "constant" and warmup_steps:  # transformers' get_scheduler would drop the warm-up silently
        raise LitFlashError(
            f"model.lr_scheduler=constant has no warm-up (model.warmup_steps={warmup_steps}): "
            "use model.lr_scheduler=constant_with_warmup, or model.warmup_steps=0"
        )
    unknown = set(sdpa_backends or ()) - set(SDPA_BACKENDS)
    if unknown:
        raise LitFlashError(f"model.sdpa_backends: unknown {sorted(unknown)}; choose from {list(SDPA_BACKENDS)}")


def check_validation_interval(trainer: Any, train_batches: int | None) -> None:
    """An integer `trainer.val_check_interval` above an epoch's training batches, while validating by epochs:
    Lightning refuses it with a traceback once the loader is built; say it before, naming both keys."""
    interval, every = trainer.val_check_interval, trainer.check_val_every_n_epoch
    if train_batches is None or every is None or not isinstance(interval, int) or isinstance(interval, bool):
        return
    limit = trainer.limit_train_batches
    batches = min(train_batches, limit) if isinstance(limit, int) else int(train_batches * limit)
    if interval > batches:
        raise LitFlashError(
            f"trainer.val_check_interval={interval} is more than an epoch's {batches} training batches, and "
            f"trainer.check_val_every_n_epoch={every} counts within epochs: set check_val_every_n_epoch to null "
            "(count steps across epochs, as the shipped recipes do) or lower val_check_interval"
        )


def check_batch_fractions(trainer: Any, loaders: dict[str, Any]) -> None:
    """A fraction `trainer.limit_{train,val,test}_batches` that leaves less than one batch of the split: Lightning
    refuses it with a traceback once the loader is built (after the sanity check, or mid-fit for validation).
    `loaders`: split ("train", "val", "test") -> a function returning its DataLoader; called only for a fraction."""
    for split, make_loader in loaders.items():
        key = f"limit_{split}_batches"
        limit = getattr(trainer, key, None)
        if not isinstance(limit, float) or not 0 < limit < 1:
            continue
        try:
            batches = len(make_loader())
        except TypeError:  # a stream: no length, Lightning does not scale it
            continue
        if batches and int(batches * limit) == 0:
            raise LitFlashError(
                f"trainer.{key}={limit}: that fraction of the {batches} {split} batches is less than one batch: give "
                f"a fraction >= {1 / batches:.3g}, or a number of batches (an integer such as 1)"
            )


def check_before_stage(
    trainer: Any, stage: str, model_config: Any, vocab_size: int, attn_implementation: str, hparams: Any
) -> None:
    """The checks that need the trainer, its device or the data, run when fit/validate/test/predict sets up
    (`FlashGPT2LM.setup`): a mistake is one line before the first step. `hparams`: the module's arguments."""
    device, precision = trainer.strategy.root_device, str(trainer.precision)
    key = "attn_pdrop" if getattr(model_config, "attn_pdrop", None) is not None else "attention_dropout"
    attn_dropout = (getattr(model_config, key, None) or 0.0) if stage == "fit" else 0.0  # none when evaluating
    check_sdpa_backends_run_on(device, hparams.sdpa_backends, attn_dropout)
    check_attention_dropout_runs(attn_implementation, attn_dropout, key)
    loss.check_fused_loss_runs_on(device, hparams.fused_cross_entropy)
    check_skip_supported(hparams.on_nonfinite, precision, trainer.strategy)
    check_precision_fits(attn_implementation, precision)
    dm = getattr(trainer, "datamodule", None)
    # Another DataModule (or loaders passed to fit) tells nothing: then only the model's own sizes are known.
    facts = dm.data_facts() if hasattr(dm, "data_facts") else DataFacts()
    check_data_fits_model(
        model_config, vocab_size=vocab_size, seq_len=facts.seq_len, max_token_id=facts.max_token_id,
        tokenizer_size=facts.tokenizer_size, max_token_where=facts.max_token_where,
        tokenizer_trained=facts.tokenizer_trained,
    )
    if stage == "fit" and hasattr(dm, "train_dataloader"):
        check_validation_interval(trainer, _length(dm.train_dataloader()))
    splits = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}.get(stage, ())
    check_batch_fractions(trainer, {s: getattr(dm, f"{s}_dataloader") for s in splits
                                    if hasattr(dm, f"{s}_dataloader")})


def _length(loader: Any) -> int | None:
    """A loader's number of batches, or None for a stream (no length)."""
    try:
        return len(loader)
    except TypeError:
        return None
