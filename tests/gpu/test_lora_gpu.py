"""LoRA (`configs/lora.yaml`) on `configs/gpt2_flash.yaml` as shipped on a GPU: flash_attention_2, 16-mixed with its
GradScaler, torch.compile (CUDA graphs), the padded vocabulary. Only the adapter trains and is checkpointed, a
resume continues, and the merged export is a plain model with the trained module's logits.

Run on the GPU machine: `pytest -m gpu tests/gpu/test_lora_gpu.py -v -s`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from test_recipe_gpu import VOCAB, _plain_argv, blocks, logged, pretrained, recipe_args  # noqa: F401 (fixtures)

from lit_flash.cli import cli_main

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
pytest.importorskip("peft")

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def lora_args(tmp: Path, root: Path, weights: Path, data: Path, **trainer: Any) -> list[str]:
    """The recipe GPU tests' run, with configs/lora.yaml between the recipe and their overlay."""
    recipe = recipe_args(tmp, root, weights, data, **trainer)  # --config recipe --config overlay
    return [*recipe[:2], "--config", str(CONFIGS / "lora.yaml"), *recipe[2:]]


def test_lora_on_the_recipe_trains_the_adapter_only_resumes_and_exports(
    tmp_path: Path, pretrained: Path, blocks: Path  # noqa: F811 (the fixtures imported above)
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
    model.cuda().eval()  # the trainer hands the model back on the CPU when fit ends
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
        want = model(ids).logits[..., :VOCAB].float()
        got_logits = exported(input_ids=ids).logits.float()
    torch.testing.assert_close(got_logits, want, rtol=2e-2, atol=2e-2)
