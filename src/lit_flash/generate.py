"""Text generation from an exported model: `python -m lit_flash generate ...`, or `generate()` in Python.

The reference recipe's `predict.py` (`--model_name_or_path`, `--input_str`, `--max_new_tokens`) does this for
one prompt; here prompts are many, batched and left-padded (the side causal LMs and flash attention need).
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Literal

import torch

from lit_flash.attention import AttnImplementation, is_flash
from lit_flash.errors import LitFlashError, check_can_create, not_a_file
from lit_flash.limits import NonNegativeFloat, OpenUnitFloat, PositiveInt, SeedInt

MIN_TEMPERATURE = 1e-3  # below: logits scaled past fp32's range; at it, sampling is already as good as greedy


def _check_sampling(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None) -> None:
    if max_new_tokens < 1:
        raise LitFlashError(f"max_new_tokens={max_new_tokens}: must be >= 1")
    if temperature < 0:
        raise LitFlashError(f"temperature={temperature}: must be >= 0 (0 is greedy decoding)")
    if 0 < temperature < MIN_TEMPERATURE:  # logits / 1e-40 overflow to inf: "probability tensor contains inf"
        raise LitFlashError(
            f"temperature={temperature}: must be 0 (greedy decoding) or >= {MIN_TEMPERATURE} (smaller ones overflow "
            "the scaled logits and sample nothing but greedy anyway)"
        )
    if top_k is not None and top_k < 1:
        raise LitFlashError(f"top_k={top_k}: must be >= 1, or null for no top-k filter")
    if top_p is not None and not 0 < top_p <= 1:
        raise LitFlashError(f"top_p={top_p}: must be in (0, 1], or null for no nucleus filter")


def _half_precision_autocast(model: Any, device: torch.device) -> contextlib.AbstractContextManager:
    """FlashAttention runs in fp16/bf16 only: with fp32 weights, autocast the forward passes."""
    flash = is_flash(str(getattr(model.config, "_attn_implementation", None)))
    if device.type == "cuda" and flash and next(model.parameters()).dtype == torch.float32:
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


@torch.no_grad()
def generate(
    model: Any,
    tokenizer: Any,
    prompts: str | list[str],
    max_new_tokens: int = 100,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    batch_size: int = 8,
) -> list[str]:
    """Complete each prompt; returns the generated continuations (without the prompts), in order.

    Sampling when `temperature > 0` (with optional top-k / top-p filters), greedy decoding at 0. Prompts are
    batched `batch_size` at a time and left-padded. `seed` makes sampling reproducible without touching the
    caller's global random state. `model` is a transformers causal LM (e.g. `FlashGPT2LM(...).model`).
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    _check_sampling(max_new_tokens, temperature, top_k, top_p)
    if batch_size < 1:
        raise LitFlashError(f"batch_size={batch_size}: must be >= 1")
    # Left padding: every row's last prompt token sits at the end, where generation continues.
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    options: dict[str, Any] = {"max_new_tokens": max_new_tokens, "pad_token_id": tokenizer.pad_token_id}
    if temperature > 0:
        # top_k=0 and top_p=1.0 switch the filters off (a model's generation_config may set others).
        options.update(do_sample=True, temperature=temperature, top_k=top_k or 0, top_p=top_p or 1.0)
    else:
        options.update(do_sample=False, temperature=None, top_k=None, top_p=None)
    config = model.config
    # Ids the tokenizer cannot decode (e.g. a vocabulary padded for speed) are never produced.
    known = set(tokenizer.get_vocab().values())
    unknown = [i for i in range(config.vocab_size) if i not in known]
    if unknown:
        options["suppress_tokens"] = unknown
    context = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    completions: list[str] = []
    devices = [device] if device.type == "cuda" else []
    try:
        rng = torch.random.fork_rng(devices=devices, enabled=seed is not None)
        with rng, _half_precision_autocast(model, device):
            if seed is not None:
                torch.manual_seed(seed)
            for start in range(0, len(prompts), batch_size):
                chunk = prompts[start : start + batch_size]
                batch = tokenizer(chunk, return_tensors="pt", padding=True).to(device)
                lengths = batch["attention_mask"].sum(dim=1)
                if int(lengths.min()) == 0:
                    empty = start + int(lengths.argmin())
                    raise LitFlashError(f"prompt {empty} is empty: give at least one token")
                prompt_len = batch["input_ids"].shape[1]
                if context is not None and prompt_len + max_new_tokens > context:
                    raise LitFlashError(
                        f"max_new_tokens={max_new_tokens}: with a {prompt_len}-token prompt this passes the "
                        f"model's {context}-token context; lower max_new_tokens or shorten the prompt"
                    )
                output = model.generate(**batch, **options)
                new_tokens = output[:, prompt_len:]
                completions += tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    finally:
        model.train(was_training)
    return completions


def load_for_generation(
    model_name_or_path: str,
    device: str | None = None,
    attn_implementation: AttnImplementation | None = None,
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto",
    tokenizer: str | None = None,
) -> tuple[Any, Any]:
    """Load an exported model (a run's `model/` folder, or a hub id) and its tokenizer for `generate`.

    `attn_implementation=None`: flash_attention_2 where it can run (CUDA, flash-attn installed), else sdpa.
    `tokenizer`: where the tokenizer is, when not beside the model (an export of a run without one).
    """
    from transformers import AutoModelForCausalLM

    from lit_flash.attention import flash_attention_unavailable_reason, resolve_attn_implementation
    from lit_flash.text import load_tokenizer

    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if attn_implementation is None:
        can_flash = flash_attention_unavailable_reason(target) is None
        attn_implementation = "flash_attention_2" if can_flash else "sdpa"
    else:
        attn_implementation = resolve_attn_implementation(attn_implementation, False, target, "--attn_implementation")
    source, flag = (model_name_or_path, "--model_name_or_path") if tokenizer is None else (tokenizer, "--tokenizer")
    check_model_source(model_name_or_path, "--model_name_or_path")
    if tokenizer is not None:
        check_model_source(tokenizer, "--tokenizer", needs_config=False)
    fix = "give the tokenizer's folder or hub id" if tokenizer is not None else (
        "a run with data.tokenizer_name: null exports none; pass --tokenizer <the tokenizer the data was tokenized "
        "with: a hub id or a folder>")
    loaded_tokenizer = load_tokenizer(source, flag, fix)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            model_name_or_path, dtype=dtype, attn_implementation=attn_implementation
        )
    except pretrained_load_errors() as err:
        first = str(err).splitlines()[0]
        raise LitFlashError(f"--model_name_or_path {model_name_or_path}: cannot load it ({first})") from err
    return model.to(target).eval(), loaded_tokenizer


def pretrained_load_errors() -> tuple[type[Exception], ...]:
    """What `from_pretrained` raises for a model folder it cannot load: missing files (OSError), a bad config
    (ValueError), weights of other shapes than its config.json (RuntimeError), a truncated or corrupt weights file
    (safetensors' SafetensorError: a traceback before)."""
    from safetensors import SafetensorError

    return OSError, ValueError, RuntimeError, SafetensorError


def check_model_source(source: str, flag: str, needs_config: bool = True) -> None:
    """A local path must be a model folder: transformers takes anything else for a hub id and says so confusingly
    (`Repo id must be in the form ...`), or fails inside a tokenizer conversion."""
    path = Path(source).expanduser()
    local = path.exists() or source.startswith((".", "/", "~")) or source.count("/") > 1
    if not local:
        return  # a hub id
    given = f"{flag} {source}" if flag.startswith("--") else f"{flag}={source}"  # a tool's flag, or a config key
    if not path.exists():
        raise LitFlashError(f"{given}: no such folder (give a run's exported model folder, <run>/model)")
    if not path.is_dir():
        raise LitFlashError(f"{given} is a file: give the folder holding it (a run's <run>/model)")
    if needs_config and not (path / "config.json").is_file() and (path / "adapter_config.json").is_file():
        raise LitFlashError(
            f"{given} holds a LoRA adapter alone (adapter_config.json, no config.json: model.lora.export=adapter), "
            "not a whole model: fit with model.lora.export=merged (the default) to export one, or merge this adapter "
            f"into its base with peft: PeftModel.from_pretrained({_adapter_base(path)}, '{source}').merge_and_unload()"
        )
    if needs_config and not (path / "config.json").is_file():
        raise LitFlashError(
            f"{given} holds no config.json, so it is not a saved model: give a run's exported model folder "
            "(<run>/model)"
        )


def _adapter_base(path: Path) -> str:
    """How the LoRA error names the adapter's base model: as its adapter_config.json records it, when it does."""
    try:
        base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        base = None
    return f"AutoModelForCausalLM.from_pretrained('{base}')" if isinstance(base, str) and base else "base_model"


def check_device(device: str | None) -> None:
    """`--device`: a torch device this machine has."""
    if device is None:
        return
    try:
        target = torch.device(device)
    except (RuntimeError, ValueError):
        raise LitFlashError(f"--device {device}: not a device name (cpu, cuda, cuda:1, ...)") from None
    if target.type == "cuda" and not torch.cuda.is_available():
        raise LitFlashError(f"--device {device}: this machine has no CUDA GPU; use --device cpu")
    if target.type == "cuda" and target.index is not None and target.index >= torch.cuda.device_count():
        raise LitFlashError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")


def expand_prompts_flag(args: list[str]) -> list[str]:
    """Let `--prompts a b c` (the shell's way) mean jsonargparse's `--prompts+=a --prompts+=b ...`."""
    out: list[str] = []
    in_prompts = False
    for i, arg in enumerate(args):
        json_list_next = i + 1 < len(args) and args[i + 1].startswith("[")
        if arg == "--prompts" and not json_list_next:
            in_prompts = True
        elif in_prompts and not arg.startswith("--"):
            out.append(f"--prompts+={arg}")
        else:
            in_prompts = False
            out.append(arg)
    return out


def read_prompts(prompts_file: str | Path) -> list[str]:
    """One prompt per line; blank lines are skipped."""
    from lit_flash.text import check_text_file

    path = Path(prompts_file)
    if not path.is_file():
        raise LitFlashError(f"--prompts_file {path}: {not_a_file(path)}: give a text file, one prompt a line")
    check_text_file(path, "--prompts_file")
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def generate_main(
    model_name_or_path: str,
    prompts: list[str] | None = None,
    prompts_file: str | None = None,
    input_str: str | None = None,
    max_new_tokens: PositiveInt = 100,
    temperature: NonNegativeFloat = 1.0,
    top_k: PositiveInt | None = None,
    top_p: OpenUnitFloat | None = None,
    seed: SeedInt | None = None,
    batch_size: PositiveInt = 8,
    output: str | None = None,
    device: str | None = None,
    attn_implementation: AttnImplementation | None = None,
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto",
    tokenizer: str | None = None,
) -> None:
    """Generate completions from an exported model (`<default_root_dir>/model` after `fit`).

    Args:
        model_name_or_path: Folder of an exported model (with its tokenizer), or a hub id.
        prompts: Prompts: `--prompts "Once upon" "The war"` (or a JSON list).
        prompts_file: A text file with one prompt per line (blank lines skipped).
        input_str: One prompt (the reference recipe's predict.py flag).
        max_new_tokens: Tokens to generate per prompt.
        temperature: Sampling temperature; 0 decodes greedily; otherwise at least 0.001.
        top_k: Sample only among the k most likely tokens (null: no limit).
        top_p: Nucleus sampling: the smallest set of tokens whose probability reaches p (null: no limit).
        seed: Seed for reproducible sampling.
        batch_size: Prompts per forward batch (left-padded).
        output: Write JSON lines `{"prompt": ..., "completion": ...}` to this new file instead of printing.
        device: `cuda`, `cpu`, `cuda:1`, ...; default: cuda when available.
        attn_implementation: Default: flash_attention_2 where it can run, else sdpa.
        dtype: Weights' dtype; `auto` keeps the saved one (fp32 is autocast to 16 bits for flash attention).
        tokenizer: The tokenizer (hub id or folder) when the model folder has none (a run without
            data.tokenizer_name exports no tokenizer); default: the model's own folder.
    """
    texts = list(prompts or []) + ([input_str] if input_str is not None else [])
    if prompts_file is not None:
        texts += read_prompts(prompts_file)
    if not texts:
        raise LitFlashError("no prompts: give --prompts, --input_str or --prompts_file")
    if output is not None and not output.strip():
        raise LitFlashError("--output is empty: give the file to write, such as completions.jsonl")
    if output is not None and output.endswith(("/", os.sep)):  # open() failed on it after the whole generation
        raise LitFlashError(f"--output {output} names a folder: give a file name, such as {output}completions.jsonl")
    if output is not None and Path(output).exists():
        raise LitFlashError(f"--output {output} exists: choose another file or remove it yourself")
    if output is not None:  # before the (slow) model load and generation
        check_can_create(output, f"--output {output}", "choose another file")
    _check_sampling(max_new_tokens, temperature, top_k, top_p)  # before the (slow) model load
    check_device(device)
    model, loaded_tokenizer = load_for_generation(model_name_or_path, device, attn_implementation, dtype, tokenizer)
    completions = generate(
        model, loaded_tokenizer, texts, max_new_tokens, temperature, top_k, top_p, seed=seed, batch_size=batch_size
    )
    if output is None:
        for prompt, completion in zip(texts, completions, strict=True):
            print(f"{prompt}{completion}\n{'-' * 80}")
        return
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    try:
        f = open(output, "x", encoding="utf-8")  # noqa: SIM115 - "x": a file created since the check is not replaced
    except FileExistsError:
        raise LitFlashError(f"--output {output} exists: choose another file or remove it yourself") from None
    with f:
        for prompt, completion in zip(texts, completions, strict=True):
            f.write(json.dumps({"prompt": prompt, "completion": completion}) + "\n")
    print(f"wrote {len(completions)} completions to {output}")
