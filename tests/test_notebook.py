"""notebooks/quickstart.ipynb executes top to bottom (nbclient, a fresh kernel), on the tiny random chat model and
a few steps so that it stays fast; the committed notebook carries no outputs."""

import os
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


def test_committed_notebook_has_no_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)


def test_quickstart_runs_top_to_bottom(tiny_chat_model, tmp_path, monkeypatch):
    monkeypatch.setenv("JAXSWIFT_NB_MODEL", str(tiny_chat_model))
    monkeypatch.setenv("JAXSWIFT_NB_STEPS", "2")
    monkeypatch.setenv("JAXSWIFT_NB_EVAL_LIMIT", "2")
    monkeypatch.setenv("JAXSWIFT_NB_OUT", str(tmp_path / "out"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(NOTEBOOK.parents[1]),
                                                                    os.environ.get("PYTHONPATH")])))
    monkeypatch.delenv("XLA_FLAGS", raising=False)  # the kernel is a user's process: one CPU device
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "skipping the install" in text
    assert "general_mcq/acc" in text and "juniper" in text
    assert "skipped the bfloat16 run" in text or "backend gpu" in text or "backend tpu" in text
    assert (tmp_path / "out" / "compare" / "compare.png").is_file()
    assert (tmp_path / "out" / "sft" / "adapter" / "adapter_config.json").is_file()
