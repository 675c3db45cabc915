"""Executed notebook -> one self-contained HTML file (nbconvert's ``lab`` template, trimmed).

What makes it self-contained:

- plotly: notebooks use the ``plotly_mimetype+notebook`` renderer (``workbench.notebook.setup``), which
  puts plotly.js itself into the first figure's ``text/html`` output; nbconvert keeps that output
  (it has no renderer for plotly's own mimetype), so figures draw offline.
- matplotlib figures are already base64 PNGs; ``embed_images`` also inlines images that markdown
  cells reference by path.
- The lab template fetches require.js, MathJax and Mermaid from a CDN. require.js is only needed by
  the ipywidgets HTML manager, so it is kept only for notebooks that stored widget state; MathJax only
  for notebooks whose markdown holds ``$`` math (offline, the TeX then shows as written); Mermaid never.
  plotly's per-figure MathJax script is removed (our figure labels hold no TeX).
"""

from __future__ import annotations

import re
from pathlib import Path

# plotly's notebook renderer adds a MathJax <script src=CDN> to every figure (for TeX in labels, which
# our figures do not use); a blocked CDN would stall the page, so it is dropped.
_FIGURE_MATHJAX = re.compile(r'<script src="https://cdn[^"]*/mathjax/[^"]*"></script>')

_TEMPLATE = """\
{%- extends 'lab/index.html.j2' -%}
{%- block html_head_js_requirejs -%}
{%- if "widgets" in nb.metadata -%}{{ super() }}{%- endif -%}
{%- endblock html_head_js_requirejs -%}
{%- block html_head_js_mathjax -%}
{%- if resources.workbench_has_math -%}{{ super() }}{%- endif -%}
{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}
{%- endblock html_head_js_mermaidjs -%}
"""


def _has_math(nb) -> bool:
    return any(c.cell_type == "markdown" and "$" in c.source for c in nb.cells)


def _drop_figure_mathjax(nb) -> None:
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if "text/html" in data and "plotly" in data["text/html"]:
                data["text/html"] = _FIGURE_MATHJAX.sub("", data["text/html"])


def notebook_to_html(notebook: str | Path, html: str | Path) -> Path:
    """Convert ``notebook`` (executed) to ``html``; images and plotly.js embedded, code cells shown."""
    import nbformat
    from jinja2 import DictLoader
    from nbconvert import HTMLExporter

    notebook, html = Path(notebook), Path(html)
    nb = nbformat.read(notebook, as_version=4)
    _drop_figure_mathjax(nb)
    exporter = HTMLExporter(
        template_name="lab",
        extra_loaders=[DictLoader({"workbench_report.html.j2": _TEMPLATE})],
        template_file="workbench_report.html.j2",
        embed_images=True,
    )
    resources = {
        "metadata": {"name": notebook.stem, "path": str(notebook.parent)},
        "workbench_has_math": _has_math(nb),
    }
    body, _ = exporter.from_notebook_node(nb, resources=resources)
    html.write_text(body, encoding="utf-8")
    return html
