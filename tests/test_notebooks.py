"""Every notebook runs top to bottom (so it cannot rot) and is stored without outputs."""

import pathlib

import nbformat
import pytest
from conftest import reuse_stages
from nbclient import NotebookClient

NOTEBOOKS = sorted((pathlib.Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
  assert NOTEBOOKS, "notebooks/ holds no .ipynb"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_is_stored_stripped(path):
  nb = nbformat.read(path, as_version=4)
  for cell in nb.cells:
    if cell.cell_type == "code":
      assert not cell.outputs and cell.execution_count is None, f"{path.name}: strip outputs"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_executes(path, tmp_path, monkeypatch, request):
  nb = nbformat.read(path, as_version=4)
  if path.name.startswith("02_"):  # the PPO run reuses the smoke run's SFT and reward model
    reuse_stages(request.getfixturevalue("smoke_run")[0], tmp_path)
  monkeypatch.setenv("MPLBACKEND", "Agg")
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setenv("PPO_JAX_NOTEBOOK_WORKDIR", str(tmp_path))
  client = NotebookClient(
    nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
  )
  # Raises CellExecutionError with the failing cell's traceback (the notebooks' own asserts too).
  client.execute()
  assert all(c.execution_count for c in nb.cells if c.cell_type == "code")
  if path.name.startswith("02_"):  # its run's outputs, as the notebook sets it up
    rows = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 8 and (tmp_path / "policy" / "model.safetensors").exists()
