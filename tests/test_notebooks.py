"""Every Colab notebook runs end to end at a tiny setting and matches its jupytext .py twin."""

import pathlib

import jupytext
import nbclient
import nbformat
import pytest

COLAB = pathlib.Path(__file__).resolve().parents[1] / "colab"
NOTEBOOKS = sorted(COLAB.glob("*.ipynb"))
SLOW_NOTEBOOKS = {"fixed_vs_gated", "generation", "three_forms"}   # 20-50 s each on 2 CPU
                                                                   # cores: `-m slow`


def _sources(notebook):
    return [(cell.cell_type, cell.source.strip()) for cell in notebook.cells]


def test_every_notebook_has_a_py_twin():
    assert NOTEBOOKS, "no notebooks found"
    assert {p.stem for p in NOTEBOOKS} == {p.stem for p in COLAB.glob("*.py")}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_matches_its_py_twin(path):
    paired = jupytext.read(path.with_suffix(".py"))
    assert _sources(nbformat.read(path, as_version=4)) == _sources(paired), (
        f"{path.name} and its .py differ: run `jupytext --sync colab/{path.stem}.py`")


@pytest.mark.parametrize("path", [
    pytest.param(p, marks=pytest.mark.slow) if p.stem in SLOW_NOTEBOOKS else p
    for p in NOTEBOOKS], ids=lambda p: p.stem)
def test_notebook_runs_at_tiny_setting(path, tmp_path, monkeypatch):
    monkeypatch.setenv("RETNET_TINY", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.chdir(tmp_path)
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError on the first failing cell
