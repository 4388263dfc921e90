"""FSDP on 2 GPUs (Lightning allows FSDP on CUDA only, so these cannot run in CPU CI): the gathered HF export,
the full checkpoint resumed on another number of GPUs, and what a sharded checkpoint allows.
Run on a 2-GPU machine: `pytest -m gpu tests/gpu/test_multi_gpu.py`."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lit_flash.synthetic import save_synthetic_dataset

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs"),
]

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("multi_gpu", ROOT / "benchmarks" / "multi_gpu.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)
STEPS = 6


def fit(tmp: Path, name: str, gpus: int, *extra: str) -> subprocess.CompletedProcess:
    args = [
        sys.executable, "-m", "lit_flash", "fit", "--config", str(ROOT / "configs" / "gpt2_flash.yaml"),
        "--config", str(ROOT / "configs" / "fsdp.yaml"), f"--trainer.devices={gpus}", "--trainer.max_epochs=-1",
        f"--trainer.default_root_dir={tmp / name}", "--trainer.limit_val_batches=0", "--trainer.log_every_n_steps=1",
        "--model.model_name_or_path=null", f"--model.model_config={json.dumps(bench.TINY)}",
        "--model.attn_implementation=sdpa", "--model.weight_decay=0.1",
        f"--data.tokenized_dataset_load_dir={tmp / 'data'}", "--data.tokenizer_name=null", "--data.batch_size=4",
        "--checkpoint.every_n_train_steps=0", "--checkpoint.save_top_k=0", "--checkpoint.save_last=true", *extra,
    ]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])))
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("fsdp")
    save_synthetic_dataset(tmp / "data", 64, 8, bench.TINY["n_positions"], bench.TINY["vocab_size"])
    return tmp


def test_fsdp_full_checkpoint_export_and_resume_on_one_gpu(tmp: Path) -> None:
    proc = fit(tmp, "full2", 2, f"--trainer.max_steps={STEPS}")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    ckpt = tmp / "full2" / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()  # state_dict_type full: one ordinary file, gathered on rank 0
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(str(tmp / "full2" / "model"))  # gathered, not one shard
    compared = [key for key in exported.state_dict() if f"model.{key}" in state]
    assert "transformer.h.0.attn.c_attn.weight" in compared and "transformer.wte.weight" in compared
    for key in compared:
        value = exported.state_dict()[key]
        torch.testing.assert_close(value, state[f"model.{key}"].to(value.dtype), msg=key)
    resumed = fit(tmp, "full1", 1, f"--trainer.max_steps={STEPS + 3}", f"--ckpt_path={ckpt}", "--export.dirname=null")
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-3000:]
    steps = bench.loss_curve(bench.read_metrics(tmp / "full1"))
    assert min(steps) >= STEPS and max(steps) == STEPS + 2  # continued from the 2-GPU step, on 1 GPU


def test_fsdp_sharded_checkpoint_resumes_under_fsdp_only(tmp: Path) -> None:
    sharded = "--trainer.strategy.init_args.state_dict_type=sharded"
    proc = fit(tmp, "sharded2", 2, f"--trainer.max_steps={STEPS}", sharded, "--export.dirname=null")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    ckpt = tmp / "sharded2" / "checkpoints" / "last.ckpt"
    assert ckpt.is_dir()  # one shard file per rank + metadata
    ddp = fit(tmp, "sharded_ddp", 1, "--trainer.strategy=ddp", f"--ckpt_path={ckpt}", "--export.dirname=null",
              f"--trainer.max_steps={STEPS + 2}")
    assert ddp.returncode == 2 and "sharded FSDP checkpoint" in ddp.stderr
    # torch.distributed.checkpoint reshards on load: 2 shards -> 1 GPU under FSDP.
    one = fit(tmp, "sharded1", 1, sharded, f"--ckpt_path={ckpt}", "--export.dirname=null",
              f"--trainer.max_steps={STEPS + 2}")
    assert one.returncode == 0, (one.stdout + one.stderr)[-3000:]
