"""lit_flash: fine-tune GPT-2 (and other causal LMs) with FlashAttention on PyTorch Lightning."""

from lit_flash.cli import cli_main
from lit_flash.data import WikitextDataModule
from lit_flash.errors import LitFlashError
from lit_flash.model import FlashGPT2LM

__version__ = "0.1.0"
__all__ = ["FlashGPT2LM", "LitFlashError", "WikitextDataModule", "cli_main", "__version__"]
