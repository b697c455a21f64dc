"""notebooks/findings.ipynb executes top to bottom on a complete run (nbclient, the venv's
``python3`` kernel), reading the run from ``APMAE_RUN``."""

from __future__ import annotations

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "findings.ipynb"


def _text(nb) -> str:
    out = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            out.append(o.get("text", "") or str(o.get("data", {}).get("text/plain", "")))
    return "\n".join(out)


def test_findings_notebook_runs_on_a_finished_run(e2e_run, monkeypatch):
    import pandas as pd

    monkeypatch.setenv("APMAE_RUN", str(e2e_run))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert not any(c.get("outputs") for c in nb.cells if c.cell_type == "code"), \
        "commit the notebook without outputs"
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    text = _text(nb)
    assert f"run: {e2e_run.resolve()}" in text and "frames load with:" in text
    # Its findings are the run's own numbers.
    heads = pd.read_parquet(e2e_run / "cluster" / "heads.parquet")
    ok = heads[heads["status"] == "ok"]
    assert f"{len(ok)} of {len(heads)} heads clustered; {ok['n_clusters'].sum()} clusters" in text
    # It reads the explorer's JSON (report/explorer.json), the same heads.
    assert f"explorer: {len(ok)} heads" in text
    res = pd.read_parquet(e2e_run / "intervene" / "results.parquet")
    assert "conditions differ from zeroing random heads" in text and f"of {len(res)}" in text
    figures = sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))
    assert figures >= 6


def test_notebook_says_which_run_is_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("APMAE_RUN", str(tmp_path / "absent"))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nb.cells = nb.cells[:2]
    with pytest.raises(nbclient.exceptions.CellExecutionError, match="is not a finished run"):
        nbclient.NotebookClient(nb, timeout=120, kernel_name="python3").execute()
