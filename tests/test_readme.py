"""README.md's Python snippet runs as written (offline, CPU), only with fewer steps."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import lit_flash

README = Path(__file__).resolve().parents[1] / "README.md"
# The snippet's step counts, cut so that the test takes seconds of training, not minutes.
FEWER_STEPS = {"max_steps=100": "max_steps=6", "val_check_interval=50": "val_check_interval=3"}


def readme_python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```$", README.read_text(), flags=re.S | re.M)


def test_readme_has_one_python_snippet():
    assert len(readme_python_blocks()) == 1


@pytest.mark.slow
def test_readme_python_snippet_runs(tmp_path):
    (code,) = readme_python_blocks()
    for old, new in FEWER_STEPS.items():
        assert code.count(old) == 1, f"README's snippet no longer has {old!r}: update FEWER_STEPS"
        code = code.replace(old, new)
    (tmp_path / "snippet.py").write_text(code)
    # This lit_flash (not another install); runs in tmp_path, where the snippet writes its runs/python folder.
    source = str(Path(lit_flash.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([source, os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    # Twice: the second run resumes from the first's last checkpoint (already at its end) and still prints.
    for _ in range(2):
        result = subprocess.run([sys.executable, "snippet.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                                timeout=240)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "def __init__(self" in result.stdout
        assert re.search(r"^[0-9.]+$", result.stdout, flags=re.M), result.stdout  # val_ppl, a number
        assert (tmp_path / "runs" / "python" / "model" / "model.safetensors").is_file()
