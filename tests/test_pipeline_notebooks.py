"""Every real notebook in notebooks/ runs green through the pipeline with the `tiny` profile.

This is issue #6's "make test executes every notebook through papermill with tiny parameters". Its
runtime grows with the notebooks (a kernel start plus the notebook's own work each); registered
notebooks not written yet are reported as missing and do not fail the test.
"""

from __future__ import annotations

import pytest

from workbench.report import DEFAULT_REGISTRY, default_notebooks_dir, run_pipeline


@pytest.mark.slow
def test_every_notebook_runs_with_tiny_parameters(tmp_path):
    present = [s.name for s in DEFAULT_REGISTRY if (default_notebooks_dir() / s.path).is_file()]
    if not present:
        pytest.skip("no pipeline notebook is written yet")
    result = run_pipeline(
        "tiny", tmp_path / "report", jobs=2, log=None
    )  # a failing cell raises NotebookFailed
    status = {r.name: r for r in result.notebooks}
    for name in present:
        res = status[name]
        blocked_by_missing = res.status == "skipped" and "(missing)" in res.reason
        assert res.status == "ok" or blocked_by_missing, f"{name}: {res.status} {res.reason}"
        if res.status == "ok":
            assert (result.run_dir / res.html).is_file()
