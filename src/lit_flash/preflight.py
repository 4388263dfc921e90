"""Checks before the trainer starts: can this machine run the asked precision, can the run write its folder."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from lit_flash.errors import LitFlashError


def check_precision_supported(precision: str | int | None, device_type: str, bf16_supported: bool = True) -> None:
    """fp16 needs a CUDA GPU (Lightning's GradScaler and fp16 kernels); bf16 on CUDA needs sm_80+ (Ampere)."""
    p = str(precision)
    if p.startswith("16") and device_type == "cpu":
        raise LitFlashError(
            f"trainer.precision={p}: fp16 needs a CUDA GPU and this run is on CPU; use bf16-mixed or 32-true"
        )
    if p.startswith("bf16") and device_type == "cuda" and not bf16_supported:
        raise LitFlashError(
            f"trainer.precision={p}: this GPU cannot run bf16 (it needs sm_80/Ampere or newer); use 16-mixed"
        )


def trainer_device_type(accelerator: str | None) -> str:
    """The device type a `Trainer(accelerator=...)` string will use on this machine; a GPU asked for on a machine
    without one is an error here (Lightning's own is a 30-line traceback)."""
    name = str(accelerator or "auto").lower()
    if name in ("gpu", "cuda") and not torch.cuda.is_available():
        raise LitFlashError(
            f"trainer.accelerator={name}: this machine has no CUDA GPU; use trainer.accelerator=auto or cpu "
            "(configs/ddp.yaml, fsdp.yaml and multinode.yaml ask for GPUs)"
        )
    if name in ("gpu", "cuda") or (name == "auto" and torch.cuda.is_available()):
        return "cuda"
    if name == "auto":
        return "mps" if torch.backends.mps.is_available() else "cpu"
    return name


def bf16_supported() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


def check_output_dir(path: str | os.PathLike, flag: str = "trainer.default_root_dir") -> None:
    """Create `path` if needed and write (then remove) a probe file: fail now, not at the first checkpoint."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-probe-"):
            pass
    except OSError as err:
        why = err.strerror or str(err)
        raise LitFlashError(f"{flag}={path}: cannot write there ({why}); choose a writable folder") from err
    for name in ("checkpoints", "logs"):  # what a run writes inside: each must be a folder if present
        if (path / name).exists() and not (path / name).is_dir():
            raise LitFlashError(
                f"{flag}={path}: {path / name} is a file, where the run keeps its {name} folder: move the file, or "
                f"give this run another {flag}"
            )


def check_multi_node_launch(num_nodes: int | None) -> None:
    """Several nodes need a launcher that tells each process its place (torchrun, SLURM, LSF, or a Kubeflow-style
    `WORLD_SIZE` + `RANK`) or a hand-set `NODE_RANK`: without one, this process would wait for ever for nodes that
    never start."""
    from lightning.fabric.plugins.environments import LSFEnvironment, SLURMEnvironment, TorchElasticEnvironment

    if not num_nodes or int(num_nodes) <= 1 or "NODE_RANK" in os.environ:
        return
    if {"WORLD_SIZE", "RANK"} <= set(os.environ):
        return
    if any(env.detect() for env in (TorchElasticEnvironment, SLURMEnvironment, LSFEnvironment)):
        return
    raise LitFlashError(
        f"trainer.num_nodes={num_nodes}: this process was not started by a multi-node launcher (torchrun, SLURM, "
        "...), so it would wait for ever for the other nodes: start it with torchrun on every node "
        "(docs/multi-gpu.md), or set trainer.num_nodes=1"
    )
