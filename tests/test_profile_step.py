"""benchmarks/profile_step.py's arithmetic on a made-up kernel timeline (the profile itself needs a GPU)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))  # profile_step imports bench
spec = importlib.util.spec_from_file_location("profile_step", BENCH / "profile_step.py")
profile_step = importlib.util.module_from_spec(spec)
spec.loader.exec_module(profile_step)


def test_nccl_is_counted_apart_from_compute_busy_time_and_gaps() -> None:
    # Two steps on one rank (us): compute kernels with a 100 us gap in each step, and an all-reduce on NCCL's stream
    # that overlaps the compute (it must neither add busy time nor hide the gaps).
    kernels = []
    for t in (0, 1000):
        kernels += [("sm90_xmma_gemm_bf16", t, t + 300), ("flash_fwd_kernel", t + 400, t + 600),
                    ("triton_poi_fused_add_0", t + 600, t + 900),
                    ("ncclDevKernel_AllReduce_Sum_f32_RING_LL", t + 350, t + 950)]
    summary = profile_step.kernel_summary(kernels, steps=2)
    assert summary["kernel_span_ms_per_step"] == pytest.approx(1950 / 2 / 1000)  # to the last all-reduce
    assert summary["busy_ms_per_step"] == pytest.approx(0.8)  # 300 + 200 + 300 us of compute a step
    assert summary["busy_share"] == pytest.approx(1600 / 1950)
    assert summary["ms_per_step_by_family"] == {"communication (NCCL)": 0.6, "matmul": 0.3,
                                                 "triton (fused elementwise/reductions)": 0.3, "attention": 0.2}
    # Gaps between compute kernels: 100 us inside each step, 100 us between the steps.
    assert summary["idle_ms_per_step_in_gaps_over_20us"] == pytest.approx(0.3 / 2)
    assert summary["largest_gaps"][0]["us"] == 100
    assert summary["kernels_per_step"] == 4


def test_user_annotations_on_the_gpu_side_are_not_kernels() -> None:
    # What a DDP profile holds besides kernels: annotations spanning CPU ranges that overlap the kernels.
    from types import SimpleNamespace

    import torch

    def event(name: str, annotation: bool = False, device: str = "CUDA") -> SimpleNamespace:
        return SimpleNamespace(name=name, time_range=SimpleNamespace(start=0, end=10), is_user_annotation=annotation,
                               device_type=getattr(torch.autograd.DeviceType, device))

    events = [event("DistributedDataParallel.forward", annotation=True), event("nccl:all_reduce", annotation=True),
              event("ncclDevKernel_AllReduce_Sum_f32_RING_LL"), event("sm90_xmma_gemm_bf16"),
              event("Memcpy HtoD (Pinned -> Device)"), event("sm90_xmma_gemm_bf16", device="CPU"),
              event("Optimizer.step#AdamW.step"), event("ProfilerStep#3")]
    names = [name for name, *_ in profile_step.gpu_kernels(events)]
    assert names == ["ncclDevKernel_AllReduce_Sum_f32_RING_LL", "sm90_xmma_gemm_bf16", "Memcpy HtoD (Pinned -> Device)"]
