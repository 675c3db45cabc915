"""Reports: the papermill notebook pipeline, each notebook as self-contained HTML, and an index page.

``workbench pipeline --profile quick|full`` calls :func:`run_pipeline`; the notebooks it runs are the
data in :mod:`workbench.report.registry`. Notebooks are committed without outputs:
``python -m workbench.report.strip`` (:func:`workbench.report.strip.strip_outputs`).
"""

from __future__ import annotations

from workbench.report.pipeline import (
    NotebookFailed,
    NotebookResult,
    PipelineResult,
    default_notebooks_dir,
    run_pipeline,
)
from workbench.report.registry import DEFAULT_REGISTRY, PROFILE_DEFAULTS, PROFILES, NotebookSpec, plan

__all__ = [
    "DEFAULT_REGISTRY",
    "PROFILES",
    "PROFILE_DEFAULTS",
    "NotebookFailed",
    "NotebookResult",
    "NotebookSpec",
    "PipelineResult",
    "default_notebooks_dir",
    "plan",
    "run_pipeline",
]
