"""Multi-GPU benchmark (issue 7): GPT-2 124M (built from config, no hub) on synthetic reference-format data.

Runs, each a plain `python -m lit_flash fit --config configs/gpt2_flash.yaml [--config configs/<overlay>.yaml]`,
with B = --batch rows of 1024 tokens per GPU (default 8):
  1gpu_bB     1 GPU, batch B            baseline for tokens/s at the same per-device batch
  1gpu_b2B    1 GPU, batch 2B           the same global batch as the 2-GPU runs: loss curve to compare
  ddp2_bB     2 GPUs DDP, batch B each  (global 2B), configs/ddp.yaml's DDP settings (one gradient bucket)
  fsdp2_bB    2 GPUs FSDP, batch B each (global 2B), with last.ckpt (full state dict) and the HF export
  fsdp1_resume  FSDP on 1 GPU resuming fsdp2_bB's last.ckpt for a few steps (another device count)
  ddp4_bB, 1gpu_b4B   with 4 GPUs or more: 4-GPU DDP and its 1-GPU twin at the same global batch (4B)
  ddp2_bB_v1, _v2, ...  one per --ddp-variant JSON (DDPStrategy arguments), then one per --ddp-flags (CLI flags)
  1gpu_bB_at_once0/1    with --concurrent: two independent 1-GPU runs at the same time on GPUs 0 and 1. Their sum
                        over 1gpu_bB is what two busy GPUs on this host give without DDP (power, CPU, PCIe): the
                        ceiling for ddp2_bB
--recipe gpt2_fast.yaml starts every run from that config instead (compiled, bf16, ...). --accumulate K adds
trainer.accumulate_grad_batches=K to every run: DDP then all-reduces once per K micro-batches.
tokens/s = Lightning ThroughputMonitor's `train/device/items_per_sec` x world size (median of the second half).
Writes <out>/results.json and <out>/summary.md (the table for benchmarks/RESULTS.md) and prints the summary.

GPU machine:  source .devwheels/setup.sh && python benchmarks/multi_gpu.py --out $OUT
CPU check:    python benchmarks/multi_gpu.py --out /tmp/mg --cpu-smoke   (tiny model, 2 steps, gloo DDP, no FSDP)
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # lit_flash from this checkout
from lit_flash.synthetic import save_synthetic_dataset  # noqa: E402

GPT2_124M = {"model_type": "gpt2", "vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12,
             "n_head": 12, "bos_token_id": 50256, "eos_token_id": 50256}
TINY = {"model_type": "gpt2", "vocab_size": 300, "n_positions": 32, "n_embd": 32, "n_layer": 1, "n_head": 2,
        "bos_token_id": 0, "eos_token_id": 0}


def read_metrics(run_dir: Path) -> list[dict[str, float]]:
    """Rows of the run's metrics.csv (CSVLogger), empty cells dropped, values as floats."""
    files = sorted(run_dir.glob("logs/version_*/metrics.csv"))
    if not files:
        return []
    with files[-1].open() as f:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]


def tokens_per_sec(rows: list[dict[str, float]], world_size: int) -> float | None:
    """All ranks' tokens/s: rank 0's `train/device/items_per_sec` x world size, median of the later half
    (the first windows include warm-up)."""
    values = [r["train/device/items_per_sec"] for r in rows if "train/device/items_per_sec" in r]
    return statistics.median(values[len(values) // 2 :]) * world_size if values else None


def loss_curve(rows: list[dict[str, float]]) -> dict[int, float]:
    return {int(r["step"]): r["train_loss"] for r in rows if "train_loss" in r}


def mean_loss_last(curve: dict[int, float], fraction: float = 0.25) -> float | None:
    """Mean train loss over the last `fraction` of logged steps (a rank's loss is noisy step to step)."""
    steps = sorted(curve)
    tail = steps[int(len(steps) * (1 - fraction)) :] or steps
    return statistics.fmean(curve[s] for s in tail) if tail else None


_REPORT = threading.Lock()


def fit(name: str, out: Path, data: Path, *, gpus: int, batch: int, steps: int, overlay: str | None,
        smoke: bool, extra: list[str] | None = None, recipe: str = "gpt2_flash.yaml",
        strategy: str | None = None, accumulate: int = 1, first_gpu: int = 0,
        flags: list[str] | None = None) -> dict[str, Any]:
    """One `python -m lit_flash fit` run in its own process (Lightning starts the other ranks). `strategy`: a
    `--trainer.strategy` value (JSON); with the overlay's class, its arguments are merged onto the overlay's.
    `first_gpu`: where its GPUs start. `flags`: more command-line flags, last."""
    run_dir = out / name
    shutil.rmtree(run_dir, ignore_errors=True)  # this script's own run folder: a rerun starts afresh
    model = TINY if smoke else GPT2_124M
    args = [sys.executable, "-m", "lit_flash", "fit", "--config", str(ROOT / "configs" / recipe)]
    if overlay:
        args += ["--config", str(ROOT / "configs" / overlay)]
    if strategy:
        args += [f"--trainer.strategy={strategy}"]
    args += [
        f"--trainer.devices={gpus}", f"--trainer.max_steps={steps}", "--trainer.max_epochs=-1",
        f"--trainer.accumulate_grad_batches={accumulate}",
        "--trainer.limit_val_batches=0", f"--trainer.log_every_n_steps={1 if smoke else 5}",
        "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={run_dir}",
        "--model.model_name_or_path=null", f"--model.model_config={json.dumps(model)}",
        "--model.learning_rate=3e-4", "--model.warmup_steps=" + ("0" if smoke else "10"),
        f"--data.tokenized_dataset_load_dir={data}", "--data.tokenizer_name=null",
        f"--data.batch_size={batch}", f"--data.eval_batch_size={batch}",
        f"--throughput.window_size={2 if smoke else 10}",
        "--checkpoint.every_n_train_steps=0",
    ]
    if smoke:
        args += ["--trainer.accelerator=cpu", "--trainer.precision=32-true", "--model.attn_implementation=sdpa",
                 "--model.compile=false", "--model.low_precision_residual=false"]
    args += extra or ["--checkpoint.save_top_k=0", "--checkpoint.save_last=false", "--export.dirname=null"]
    args += flags or []
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])))
    if not smoke:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(first_gpu, first_gpu + gpus))
    started = time.time()
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True)
    ended = time.time()
    wall = ended - started
    (out / f"{name}.log").write_text(proc.stdout + proc.stderr)
    rows = read_metrics(run_dir)
    curve = loss_curve(rows)
    result = {
        "name": name, "gpus": gpus, "batch_per_device": batch, "accumulate": accumulate,
        "global_batch": batch * gpus * accumulate, "overlay": overlay,
        "rc": proc.returncode, "wall_s": round(wall, 1), "started": started, "ended": ended,
        "tokens_per_sec": tokens_per_sec(rows, gpus),
        "final_loss": mean_loss_last(curve), "loss_curve": curve, "command": " ".join(args[1:]),
    }
    with _REPORT:  # --concurrent runs finish side by side
        print(f"[{name}] rc={proc.returncode} wall={wall:.0f}s tokens/s={result['tokens_per_sec']} "
              f"loss(last 25%)={result['final_loss']}", flush=True)
        if proc.returncode != 0:
            print((proc.stdout + proc.stderr)[-4000:], flush=True)
        with (out / "runs.jsonl").open("a") as f:  # each run as it ends: a time limit keeps the finished ones
            f.write(json.dumps(result) + "\n")
    return result


def check_export(path: Path, data: Path) -> dict[str, Any]:
    """The FSDP run's HF export loads with plain transformers, and its loss on held-out rows is sane."""
    import datasets
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path))
    ids = torch.tensor(datasets.load_from_disk(str(data))["test"]["input_ids"][:2], dtype=torch.long)
    with torch.no_grad():
        loss = float(model(input_ids=ids, labels=ids).loss)
    return {"export_loads": True, "export_test_loss": round(loss, 3)}


def summarize(results: dict[str, dict[str, Any]], card: str) -> str:
    lines = [f"Card: {card}. Model from config, synthetic reference-format blocks; see results.json for commands.", "",
             "| run | GPUs | batch/GPU | global batch | tokens/s | loss (last 25% steps) | rc |",
             "|---|---|---|---|---|---|---|"]
    runs = [r for r in results.values() if "gpus" in r]
    for r in runs:
        t = f"{r['tokens_per_sec']:,.0f}" if r["tokens_per_sec"] else "-"
        loss = f"{r['final_loss']:.3f}" if r["final_loss"] is not None else "-"
        lines.append(f"| {r['name']} | {r['gpus']} | {r['batch_per_device']} | {r['global_batch']} | {t} | {loss} "
                     f"| {r['rc']} |")
    lines.append("")
    # Each multi-GPU run against the 1-GPU run at the same batch per GPU (scaling), and against the 1-GPU run at
    # the same global batch (the loss curve).
    ones = [r for r in runs if r["gpus"] == 1]
    for r in runs:
        if r["gpus"] == 1:
            continue
        same_device = next((o for o in ones if o["batch_per_device"] == r["batch_per_device"]), None)
        same_global = next((o for o in ones if o["global_batch"] == r["global_batch"]), None)
        if same_device and r["tokens_per_sec"] and same_device["tokens_per_sec"]:
            lines.append(f"- {r['name']} / {same_device['name']} (same batch per GPU) = "
                         f"{r['tokens_per_sec'] / same_device['tokens_per_sec']:.2f}x")
        if same_global and r["final_loss"] is not None and same_global["final_loss"] is not None:
            a, b = r["final_loss"], same_global["final_loss"]
            lines.append(f"- loss, {r['name']} vs {same_global['name']} (global batch {r['global_batch']}): "
                         f"{a:.3f} vs {b:.3f} ({(a - b) / b:+.1%})")
    pair = [r for r in runs if "_at_once" in r["name"] and r["tokens_per_sec"]]
    solo = results.get(f"1gpu_b{pair[0]['batch_per_device']}") if pair else None
    if len(pair) == 2 and solo and solo["tokens_per_sec"]:
        both = sum(r["tokens_per_sec"] for r in pair)
        # The ceiling holds only if the two ran side by side: the share of the shorter run spent with both running.
        shared = min(r["ended"] for r in pair) - max(r["started"] for r in pair)
        overlap = max(0.0, shared) / min(r["ended"] - r["started"] for r in pair)
        lines.append(f"- two 1-GPU runs at once, no DDP: {both:,.0f} tokens/s together = "
                     f"{both / solo['tokens_per_sec']:.2f}x {solo['name']} (the host's ceiling for 2 GPUs; "
                     f"they ran side by side for {overlap:.0%} of the shorter)")
    for key in ("fsdp1_resume", "export"):
        if key in results:
            lines.append(f"- {key}: {json.dumps({k: v for k, v in results[key].items() if k != 'loss_curve'})}")
    if "variants" in results:
        lines += [f"- {name}: " + (f"DDPStrategy({v['init_args']})" if isinstance(v, dict) else v)
                  for name, v in results["variants"].items()]
    return "\n".join(lines) + "\n"


def _train_rows(data: Path) -> int:
    import datasets

    return len(datasets.load_from_disk(str(data))["train"])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for runs, logs, results.json, summary.md")
    parser.add_argument("--steps", type=int, default=120, help="optimizer steps per run")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny model, 2 steps, CPU + gloo, no FSDP")
    parser.add_argument("--skip-fsdp", action="store_true")
    parser.add_argument("--recipe", default="gpt2_flash.yaml", help="the config every run starts from (configs/)")
    parser.add_argument("--accumulate", type=int, default=1, help="trainer.accumulate_grad_batches of every run")
    parser.add_argument("--batch", type=int, default=8, help="rows of 1024 tokens per GPU in every run")
    parser.add_argument("--ddp-variant", action="append", default=[], metavar="JSON",
                        help="one more 2-GPU DDP run with these DDPStrategy arguments, e.g. "
                        "'{\"bucket_cap_mb\": 100}', on top of configs/ddp.yaml's (repeatable). DDP's own "
                        "defaults: --ddp-flags=--trainer.strategy=ddp")
    parser.add_argument("--ddp-flags", action="append", default=[], metavar="FLAGS",
                        help="one more 2-GPU DDP run with these extra lit_flash flags (space-separated), e.g. "
                        "--ddp-flags='--data.num_workers=8' (repeatable). Split as a shell would, which drops "
                        "JSON's double quotes: give DDPStrategy arguments with --ddp-variant")
    parser.add_argument("--concurrent", action="store_true",
                        help="also two independent 1-GPU runs at once (GPUs 0 and 1, no communication): "
                        "what two busy GPUs on this host give without DDP, the ceiling for ddp2")
    args = parser.parse_args(argv)
    smoke = args.cpu_smoke
    steps = 2 if smoke else args.steps
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    model = TINY if smoke else GPT2_124M
    four = False
    card = "cpu"
    if not smoke:
        import torch

        card = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
        four = torch.cuda.device_count() >= 4
        if torch.cuda.device_count() < 2:
            parser.error(f"needs 2 GPUs or more, this machine has {torch.cuda.device_count()} (or use --cpu-smoke)")
    (out / "runs.jsonl").unlink(missing_ok=True)  # this invocation's runs only
    data = out / "data"
    b = args.batch
    # Enough rows that no run repeats one: steps x the largest global batch (+ the resume's steps).
    rows = (steps + 20) * b * (4 if four else 2) * args.accumulate
    if not (data / "dataset_dict.json").is_file() or _train_rows(data) < rows:
        shutil.rmtree(data, ignore_errors=True)
        save_synthetic_dataset(data, rows, 16, model["n_positions"], model["vocab_size"])
    results: dict[str, dict[str, Any]] = {}
    common = {"out": out, "data": data, "steps": steps, "smoke": smoke, "recipe": args.recipe,
              "accumulate": args.accumulate}
    for batch in (b, 2 * b):
        results[f"1gpu_b{batch}"] = fit(f"1gpu_b{batch}", gpus=1, batch=batch, overlay=None, **common)
    keep = ["--checkpoint.save_top_k=0", "--checkpoint.save_last=true"]  # last.ckpt + HF export
    # On CPU the DDP run also writes last.ckpt and the export, to check that path without a GPU.
    ddp2 = f"ddp2_b{b}"
    results[ddp2] = fit(ddp2, gpus=2, batch=b, overlay="ddp.yaml", extra=keep if smoke else None, **common)
    if smoke:
        results["export"] = check_export(out / ddp2 / "model", data)
    strategies = [{"class_path": "lightning.pytorch.strategies.DDPStrategy", "init_args": json.loads(v)}
                  for v in args.ddp_variant]
    variants = {f"{ddp2}_v{i}": v for i, v in enumerate([*strategies, *args.ddp_flags], 1)}
    for name, variant in variants.items():
        if isinstance(variant, dict):
            results[name] = fit(name, gpus=2, batch=b, overlay="ddp.yaml", strategy=json.dumps(variant), **common)
        else:
            results[name] = fit(name, gpus=2, batch=b, overlay="ddp.yaml", flags=shlex.split(variant), **common)
    if variants:
        results["variants"] = variants
    if args.concurrent:
        # Same host load as ddp2 (two GPUs, two processes) without any gradient traffic.
        with ThreadPoolExecutor(2) as pool:
            pair = list(pool.map(lambda i: fit(f"1gpu_b{b}_at_once{i}", gpus=1, batch=b, overlay=None,
                                               first_gpu=i, **common), (0, 1)))
        results.update({r["name"]: r for r in pair})
    if four:
        results[f"ddp4_b{b}"] = fit(f"ddp4_b{b}", gpus=4, batch=b, overlay="ddp.yaml", **common)
        results[f"1gpu_b{4 * b}"] = fit(f"1gpu_b{4 * b}", gpus=1, batch=4 * b, overlay=None, **common)
    if not (smoke or args.skip_fsdp):
        fsdp2 = f"fsdp2_b{b}"
        results[fsdp2] = fit(fsdp2, gpus=2, batch=b, overlay="fsdp.yaml", extra=keep, **common)
        ckpt = out / fsdp2 / "checkpoints" / "last.ckpt"
        if ckpt.is_file():
            resume = {**common, "steps": steps + 10}
            results["fsdp1_resume"] = fit("fsdp1_resume", gpus=1, batch=2 * b, overlay="fsdp.yaml",
                                          extra=[f"--ckpt_path={ckpt}", *keep[:1], "--export.dirname=null"], **resume)
            curve = results["fsdp1_resume"]["loss_curve"]
            results["fsdp1_resume"]["resumed_at_step"] = min(curve) if curve else None
        if (out / fsdp2 / "model").is_dir():
            results["export"] = check_export(out / fsdp2 / "model", data)
    summary = summarize(results, card)
    (out / "results.json").write_text(json.dumps({"card": card, "results": results}, indent=1))
    (out / "summary.md").write_text(summary)
    print(summary)
    return results


if __name__ == "__main__":
    main()
