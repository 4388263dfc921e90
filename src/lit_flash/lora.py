"""LoRA adapters through PEFT (`model.lora`): only the adapter trains, checkpoints hold only what trains, and the
export is the merged plain model (default) or the adapter alone.

The adapter is injected into transformers' own model in place (`peft.inject_adapter_in_model`), not wrapped in a
`PeftModel`: `FlashGPT2LM.model` stays the transformers model, so `model.base_model` (the transformer body the loss
calls), `get_output_embeddings()`, `config.vocab_size`, DDP and generation are unchanged. A `PeftModel` would make
`base_model` the `LoraModel` (the whole LM, logits out) and prefix every name. `peft` is imported inside the
functions: `import lit_flash` does not need it.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from lit_flash.errors import LitFlashError
from lit_flash.limits import DropoutFloat, PositiveFloat, PositiveInt


@dataclass
class LoraSettings:
    """LoRA on the model's linear layers (`--model.lora.r 8` ...; `model.lora: null`, the default, is off).

    Args:
        r: Rank of the update matrices.
        alpha: Scale: the update is multiplied by `alpha / r`.
        dropout: Dropout on the adapter's input.
        target_modules: Linear layers of the transformer blocks to adapt, by name or name suffix (PEFT's rule).
            GPT-2's are `c_attn` (the fused query/key/value projection), `c_proj` (attention and MLP outputs) and
            `c_fc`. The embeddings and the head are not allowed: GPT-2 ties them, and a merge would change both.
        export: What the Hugging Face export holds: `merged` (a plain transformers model, the adapter merged into
            the weights, no peft needed to load it) or `adapter` (PEFT's `adapter_config.json` and
            `adapter_model.safetensors`, for `PeftModel.from_pretrained(base, path)`).
    """

    # The defaults are litgpt's (finetune/lora: r 8, alpha 16, dropout 0.05, query and value) and PEFT's own for
    # GPT-2 (`c_attn`): GPT-2 fuses query, key and value into c_attn, so it is the one module that holds them.
    r: PositiveInt = 8
    alpha: PositiveFloat = 16.0
    dropout: DropoutFloat = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["c_attn"])
    export: Literal["merged", "adapter"] = "merged"

    def __post_init__(self) -> None:  # the CLI's parser checks the same; this is for Python callers
        for key, kind in (("r", PositiveInt), ("alpha", PositiveFloat), ("dropout", DropoutFloat)):
            try:
                setattr(self, key, kind.check(getattr(self, key)))
            except ValueError as err:
                raise LitFlashError(f"model.lora.{key}={getattr(self, key)!r}: {str(err).split(', got')[0]}") from None
        if self.export not in ("merged", "adapter"):
            raise LitFlashError(f"model.lora.export={self.export!r}: choose merged or adapter")


def as_settings(lora: LoraSettings | dict[str, Any] | None) -> LoraSettings | None:
    """`lora` as `LoraSettings` (a checkpoint's hyperparameters hold it as a plain dict), its layer names checked
    here rather than in `__post_init__`: the CLI's parser would turn a refusal there into a traceback."""
    settings = LoraSettings(**lora) if isinstance(lora, dict) else lora
    if settings is None:
        return None
    names = settings.target_modules
    if not names or not all(isinstance(t, str) and t.strip() for t in names):
        raise LitFlashError(
            f"model.lora.target_modules={names!r}: give a list of layer names, e.g. [c_attn, c_proj, c_fc]"
        )
    return settings


def as_hparam(lora: LoraSettings | dict[str, Any] | None) -> dict[str, Any] | None:
    """The settings as plain values: checkpoints are loaded with `weights_only=True`, which refuses a dataclass."""
    return None if lora is None else asdict(as_settings(lora))


def _peft() -> Any:
    try:
        import peft
    except ImportError as err:
        raise LitFlashError(
            f"model.lora needs peft ({err}): pip install 'lit-flash[lora]', or set model.lora null"
        ) from None
    return peft


def _linear_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The linear layers (nn.Linear, transformers' Conv1D) of the transformer body, by full name."""
    from transformers.pytorch_utils import Conv1D

    prefix = next(n for n, m in model.named_modules() if m is model.base_model)
    return {f"{prefix}.{n}" if prefix else n: m for n, m in model.base_model.named_modules()
            if isinstance(m, torch.nn.Linear | Conv1D)}


def apply_lora(model: torch.nn.Module, lora: LoraSettings, pretrained: bool) -> None:
    """Inject the adapter into `model` in place and freeze everything else (embeddings and head included)."""
    if not pretrained:
        raise LitFlashError(
            "model.lora needs pretrained weights (model.model_name_or_path): checkpoints hold only the adapter, "
            "so a from-scratch model's frozen random weights would be lost"
        )
    peft = _peft()
    from transformers.pytorch_utils import Conv1D

    layers = _linear_layers(model)
    matched = {t: [n for n in layers if n == t or n.endswith(f".{t}")] for t in lora.target_modules}
    missing = [t for t, names in matched.items() if not names]
    if missing:
        known = sorted({n.rsplit(".", 1)[-1] for n in layers})
        raise LitFlashError(f"model.lora.target_modules: {missing} names no linear layer of the model's blocks; "
                            f"they are {known}")
    # GPT-2's Conv1D stores its weight as (in, out): PEFT must transpose (it warns and does so itself otherwise).
    conv1d = any(isinstance(layers[n], Conv1D) for names in matched.values() for n in names)
    config = peft.LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                             target_modules=list(lora.target_modules), fan_in_fan_out=conv1d, bias="none")
    peft.inject_adapter_in_model(config, model)  # also freezes every parameter but the adapter's (bias "none")


def trainable_state_dict(module: torch.nn.Module, state_dict: dict[str, Any]) -> dict[str, Any]:
    """`state_dict` (of `module`) without the frozen parameters: the adapter, and any buffers."""
    frozen = {n for n, p in module.named_parameters(remove_duplicate=False) if not p.requires_grad}
    return {k: v for k, v in state_dict.items() if k not in frozen}


def check_checkpoint_lora(lora: dict[str, Any] | None, checkpoint: dict[str, Any], name: str) -> None:
    """A checkpoint trained with LoRA (only the adapter) loaded without `model.lora`, or the other way round: one
    line saying which and what to change, instead of check_state_dict_fits' first missing weight. `lora`: this
    model's `model.lora` hyperparameter; `name`: how the line names the checkpoint (`ckpt_path=...`)."""
    from lit_flash.ckpt_file import switched_sections

    saved = checkpoint.get("hyper_parameters") or {}
    if "lora" not in saved:
        return  # a checkpoint that does not say: its weights are checked by name
    if not switched_sections({"lora": lora}, {"lora": saved["lora"]}):
        # Both with LoRA: what defines the adapter's function must match. r and target_modules change its shapes
        # (a size or missing-weight error would name a tensor); alpha only its scale, alpha / r: silently.
        then, now = saved["lora"] or {}, lora or {}
        for key in ("r", "alpha", "target_modules"):
            if key in then and then.get(key) != now.get(key):
                raise LitFlashError(
                    f"{name} was trained with model.lora.{key}={then[key]!r} and this run has {now.get(key)!r}: "
                    f"resume with model.lora.{key}={then[key]!r} (dropout and export may differ)"
                )
        return
    if lora is None:
        raise LitFlashError(
            f"{name} was trained with model.lora (it holds only the adapter, not the model's weights), and "
            "model.lora is null here: set model.lora as that run did (e.g. --config configs/lora.yaml)"
        )
    raise LitFlashError(
        f"{name} was trained without model.lora (a full fine-tune: it holds no adapter), and model.lora is set "
        "here: remove model.lora (leave out configs/lora.yaml, or pass --model.lora null) to resume it"
    )


# A LoRA checkpoint's key for the fingerprint of the base model it was trained on (it holds no base weights).
BASE_KEY = "lit_flash_lora_base"


def base_fingerprint(model: torch.nn.Module) -> dict[str, list[float]]:
    """Each weight of the pretrained model as loaded (fp32, before any vocabulary padding) summed, and its absolute
    values summed, in fp64: one cheap pass (a fraction of a second for GPT-2's 124M parameters), plain floats for
    a `weights_only` load. Another model of the same shape, even another fine-tune of the same one, changes sums."""
    with torch.no_grad():
        # vector_norm's 1-norm: the absolute sum without an fp32 copy of each weight (p.abs() was 3x slower).
        return {name: [float(p.sum(dtype=torch.float64)), float(torch.linalg.vector_norm(p, 1, dtype=torch.float64))]
                for name, p in model.named_parameters()}


def _first_difference(here: dict[str, list[float]], saved: dict[str, list[float]]) -> str | None:
    """The first weight whose sums differ beyond summation-order noise (relative to its absolute sum), or None."""
    if set(here) != set(saved):
        return next(iter(sorted(set(here) ^ set(saved))))
    for name, (total, size) in here.items():
        scale = max(size, saved[name][1], 1e-30)
        if abs(total - saved[name][0]) > 1e-6 * scale or abs(size - saved[name][1]) > 1e-6 * scale:
            return name
    return None


def check_checkpoint_base(
    fingerprint: dict[str, list[float]] | None, checkpoint: dict[str, Any], name: str, model_name_or_path: str | None
) -> None:
    """A LoRA checkpoint loaded onto another base model of the same shape (another model.model_name_or_path, or
    its folder's weights replaced) is refused: the adapter only fits the base it was trained on. Checkpoints from
    before the fingerprint was saved are not checked."""
    saved = checkpoint.get(BASE_KEY)
    differs = None if fingerprint is None or saved is None else _first_difference(fingerprint, saved)
    if differs is None:
        return
    then = (checkpoint.get("hyper_parameters") or {}).get("model_name_or_path")
    given = f"model.model_name_or_path={model_name_or_path}"
    if then == model_name_or_path:  # the same name, other weights: the folder was written over since
        raise LitFlashError(
            f"{given}: its weights changed since {name} was trained on them ({differs} differs), and its LoRA "
            "adapter only fits the weights it was trained on: put those back, or give another ckpt_path"
        )
    raise LitFlashError(
        f"{given}: its weights are not the base model {name} was trained on (model.model_name_or_path={then} then; "
        f"{differs} differs), and its LoRA adapter only fits that base: give that base model, or another ckpt_path"
    )


def check_strategy(strategy: Any) -> None:
    from lightning.pytorch.strategies import FSDPStrategy

    if isinstance(strategy, FSDPStrategy):
        raise LitFlashError("model.lora does not run under FSDP in lit_flash: use DDP (configs/ddp.yaml) or one "
                            "device; with LoRA a GPT-2 sized model fits one GPU")


def plain_copy(model: torch.nn.Module, merge: bool) -> torch.nn.Module:
    """A CPU copy of `model` without its adapter, merged into the weights if `merge`; `model` is not changed."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    plain = copy.deepcopy(model).cpu()
    for name, layer in list(plain.named_modules()):
        if isinstance(layer, BaseTunerLayer):
            if merge:
                layer.merge()
            parent, _, child = name.rpartition(".")
            setattr(plain.get_submodule(parent), child, layer.get_base_layer())
    plain.__dict__.pop("peft_config", None)  # transformers would save an adapter-only model otherwise
    return plain


def export_lora(model: torch.nn.Module, lora: LoraSettings, vocab_size: int, path: str | Path, tokenizer: Any,
                run_dir: str | Path | None, flag: str | None) -> Path:
    """`FlashGPT2LM.export_hf` with LoRA: the merged plain model, or the adapter alone (`lora.export`)."""
    from lit_flash.export import export_causal_lm, write_export

    if lora.export == "merged":
        return export_causal_lm(plain_copy(model, merge=True), vocab_size, path, tokenizer, None, run_dir, flag)
    peft = _peft()
    # PEFT's own save of a PeftModel: its file names and key names, which PeftModel.from_pretrained expects.
    wrapped = peft.get_peft_model(plain_copy(model, merge=False), copy.deepcopy(model.peft_config["default"]))
    adapter = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    if wrapped.base_model.model.load_state_dict(adapter, strict=False).unexpected_keys:
        raise RuntimeError("the adapter's names differ from PEFT's: nothing was exported")

    def write(folder: Path) -> None:
        wrapped.save_pretrained(str(folder), save_embedding_layers=False)  # they do not train (nor pad ids)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(folder))

    return write_export(path, write, run_dir, flag or f"path={path}")
