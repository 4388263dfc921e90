"""The LightningModule: transformers' GPT-2 (any causal LM) with FlashAttention-2, loss/perplexity, AdamW + schedule.

The `nn.Module` is transformers' own model (`self.model`); this file only adds the training system around it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch

from lit_flash import lora as adapters
from lit_flash.attention import (
    AttnImplementation,
    SDPABackend,
    is_flash,
    resolve_attn_implementation,
    sdpa_kernels_in_order,
    sdpa_priority,
)
from lit_flash.blocks import IGNORE_INDEX
from lit_flash.build import adapt_for_training, load_causal_lm
from lit_flash.checkpointing import loaded_checkpoint_name
from lit_flash.ckpt_file import check_checkpoint_fits
from lit_flash.export import export_causal_lm
from lit_flash.guards import check_before_stage, check_module_args
from lit_flash.lightning_adapters import attached_trainer, is_log_step
from lit_flash.limits import DropoutFloat, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, check_call_args
from lit_flash.lora import LoraSettings
from lit_flash.loss import causal_lm_loss, fused_loss
from lit_flash.metrics import TokenMean, flops_per_token, perplexity, row_scores
from lit_flash.nonfinite import finite_or_skip, record_first_nonfinite, stop_if_nonfinite
from lit_flash.optim import LR_PLAN_KEY, adamw_with_schedule, clip_fused_or_sharded, planned_optimizer_steps
from lit_flash.packing import packed_attention_kwargs

CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
LRSchedule = Literal["linear", "cosine", "cosine_with_min_lr", "constant", "constant_with_warmup"]


class FlashGPT2LM(L.LightningModule):
    """Causal-LM fine-tuning with FlashAttention-2: logs `train_loss`, `val_loss`, `val_ppl`, `test_loss`, `test_ppl`;
    `predict` scores rows (per-row loss and perplexity).

    Args:
        model_name_or_path: Hub id or local folder of a pretrained causal LM (`--model_name_or_path`). Null builds a
            fresh model from `model_config` instead (from scratch, or tiny models for tests and the demo).
        model_config: Config values: the whole config of a from-scratch model (`model_type` defaults to gpt2), or
            overrides of the pretrained model's config.
        attn_implementation: `flash_attention_2` (default), `flash_attention_3` (Hopper GPUs; no attention dropout),
            `sdpa` or `eager` (`--attn_implementation`).
        sdpa_backends: With `attn_implementation: sdpa`, PyTorch's attention kernels to choose from, in this order
            (`cudnn`: cuDNN's fused attention, for Hopper GPUs), in training, validation and test steps. Null:
            PyTorch's own choice. With `compile`, the choice is fixed when the step first compiles.
        attn_fallback: When flash attention cannot run here (not installed, no CUDA, a GPU it does not support),
            say why once and use `sdpa` (`flash_attention_2` for `flash_attention_3`, where it runs). False stops with
            an error instead.
        learning_rate: Peak AdamW learning rate (`--learning_rate`).
        weight_decay: AdamW weight decay, not applied to biases and LayerNorm weights (`--weight_decay`).
        betas: AdamW betas (`--adam_beta1`, `--adam_beta2`).
        eps: AdamW epsilon (`--adam_epsilon`); above 0 (0 divides by zero where a gradient is 0: NaN).
        warmup_steps: Linear warm-up steps from 0 to `learning_rate` (`--warmup_steps`).
        lr_scheduler: Decay after warm-up, as transformers' `get_scheduler` names it (`--lr_scheduler_type`).
            `constant` has no warm-up (use `constant_with_warmup`); `cosine_with_min_lr` ends at 10% of the peak.
        dropout: Sets GPT-2's residual, embedding and attention dropout together; null keeps the model's.
        trust_remote_code: Allow hub models that ship their own code. Off unless you trust the repository.
        compile: `torch.compile` the forward and the loss (only the body with a fused cross-entropy). The
            first steps are slow while it compiles.
        compile_mode: `torch.compile`'s mode (needs `compile: true`). `reduce-overhead` (CUDA graphs) pays at small
            batches, where launching each kernel from Python would leave the GPU idle; `max-autotune-no-cudagraphs`
            tunes Triton matmuls against cuBLAS for many minutes and mostly keeps cuBLAS (benchmarks/RESULTS.md).
        fused_cross_entropy: Compute the loss with liger-kernel's fused linear cross-entropy, chunk by chunk, so the
            full fp32 logits (batch x seq x vocab) are never materialized. CUDA only; needs
            `pip install 'lit-flash[fast]'`.
        pad_vocab_to_multiple_of: Pad the embedding/head rows to a multiple of this (64: 50257 -> 50304) for
            faster matmuls. The pad ids are masked out of the softmax; the export is sliced back to the real size.
        fused_adamw: AdamW's fused kernel (one launch a step; under 16-mixed it skips an overflowed step on the GPU
            without a host sync, clipping included); null: on when training on CUDA, else multi-tensor AdamW.
        low_precision_residual: Under 16-mixed or bf16-mixed, carry the residual stream between blocks in fp16/bf16
            (as a model loaded in that dtype does, like the reference's `--torch_dtype float16`) instead of fp32:
            half the memory traffic of each residual add and LayerNorm; weights, gradients and AdamW stay fp32.
            No effect without autocast. Speed and quality: benchmarks/RESULTS.md.
        on_nonfinite: A NaN/inf training loss `stop`s the run with an error naming the step (before the update, so
            the weights and the last checkpoint stay finite), or `skip`s that batch (no update) with a warning. On
            GPU, `stop` looks every `log_every_n_steps` and before each checkpoint instead of syncing every step:
            up to that many updates may see the NaN, but no checkpoint ever holds them.
        lora: LoRA adapters (`lit_flash.lora.LoraSettings`: `r`, `alpha`, `dropout`, `target_modules`, `export`) on
            a pretrained model: only the adapter trains and is checkpointed. Null (default): full fine-tuning.
    """

    def __init__(
        self,
        model_name_or_path: str | None = "openai-community/gpt2",
        model_config: dict[str, Any] | None = None,
        attn_implementation: AttnImplementation = "flash_attention_2",
        attn_fallback: bool = True,
        sdpa_backends: list[SDPABackend] | None = None,
        learning_rate: PositiveFloat = 5e-5,
        weight_decay: NonNegativeFloat = 0.0,
        betas: tuple[DropoutFloat, DropoutFloat] = (0.9, 0.999),
        eps: PositiveFloat = 1e-8,
        warmup_steps: NonNegativeInt = 0,
        lr_scheduler: LRSchedule = "linear",
        dropout: DropoutFloat | None = None,
        trust_remote_code: bool = False,
        compile: bool = False,
        compile_mode: CompileMode = "default",
        fused_cross_entropy: bool = False,
        pad_vocab_to_multiple_of: PositiveInt | None = None,
        fused_adamw: bool | None = None,
        low_precision_residual: bool = False,
        on_nonfinite: Literal["stop", "skip"] = "stop",
        lora: LoraSettings | None = None,
    ) -> None:
        super().__init__()
        check_call_args(FlashGPT2LM, locals(), "model")  # the CLI's range checks, for a call from Python
        check_module_args(attn_implementation, sdpa_backends, lr_scheduler, warmup_steps, compile, compile_mode)
        # The hyperparameter as plain values (checkpoints load with weights_only), the settings as a dataclass.
        self.lora, lora = adapters.as_settings(lora), adapters.as_hparam(lora)
        self.save_hyperparameters()
        self.sdpa_priority = sdpa_priority(sdpa_backends)
        self.attn_implementation = resolve_attn_implementation(attn_implementation, attn_fallback)
        self.model = load_causal_lm(
            model_name_or_path, model_config, dropout, self.attn_implementation, trust_remote_code
        )
        self.vocab_size = self.model.config.vocab_size  # the real vocabulary, before any padding
        # What a LoRA checkpoint's adapter was trained on, as loaded (padding adds random rows): see on_load_checkpoint
        self.base_fingerprint = adapters.base_fingerprint(self.model) if self.lora is not None else None
        bias = adapt_for_training(self.model, pad_vocab_to_multiple_of, low_precision_residual)
        if self.lora is not None:  # after the padding, before compile; the frozen base is not checkpointed
            adapters.apply_lora(self.model, self.lora, pretrained=model_name_or_path is not None)
            self.strict_loading = False
        self.register_buffer("vocab_bias", bias, persistent=False)
        # The same constant on every rank: no need for DDP to broadcast it before each syncing forward (a collective
        # that holds the ranks to rank 0's pace). DDP reads this attribute by name (interim API, pytorch#43690).
        self._ddp_params_and_buffers_to_ignore = ["vocab_bias"]
        # First step whose loss was NaN/inf (-1: none), kept on the device: see _finite_or_skip. Not a buffer: DDP
        # broadcasts buffers from rank 0 before each forward, which would erase another rank's record.
        self.first_nonfinite_step: torch.Tensor | None = None
        self.fused_ce = fused_loss(fused_cross_entropy)
        self._compute_loss = self._loss_impl
        self._compiled = False
        self.val_loss = TokenMean()
        self.test_loss = TokenMean()
        self.flops_per_batch: float | None = None  # read by Lightning's ThroughputMonitor
        self._flops_per_token: dict[tuple[int, bool], float] = {}

    # ----------------------------------------------------------------------------------------- lifecycle
    def setup(self, stage: str) -> None:
        device = self.trainer.strategy.root_device
        if is_flash(self.attn_implementation) and device.type != "cuda":
            fallback = self.hparams.attn_fallback
            # What was asked, not the fallback chosen at init: the line names the user's setting.
            self.attn_implementation = resolve_attn_implementation(self.hparams.attn_implementation, fallback, device)
            self.model.set_attn_implementation(self.attn_implementation)
        if self.lora is not None:
            adapters.check_strategy(self.trainer.strategy)
        check_before_stage(self.trainer, stage, self.model.config, self.vocab_size, self.attn_implementation,
                           self.hparams)
        if self.hparams.compile and not self._compiled:
            self._compiled = True
            mode = None if self.hparams.compile_mode == "default" else self.hparams.compile_mode
            if self.fused_ce is None:  # the whole forward, so the cross-entropy fuses with the logits
                # Static shapes: an epoch's smaller last batch gets its own graph instead of turning every later
                # step's graph dynamic (slower).
                self._compute_loss = torch.compile(self._loss_impl, dynamic=False, mode=mode)
            else:  # the fused kernels stay outside the graph
                self.model.base_model.compile(mode=mode)

    # ------------------------------------------------------------------------------------------- steps
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> Any:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def _loss(self, batch: dict[str, torch.Tensor], training: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean loss over the batch's predicted tokens, and how many tokens that mean is over."""
        labels = batch["labels"]
        self.flops_per_batch = self._flops(labels.shape[1], training) * labels.numel()
        with sdpa_kernels_in_order(self.sdpa_priority):
            loss = self._compute_loss(
                batch["input_ids"], labels, batch.get("attention_mask"), batch.get("position_ids"),
                batch.get("cu_seq_lens"),
            )
        return loss, (labels[:, 1:] != IGNORE_INDEX).sum()

    def _loss_impl(
        self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None = None, cu_seq_lens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        packed = packed_attention_kwargs(position_ids, cu_seq_lens, self.attn_implementation)
        return causal_lm_loss(self.model, input_ids, labels, attention_mask, packed, self.vocab_size,
                              self.vocab_bias, self.fused_ce)

    def _flops(self, seq_len: int, training: bool) -> float:
        key = (seq_len, training)
        if key not in self._flops_per_token:
            self._flops_per_token[key] = flops_per_token(self.model.config, seq_len, training)
        return self._flops_per_token[key]

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor | None:
        loss, n_tokens = self._loss(batch, training=True)
        if not self._finite_or_skip(loss, batch_idx, n_tokens):
            return None  # Lightning skips backward and the optimizer step
        rows = batch["input_ids"].shape[0]
        self.log("train_loss", loss, batch_size=rows)  # a device tensor: the logger reads it on its own steps
        if not self._host_reads_stall(loss) or is_log_step(self.trainer, before_optimizer_step=True):
            # Lightning turns every progress-bar value into a Python number after each batch: a GPU tensor there
            # syncs every step (the CPU cannot queue the next one; RESULTS.md has the idle time it cost).
            # On GPU the bar gets a host copy on the logger's steps only (each micro-batch of such a step when
            # accumulating gradients).
            self.log("loss", loss.detach().cpu(), prog_bar=True, logger=False, batch_size=rows)
        return loss

    def _finite_or_skip(self, loss: torch.Tensor, batch_idx: int, n_tokens: torch.Tensor | None = None) -> bool:
        if self.hparams.on_nonfinite == "stop" and self._host_reads_stall(loss):
            # A per-step check would sync the GPU every step (the CPU could not queue the next step ahead): note
            # the first bad step on the device, look at it on logging steps and before every checkpoint.
            self.first_nonfinite_step = record_first_nonfinite(self.first_nonfinite_step, loss, self.global_step)
            if is_log_step(self.trainer, before_optimizer_step=True):
                self.stop_if_nonfinite()
            return True
        where = f"step {self.global_step} (epoch {self.current_epoch}, batch {batch_idx})"
        return finite_or_skip(loss, n_tokens, self.hparams.on_nonfinite, self.trainer.strategy, where)

    @staticmethod
    def _host_reads_stall(tensor: torch.Tensor) -> bool:
        """Whether reading `tensor` on the host waits for the device's queue; on the CPU it costs nothing."""
        return tensor.device.type == "cuda"

    def stop_if_nonfinite(self) -> None:
        """Raise if a training loss was NaN/inf since the last look (on GPU the check is deferred); all ranks call it.
        Checkpoints and the export call it first: they never hold weights trained on a NaN loss."""
        stop_if_nonfinite(self.first_nonfinite_step, self.trainer.strategy)

    def on_fit_start(self) -> None:
        # Train mode whatever the model's source or what was done with it before (a hub model loads in eval mode; a
        # notebook may have generated with it). Lightning's loops switch to eval for validation and back to this.
        self.train()

    def on_train_start(self) -> None:
        self.first_nonfinite_step = None  # a new fit (e.g. again in a notebook, on another device) starts clean

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.hparams.on_nonfinite == "stop":
            self.stop_if_nonfinite()  # never write weights trained on a NaN loss
        if getattr(self, "_lr_plan", None) is not None:
            checkpoint[LR_PLAN_KEY] = self._lr_plan
        if self.lora is not None:  # only what trains: the frozen base comes from model_name_or_path
            checkpoint["state_dict"] = adapters.trainable_state_dict(self, checkpoint["state_dict"])
            checkpoint[adapters.BASE_KEY] = self.base_fingerprint  # so a resume can tell it is the same base

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "state_dict" in checkpoint:  # FSDP loads (and pops) the weights itself, before this hook
            expected = self.state_dict()
            expected = expected if self.lora is None else adapters.trainable_state_dict(self, expected)
            name = loaded_checkpoint_name(attached_trainer(self))
            check_checkpoint_fits(checkpoint, name, self.hparams, expected, self.base_fingerprint)
        # Read by configure_optimizers, which Lightning calls after this hook and before restoring the scheduler.
        self._resumed_lr_plan = (checkpoint.get(LR_PLAN_KEY), int(checkpoint.get("global_step", 0)))

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss, n_tokens = self._loss(batch, training=False)
        # Weighted by predicted tokens: the epoch mean is the mean over tokens, on every rank (torchmetrics syncs).
        self.val_loss.update(loss.float(), n_tokens)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss, n_tokens = self._loss(batch, training=False)
        self.test_loss.update(loss.float(), n_tokens)

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        """Score rows: each row's mean loss over its predicted tokens, its perplexity and token count."""
        packed = packed_attention_kwargs(batch.get("position_ids"), batch.get("cu_seq_lens"), self.attn_implementation)
        logits = self(batch["input_ids"], batch.get("attention_mask"), **packed).logits
        return row_scores(logits[..., : self.vocab_size], batch["labels"])

    def on_validation_epoch_end(self) -> None:
        self._log_epoch_loss("val", self.val_loss)

    def on_test_epoch_end(self) -> None:
        self._log_epoch_loss("test", self.test_loss)

    def _log_epoch_loss(self, prefix: str, metric: TokenMean) -> None:
        if metric.update_count == 0 and self.trainer.world_size == 1:
            return  # with several ranks compute() syncs: a rank without batches must still take part
        mean = metric.compute()
        metric.reset()
        # Already the same on every rank (compute() synced the sums): sync_dist costs a tiny all-reduce and spares
        # Lightning's warning that epoch-level values should be synced.
        self.log(f"{prefix}_loss", mean, prog_bar=True, sync_dist=True)
        self.log(f"{prefix}_ppl", perplexity(mean), prog_bar=True, sync_dist=True)

    # ------------------------------------------------------------------------------------ optimization
    def configure_optimizers(self) -> Any:
        h = self.hparams
        trainer = attached_trainer(self)
        on_cuda = trainer is not None and trainer.strategy.root_device.type == "cuda"
        stored, at_step = getattr(self, "_resumed_lr_plan", (None, 0))
        self._resumed_lr_plan = (None, 0)  # used once: a later fit of this module plans afresh
        optimizer, scheduler, self._lr_plan = adamw_with_schedule(
            self.model, h, fused=on_cuda if h.fused_adamw is None else h.fused_adamw,
            total=planned_optimizer_steps(self.trainer), stored_plan=stored, at_step=at_step,
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(
        self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        if not clip_fused_or_sharded(self.trainer, optimizer, gradient_clip_val, gradient_clip_algorithm):
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    # -------------------------------------------------------------------------------------------- export
    def export_hf(
        self,
        path: str | Path,
        tokenizer: Any = None,
        state_dict: dict | None = None,
        run_dir: str | Path | None = None,
        flag: str | None = None,
    ) -> Path:
        """Save the model (safetensors) and tokenizer so `AutoModelForCausalLM.from_pretrained(path)` loads them;
        written beside `path`, then renamed onto it. `state_dict`: the full weights gathered under FSDP. `run_dir`:
        the run whose earlier export at `path` may be replaced (anything else there is refused: `lit_flash.export`).
        `flag`: how errors name `path` (default `path=...`)."""
        if self.lora is not None:  # merged into a copy (this module keeps training unchanged), or the adapter alone
            return adapters.export_lora(self.model, self.lora, self.vocab_size, path, tokenizer, run_dir, flag)
        return export_causal_lm(self.model, self.vocab_size, path, tokenizer, state_dict, run_dir, flag)

