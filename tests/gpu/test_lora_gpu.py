"""LoRA (`configs/lora.yaml`) on `configs/gpt2_flash.yaml` as shipped on a GPU: flash_attention_2, 16-mixed with its
GradScaler, torch.compile (CUDA graphs), the padded vocabulary. Only the adapter trains and is checkpointed, a
resume continues, and the merged export is a plain model with the trained module's logits.

Run on the GPU machine: `pytest -m gpu tests/gpu/test_lora_gpu.py -v -s`.
"""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from lit_flash.cli import cli_main
from lit_flash.synthetic import save_synthetic_dataset

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
pytest.importorskip("peft")

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
VOCAB, BLOCK, N_TRAIN = 1000, 128, 23  # 1000 pads to 1024; batch 2: 12 batches an epoch, the last one short


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_positions=BLOCK, n_embd=128, n_layer=2, n_head=2)
    path = tmp_path_factory.mktemp("hub") / "gpt2-small"
    GPT2LMHeadModel(config).save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def blocks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("input") / "blocks"
    return save_synthetic_dataset(path, n_train=N_TRAIN, n_test=8, block_size=BLOCK, vocab_size=VOCAB)


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", sys.argv[:1])


def lora_args(tmp: Path, root: Path, pretrained: Path, blocks: Path, **trainer: Any) -> list[str]:
    overlay = {
        "trainer": {"val_check_interval": 4, "log_every_n_steps": 1, "default_root_dir": str(root),
                    "enable_progress_bar": False, **trainer},
        "checkpoint": {"every_n_train_steps": 4},
        "model": {"model_name_or_path": str(pretrained), "learning_rate": 1e-3},
        "data": {"tokenized_dataset_load_dir": str(blocks), "tokenizer_name": None, "batch_size": 2,
                 "eval_batch_size": 2, "num_workers": 0},
    }
    path = tmp / f"{root.name}.yaml"
    path.write_text(yaml.safe_dump(overlay))
    return ["--config", str(CONFIGS / "gpt2_flash.yaml"), "--config", str(CONFIGS / "lora.yaml"), "--config",
            str(path)]


def logged(root: Path, key: str) -> dict[int, float]:
    values: dict[int, float] = {}
    for metrics in sorted(root.glob("logs/version_*/metrics.csv")):
        for row in csv.DictReader(open(metrics)):
            if row.get(key):
                values[int(row["step"])] = float(row[key])
    return values


def test_lora_on_the_recipe_trains_the_adapter_only_resumes_and_exports(
    tmp_path: Path, pretrained: Path, blocks: Path
) -> None:
    from transformers import AutoModelForCausalLM

    whole = tmp_path / "whole"
    cli = cli_main(["fit", *lora_args(tmp_path, whole, pretrained, blocks, max_epochs=2)])
    model = cli.model
    assert model.attn_implementation == "flash_attention_2" and model._compiled
    assert str(cli.trainer.precision) == "16-mixed" and cli.trainer.global_step == 24
    train = logged(whole, "train_loss")
    assert len(train) == 24 and all(math.isfinite(v) for v in train.values())
    adapter = {n for n, p in model.named_parameters() if p.requires_grad}
    assert adapter and all("lora_" in n for n in adapter)
    checkpoint = next((whole / "checkpoints").glob("*step=8.ckpt"))
    assert set(torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]) == adapter

    resumed = tmp_path / "resumed"
    cli_main(["fit", *lora_args(tmp_path, resumed, pretrained, blocks, max_epochs=2), "--ckpt_path", str(checkpoint)])
    got = logged(resumed, "train_loss")
    after = {s: v for s, v in train.items() if s >= 8}
    assert sorted(got) == sorted(after)
    diffs = [abs(got[s] - after[s]) for s in after]  # GPU kernels with atomics: run-to-run noise
    print("LoRA resume: max |train_loss diff| =", max(diffs))
    assert max(diffs) < 5e-3, diffs

    exported = AutoModelForCausalLM.from_pretrained(whole / "model", attn_implementation="sdpa").cuda().eval()
    assert exported.config.vocab_size == VOCAB and not any("lora" in k for k in exported.state_dict())
    ids = torch.arange(64, device="cuda").reshape(2, 32) % VOCAB
    model.eval()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
        want = model(ids).logits[..., :VOCAB].float()
        got_logits = exported(input_ids=ids).logits.float()
    torch.testing.assert_close(got_logits, want, rtol=2e-2, atol=2e-2)
