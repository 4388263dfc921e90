"""AdamW's parameter groups and the length of the learning-rate schedule."""

from __future__ import annotations

import functools
import math
from typing import Any

import lightning as L
import torch

from lit_flash.errors import LitFlashError, warn_user


def weight_decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups as the HF Trainer makes them: no decay on biases and norm weights, decay on the rest.

    Decided by parameter name and module type, not by `ndim`: under FSDP (`use_orig_params`) each parameter is
    a flat 1-d shard, and an `ndim < 2` rule would silently drop weight decay everywhere.
    """
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    seen: set[int] = set()  # tied weights (GPT-2's wte and lm_head) are one parameter: one group
    for module in model.modules():
        is_norm = "norm" in type(module).__name__.lower()
        for name, param in module.named_parameters(recurse=False):
            if param.requires_grad and id(param) not in seen:
                seen.add(id(param))
                (no_decay if is_norm or name == "bias" else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def limited_batches(length: int, limit: int | float) -> int:
    """Batches an epoch runs under `trainer.limit_train_batches` (an int caps the count, a float is a fraction)."""
    if isinstance(limit, int):
        return min(length, limit)
    return int(length * limit)


def planned_optimizer_steps(trainer: L.Trainer) -> int | float:
    """The optimizer steps this fit will take: the length of the learning-rate schedule.

    Lightning's `trainer.estimated_stepping_batches` builds the fit loop's train loader when the run is bounded by
    epochs; called from `configure_optimizers`, that happens before a checkpoint's loader position is restored,
    and Lightning then never restores it (Lightning#20550): a resumed run would replay its epoch from the start.
    Here the epoch's length comes from a loader of the DataModule's own, which the fit loop never sees. Without a
    DataModule (loaders passed to `fit`), Lightning's estimate is used.
    """
    if trainer.max_epochs in (None, -1):  # bounded by steps alone
        return trainer.max_steps if trainer.max_steps != -1 else math.inf
    datamodule = trainer.datamodule
    if datamodule is None:
        return trainer.estimated_stepping_batches
    loader = datamodule.train_dataloader()
    try:
        length = len(loader)
    except TypeError:  # an iterable dataset: only max_steps bounds it
        return trainer.max_steps if trainer.max_steps != -1 else math.inf
    per_epoch = math.ceil(limited_batches(length, trainer.limit_train_batches) / trainer.accumulate_grad_batches)
    total = per_epoch * max(trainer.max_epochs, 1)
    return min(total, trainer.max_steps) if trainer.max_steps != -1 else total


# The schedule's plan, stored in every checkpoint (`lit_flash_lr_schedule`) so that a resume with another length
# (`max_steps`/`max_epochs` changed: "train longer") continues it without a jump. `planned_steps` is the length the
# transformers schedule was built for; `knots` map real steps to that schedule's steps (piecewise linear, slope 1
# after the last knot, never past `planned_steps`); `end` is the real step where it now ends.
def new_lr_plan(total: int) -> dict[str, Any]:
    return {"planned_steps": total, "end": total, "knots": [[0, 0]]}


def schedule_step(plan: dict[str, Any], step: float) -> float:
    """The step of the transformers schedule that real step `step` runs at."""
    knots = plan["knots"]
    for (r0, v0), (r1, v1) in zip(knots, knots[1:], strict=False):
        if step <= r1:
            return v0 + (step - r0) * (v1 - v0) / (r1 - r0) if r1 > r0 else v1
    r_last, v_last = knots[-1]
    return min(v_last + max(step - r_last, 0), plan["planned_steps"])


def stretch_lr_plan(plan: dict[str, Any], at_step: int, new_end: int) -> dict[str, Any]:
    """The plan resumed at `at_step` to end at `new_end`: up to `at_step` unchanged (the LR there is the same: no
    jump); the rest of the schedule, from where it stands, is stretched (or squeezed) to end at `new_end`.

    A schedule that had already ended (a finished run trained longer) runs once more over the new steps, warm-up
    included: its final rate is 0 for linear and cosine, and continuing at 0 would train nothing. The warm-up
    starts from 0, so the rate rises from where a linear or cosine schedule ended, without a jump."""
    here = schedule_step(plan, at_step)
    knots = [k for k in plan["knots"] if k[0] < at_step] + [[at_step, here]]
    if new_end > at_step:
        if here >= plan["planned_steps"]:
            knots.append([at_step, 0])  # the restart: schedule step 0 right after the resume step
        knots.append([new_end, plan["planned_steps"]])
    return {"planned_steps": plan["planned_steps"], "end": new_end, "knots": knots}


LR_PLAN_KEY = "lit_flash_lr_schedule"  # the schedule's plan in a checkpoint (see new_lr_plan)


def lr_plan_for(stored: dict[str, Any] | None, at_step: int, total: int | float) -> dict[str, Any] | None:
    """This fit's schedule plan: a fresh one, the checkpoint's (`stored`, saved at `at_step`), or the checkpoint's
    stretched to `total` steps (with a warning saying what changed). None for an unbounded run (no length to plan)."""
    if not math.isfinite(total):
        return None
    if stored is None:  # a fresh run, or a checkpoint from before plans were stored: built for `total`
        return new_lr_plan(int(total))
    if int(stored["end"]) == int(total):
        return stored
    if int(total) < at_step:  # Lightning would stop at once and the run end as if it had trained to here
        raise LitFlashError(
            f"the run now plans {int(total)} optimizer steps, but the checkpoint is at step {at_step}: to train on, "
            f"set trainer.max_steps (or max_epochs) beyond step {at_step}"
        )
    plan = stretch_lr_plan(stored, at_step, int(total))
    ended = schedule_step(stored, at_step) >= stored["planned_steps"]
    warn_user(
        f"the run now plans {int(total)} optimizer steps instead of {stored['end']} (trainer.max_steps, "
        "max_epochs, the data or the number of devices changed): "
        + (
            f"its learning-rate schedule had ended at step {at_step}, so it runs once more over steps "
            f"{at_step + 1}-{int(total)}: its warm-up from 0, then its decay (a restart)"
            if ended
            else f"the rest of the learning-rate schedule from step {at_step} is stretched to end at step "
            f"{int(total)}, continuing from the current learning rate without a jump"
        )
    )
    return plan


def lr_scheduler_for(
    name: str, optimizer: torch.optim.Optimizer, warmup_steps: int, total: int | float, plan: dict[str, Any] | None
) -> torch.optim.lr_scheduler.LRScheduler:
    """transformers' schedule `name` over the plan's length (`total` without a plan), run on the plan's steps."""
    from transformers import get_scheduler

    extra = {"scheduler_specific_kwargs": {"min_lr_rate": 0.1}} if name == "cosine_with_min_lr" else {}
    planned = int(plan["planned_steps"]) if plan is not None else int(total)
    scheduler = get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=planned, **extra)
    if plan is not None and len(plan["knots"]) > 1:  # resumed with another length: run on the stretched plan
        factor = scheduler.lr_lambdas[0]
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(_stretched_factor, factor, plan))
    return scheduler


def _stretched_factor(factor: Any, plan: dict[str, Any], step: int) -> float:
    """The transformers schedule's factor at the step the stretched plan maps `step` to."""
    return factor(schedule_step(plan, step))


def clip_fused_or_sharded(
    trainer: L.Trainer, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None,
    gradient_clip_algorithm: str | None,
) -> bool:
    """Clip where Lightning's own clipping cannot (a fused AdamW, FSDP); False: leave it to Lightning."""
    norm = bool(gradient_clip_val) and gradient_clip_algorithm != "value"
    fused = bool(optimizer.defaults.get("fused"))
    scaler = getattr(trainer.precision_plugin, "scaler", None)  # 16-mixed's GradScaler, else None
    if gradient_clip_val and fused and scaler is not None:
        # Lightning's AMP plugin leaves the unscaling to a fused optimizer's step and so refuses to clip. Unscale
        # here instead (one foreach kernel, no host sync): GradScaler.step then hands the fused kernel only the
        # inf flag, and the kernel skips an overflowed step on the device.
        scaler.unscale_(optimizer)
    if norm and hasattr(trainer.model, "clip_grad_norm_"):
        # FSDP: the norm spans every rank's shard; only the wrapped module can compute it (Lightning's FSDP
        # precision refuses 'norm'). The GradScaler, if any, has unscaled the gradients already.
        trainer.model.clip_grad_norm_(gradient_clip_val)
        return True
    if gradient_clip_val and fused:  # true-scale gradients (bf16, fp32, or unscaled above): clip directly
        # The optimizer's own list: a module's `parameters()` walks every submodule, a millisecond of host time
        # a step.
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if norm:
            torch.nn.utils.clip_grad_norm_(params, gradient_clip_val, foreach=True)
        else:
            torch.nn.utils.clip_grad_value_(params, gradient_clip_val, foreach=True)
        return True
    return False


def adamw_with_schedule(
    model: torch.nn.Module, h: Any, fused: bool, total: int | float, stored_plan: dict[str, Any] | None, at_step: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler, dict[str, Any] | None]:
    """AdamW over `model` with the HF Trainer's decay groups, its learning-rate schedule over `total` steps (the
    checkpoint's plan `stored_plan`, saved at `at_step`, continued or stretched), and the plan to store.

    `h`: the module's hyperparameters (learning_rate, betas, eps, weight_decay, warmup_steps, lr_scheduler).
    `fused`: AdamW's fused kernel, one launch a step; under 16-mixed it takes the GradScaler's inf flag on the
    device (no host sync to decide whether to skip).
    """
    groups = weight_decay_groups(model, h.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=h.learning_rate, betas=tuple(h.betas), eps=h.eps, fused=fused)
    plan = lr_plan_for(stored_plan, at_step, total)
    if h.warmup_steps >= total and h.lr_scheduler != "constant":
        warn_user(f"model.warmup_steps={h.warmup_steps} is not below the {total} training steps")
    return optimizer, lr_scheduler_for(h.lr_scheduler, optimizer, h.warmup_steps, total, plan), plan
