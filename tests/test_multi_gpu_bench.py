"""The CPU-checkable parts of benchmarks/multi_gpu.py (the GPU runs themselves: `--cpu-smoke` and the lead's GPU)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "multi_gpu.py"
spec = importlib.util.spec_from_file_location("multi_gpu", SCRIPT)
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def test_metrics_to_tokens_per_sec_and_loss(tmp_path: Path) -> None:
    log = tmp_path / "run" / "logs" / "version_0"
    log.mkdir(parents=True)
    rows = ["step,train_loss,train/device/items_per_sec"]
    rows += [f"{s},{10 - s / 10},{100 if s < 20 else 1000}" for s in range(0, 40, 5)]
    rows.insert(3, "7,,")  # a row with other metrics only
    (log / "metrics.csv").write_text("\n".join(rows) + "\n")
    metrics = bench.read_metrics(tmp_path / "run")
    assert bench.tokens_per_sec(metrics, world_size=2) == 2000  # the later half, all ranks
    curve = bench.loss_curve(metrics)
    assert curve[0] == 10 and len(curve) == 8
    assert bench.mean_loss_last(curve) == pytest.approx((10 - 3.0 + 10 - 3.5) / 2)
    one = {"name": "1gpu_b8", "gpus": 1, "batch_per_device": 8, "global_batch": 8, "rc": 0,
           "tokens_per_sec": 1000.0, "final_loss": 5.0}
    twin = {**one, "name": "1gpu_b16", "batch_per_device": 16, "global_batch": 16, "final_loss": 4.0}
    two = {**one, "name": "ddp2_b8", "gpus": 2, "global_batch": 16, "tokens_per_sec": 1950.0, "final_loss": 4.2}
    variant = {**two, "name": "ddp2_b8_v1", "tokens_per_sec": 1980.0}
    summary = bench.summarize({r["name"]: r for r in (one, twin, two, variant)}, "test card")
    assert "ddp2_b8 / 1gpu_b8 (same batch per GPU) = 1.95x" in summary
    assert "ddp2_b8_v1 / 1gpu_b8 (same batch per GPU) = 1.98x" in summary
    assert "loss, ddp2_b8 vs 1gpu_b16 (global batch 16): 4.200 vs 4.000 (+5.0%)" in summary
    assert "1gpu_b16 /" not in summary  # 1-GPU runs are the baselines, not compared


def test_summary_pairs_runs_by_micro_batch_for_speed_and_global_batch_for_loss_under_accumulation() -> None:
    # With accumulate_grad_batches=2 the global batch is 2x the rows per step: speed pairs by micro-batch (8), the
    # loss by global batch (32 = 16 rows x 2 on one GPU, 8 x 2 GPUs x 2).
    one = {"name": "1gpu_b8", "gpus": 1, "batch_per_device": 8, "accumulate": 2, "global_batch": 16, "rc": 0,
           "tokens_per_sec": 1000.0, "final_loss": 5.0}
    twin = {**one, "name": "1gpu_b16", "batch_per_device": 16, "global_batch": 32, "final_loss": 4.0}
    two = {**one, "name": "ddp2_b8", "gpus": 2, "global_batch": 32, "tokens_per_sec": 1900.0, "final_loss": 4.4}
    summary = bench.summarize({r["name"]: r for r in (one, twin, two)}, "test card")
    assert "ddp2_b8 / 1gpu_b8 (same batch per GPU) = 1.90x" in summary
    assert "loss, ddp2_b8 vs 1gpu_b16 (global batch 32): 4.400 vs 4.000 (+10.0%)" in summary


def test_two_runs_at_once_give_the_hosts_ceiling() -> None:
    one = {"name": "1gpu_b8", "gpus": 1, "batch_per_device": 8, "global_batch": 8, "rc": 0,
           "tokens_per_sec": 1000.0, "final_loss": 5.0}
    pair = [{**one, "name": f"1gpu_b8_at_once{i}", "tokens_per_sec": t, "started": t0, "ended": t0 + 100}
            for i, t, t0 in ((0, 990.0, 0.0), (1, 1010.0, 10.0))]
    two = {**one, "name": "ddp2_b8", "gpus": 2, "global_batch": 16, "tokens_per_sec": 1800.0}
    summary = bench.summarize({r["name"]: r for r in (one, two, *pair)}, "test card")
    assert "two 1-GPU runs at once, no DDP: 2,000 tokens/s together = 2.00x 1gpu_b8" in summary
    assert "side by side for 90% of the shorter" in summary
    assert "ddp2_b8 / 1gpu_b8 (same batch per GPU) = 1.80x" in summary  # not against an at-once run


def test_main_starts_each_variant_and_the_runs_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict] = []

    def fake_fit(name: str, **kwargs) -> dict:
        calls.append({"name": name, **kwargs})
        return {"name": name, "gpus": kwargs["gpus"], "batch_per_device": kwargs["batch"], "rc": 0,
                "global_batch": kwargs["batch"] * kwargs["gpus"], "tokens_per_sec": 1.0, "final_loss": 1.0,
                "started": 0.0, "ended": 1.0}

    monkeypatch.setattr(bench, "fit", fake_fit)
    monkeypatch.setattr(bench, "check_export", lambda path, data: {})  # no run wrote an export
    bench.main(["--out", str(tmp_path), "--cpu-smoke", "--concurrent", "--ddp-variant", '{"bucket_cap_mb": 500}',
                "--ddp-flags=--trainer.accumulate_grad_batches=2 --model.model_config='{\"n_layer\": 1}'"])
    by_name = {c["name"]: c for c in calls}
    assert json_strategy(by_name["ddp2_b8_v1"]["strategy"]) == {"bucket_cap_mb": 500}
    # Split as a shell would: the quoted JSON stays one argument.
    flags = ["--trainer.accumulate_grad_batches=2", '--model.model_config={"n_layer": 1}']
    assert by_name["ddp2_b8_v2"]["flags"] == flags
    assert {by_name[f"1gpu_b8_at_once{i}"]["first_gpu"] for i in (0, 1)} == {0, 1}
    assert "- ddp2_b8_v2: --trainer.accumulate_grad_batches=2" in (tmp_path / "summary.md").read_text()


def json_strategy(value: str) -> dict:
    strategy = json.loads(value)
    assert strategy["class_path"] == "lightning.pytorch.strategies.DDPStrategy"
    return strategy["init_args"]


def test_fit_runs_on_the_gpus_it_is_given_with_the_extra_flags_last(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    seen = {}

    def fake_run(args: list[str], env: dict, **kwargs) -> subprocess.CompletedProcess:
        seen.update(args=args, env=env)
        return subprocess.CompletedProcess(args, 0, "", "")

    monkeypatch.setattr(bench.subprocess, "run", fake_run)
    result = bench.fit("1gpu_b8_at_once1", out=tmp_path, data=tmp_path / "data", gpus=1, batch=8, steps=3,
                       overlay=None, smoke=False, first_gpu=1, flags=["--data.num_workers=8"])
    assert seen["env"]["CUDA_VISIBLE_DEVICES"] == "1"
    assert seen["args"][-1] == "--data.num_workers=8" and "--trainer.devices=1" in seen["args"]
    assert result["ended"] >= result["started"] and result["tokens_per_sec"] is None  # no metrics were written
    assert json.loads((tmp_path / "runs.jsonl").read_text())["name"] == "1gpu_b8_at_once1"
