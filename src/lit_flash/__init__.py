"""lit_flash: fine-tune GPT-2 (and other causal LMs) with FlashAttention on PyTorch Lightning.

The names below load on first use, so `import lit_flash` (and `lit_flash.generate`) stays light: Lightning and
transformers are imported only by what needs them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# name -> the module that defines it
_EXPORTS = {
    "FlashGPT2LM": "lit_flash.module",
    "WikitextDataModule": "lit_flash.datamodule",
    "LitFlashError": "lit_flash.errors",
    "LoraSettings": "lit_flash.lora",
    "cli_main": "lit_flash.cli",
    "HFExport": "lit_flash.callbacks",
    "TokenThroughput": "lit_flash.callbacks",
    "ExactResume": "lit_flash.resume",
    "AtomicCheckpointIO": "lit_flash.checkpointing",
    "trainer_kwargs": "lit_flash.trainer_setup",
    "trainer_callbacks": "lit_flash.trainer_setup",
    "trainer_plugins": "lit_flash.trainer_setup",
    "resume_path": "lit_flash.trainer_setup",
}
__all__ = [
    "AtomicCheckpointIO",
    "ExactResume",
    "FlashGPT2LM",
    "HFExport",
    "LitFlashError",
    "LoraSettings",
    "TokenThroughput",
    "WikitextDataModule",
    "__version__",
    "cli_main",
    "resume_path",
    "trainer_callbacks",
    "trainer_kwargs",
    "trainer_plugins",
]

if TYPE_CHECKING:
    from lit_flash.callbacks import HFExport, TokenThroughput
    from lit_flash.checkpointing import AtomicCheckpointIO
    from lit_flash.cli import cli_main
    from lit_flash.datamodule import WikitextDataModule
    from lit_flash.errors import LitFlashError
    from lit_flash.lora import LoraSettings
    from lit_flash.module import FlashGPT2LM
    from lit_flash.resume import ExactResume
    from lit_flash.trainer_setup import resume_path, trainer_callbacks, trainer_kwargs, trainer_plugins


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lit_flash' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # once loaded, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
