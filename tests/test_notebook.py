"""notebooks/quickstart.ipynb runs top to bottom (a shorter run) and is kept in git without outputs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import lit_flash

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


def test_committed_notebook_has_no_outputs():
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code and all(cell.outputs == [] and cell.execution_count is None for cell in code)


@pytest.mark.slow
def test_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    pytest.importorskip("matplotlib")
    # The kernel imports this lit_flash (not another install), trains briefly, and writes only under tmp_path.
    source = str(Path(lit_flash.__file__).resolve().parents[1])
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([source, os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("LIT_FLASH_NB_STEPS", "20")
    monkeypatch.setenv("LIT_FLASH_NB_RUN_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
    assert not [out for out in outputs if out.output_type == "error"]
    assert any("image/png" in out.get("data", {}) for out in outputs), "no plot was drawn"
    printed = "".join(out.get("text", "") for out in outputs if out.output_type == "stream")
    assert printed.count("\n---") == 3 and "def __init__(self" in printed
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
    assert list((tmp_path / "run" / "logs").glob("version_*/metrics.csv"))
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()  # the CLI's checkpoints, through trainer_kwargs
