"""A `--ckpt_path` file as the CLI reads it before Lightning does: is it a Lightning checkpoint at all, and which
`model.*` values its stored hyperparameters replace (LightningCLI swaps them in silently)."""

from __future__ import annotations

import os
import sys
import zipfile
from collections.abc import Callable, Mapping
from typing import Any

import torch

from lit_flash.checkpointing import LOAD_ERRORS, check_state_dict_fits, load_error
from lit_flash.errors import LitFlashError


def check_is_lightning_checkpoint(path: str | os.PathLike) -> None:
    """Refuse a file that is not a Lightning checkpoint before Lightning reads it (a KeyError deep in its restore):
    a safetensors file, a plain zip or pickle, text, or a torch file without Lightning's keys."""
    kind = sniff_file_kind(path)
    if kind is not None:
        raise LitFlashError(
            f"ckpt_path={path} is {kind}, not a Lightning checkpoint: give a .ckpt file lit_flash wrote "
            "(e.g. <run>/checkpoints/last.ckpt); to start from Hugging Face weights use --model.model_name_or_path"
        )
    try:
        # mmap: only the small dictionary is read, not the tensors (LightningCLI loads the file again anyway).
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except LOAD_ERRORS as err:
        raise load_error(path, err) from err
    keys = checkpoint if isinstance(checkpoint, dict) else {}
    missing = [k for k in ("state_dict", "pytorch-lightning_version") if k not in keys]
    if missing:
        raise LitFlashError(
            f"ckpt_path={path} is a torch file without Lightning's {missing}, not a Lightning checkpoint: "
            "give a .ckpt file lit_flash wrote (e.g. <run>/checkpoints/last.ckpt)"
        )


def sniff_file_kind(path: str | os.PathLike) -> str | None:
    """What a checkpoint-to-be is by its first bytes, when that is surely not a torch checkpoint; None otherwise."""
    with open(path, "rb") as f:
        head = f.read(64)
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 100_000_000:
        return "a safetensors file"  # an 8-byte header length, then the JSON header
    if head.startswith(b"PK"):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except zipfile.BadZipFile:
            return None  # a damaged torch file: load_error says truncated or corrupted
        # torch's zip checkpoints hold <name>/data.pkl; any other zip is some other archive
        return None if any(n.endswith("data.pkl") for n in names) else "a zip archive"
    if head.startswith((b"{", b"[")) or (head and all(32 <= b < 127 or b in b"\t\r\n" for b in head)):
        return "a text file"
    if head.startswith(b"\x80") and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "a plain pickle file"  # Lightning's checkpoints are torch's zip format
    return None


def warn_replaced_model_values(user: Any, used: Any, ckpt_path: str | os.PathLike) -> None:
    """Say which model.* values the checkpoint's hyperparameters replaced (LightningCLI does it silently)."""
    user_flat, used_flat = _flatten(user), _flatten(used)
    # A section set on one side and null on the other (model.lora: LoRA on or off) is said as a whole.
    user_top, used_top = _sections(user), _sections(used)
    whole = switched_sections(user, used)
    replaced = [(k, user_top[k], used_top[k]) for k in sorted(whole)]
    replaced += [(k, v, used_flat[k]) for k, v in user_flat.items()
                 if k.split(".")[0] not in whole and k in used_flat and used_flat[k] != v]
    for key, value, kept in replaced:
        sys.stderr.write(
            f"lit_flash: model.{key}={value!r} is ignored: --ckpt_path {ckpt_path} was saved with "
            f"model.{key}={kept!r}, which is used\n"
        )


def switched_sections(user: Any, used: Any) -> set[str]:
    """The sections (e.g. `lora`) set on one side and null on the other: a feature switched on or off."""
    user_top, used_top = _sections(user), _sections(used)
    return {k for k in user_top if k in used_top and isinstance(user_top[k], dict) != isinstance(used_top[k], dict)}


def _sections(namespace: Any) -> dict[str, Any]:
    return namespace.as_dict() if hasattr(namespace, "as_dict") else dict(namespace or {})


def _flatten(namespace: Any) -> dict[str, Any]:
    as_dict = _sections(namespace)
    flat: dict[str, Any] = {}
    for key, value in as_dict.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in _flatten(value).items()})
        else:
            flat[key] = value
    return flat


def check_same_model_config(
    current: Any, checkpoint: dict[str, Any], name: str, default: Callable[[str, dict[str, Any]], Any] | None = None
) -> None:
    """Refuse a checkpoint saved with other `model.model_config` values than this run's (n_head,
    activation_function, ...): weights of the same shapes load, and a different model would go on training on
    them unsaid. `--ckpt_path <file>` swaps the checkpoint's values in with a warning (LightningCLI); `auto` and
    `last` are resolved after the model is built, so they refuse instead. Dropout rates (`*_pdrop`) may change.

    `default(key, written)`: the value a model whose model_config is `written` (without `key`) is built with
    (`model_defaults`). A key written on one side only is the same model when the other side's model has that value:
    a config that now writes a default out (or an older one that did not) resumes."""
    stored = (checkpoint.get("hyper_parameters") or {}).get("model_config")
    if not isinstance(stored, dict) or not isinstance(current, dict) and current is not None:
        return  # a checkpoint not written by FlashGPT2LM (or without hyperparameters): nothing to compare
    current = dict(current or {})
    # model_type first: the other keys' defaults are this run's model type's
    for key in sorted(set(stored) | set(current), key=lambda k: (k != "model_type", k)):
        if key.endswith("_pdrop") or key in stored and key in current and stored[key] == current[key]:
            continue
        if key in stored and key in current:
            raise LitFlashError(
                f"{name} was saved with model.model_config.{key}={stored[key]!r}, this run has "
                f"{current[key]!r}: resume with the checkpoint's value, or start a new run "
                "(another trainer.default_root_dir)"
            )
        value = default(key, stored if key in current else current) if default is not None else _UNKNOWN
        if (stored if key in stored else current)[key] == value:
            continue  # written out on one side, left to the same default on the other
        said = "" if value is _UNKNOWN else f" (the model's default, {value!r})"
        if key in stored:
            raise LitFlashError(
                f"{name} was saved with model.model_config.{key}={stored[key]!r}, this run leaves it out{said}: "
                f"resume with model.model_config.{key}={stored[key]!r}, or start a new run "
                "(another trainer.default_root_dir)"
            )
        raise LitFlashError(
            f"{name} was saved without model.model_config.{key}{said}, this run has {current[key]!r}: resume "
            f"without model.model_config.{key}, or start a new run (another trainer.default_root_dir)"
        )


_UNKNOWN = object()  # no default known for a key: a key on one side only differs


def model_defaults(hparams: Any) -> Callable[[str, dict[str, Any]], Any]:
    """`default(key, written)` for check_same_model_config: the value of `key` in the config a model whose
    model_config is `written` is built from. From scratch that is transformers' config of `model_type` built with
    the other written values (Llama's head_dim and num_key_value_heads follow hidden_size and num_attention_heads);
    from a pretrained model, its own config (model_config's values are set on it, nothing is derived again). Read
    only when asked: a resume whose keys match on both sides never reads it."""
    built: list[tuple[dict[str, Any], Any]] = []

    def config_of(written: dict[str, Any]) -> Any:
        from transformers import AutoConfig

        from lit_flash.guards import as_declared_types

        if hparams.model_name_or_path is not None:  # the model loaded from it in this process: local or cached
            return AutoConfig.from_pretrained(hparams.model_name_or_path, trust_remote_code=hparams.trust_remote_code)
        overrides = dict(written)
        model_type = overrides.pop("model_type", "gpt2")
        try:  # as build.load_causal_lm builds it
            return AutoConfig.for_model(model_type, **as_declared_types(overrides, AutoConfig.for_model(model_type)))
        except (ValueError, TypeError, KeyError):  # e.g. a checkpoint's values this transformers no longer takes
            return None

    def default(key: str, written: dict[str, Any]) -> Any:
        if hparams.model_name_or_path is None and key == "model_type":
            return "gpt2"  # what build.load_causal_lm builds without one
        mine = written if hparams.model_name_or_path is None else {}  # a pretrained config does not depend on it
        if not any(w == mine for w, _ in built):
            built.append((mine, config_of(mine)))
        return getattr(next(c for w, c in built if w == mine), key, _UNKNOWN)

    return default


def check_same_vocab_padding(
    current: int | None, checkpoint: dict[str, Any], name: str, expected: Mapping[str, Any]
) -> None:
    """Refuse a checkpoint padded to another `model.pad_vocab_to_multiple_of` than this run's, naming that key:
    its embedding and head have other row counts than `expected` (this model's weights), and check_state_dict_fits
    could only name a weight's shape. Different values that pad to the same rows load as they are."""
    stored = (checkpoint.get("hyper_parameters") or {}).get("pad_vocab_to_multiple_of", current)
    if stored == current:
        return
    found = checkpoint.get("state_dict") or {}
    shapes = [(getattr(found.get(key), "shape", None), want.shape) for key, want in expected.items() if key in found]
    if any(got is not None and tuple(got) != tuple(want) for got, want in shapes):
        raise LitFlashError(
            f"{name} was saved with model.pad_vocab_to_multiple_of={stored!r}, this run has {current!r}: resume "
            "with the checkpoint's value, or start a new run (another trainer.default_root_dir)"
        )


def check_checkpoint_fits(
    checkpoint: dict[str, Any], name: str, hparams: Any, expected: dict[str, Any], base_fingerprint: Any
) -> None:
    """Before Lightning loads a checkpoint's weights into `FlashGPT2LM` (its `hparams`; `expected`: the state dict it
    checkpoints): another model, LoRA setting, base model or padding is one line naming the key, not a page of size
    mismatches or (a transposed or same-size weight) a silently wrong model."""
    from lit_flash import lora as adapters

    check_same_model_config(hparams.model_config, checkpoint, name, model_defaults(hparams))
    adapters.check_checkpoint_lora(hparams.lora, checkpoint, name)
    adapters.check_checkpoint_base(base_fingerprint, checkpoint, name, hparams.model_name_or_path)
    check_same_vocab_padding(hparams.pad_vocab_to_multiple_of, checkpoint, name, expected)
    check_state_dict_fits(expected, checkpoint["state_dict"])

