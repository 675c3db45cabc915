"""The report's front page: ``index.html`` (static, no external CSS/JS) and ``index.json`` (same data).

Content comes from each notebook's ``<output_dir>/summary.json`` (see :func:`workbench.notebook.write_summary`)::

    {"headline": {"metric name": value, ...},
     "tables": {"table name": {"columns": [...], "rows": [[...], ...]}}}

Every notebook's headline metrics and tables are shown; the tables of ``13_table12`` get their own
"Table 12 reproduction" section at the top.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from html import escape
from importlib import metadata
from pathlib import Path
from typing import Any

TABLE12_NOTEBOOK = "13_table12"
INDEX_PAGE = "index.html"  # in the run directory, beside index.json

_CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto;
       max-width: 70rem; padding: 0 1rem; color: #1f2328; }
h1 { margin-bottom: .2rem; } h2 { margin-top: 2rem; border-bottom: 1px solid #d0d7de; }
.meta { color: #59636e; } .meta span { margin-right: 1.5rem; }
table { border-collapse: collapse; margin: .6rem 0 1rem; }
th, td { border: 1px solid #d0d7de; padding: .3rem .6rem; text-align: left; vertical-align: top; }
th { background: #f6f8fa; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.status { font-weight: 600; padding: .05rem .45rem; border-radius: .6rem; }
.ok { background: #dafbe1; color: #1a7f37; } .failed { background: #ffebe9; color: #cf222e; }
.skipped { background: #eaeef2; color: #59636e; } .missing { background: #fff8c5; color: #9a6700; }
.reason { color: #59636e; font-size: .9em; } .none { color: #59636e; font-style: italic; }
"""


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on (no torch import: versions come from package metadata)."""

    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "not installed"

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable = os.cpu_count() or 0
    info = {
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "processor": platform.processor() or platform.machine(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": version("torch"),
        "workbench": version("workbench"),
    }
    try:
        git = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parents[2],
            capture_output=True,
            text=True,
            timeout=5,
        )
        if git.returncode == 0:
            info["git_commit"] = git.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return info


# -------------------------------------------------------------------------------------------- render
def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return escape(str(value))
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"
    return escape(str(value))


def _cell(value: Any) -> str:
    cls = ' class="num"' if isinstance(value, int | float) and not isinstance(value, bool) else ""
    return f"<td{cls}>{_fmt(value)}</td>"


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes} min {secs:02d} s" if minutes else f"{seconds:.1f} s"


def _table(name: str, table: Any) -> str:
    if not isinstance(table, dict) or not isinstance(table.get("rows"), list):
        return f'<p class="none">table {escape(name)}: not in the {{"columns", "rows"}} form</p>'
    head = "".join(f"<th>{escape(str(c))}</th>" for c in table.get("columns", []))
    rows = "".join(
        "<tr>" + "".join(_cell(v) for v in (row if isinstance(row, list) else [row])) + "</tr>"
        for row in table["rows"]
    )
    return f"<h4>{escape(name)}</h4>\n<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def _status_table(notebooks: list[dict]) -> str:
    rows = []
    for nb in notebooks:
        link = (
            f'<a href="{escape(nb["html"])}">{escape(nb["name"])}</a>' if nb["html"] else escape(nb["name"])
        )
        if nb.get("notebook"):
            link += f' <a class="reason" href="{escape(nb["notebook"])}">.ipynb</a>'
        reason = f'<div class="reason">{escape(nb["reason"])}</div>' if nb["reason"] else ""
        took = _duration(nb["seconds"]) if nb["status"] in ("ok", "failed") else ""
        rows.append(
            f"<tr><td>{link}</td><td>{escape(nb['title'])}</td>"
            f'<td><span class="status {escape(nb["status"])}">{escape(nb["status"])}</span>{reason}</td>'
            f'<td class="num">{took}</td></tr>'
        )
    head = "<tr><th>notebook</th><th>what</th><th>status</th><th>time</th></tr>"
    return f"<table><thead>{head}</thead><tbody>{''.join(rows)}</tbody></table>"


def _headline_table(notebooks: list[dict]) -> str:
    rows = [
        f"<tr><td>{escape(nb['name'])}</td><td>{escape(str(k))}</td>{_cell(v)}</tr>"
        for nb in notebooks
        for k, v in (nb["summary"].get("headline") or {}).items()
    ]
    if not rows:
        return '<p class="none">No notebook reported headline metrics yet.</p>'
    head = "<tr><th>notebook</th><th>metric</th><th>value</th></tr>"
    return f"<table><thead>{head}</thead><tbody>{''.join(rows)}</tbody></table>"


def render_index(data: dict[str, Any]) -> str:
    """index.html from the dict written to index.json (so one can re-render an old report)."""
    notebooks = data["notebooks"]
    counts = {s: sum(nb["status"] == s for nb in notebooks) for s in ("ok", "failed", "skipped", "missing")}
    m = data["machine"]
    machine = (
        f"{m.get('cpu_count')} CPUs ({m.get('cpus_usable')} usable), {m.get('processor')}, "
        f"{m.get('platform')}; Python {m.get('python')}, torch {m.get('torch')}, "
        f"workbench {m.get('workbench')}" + (f" @ {m['git_commit']}" if m.get("git_commit") else "")
    )
    t12 = next((nb for nb in notebooks if nb["name"] == TABLE12_NOTEBOOK), None)
    t12_tables = (t12 or {}).get("summary", {}).get("tables") or {}
    if t12_tables:
        table12 = "\n".join(_table(k, v) for k, v in t12_tables.items())
    else:
        state = f"{TABLE12_NOTEBOOK} is {t12['status']}" if t12 else f"{TABLE12_NOTEBOOK} is not registered"
        table12 = f'<p class="none">No Table 12 in this run ({escape(state)}).</p>'
    details = []
    for nb in notebooks:
        tables = nb["summary"].get("tables") or {}
        if tables and nb["name"] != TABLE12_NOTEBOOK:
            details.append(
                f"<h3>{escape(nb['name'])}</h3>\n" + "\n".join(_table(k, v) for k, v in tables.items())
            )
    summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>workbench report {escape(data["run"])}</title>
<style>{_CSS}</style>
</head>
<body>
<h1>workbench report: {escape(data["run"])}</h1>
<p class="meta"><span>profile <b>{escape(data["profile"])}</b>{_overrides(data)}</span><span>started {escape(data["started"])}</span>
<span>wall time {_duration(data["seconds"])}</span><span>{escape(summary)}</span></p>
<p class="meta">{escape(machine)}</p>

<h2>Notebooks</h2>
{_status_table(notebooks)}

<h2>Headline metrics</h2>
{_headline_table(notebooks)}

<h2>Table 12 reproduction</h2>
{table12}

<h2>Tables</h2>
{"".join(details) or '<p class="none">No other tables.</p>'}
</body>
</html>
"""


def _update_latest(run_dir: Path) -> Path:
    """Point ``<parent>/latest`` at this run (a relative symlink), or write ``<parent>/LATEST`` if we cannot."""
    link = run_dir.parent / "latest"
    try:
        if link.is_symlink():
            link.unlink()
        if not link.exists():
            link.symlink_to(run_dir.name, target_is_directory=True)
            return link
    except OSError:
        pass
    marker = run_dir.parent / "LATEST"
    marker.write_text(run_dir.name + "\n")
    return marker


def _overrides(data: dict) -> str:
    given = data.get("overrides") or []
    return f" with <code>{escape(' '.join(given))}</code>" if given else ""


def write_index(run_dir: Path, data: dict[str, Any]) -> Path:
    """Write a pipeline run's ``index.json`` and ``index.html`` (from ``PipelineResult.to_dict()``) into
    ``run_dir`` and update ``latest``; return the page."""
    (run_dir / "index.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
    page = run_dir / INDEX_PAGE
    page.write_text(render_index(data), encoding="utf-8")
    _update_latest(run_dir)
    return page
