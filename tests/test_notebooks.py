"""Every notebook in colab/ runs top to bottom (small, on CPU)."""

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "colab").glob("*.ipynb"))
# What each notebook prints once its last cell has run.
DONE = {"quickstart.ipynb": "max |parallel - cached|", "parallelism.ipynb": "headline:",
        "translation.ipynb": "cross-attention weights", "sharding.ipynb": "collective bytes per step",
        "finetune.ipynb": "held-out loss (transformers)"}


def test_there_are_notebooks():
    assert NOTEBOOKS, "colab/ holds no notebooks"


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
    printed = "".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code"
                      for out in cell.get("outputs", []) if out.get("output_type") == "stream")
    assert DONE[path.name] in printed, printed[-2000:]
