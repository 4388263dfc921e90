"""AdamW's parameter groups and the length of the learning-rate schedule."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch


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
