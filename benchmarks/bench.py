"""Throughput of lit_flash against the reference recipe, on one GPU, in one process.

    python benchmarks/bench.py --out results/         # GPU machine: the reference as shipped, HF Trainer with
                                                      # torch_compile at each config's batch and precision, the
                                                      # recipe (16-mixed, + bf16), fast, fastest, quality
    python benchmarks/bench.py --out results/ --parts recipe,lora   # LoRA (configs/lora.yaml) vs full fine-tuning
    python benchmarks/bench.py --out /tmp/b --cpu-smoke  # a few tiny steps on CPU: checks the script itself
    python benchmarks/bench.py --out results/ --parts packing   # data.packing: speed and validation loss

Every run trains GPT-2 124M from one random init saved with `save_pretrained` (loaded as hub weights are; the
speed does not depend on the weights) on the same synthetic reference-format token blocks (lit_flash.synthetic),
1024 tokens a row. Tokens/s are timed between the
end of the warm-up steps and the last step, with the GPU synchronized at both ends. MFU = tokens/s x FLOPs per token
/ peak, FLOPs per token = 6N + 12*L*d*T (N parameters, L layers, d width, T=1024 context), against both 790 TFLOP/s
(the H100/H200 bf16 dense rate the issue names) and the matmul rate measured here.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

GPT2_124M = {"model_type": "gpt2", "n_layer": 12, "n_head": 12, "n_embd": 768, "n_positions": 1024, "vocab_size": 50257}
TINY = {"model_type": "gpt2", "n_layer": 1, "n_head": 2, "n_embd": 32, "n_positions": 64, "vocab_size": 50257}
# The recipe's every setting on a model too small to keep the GPU busy: its step time is the host's.
HOST_PROBE = {"model_type": "gpt2", "n_layer": 1, "n_head": 1, "n_embd": 64, "n_positions": 1024, "vocab_size": 50257}
PEAK_BF16 = 790e12
ROOT = Path(__file__).resolve().parents[1]


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class StepClock:
    """Wall time from the end of step `warmup` to `stop()`: synchronized at both ends only, so that the clock itself
    does not stall the CPU from queueing kernels ahead."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.steps, self.t0, self.t1 = warmup, 0, None, None
        self.started = time.perf_counter()
        self.host_times: list[float] = []  # when the host finished queueing each step: shows stalls (recompiles)

    def tick(self) -> None:
        self.steps += 1
        self.host_times.append(time.perf_counter())
        if self.steps == self.warmup:
            sync()
            self.t0 = time.perf_counter()

    def stop(self) -> None:
        sync()
        self.t1 = time.perf_counter()

    def rate(self, tokens_per_step: int) -> float:
        return (self.steps - self.warmup) * tokens_per_step / (self.t1 - self.t0)

    def stalls(self) -> dict[str, float]:
        """Host-side step gaps in the timed window: a max far above the median is a stall, not a slow kernel."""
        timed = self.host_times[self.warmup - 1 :]
        gaps = sorted(b - a for a, b in zip(timed, timed[1:], strict=False))
        first = {"first_step_s": self.host_times[0] - self.started} if self.host_times else {}  # compile time
        return {"median_step_s": gaps[len(gaps) // 2], "max_step_s": gaps[-1], **first} if gaps else first


def peak_mem_gib() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def reset() -> None:
    torch._dynamo.reset()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def matmul_tflops(n: int = 8192, iters: int = 50) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(5):
        a @ b
    sync()
    t = time.perf_counter()
    for _ in range(iters):
        a @ b
    sync()
    return 2 * n**3 * iters / (time.perf_counter() - t) / 1e12


def save_initial_weights(model_config: dict, path: Path) -> Path:
    """One random-init GPT-2 saved with `save_pretrained`: every run starts from these weights, loaded the way hub
    weights are (lit_flash through `model.model_name_or_path`, HF Trainer through `from_pretrained`)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(model_config)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg)).save_pretrained(str(path))
    return path


def run_reference(
    data: Path, weights: Path, steps: int, warmup: int, batch: int, smoke: bool, dtype: str = "float16",
    compile: bool = False, amp: bool = False, evaluate: bool = True,
) -> dict:
    """The reference recipe on HF Trainer: `--torch_dtype <dtype>` weights, flash_attention_2, its defaults
    (lr 5e-5, linear schedule, clipping 1.0, GPT-2's dropout). `compile`: its one `--torch_compile` flag, the honest
    peer. `amp`: fp32 weights with fp16 autocast (`--fp16`), the quality baseline."""
    import datasets
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments, default_data_collator

    attn = "sdpa" if smoke else "flash_attention_2"
    torch_dtype = torch.float32 if smoke or amp else getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(str(weights), attn_implementation=attn, dtype=torch_dtype)
    ds = datasets.load_from_disk(str(data))
    clock, eval_clock = StepClock(warmup), StepClock(2)

    class Clock(TrainerCallback):
        def on_step_end(self, *a: Any, **k: Any) -> None:
            clock.tick()

        def on_train_end(self, *a: Any, **k: Any) -> None:
            clock.stop()

        def on_prediction_step(self, *a: Any, **k: Any) -> None:
            eval_clock.tick()

        def on_evaluate(self, *a: Any, **k: Any) -> None:
            eval_clock.stop()

    tmp = tempfile.mkdtemp()
    args = TrainingArguments(
        output_dir=tmp, per_device_train_batch_size=batch, per_device_eval_batch_size=batch, max_steps=steps,
        logging_steps=50, save_strategy="no", eval_strategy="no", report_to=[], use_cpu=smoke,
        disable_tqdm=True, torch_compile=compile and not smoke, fp16=amp and not smoke, seed=42,
    )
    trainer = Trainer(model=model, args=args, train_dataset=ds["train"], eval_dataset=ds["test"],
                      data_collator=default_data_collator, callbacks=[Clock()])
    reset()
    trainer.train()
    seq = len(ds["train"][0]["input_ids"])
    out = {"tokens_per_s": clock.rate(batch * seq), "peak_mem_gib": peak_mem_gib(), "batch": batch,
           "dtype": "fp32+fp16 autocast" if amp else dtype, "torch_compile": compile, **clock.stalls()}
    if evaluate:
        metrics = trainer.evaluate()
        out["eval_tokens_per_s"] = eval_clock.rate(batch * seq)
        out["val_loss"] = float(metrics["eval_loss"])
        out["plain_val_loss"] = plain_val_loss(model, ds["test"], batch)
    shutil.rmtree(tmp, ignore_errors=True)
    del trainer, model
    return out


@torch.no_grad()
def plain_val_loss(model: Any, dataset: Any, batch: int) -> float:
    """Mean loss over the predicted tokens, as lit_flash's val_loss is (rows are equal length: the mean of batch
    means). HF Trainer's own eval_loss divides by all label tokens, the unpredicted last one of each row included,
    so it reads 1/1024 low at 1024 tokens a row."""
    model.eval()
    device = next(model.parameters()).device
    losses = []
    for i in range(0, len(dataset), batch):
        ids = torch.tensor(dataset[i : i + batch]["input_ids"], device=device)
        with torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
            losses.append(model(input_ids=ids, labels=ids).loss.float())
    return float(torch.stack(losses).mean())


def fit_args(data: Path, config: str, weights: Path, steps: int, root_dir: str, overrides: list[str]) -> list[str]:
    """`lit_flash fit` arguments for a timing run: the weights saved at `weights` (as hub weights arrive), the
    synthetic blocks at `data`, `steps` steps, no validation, checkpoints or export."""
    return ["--config", str(ROOT / "configs" / config), "--model.model_name_or_path", str(weights),
            "--data.tokenized_dataset_load_dir", str(data), "--data.tokenizer_name", "null",
            "--trainer.max_steps", str(steps), "--trainer.max_epochs", "-1", "--trainer.limit_val_batches", "0",
            "--trainer.default_root_dir", root_dir, "--trainer.enable_checkpointing", "false",
            "--checkpoint.save_last", "false", "--export.dirname", "null", *overrides]


def run_lit(
    data: Path, config: str, overrides: list[str], weights: Path, steps: int, warmup: int, evaluate: bool = True
) -> dict:
    """`lit_flash fit --config <config>` in-process, from the weights at `weights`, no checkpoints."""
    import lightning as L

    from lit_flash.cli import cli_main

    tmp = tempfile.mkdtemp()
    reset()
    cli = cli_main(fit_args(data, config, weights, steps, tmp, overrides), run=False)
    clock, eval_clock = StepClock(warmup), StepClock(3)

    class Clock(L.Callback):
        def on_train_batch_end(self, *a: Any, **k: Any) -> None:
            clock.tick()

        def on_train_end(self, *a: Any, **k: Any) -> None:
            clock.stop()

        def on_validation_batch_end(self, *a: Any, **k: Any) -> None:
            eval_clock.tick()

        def on_validation_end(self, *a: Any, **k: Any) -> None:
            eval_clock.stop()

    cli.trainer.callbacks.append(Clock())
    clock.started = time.perf_counter()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    rows, seq = cli.datamodule.hparams.batch_size, cli.datamodule.seq_len
    out = {"tokens_per_s": clock.rate(rows * seq), "peak_mem_gib": peak_mem_gib(), "batch": rows,
           "precision": str(cli.trainer.precision), **clock.stalls(),
           "trainable_params": sum(p.numel() for p in cli.model.parameters() if p.requires_grad),
           "params": sum(p.numel() for p in cli.model.parameters())}
    if torch.cuda.is_available():  # cudaFree on a retry synchronizes the device: a hidden per-step stall
        out["alloc_retries"] = torch.cuda.memory_stats().get("num_alloc_retries", 0)
    losses = cli.trainer.callback_metrics
    out["final_train_loss"] = float(losses["train_loss"]) if "train_loss" in losses else None
    if not evaluate:
        shutil.rmtree(tmp, ignore_errors=True)
        return out
    cli.trainer.limit_val_batches = 1.0
    cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)
    out["eval_tokens_per_s"] = eval_clock.rate(cli.datamodule.hparams.eval_batch_size * seq)
    out["val_loss"] = float(cli.trainer.callback_metrics["val_loss"])
    shutil.rmtree(tmp, ignore_errors=True)
    del cli
    return out


def flops_per_token(model_config: dict) -> float:
    from transformers import AutoConfig

    from lit_flash.metrics import flops_per_token as fpt

    cfg = dict(model_config)
    return fpt(AutoConfig.for_model(cfg.pop("model_type"), **cfg), seq_len=cfg["n_positions"])


# Each lever measured on its own: gpt2_fast.yaml with that one lever switched back off (or one extra added), against
# gpt2_fast.yaml itself and the plain gpt2_flash.yaml, all in the same run.
BAR_EVERY_50 = json.dumps(
    [{"class_path": "lightning.pytorch.callbacks.TQDMProgressBar", "init_args": {"refresh_rate": 50}}]
)
LEVERS: list[tuple[str, str, list[str]]] = [
    ("the recipe, gpt2_flash.yaml (16-mixed, batch 8, dropout 0.1, compiled)", "gpt2_flash.yaml", []),
    ("gpt2_fast.yaml (all levers)", "gpt2_fast.yaml", []),
    ("- torch.compile", "gpt2_fast.yaml", ["--model.compile", "false"]),
    ("- dropout 0 (GPT-2's 0.1)", "gpt2_fast.yaml", ["--model.dropout", "null"]),
    ("- vocab padding (50257)", "gpt2_fast.yaml", ["--model.pad_vocab_to_multiple_of", "null"]),
    ("- bf16-mixed (16-mixed + GradScaler)", "gpt2_fast.yaml",
     ["--trainer.precision", "16-mixed", "--model.low_precision_residual", "false"]),
    ("- batch 32 (batch 8)", "gpt2_fast.yaml", ["--data.batch_size", "8"]),
    ("- fused AdamW (foreach)", "gpt2_fast.yaml", ["--model.fused_adamw", "false"]),
    ("- flash_attention_2 (sdpa)", "gpt2_fast.yaml", ["--model.attn_implementation", "sdpa"]),
    ("progress bar redrawn every 50 steps (not every step)", "gpt2_fast.yaml", ["--trainer.callbacks", BAR_EVERY_50]),
    ("+ liger fused linear cross-entropy", "gpt2_fast.yaml", ["--model.fused_cross_entropy", "true"]),
    ("+ batch 64", "gpt2_fast.yaml", ["--data.batch_size", "64"]),
    ("- pinned memory, 0 workers", "gpt2_fast.yaml", ["--data.pin_memory", "false", "--data.num_workers", "0"]),
    ("+ compile max-autotune-no-cudagraphs", "gpt2_fast.yaml", ["--model.compile_mode", "max-autotune-no-cudagraphs"]),
    ("+ compile mode max-autotune (CUDA graphs)", "gpt2_fast.yaml", ["--model.compile_mode", "max-autotune"]),
    ("sdpa with cuDNN attention (for flash_attention_2)", "gpt2_fast.yaml",
     ["--model.attn_implementation", "sdpa", "--model.sdpa_backends", '["cudnn"]']),
    ("- pad_last_batch", "gpt2_fast.yaml", ["--data.pad_last_batch", "false"]),
    ("+ compile mode reduce-overhead (CUDA graphs)", "gpt2_fast.yaml", ["--model.compile_mode", "reduce-overhead"]),
    ("- 16-bit residual stream (fp32 under autocast)", "gpt2_fast.yaml", ["--model.low_precision_residual", "false"]),
    ("recipe: 2 DataLoader worker processes (gpt2_flash.yaml has 0)", "gpt2_flash.yaml", ["--data.num_workers", "2"]),
    ("recipe: no progress bar", "gpt2_flash.yaml", ["--trainer.enable_progress_bar", "false"]),
    ("recipe on a 1-layer, 64-wide GPT-2: the host's own time a step", "gpt2_flash.yaml",
     ["--model.model_name_or_path", "null", "--model.model_config", json.dumps(HOST_PROBE)]),
    ("recipe: + 16-bit residual stream (fp16)", "gpt2_flash.yaml", ["--model.low_precision_residual", "true"]),
    ("recipe: bf16-mixed + 16-bit residual stream", "gpt2_flash.yaml",
     ["--trainer.precision", "bf16-mixed", "--model.low_precision_residual", "true"]),
    ("+ inductor coordinate-descent tuning", "gpt2_fast.yaml", []),
    ("- flash_attention_3 (flash_attention_2)", "gpt2_fast.yaml", ["--model.attn_implementation", "flash_attention_2"]),
]
# Levers that are inductor settings rather than lit_flash keys: patched around that lever's run only.
INDUCTOR_PATCHES = {"+ inductor coordinate-descent tuning": {"coordinate_descent_tuning": True}}


EOS = 50256  # GPT-2's <|endoftext|>: ends each synthetic document


def synthetic_documents(lengths: np.ndarray, seed: int) -> list[np.ndarray]:
    """Documents of the given lengths (the last token EOS), each with its own "topic": the synthetic stream shifted
    by a per-document offset, which only the document's own earlier tokens reveal."""
    from lit_flash.synthetic import synthetic_blocks

    rng = np.random.default_rng(seed)
    stream = synthetic_blocks(1, int(lengths.sum()), seed=seed)[0].astype(np.int64)
    docs, at = [], 0
    for n in lengths:
        doc = (stream[at : at + n] + rng.integers(0, 50000)) % EOS
        doc[-1] = EOS
        docs.append(doc)
        at += n
    return docs


def packed_split(docs: list[np.ndarray], block: int) -> dict[str, np.ndarray]:
    """Documents concatenated and cut into blocks (tail dropped), with position ids restarting after each EOS."""
    from lit_flash.packing import positions_from_starts

    tokens = np.concatenate(docs)
    rows = len(tokens) // block
    ids = tokens[: rows * block].reshape(rows, block)
    start = np.zeros_like(ids, dtype=bool)
    start[:, 1:] = ids[:, :-1] == EOS
    return {"input_ids": ids, "labels": ids, "position_ids": positions_from_starts(start)}


def padded_split(docs: list[np.ndarray], block: int) -> dict[str, np.ndarray]:
    """One document per row (cut at the block), right-padded with EOS whose labels are ignored (-100). Causal
    attention never lets a real token see the padding after it, so the rows need no attention mask."""
    ids = np.full((len(docs), block), EOS, dtype=np.int64)
    labels = np.full((len(docs), block), -100, dtype=np.int64)
    for i, doc in enumerate(docs):
        ids[i, : min(len(doc), block)] = labels[i, : min(len(doc), block)] = doc[:block]
    return {"input_ids": ids, "labels": labels, "position_ids": np.broadcast_to(np.arange(block), ids.shape)}


def save_splits(path: Path, train: dict[str, np.ndarray], test: dict[str, np.ndarray]) -> Path:
    import datasets
    import pyarrow as pa

    from lit_flash.blocks import save_dataset_dict

    def table(split: dict[str, np.ndarray]) -> datasets.Dataset:
        def rows(values: np.ndarray) -> pa.ListArray:
            offsets = np.arange(0, values.size + 1, values.shape[1], dtype=np.int32)
            return pa.ListArray.from_arrays(pa.array(offsets), pa.array(np.ascontiguousarray(values).reshape(-1)))

        return datasets.Dataset(pa.table({k: rows(v) for k, v in split.items()}))

    save_dataset_dict(datasets.DatasetDict(train=table(train), test=table(test)), path)
    return path


def run_packing(work: Path, block: int, cpu: list[str], weights: Path, steps: int, warmup: int, quality_steps: int,
                smoke: bool, cases: str = "a,b,c") -> dict:
    """data.packing on the recipe (gpt2_flash.yaml): (a) wikitext-like documents (a few blocks long) packed vs
    grouped, tokens/s; (b) documents of varied length, packed vs one per row padded to the block, trained (non-pad)
    tokens/s; (c) validation loss after `quality_steps` steps of packed-with-boundaries, packed-without (the same
    blocks) and one-per-row padded (as many real tokens: more steps), each evaluated on the same held-out documents,
    each alone in a padded row. `cases`: which of a, b, c to run."""
    rng = np.random.default_rng(0)
    n_rows = 64 if smoke else 3000
    out: dict[str, Any] = {}
    packing = ["--data.packing", "true"]
    # (a) wikitext-2's articles run about 3.5 blocks of 1024 tokens (lognormal spread).
    long_docs = synthetic_documents(np.clip(rng.lognormal(np.log(3 * block), 0.6, n_rows // 2), 32, None)
                                    .astype(int), seed=1)
    held_out = synthetic_documents(rng.integers(block // 8, block + 1, 16 if smoke else 256), seed=2)
    test = padded_split(held_out, block)
    wiki = save_splits(work / "pack_wiki", packed_split(long_docs, block), test)
    if "a" in cases:
        a = {"packed": run_lit(wiki, "gpt2_flash.yaml", cpu + packing, weights, steps, warmup, evaluate=False),
             "unpacked": run_lit(wiki, "gpt2_flash.yaml", cpu, weights, steps, warmup, evaluate=False)}
        a["packed_vs_unpacked"] = a["packed"]["tokens_per_s"] / a["unpacked"]["tokens_per_s"]
        out["wikitext_like"] = a
        print(json.dumps({"packing_wikitext_like": a}), flush=True)
    # (b) documents of 1/16 to 1 block (lognormal around 1/4 block): padding one per row wastes most of a row.
    lengths = np.clip(rng.lognormal(np.log(block / 4), 0.8, n_rows * 3), block // 16, block).astype(int)
    docs = synthetic_documents(lengths, seed=3)
    packed_dir = save_splits(work / "pack_varied", packed_split(docs, block), test)
    padded = padded_split(docs, block)
    padded_dir = save_splits(work / "pad_varied", padded, test)
    real = float((padded["labels"] != -100).mean())  # the padded rows' share of trained tokens
    if "b" in cases:
        b = {"packed": run_lit(packed_dir, "gpt2_flash.yaml", cpu + packing, weights, steps, warmup, evaluate=False),
             "padded": run_lit(padded_dir, "gpt2_flash.yaml", cpu, weights, steps, warmup, evaluate=False),
             "padded_real_token_share": real}
        b["packed"]["trained_tokens_per_s"] = b["packed"]["tokens_per_s"]
        b["padded"]["trained_tokens_per_s"] = b["padded"]["tokens_per_s"] * real
        b["packed_vs_padded_trained"] = b["packed"]["trained_tokens_per_s"] / b["padded"]["trained_tokens_per_s"]
        out["varied_length"] = b
        print(json.dumps({"packing_varied_length": b}), flush=True)
    if "c" not in cases:
        return out
    # (c) the same documents and about as many of their tokens (the padded rows hold fewer: more steps), evaluated
    # alike (each held-out document alone in a padded row).
    padded_steps = round(quality_steps / real)
    c: dict[str, Any] = {"steps": quality_steps, "padded_steps": padded_steps}
    for name, data, extra, n in (("packed_with_boundaries", packed_dir, packing, quality_steps),
                                 ("packed_without", packed_dir, [], quality_steps),
                                 ("unpacked_padded", padded_dir, [], padded_steps)):
        c[name] = run_lit(data, "gpt2_flash.yaml", cpu + extra, weights, n, 2)["val_loss"]
    out["val_loss"] = c
    print(json.dumps({"packing_val_loss": c}), flush=True)
    return out


# The honest peer of each lit_flash run: HF Trainer with its one `--torch_compile` flag, same batch and precision.
PEERS = {
    "recipe": (8, "float16"), "recipe_bf16": (8, "bfloat16"), "fast": (32, "bfloat16"), "fastest": (64, "bfloat16")
}
PEER_OF = {"fast_eval128": "fast", "fast_fa2": "fast", "fastest_fa2": "fastest"}  # parts that share a peer
LIT_RUNS = {  # part: (config, overlay)
    "recipe": ("gpt2_flash.yaml", []),
    "recipe_bf16": ("gpt2_flash.yaml", ["--trainer.precision", "bf16-mixed"]),
    "fast": ("gpt2_fast.yaml", []),
    "fastest": ("gpt2_fast.yaml", ["--config", str(ROOT / "configs" / "batch64.yaml")]),
    "fast_eval128": ("gpt2_fast.yaml", ["--data.eval_batch_size", "128"]),  # a larger evaluation batch
    # FlashAttention-2 for gpt2_fast.yaml's FlashAttention-3, at each batch: compared with the same peer as fast/fastest
    "fast_fa2": ("gpt2_fast.yaml", ["--model.attn_implementation", "flash_attention_2"]),
    "fastest_fa2": ("gpt2_fast.yaml", ["--config", str(ROOT / "configs" / "batch64.yaml"),
                                       "--model.attn_implementation", "flash_attention_2"]),
    # LoRA against full fine-tuning (the recipe): tokens/s, peak memory, trainable parameters and the validation
    # loss after the same steps. Its learning rate is lora.yaml's (2e-4), the recipe's 5e-5. Its mfu_* count full
    # fine-tuning's FLOPs (6N a token): LoRA skips the frozen weights' gradients (about 4N), so compare tokens/s.
    "lora": ("gpt2_flash.yaml", ["--config", str(ROOT / "configs" / "lora.yaml")]),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--parts", default="matmul,reference,peers,recipe,recipe_bf16,fast,fastest,lora,quality",
                   help="comma-separated subset of: matmul, reference, peers, recipe, recipe_bf16, fast, fastest, "
                        "fast_eval128, fast_fa2, fastest_fa2 (FlashAttention-2 for -3), "
                        "lora (the recipe with configs/lora.yaml), quality (recipe vs HF Trainer from the same "
                        "weights), quality_fast, quality_levers, levers, packing")
    p.add_argument("--peers", default="recipe,recipe_bf16,fast,fastest", help="whose HF+torch_compile peer to run")
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--warmup", type=int, default=25)
    p.add_argument("--quality-steps", type=int, default=300)
    p.add_argument("--packing-cases", default="a,b,c", help="packing's cases to run (see run_packing)")
    p.add_argument("--levers", default="", help="comma-separated lever indices (default all)")
    p.add_argument("--quality-levers", default="", help="quality_levers: lever indices whose validation loss after "
                   "--quality-steps to compare with gpt2_fast.yaml's levers-off run (as quality_fast's)")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny model, 4 steps, CPU: tests the script only")
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    smoke = a.cpu_smoke
    model_config, steps, warmup = (TINY, 4, 2) if smoke else (GPT2_124M, a.steps, a.warmup)
    cpu = ["--trainer.accelerator", "cpu", "--trainer.precision", "32-true", "--model.attn_implementation", "sdpa",
           "--model.compile", "false", "--model.compile_mode", "default", "--model.fused_cross_entropy", "false",
           "--model.low_precision_residual", "false", "--data.batch_size", "2", "--data.eval_batch_size", "2",
           "--data.num_workers", "0"] if smoke else []
    from lit_flash.synthetic import save_synthetic_dataset

    work = Path(tempfile.mkdtemp())
    data = work / "blocks"
    block = model_config["n_positions"]
    save_synthetic_dataset(data, n_train=64 if smoke else 3000, n_test=8 if smoke else 1024, block_size=block)
    weights = save_initial_weights(model_config, work / "weights")
    fpt = flops_per_token(model_config)
    results: dict[str, Any] = {"flops_per_token": fpt, "device": torch.cuda.get_device_name() if not smoke else "cpu",
                               "date": time.strftime("%Y-%m-%d"), "steps": steps, "warmup": warmup,
                               "torch": torch.__version__}
    parts = a.parts.split(",")

    def save() -> None:
        (a.out / "bench.json").write_text(json.dumps(results, indent=1))

    def mfu(r: dict) -> None:
        r["mfu_790"] = r["tokens_per_s"] * fpt / PEAK_BF16
        if "matmul_tflops" in results:
            r["mfu_measured"] = r["tokens_per_s"] * fpt / (results["matmul_tflops"] * 1e12)
        print(json.dumps(r), flush=True)

    if "matmul" in parts and not smoke:
        results["matmul_tflops"] = matmul_tflops()
        print(f"bf16 matmul 8192^3: {results['matmul_tflops']:.0f} TFLOP/s", flush=True)
    if "reference" in parts:  # as shipped: fp16 weights, batch 8, no compile
        results["reference"] = r = run_reference(data, weights, steps, warmup, 8 if not smoke else 2, smoke)
        mfu(r)
        save()
    if "peers" in parts:
        results.setdefault("peers", {})
        for name in a.peers.split(","):
            batch, dtype = PEERS[name]
            r = run_reference(data, weights, steps, warmup, batch if not smoke else 2, smoke, dtype, compile=True)
            results["peers"][name] = r
            mfu(r)
            save()
    for part, (config, overlay) in LIT_RUNS.items():
        if part not in parts:
            continue
        results[part] = r = run_lit(data, config, overlay + cpu, weights, steps, warmup)
        mfu(r)
        peer = results.get("peers", {}).get(PEER_OF.get(part, part))
        for base, ref in (("reference", results.get("reference")), ("peer", peer)):
            if ref:
                r[f"x_{base}_train"] = r["tokens_per_s"] / ref["tokens_per_s"]
                r[f"x_{base}_eval"] = r["eval_tokens_per_s"] / ref["eval_tokens_per_s"]
                r[f"mem_vs_{base}"] = (r["peak_mem_gib"] or 0) / (ref["peak_mem_gib"] or 1)
                print(f"{part} / {base}: train {r[f'x_{base}_train']:.2f}x, eval {r[f'x_{base}_eval']:.2f}x, "
                      f"peak memory {r[f'mem_vs_{base}']:.2f}x", flush=True)
        save()
    if "quality" in parts:  # the recipe against HF Trainer (fp32 weights, fp16 autocast): same weights and tokens
        n = 8 if smoke else a.quality_steps
        q: dict[str, Any] = {"steps": n}
        q["recipe_val_loss"] = run_lit(data, "gpt2_flash.yaml", cpu, weights, n, 2)["val_loss"]
        hf = run_reference(data, weights, n, 2, 8 if not smoke else 2, smoke, amp=True)
        q["hf_fp16_amp_val_loss"], q["hf_trainer_eval_loss"] = hf["plain_val_loss"], hf["val_loss"]
        q["rel_diff"] = abs(q["recipe_val_loss"] - q["hf_fp16_amp_val_loss"]) / q["hf_fp16_amp_val_loss"]
        results["quality"] = q
        print(json.dumps(q), flush=True)
        save()
    # Same tokens, same seed: gpt2_fast.yaml's levers on vs off (bf16, batch 32, dropout 0 in both; off runs the
    # recipe's flash_attention_2)
    off = ["--model.attn_implementation", "flash_attention_2",
           "--model.compile", "false", "--model.fused_cross_entropy", "false", "--model.pad_vocab_to_multiple_of",
           "null", "--model.low_precision_residual", "false", "--trainer.log_every_n_steps", "1"]
    on = ["--trainer.log_every_n_steps", "1"]
    if "quality_fast" in parts:
        n = 8 if smoke else a.quality_steps
        q = {"steps": n}
        q["fast_val_loss"] = run_lit(data, "gpt2_fast.yaml", on + cpu, weights, n, 2)["val_loss"]
        q["plain_val_loss"] = run_lit(data, "gpt2_fast.yaml", off + cpu, weights, n, 2)["val_loss"]
        q["rel_diff"] = abs(q["fast_val_loss"] - q["plain_val_loss"]) / q["plain_val_loss"]
        results["quality_fast"] = q
        print(json.dumps(q), flush=True)
        save()
    if "quality_levers" in parts:  # each lever's validation loss against the levers-off run, same tokens
        n = 8 if smoke else a.quality_steps
        q = results.setdefault("quality_levers", {"steps": n})
        q["plain_val_loss"] = run_lit(data, "gpt2_fast.yaml", off + cpu, weights, n, 2)["val_loss"]
        for i in [int(i) for i in a.quality_levers.split(",") if i]:
            name, config, extra = LEVERS[i]
            loss = run_lit(data, config, extra + on + cpu, weights, n, 2)["val_loss"]
            q[name] = {"val_loss": loss, "rel_diff": abs(loss - q["plain_val_loss"]) / q["plain_val_loss"]}
            print(name, json.dumps(q[name]), flush=True)
            save()
    if "packing" in parts:
        results["packing"] = run_packing(work, block, cpu, weights, steps, warmup, 8 if smoke else a.quality_steps,
                                         smoke, a.packing_cases)
        save()
    if "levers" in parts:
        chosen = [int(i) for i in a.levers.split(",")] if a.levers else range(len(LEVERS))
        results.setdefault("levers", {})
        for i in chosen:
            name, config, extra = LEVERS[i]
            try:
                from torch._inductor import config as inductor_config

                with inductor_config.patch(INDUCTOR_PATCHES.get(name, {})):
                    r = run_lit(data, config, extra + cpu, weights, steps, warmup, evaluate=False)
                mfu(r)
            except (Exception, SystemExit) as err:  # one failed lever (or CLI error) must not cost the others' numbers
                r = {"error": f"{type(err).__name__}: {err}"[:300]}
                print(name, r, flush=True)
            results["levers"][name] = r
            save()
    save()


if __name__ == "__main__":
    main()
