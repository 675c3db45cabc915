"""Process start-up costs the workbench avoids, applied by the modules whose processes pay them.

jsonschema imports the optional ``rfc3987_syntax`` whenever it is installed (JupyterLab's
jupyter-events requires ``jsonschema[format-nongpl]``), only to check the ``iri`` string format, and
that import builds a Lark grammar: ``import jsonschema`` took 5.5 s on a 2-core AVX2 machine whose fp32
matmul roof measured 39 GFLOP/s (RESULTS.md, 2026-12-04). nbformat imports jsonschema, and plotly's
renderers import nbformat, so every notebook kernel paid it once more, as did the pipeline process
around them. Nothing the workbench validates has an ``iri`` field (nbformat's schemas do not), so
:func:`skip_iri_format_check` makes that one optional import fail fast, as if the package were absent.
"""

from __future__ import annotations

import sys


def skip_iri_format_check() -> None:
    """Before jsonschema is first imported in this process: leave out its ``iri`` format checker (and
    the 5 s grammar build behind it). Afterwards this changes nothing, and a process that already
    imported ``rfc3987_syntax`` keeps it."""
    if "jsonschema" not in sys.modules:
        sys.modules.setdefault("rfc3987_syntax", None)  # None: `import rfc3987_syntax` raises ImportError
