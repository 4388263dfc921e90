"""lit_flash reads no Lightning private state outside `lit_flash.lightning_adapters`: a private name can change in
any Lightning release without notice, and then it must break in one known place."""

from __future__ import annotations

import ast
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ThroughputMonitor

from lit_flash.callbacks import TokenThroughput

SRC = Path(__file__).resolve().parents[1] / "src" / "lit_flash"
ADAPTERS = "lightning_adapters.py"
# LightningCLI's protected `_parse_ckpt_path` (reads a checkpoint's hyperparameters), overridden by cli.py: no public
# hook exists (Lightning#20801, #21408).
REMAINING = {
    ("cli.py", "super()._parse_ckpt_path"),
    ("interrupt.py", "os._exit"),  # public in the standard library despite its name: exit without cleanup
}


def _names_defined(tree: ast.Module) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.alias):
            names.add(node.asname or node.name.split(".")[-1])
    return names


def private_uses(source: str) -> set[str]:
    """`x._name` where `_name` is not defined in `source` itself (so: another library's), and every `super()._name`."""
    tree = ast.parse(source)
    defined = _names_defined(tree)
    uses = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute) or not node.attr.startswith("_") or node.attr.startswith("__"):
            continue
        is_super = isinstance(node.value, ast.Call) and ast.unparse(node.value.func) == "super"
        if is_super or node.attr not in defined:
            uses.add(ast.unparse(node))
    return uses


def test_private_uses_are_found() -> None:
    source = "def f(trainer):\n    self._mine = 1\n    return trainer._logger_connector, self._mine, super()._mine"
    assert private_uses(source) == {"trainer._logger_connector", "super()._mine"}


def test_no_lightning_private_state_outside_the_adapters() -> None:
    found = {
        (path.name, use)
        for path in sorted(SRC.glob("*.py"))
        if path.name != ADAPTERS
        for use in private_uses(path.read_text())
    }
    assert found == REMAINING


def test_token_throughput_is_a_plain_callback_on_public_throughput() -> None:
    callback = TokenThroughput()
    assert isinstance(callback, L.Callback) and not isinstance(callback, ThroughputMonitor)
