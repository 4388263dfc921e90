"""Where a training step's GPU time goes: `lit_flash fit` with a config, profiled for a few steps after warm-up.

    python benchmarks/profile_step.py --out results/ [--config gpt2_fast.yaml] [-- extra CLI overrides]
    python benchmarks/profile_step.py --out results/ -- --config configs/ddp.yaml --trainer.devices=2   # DDP
    PROFILE_TRACE=/tmp/t python benchmarks/profile_step.py --out results/   # + the timeline, and what each of the
                                                                            # largest idle gaps waited for

Prints the GPU's busy share of the profiled wall time (idle time is host overhead, syncs or waiting for another
rank), the time by kernel family (matmul, attention, Triton-fused ops, NCCL communication, the rest) and the top
kernels, and writes them to profile.json. Under DDP (Lightning's own launcher, as above; not torchrun) every rank
profiles its own GPU and writes profile_rank<N>.json; compare a rank's compute time and gaps with the one-GPU
profile of the same config. Under DDP the ranks may outlive the profile (the run folder's processes were still
up 190 s after writing it on 2 x H200): the files are written first.
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import itertools
import json
import os
import pstats
import shutil
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import GPT2_124M, fit_args, reset, save_initial_weights  # noqa: E402

NCCL = "communication (NCCL)"


def family(name: str) -> str:
    low = name.lower()
    if "nccl" in low:
        return NCCL
    if "flash" in low or "fmha" in low:
        return "attention"
    if any(k in low for k in ("gemm", "nvjet", "cutlass", "cublas", "sm90_xmma", "sm80_xmma")):
        return "matmul"
    if low.startswith("triton"):
        return "triton (fused elementwise/reductions)"
    return "other"


def gpu_kernels(events: Any) -> list[tuple[str, float, float]]:
    """(name, start us, end us) of the kernels and copies among a profile's events. The GPU side also holds user
    annotations that span CPU ranges (Lightning's `optimizer.step(closure)` around the whole step, DDP's
    `DistributedDataParallel.forward`, `nccl:all_reduce` beside its kernel): they overlap the kernels and are left
    out, or they count as busy time (a 2-GPU profile showed 22 ms of "other" that was DDP's forward)."""
    return [(e.name, e.time_range.start, e.time_range.end) for e in events
            if e.device_type == torch.autograd.DeviceType.CUDA and not getattr(e, "is_user_annotation", False)
            and "#" not in e.name and not e.name.startswith(("Optimizer.", "ProfilerStep", "## "))]


def kernel_summary(kernels: list[tuple[str, float, float]], steps: int) -> dict[str, Any]:
    """Per-step figures from GPU kernels as (name, start us, end us). NCCL kernels run on their own stream beside
    the compute: they are counted apart, and busy time and idle gaps are those of the other kernels."""
    compute = sorted((k for k in kernels if family(k[0]) != NCCL), key=lambda k: k[1])
    gaps = sorted(((b[1] - a[2], a[0][:60], b[0][:60]) for a, b in itertools.pairwise(compute)), reverse=True)
    start, end = min(k[1] for k in kernels), max(k[2] for k in kernels)
    by_family: collections.Counter[str] = collections.Counter()
    by_name: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    for name, t0, t1 in kernels:
        by_family[family(name)] += t1 - t0
        by_name[name][0] += t1 - t0
        by_name[name][1] += 1
    busy = sum(t1 - t0 for _, t0, t1 in compute)
    per_step = lambda us: us / steps / 1000  # noqa: E731  (ms per step)
    return {
        "kernel_span_ms_per_step": per_step(end - start), "busy_ms_per_step": per_step(busy),
        "busy_share": busy / (end - start), "kernels_per_step": len(kernels) / steps,
        "ms_per_step_by_family": {k: round(per_step(v), 3) for k, v in by_family.most_common()},
        "idle_ms_per_step_in_gaps_over_20us": per_step(sum(g for g, *_ in gaps if g > 20)),
        "largest_gaps": [{"us": round(g), "after": x, "before": y} for g, x, y in gaps[:15]],
        "top_kernels": [
            {"ms_per_step": round(per_step(us), 3), "calls_per_step": n / steps, "name": name[:140]}
            for name, (us, n) in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:25]
        ],
    }


def gap_context(trace: Path, top: int = 8) -> list[dict[str, Any]]:
    """The largest idle gaps of a chrome trace, each with the kernels around it, when the host launched the kernel
    after it (relative to the gap's start: late launches mean the host was behind) and the CPU ops it was launched
    from (outermost first)."""
    events = json.loads(trace.read_text())["traceEvents"]
    kernels = sorted((e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")),
                     key=lambda e: e["ts"])
    launches = {e["args"]["correlation"]: e for e in events
                if e.get("cat") == "cuda_runtime" and "correlation" in e.get("args", {})}
    ops = [e for e in events if e.get("cat") in ("cpu_op", "user_annotation") and e.get("ph") == "X"]
    gaps = sorted(((b["ts"] - a["ts"] - a.get("dur", 0), i) for i, (a, b) in enumerate(itertools.pairwise(kernels))),
                  reverse=True)[:top]
    out = []
    for gap, i in gaps:
        after = kernels[i + 1]
        launch = launches.get(after.get("args", {}).get("correlation"))
        gap_start = kernels[i]["ts"] + kernels[i].get("dur", 0)
        stack = [] if launch is None else [o["name"][:80] for o in sorted(
            (o for o in ops if o["tid"] == launch["tid"] and o["ts"] <= launch["ts"] <= o["ts"] + o["dur"]),
            key=lambda o: o["ts"])]
        out.append({"us": round(gap), "before": [k["name"][:70] for k in kernels[max(i - 2, 0): i + 1]],
                    "after": after["name"][:70], "launch": launch["name"] if launch else None,
                    "launched_us_after_gap_start": round(launch["ts"] - gap_start) if launch else None,
                    "launched_from": stack[-6:]})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--config", default="gpt2_fast.yaml")
    p.add_argument("--start", type=int, default=30, help="first profiled step (after compile and warm-up)")
    p.add_argument("--steps", type=int, default=5, help="profiled steps")
    p.add_argument("--python", action="store_true",
                   help="also profile the host's Python (cProfile) over the same steps, to profile_python.txt")
    p.add_argument("overrides", nargs="*", help="extra lit_flash CLI arguments (after --)")
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)

    import lightning as L

    from lit_flash.cli import cli_main
    from lit_flash.synthetic import save_synthetic_dataset

    # One folder for every rank: under DDP Lightning's launcher starts the other ranks by running this script again
    # (with LOCAL_RANK set) once rank 0 is in `fit`, so only rank 0 writes the data. (torchrun sets LOCAL_RANK on
    # every rank from the start: not supported.)
    data, root, weights = a.out / "profile_data", a.out / "profile_run", a.out / "profile_weights"
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        shutil.rmtree(data, ignore_errors=True)
        save_synthetic_dataset(data, n_train=3000, n_test=64, block_size=1024)
        save_initial_weights(GPT2_124M, weights)
    reset()
    steps = a.start + a.steps + 2
    cli = cli_main(fit_args(data, a.config, weights, steps, str(root), a.overrides), run=False)
    activity = torch.profiler.ProfilerActivity
    prof = torch.profiler.profile(activities=[activity.CPU, activity.CUDA])

    syncs: collections.Counter[str] = collections.Counter()
    python_profile = cProfile.Profile() if a.python else None

    show_warning, filters = warnings.showwarning, warnings.filters[:]

    def record_sync(message: Any, *args: Any, **kwargs: Any) -> None:
        # torch's sync debug mode warns at each host-device synchronization: keep where it came from
        if "synchroniz" not in str(message):
            return show_warning(message, *args, **kwargs)
        frames = [f for f in traceback.extract_stack()[:-1] if "warnings" not in f.filename]
        syncs[" <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames[-8:]))] += 1

    class Profile(L.Callback):
        started = stopped = False
        host_starts: list[float] = []

        def on_train_batch_start(self, trainer: L.Trainer, *_: Any) -> None:
            if self.started and not self.stopped:
                self.host_starts.append(time.perf_counter())
            if trainer.global_step == a.start and not self.started:  # once, also when accumulating gradients
                self.started = True
                torch.cuda.synchronize()
                prof.start()
                warnings.showwarning = record_sync
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                self.host_starts.append(time.perf_counter())
                if python_profile is not None:
                    python_profile.enable()

        def on_train_batch_end(self, trainer: L.Trainer, *_: Any) -> None:
            if trainer.global_step == a.start + a.steps and self.started and not self.stopped:
                self.stopped = True
                if python_profile is not None:
                    python_profile.disable()
                torch.cuda.set_sync_debug_mode("default")
                warnings.showwarning = show_warning
                warnings.filters[:] = filters
                torch.cuda.synchronize()
                prof.stop()

    cli.trainer.callbacks.append(Profile())
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)

    kernels = gpu_kernels(prof.events())
    world_size = cli.trainer.world_size
    result = {
        "device": torch.cuda.get_device_name(), "config": a.config, "overrides": a.overrides, "steps": a.steps,
        "world_size": world_size, "rank": cli.trainer.global_rank, **kernel_summary(kernels, a.steps),
        "graph_breaks": dict(torch._dynamo.utils.counters["graph_break"]),
        "unique_graphs": torch._dynamo.utils.counters["stats"]["unique_graphs"],
        "alloc_retries": torch.cuda.memory_stats().get("num_alloc_retries"),
        # Host time from one batch's start to the next, never synchronized: close to the GPU's span when the host
        # (Python, Lightning, launches) is what bounds the step.
        "host_ms_per_batch": [round(1e3 * (b - a_), 2) for a_, b in itertools.pairwise(Profile.host_starts)],
        "host_syncs_in_profiled_steps": [{"count": n, "stack": k} for k, n in syncs.most_common(10)],
    }
    name = "profile.json" if world_size == 1 else f"profile_rank{cli.trainer.global_rank}.json"
    (a.out / name).write_text(json.dumps(result, indent=1))
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=90)
    (a.out / name.replace(".json", "_host.txt")).write_text(table)
    if python_profile is not None:
        with open(a.out / name.replace(".json", "_python.txt"), "w") as f:
            for order in ("tottime", "cumulative"):
                pstats.Stats(python_profile, stream=f).sort_stats(order).print_stats(45)
    if os.environ.get("PROFILE_TRACE"):  # the whole timeline, for chrome://tracing or Perfetto
        trace = Path(os.environ["PROFILE_TRACE"]) / name.replace(".json", "_trace.json")
        trace.parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(trace))
        result["gap_context"] = gap_context(trace)
        (a.out / name).write_text(json.dumps(result, indent=1))
    if cli.trainer.global_rank == 0:
        print(json.dumps(result, indent=1), flush=True)
        # Lightning's launcher does not wait for the ranks it started: wait here, so that every rank's file is
        # written when this script exits.
        for child in getattr(cli.trainer.strategy.launcher, "procs", []):
            child.wait()


if __name__ == "__main__":
    main()
