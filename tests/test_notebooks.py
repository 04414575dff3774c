"""Every notebook in colab/ runs top to bottom (small, on CPU), and its install cell behaves without a source."""

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "colab").glob("*.ipynb"))
# What each notebook prints once its last cell has run.
DONE = {"quickstart.ipynb": "max |parallel - cached|", "parallelism.ipynb": "headline:",
        "translation.ipynb": "cross-attention weights", "sharding.ipynb": "collective bytes per step",
        "finetune.ipynb": "held-out loss (transformers)"}
# The accelerator notebooks report the runtime in their second cell (finetune is a CPU walkthrough with torch).
REPORTS_RUNTIME = {"quickstart.ipynb", "parallelism.ipynb", "translation.ipynb", "sharding.ipynb"}
NO_SOURCE = "REPO_URL is empty: set it in the form above"


def _code_cells(path: Path) -> list[str]:
    nbformat = pytest.importorskip("nbformat")
    return [c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]


def _stream_text(cell) -> str:
    return "".join(out.get("text", "") for out in cell.get("outputs", []) if out.get("output_type") == "stream")


def test_there_are_notebooks():
    assert NOTEBOOKS, "colab/ holds no notebooks"


def test_every_notebook_opens_with_the_same_install_cell_and_one_form_field():
    first = {path.name: _code_cells(path)[0] for path in NOTEBOOKS}
    assert len(set(first.values())) == 1, "the notebooks' install cells differ"
    cell = next(iter(first.values()))
    assert cell.count("# @param") == 1 and 'REPO_URL = ""  # @param {type:"string"}' in cell
    assert "SystemExit" not in cell and "-U jax" not in cell


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, monkeypatch):
    """Executed cell by cell in a real Jupyter kernel (nbclient), as Colab runs it, in the smoke setting."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    for key, value in {"TFORMER_NOTEBOOK_SMOKE": "1", "JAX_PLATFORMS": "cpu",
                       "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "PYTHONPATH": str(REPO)}.items():
        monkeypatch.setenv(key, value)  # the kernel inherits this process's environment
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=600,
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert NO_SOURCE in _stream_text(code[0]) and "Carrying on with the tformer" in _stream_text(code[0])
    if path.name in REPORTS_RUNTIME:
        assert "backend cpu: 2 devices. NO accelerator in use" in _stream_text(code[1])
    printed = "".join(_stream_text(cell) for cell in code)
    assert DONE[path.name] in printed, printed[-2000:]


def _run_install_cell(source: str, cwd: Path, monkeypatch) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",  # as on a fresh runtime: nothing of tformer's installed
                        lambda name, *a: None if name in ("tformer", "experiments") else real_find_spec(name, *a))
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.chdir(cwd)
    exec(compile(source, "install-cell", "exec"), {"__name__": "__main__"})


def test_install_cell_without_a_source_says_what_to_set_and_carries_on(tmp_path, monkeypatch, capsys):
    """Empty REPO_URL: a message naming the field and both kinds of source, never SystemExit; from a checkout's
    colab/ folder it carries on with that checkout."""
    cell = _code_cells(NOTEBOOKS[0])[0]
    _run_install_cell(cell, tmp_path, monkeypatch)
    printed = capsys.readouterr().out
    assert NO_SOURCE in printed and "git URL" in printed and "Drive folder" in printed
    assert "No tformer is importable here, so the cells below cannot run yet." in printed

    for folder in ("tformer", "experiments", "colab"):
        (tmp_path / folder).mkdir()
    _run_install_cell(cell, tmp_path / "colab", monkeypatch)
    assert "Carrying on with the checkout this notebook sits in." in capsys.readouterr().out
    assert sys.path[0] == str(tmp_path)


def test_install_cell_rejects_a_missing_folder(tmp_path, monkeypatch):
    cell = _code_cells(NOTEBOOKS[0])[0].replace('REPO_URL = ""', 'REPO_URL = "/no/such/tformer"', 1)
    with pytest.raises(FileNotFoundError, match="is not a folder: give a checkout's folder or a git URL"):
        _run_install_cell(cell, tmp_path, monkeypatch)


def test_install_adds_only_missing_requirements_and_never_replaces_jax():
    spec = importlib.util.spec_from_file_location("colab_install", REPO / "colab" / "install.py")
    install = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(install)
    requires = ["jax>=0.10", "flax>=0.12", "optax>=0.2.5", "numpy>=1.26", 'absl-py>=2.1; extra == "experiments"',
                'ml_collections>=1.0; extra == "experiments"', 'pytest>=8; extra == "test"']
    runtime = {"jax": "0.7.2", "jaxlib": "0.7.2", "flax": "0.10.4", "optax": "0.2.6", "numpy": "2.0.2",
               "absl-py": "2.3.1"}
    to_install, warnings = install.plan(requires, runtime)
    assert to_install == ["flax>=0.12", "ml_collections>=1.0"]  # too old, missing; pytest is not a notebook's
    assert len(warnings) == 1 and warnings[0].startswith("jax 0.7.2 is below tformer's jax>=0.10: kept")
