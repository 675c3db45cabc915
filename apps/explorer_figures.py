"""Pictures and tables of the explorer's endpoint answers (plotly figures, markdown): no gradio here.

Every function takes the JSON an endpoint returns (plus, for cross-attention, the pictures kept in
the session state) and draws it, so the app's chained UI events stay one-liners and the figures can
be rebuilt from a saved answer (``json.load`` -> :func:`attention_figure`).
"""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go


def heatmap(
    matrix, x: list[str], y: list[str], title: str, zmin=None, zmax=None, scale="Viridis"
) -> go.Figure:
    """An interactive heatmap; hover names the query and key tokens and the weight."""
    z = np.asarray(matrix, dtype=float)
    text = [[f"{y[i] if i < len(y) else i} ← {x[j] if j < len(x) else j}" for j in range(z.shape[1])]
            for i in range(z.shape[0])]  # fmt: skip
    fig = go.Figure(go.Heatmap(z=z, text=text, colorscale=scale, zmin=zmin, zmax=zmax,
                               hovertemplate="%{text}<br>weight %{z:.4f}<extra></extra>"))  # fmt: skip
    fig.update_layout(title=title, margin=dict(l=40, r=10, t=40, b=40), height=420,
                      xaxis_title="keys (attended to)", yaxis_title="queries")  # fmt: skip
    fig.update_yaxes(autorange="reversed")
    return fig


def attention_figure(info: dict | None) -> go.Figure | None:
    if not info:
        return None
    title = f"{info['name']} head {info['head']} on the {info['modality']} ({info['shape'][0]}x{info['shape'][1]})"
    return heatmap(info["matrix"], info["keys"], info["queries"], title, 0, None)


def cross_figures(info: dict | None, state: dict | None) -> tuple:
    if not info:
        return None, None, None, None
    a, b, tag = info["a"], info["b"], f"{info['module']}.{info['layer']} head {info['head']}"
    fab = heatmap(
        info["a<-b"]["matrix"], info["labels_b"], info["labels_a"], f"{a} tokens attend to {b} ({tag})"
    )
    fba = heatmap(
        info["b<-a"]["matrix"], info["labels_a"], info["labels_b"], f"{b} tokens attend to {a} ({tag})"
    )
    return fab, fba, (state or {}).get("a"), (state or {}).get("b")


def importance_figures(info: dict | None) -> tuple[go.Figure | None, go.Figure | None]:
    """Two layers x heads heatmaps: the metric lost and the loss gained when each head is silenced."""
    if not info:
        return None, None
    cols = [f"head {h}" for h in range(info["heads"])]
    figs = []
    for field, what in (("drop", f"{info['metric']} lost (baseline {info['baseline']:.3f})"),
                        ("loss_increase", f"loss gained (baseline {info['baseline_loss']:.3f})")):  # fmt: skip
        z = np.array([[np.nan if v is None else v for v in row] for row in info[field]], dtype=float)
        bound = float(np.nanmax(np.abs(z))) if np.isfinite(z).any() else 0.0
        fig = go.Figure(go.Heatmap(z=z, x=cols, y=info["rows"], colorscale="RdBu_r", zmid=0,
                                   zmin=-bound if bound else None, zmax=bound if bound else None,
                                   hovertemplate="%{y} %{x}<br>%{z:.4f}<extra></extra>"))  # fmt: skip
        fig.update_layout(title=f"{info['task']}: {what}, n={info['n']}", height=140 + 45 * len(info["rows"]),
                          margin=dict(l=40, r=10, t=40, b=30), yaxis_autorange="reversed")  # fmt: skip
        figs.append(fig)
    return figs[0], figs[1]


def change_table(info: dict | None) -> str:
    if not info:
        return ""
    rows = ["| task | before | after | change |", "|---|---|---|---|"]
    for task, c in info["change"].items():
        if "label_changed" in c:
            rows.append(f"| {task} | {c['label_before']} ({c['p_label_before']:.3f}) | {c['label_after']} "
                        f"(p of old label {c['p_label_after']:.3f}) | TV distance {c['total_variation']:.3f}"
                        f"{' **label changed**' if c['label_changed'] else ''} |")  # fmt: skip
        else:
            rows.append(
                f"| {task} | | | mean abs change {c['mean_abs_change']:.4f} (max {c['max_abs_change']:.3f}) |"
            )
    silenced = ", ".join(".".join(map(str, t)) for t in info["silenced"]) or "nothing"
    return f"Silenced: {silenced}\n\n" + "\n".join(rows)


def latency_text(preds: list[dict] | None) -> str:
    if not preds:
        return ""
    return "Model latency: " + ", ".join(f"{p['modality']} {p['latency_ms']:.1f} ms" for p in preds)
