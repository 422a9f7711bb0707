"""docs/tutorial.ipynb runs top to bottom (nbclient, a fresh kernel of this interpreter), shows its
pictures inline, and is stored without outputs."""

import json
import time
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "docs" / "tutorial.ipynb"
nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")


def test_the_notebook_is_stored_without_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, cell.source[:60]
    assert any("tracekit.patch(" in cell.source for cell in notebook.cells)  # patching is part of the tour


def test_the_tutorial_runs_top_to_bottom(tmp_path, monkeypatch):
    monkeypatch.setenv("TRACEKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")  # as in Jupyter
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    started = time.perf_counter()
    client.execute()  # ipykernel's "python3" runs this interpreter (jupyter_client puts sys.executable first)
    seconds = time.perf_counter() - started
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "\n".join(o.get("text", "") + json.dumps(o.get("data", {}).get("text/plain", "")) for o in outputs)
    html = [o["data"]["text/html"] for o in outputs if "text/html" in o.get("data", {})]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert any("data:image/png;base64," in page for page in html)  # the trace result shows itself
    assert len(images) >= 3  # the side-by-side heatmaps, the zeroing plot, the analysis figure
    assert "undo restored every weight bit for bit: True" in text
    assert "points traced" in text and "r2_layer_x_tracing" in text
    difference = text.split("largest difference from trace() above: ")[1].split()[0].strip('\\n"')
    assert float(difference) <= 1e-6  # causal tracing as a patch configuration
    print(f"tutorial ran in {seconds:.1f} s")
