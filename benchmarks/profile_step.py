"""Where a training step's GPU time goes: `lit_flash fit` with a config, profiled for a few steps after warm-up.

    python benchmarks/profile_step.py --out results/ [--config gpt2_fast.yaml] [-- extra CLI overrides]

Prints the GPU's busy share of the profiled wall time (idle time is host overhead or syncs), the time by kernel
family (matmul, attention, Triton-fused ops, the rest) and the top kernels, and writes them to profile.json.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import sys
import tempfile
import traceback
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import GPT2_124M, fit_args, reset  # noqa: E402


def family(name: str) -> str:
    low = name.lower()
    if "flash" in low or "fmha" in low:
        return "attention"
    if any(k in low for k in ("gemm", "nvjet", "cutlass", "cublas", "sm90_xmma", "sm80_xmma")):
        return "matmul"
    if low.startswith("triton"):
        return "triton (fused elementwise/reductions)"
    return "other"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--config", default="gpt2_fast.yaml")
    p.add_argument("--start", type=int, default=30, help="first profiled step (after compile and warm-up)")
    p.add_argument("--steps", type=int, default=5, help="profiled steps")
    p.add_argument("overrides", nargs="*", help="extra lit_flash CLI arguments (after --)")
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)

    import lightning as L

    from lit_flash.cli import cli_main
    from lit_flash.synthetic import save_synthetic_dataset

    data = Path(tempfile.mkdtemp()) / "blocks"
    save_synthetic_dataset(data, n_train=3000, n_test=64, block_size=1024)
    reset()
    steps = a.start + a.steps + 2
    cli = cli_main(fit_args(data, a.config, GPT2_124M, steps, tempfile.mkdtemp(), a.overrides), run=False)
    activity = torch.profiler.ProfilerActivity
    prof = torch.profiler.profile(activities=[activity.CPU, activity.CUDA])

    syncs: collections.Counter[str] = collections.Counter()

    show_warning, filters = warnings.showwarning, warnings.filters[:]

    def record_sync(message: Any, *args: Any, **kwargs: Any) -> None:
        # torch's sync debug mode warns at each host-device synchronization: keep where it came from
        if "synchroniz" not in str(message):
            return show_warning(message, *args, **kwargs)
        frames = [f for f in traceback.extract_stack()[:-1] if "warnings" not in f.filename]
        syncs[" <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames[-8:]))] += 1

    class Profile(L.Callback):
        def on_train_batch_start(self, trainer: L.Trainer, *_: Any) -> None:
            if trainer.global_step == a.start:
                torch.cuda.synchronize()
                prof.start()
                warnings.showwarning = record_sync
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")

        def on_train_batch_end(self, trainer: L.Trainer, *_: Any) -> None:
            if trainer.global_step == a.start + a.steps:
                torch.cuda.set_sync_debug_mode("default")
                warnings.showwarning = show_warning
                warnings.filters[:] = filters
                torch.cuda.synchronize()
                prof.stop()

    cli.trainer.callbacks.append(Profile())
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)

    # GPU-side events are kernels and copies, plus annotations that span CPU ranges (Lightning runs the whole
    # step inside `optimizer.step(closure)`): those overlap the kernels and are left out.
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA and "#" not in e.name
               and not e.name.startswith(("Optimizer.", "ProfilerStep", "## "))]
    kernels.sort(key=lambda e: e.time_range.start)
    gaps = sorted(
        ((b.time_range.start - a.time_range.end, a.name[:60], b.name[:60]) for a, b in itertools.pairwise(kernels)),
        reverse=True,
    )
    start = min(e.time_range.start for e in kernels)
    end = max(e.time_range.end for e in kernels)
    busy = sum(e.time_range.elapsed_us() for e in kernels)
    by_family: collections.Counter[str] = collections.Counter()
    by_name: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    for e in kernels:
        us = e.time_range.elapsed_us()
        by_family[family(e.name)] += us
        by_name[e.name][0] += us
        by_name[e.name][1] += 1
    per_step = lambda us: us / a.steps / 1000  # noqa: E731  (ms per step)
    result = {
        "device": torch.cuda.get_device_name(), "config": a.config, "overrides": a.overrides, "steps": a.steps,
        "kernel_span_ms_per_step": per_step(end - start), "busy_ms_per_step": per_step(busy),
        "busy_share": busy / (end - start), "kernels_per_step": len(kernels) / a.steps,
        "ms_per_step_by_family": {k: round(per_step(v), 3) for k, v in by_family.most_common()},
        "graph_breaks": dict(torch._dynamo.utils.counters["graph_break"]),
        "unique_graphs": torch._dynamo.utils.counters["stats"]["unique_graphs"],
        "idle_ms_per_step_in_gaps_over_20us": per_step(sum(g for g, *_ in gaps if g > 20)),
        "largest_gaps": [{"us": round(g), "after": x, "before": y} for g, x, y in gaps[:15]],
        "alloc_retries": torch.cuda.memory_stats().get("num_alloc_retries"),
        "host_syncs_in_profiled_steps": [{"count": n, "stack": k} for k, n in syncs.most_common(10)],
        "top_kernels": [
            {"ms_per_step": round(per_step(us), 3), "calls_per_step": n / a.steps, "name": name[:140]}
            for name, (us, n) in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:25]
        ],
    }
    print(json.dumps(result, indent=1), flush=True)
    (a.out / "profile.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
