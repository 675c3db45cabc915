"""Helpers the notebooks import: parameter validation, plotting, and the summary the report index reads.

Thin on purpose (STYLE.md rule 9): no training or evaluation logic lives here, only what turns the
workbench's outputs (``history.jsonl``, metrics dicts, attention matrices) into figures and tables.

A notebook's first code cell is tagged ``parameters`` (papermill replaces it when the pipeline runs)::

    profile = "quick"                       # tiny | quick | full (informational inside the notebook)
    seeds = [0]                             # one run per seed; cfg.seed = seeds[0]
    steps = 200                             # -> train.steps
    preset = "small"                        # -> model.preset
    init_checkpoint = ""                    # upstream checkpoint directory ("" = from scratch)
    output_dir = "../reports/scratch/01"    # everything this notebook writes
    overrides = []                          # any other config key: ["train.lr=3e-4", ...]

and the next cell validates them through the same typed config as the CLI::

    from workbench import notebook as wn
    cfg = wn.setup(dict(profile=profile, seeds=seeds, steps=steps, preset=preset,
                        init_checkpoint=init_checkpoint, output_dir=output_dir, overrides=overrides))

Named parameters map to config keys through :data:`CONFIG_PARAMETERS`; dotted config keys
(``"train.lr"``) are accepted too. An unknown name or a value of the wrong type raises ConfigError
naming the closest valid key, exactly like ``workbench train key=value``.
"""

from __future__ import annotations

import difflib
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from workbench.config import Config, load_config, valid_keys
from workbench.errors import CheckpointError, ConfigError
from workbench.startup import skip_iri_format_check
from workbench.stats import format_mean_spread, mean_spread  # noqa: F401 (the notebooks call wn.*)

skip_iri_format_check()  # before plotly's renderers import nbformat: 5 s less per kernel on a slow CPU

# notebook parameter -> config key. Notebooks may also use any dotted config key directly.
CONFIG_PARAMETERS: dict[str, str] = {
    "seed": "seed",
    "steps": "train.steps",
    "stage": "train.stage",
    "batch_size": "train.batch_size",
    "lr": "train.lr",
    "mixed_precision": "train.mixed_precision",
    "balancer": "train.balancer",
    "preset": "model.preset",
    "tokenizer": "model.tokenizer",
    "task_head": "model.task_head",
    "fusion": "model.fusion",
    "data_source": "data.source",
    "modalities": "data.modalities",
    "audio_source": "data.audio_source",
    "fsdd_dir": "data.fsdd_dir",
}
# Parameters that are not config fields: how the pipeline runs the notebook and wires it to others.
NOTEBOOK_PARAMETERS = (
    "profile",
    "seeds",
    "overrides",
    "output_dir",
    "init_checkpoint",
    "checkpoint",
    "ablation_dirs",
    "budget",
    "adapt_datasets",
    "adapt_seeds",
    "adapt_epochs",
)
PLOTLY_RENDERER = "plotly_mimetype+notebook"  # interactive in JupyterLab, plotly.js embedded for HTML


# -------------------------------------------------------------------------------------------- setup
def _closest_parameter(name: str) -> str:
    choices = [*CONFIG_PARAMETERS, *NOTEBOOK_PARAMETERS, *valid_keys()]
    hit = difflib.get_close_matches(name, choices, n=1, cutoff=0.5) or difflib.get_close_matches(
        name, choices, n=1, cutoff=0.0
    )
    return f"; the closest valid key is {hit[0]!r}" if hit else ""


def _check_list(name: str, value: Any, kind: type) -> list:
    if not isinstance(value, list | tuple) or not all(
        isinstance(v, kind) and not isinstance(v, bool) for v in value
    ):
        raise ConfigError(f"notebook parameter {name}={value!r} must be a list of {kind.__name__}")
    return list(value)


def _check_adapt_datasets(value: Any) -> None:
    """``adapt_datasets``: ``[kind, directory]`` pairs, ``kind`` one of ``workbench adapt``'s datasets."""
    from workbench.adapt import DATASETS

    pairs = value if isinstance(value, list | tuple) else [value]
    for pair in pairs:
        if not (isinstance(pair, list | tuple) and len(pair) == 2 and all(isinstance(v, str) for v in pair)):
            raise ConfigError(
                f"notebook parameter adapt_datasets={value!r} must be a list of [kind, directory] pairs"
            )
        if pair[0] not in DATASETS:
            raise ConfigError(
                f"notebook parameter adapt_datasets names {pair[0]!r}; the kinds are {list(DATASETS)}"
            )


def _nest(dotted: str, value: Any, into: dict) -> None:
    *parents, leaf = dotted.split(".")
    node = into
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = value


def setup(parameters: Mapping[str, Any], stage: int | None = None) -> Config:
    """Validate a notebook's parameters into a :class:`Config`, then set up plotting and seeds.

    ``stage``: the training stage the notebook runs, set before the config resolves, so steps and
    learning rate left at 0 and batch scales left unset take that stage's defaults (``STAGE_STEPS``,
    ``STAGE_LR``, ``STAGE_BATCH_SCALE``), as in
    ``workbench train --stage N``.

    Side effects: plotly's default renderer (so figures work in JupyterLab and in the HTML report),
    matplotlib defaults, every RNG seeded with ``cfg.seed``, ``output_dir`` created.
    """
    from workbench.report.registry import PROFILES
    from workbench.seeding import seed_everything

    base: dict[str, Any] = {}
    overrides: list[str] = []
    seeds: list[int] = []
    for name, value in parameters.items():
        if value is None:
            continue  # "use the config's default"
        if name in CONFIG_PARAMETERS:
            _nest(CONFIG_PARAMETERS[name], value, base)
        elif "." in name and name in valid_keys():
            _nest(name, value, base)
        elif name == "profile":
            if value not in PROFILES:
                hint = difflib.get_close_matches(str(value), PROFILES, n=1)
                raise ConfigError(
                    f"notebook parameter profile={value!r} is not one of {list(PROFILES)}"
                    + (f"; did you mean {hint[0]!r}?" if hint else "")
                )
        elif name == "seeds":
            seeds = _check_list(name, value, int)
            if not seeds:
                raise ConfigError("notebook parameter seeds=[] is empty; give at least one seed")
        elif name == "overrides":
            overrides = _check_list(name, value, str)
        elif name == "ablation_dirs":
            _check_list(name, value, str)
        elif name == "adapt_datasets":
            _check_adapt_datasets(value)
        elif name == "adapt_seeds":
            if not _check_list(name, value, int):
                raise ConfigError("notebook parameter adapt_seeds=[] is empty; give at least one seed")
        elif name == "adapt_epochs":
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"notebook parameter adapt_epochs={value!r} must be a whole number >= 1")
        elif name == "budget":
            from workbench.ablation import BUDGETS

            if value not in BUDGETS:
                raise ConfigError(f"notebook parameter budget={value!r} is not one of {list(BUDGETS)}")
        elif name in ("init_checkpoint", "checkpoint"):
            if value and not Path(value).is_dir():
                raise CheckpointError(f"notebook parameter {name}={str(value)!r} is not a directory")
        elif name == "output_dir":
            if not isinstance(value, str | Path) or not str(value):
                raise ConfigError(f"notebook parameter output_dir={value!r} must be a non-empty path")
        else:
            raise ConfigError(f"unknown notebook parameter {name!r}{_closest_parameter(name)}")
    if seeds and "seed" not in base:
        base["seed"] = seeds[0]
    if stage is not None:
        base.setdefault("train", {})["stage"] = stage
    cfg = load_config(base=base, overrides=overrides)

    if parameters.get("output_dir"):
        Path(parameters["output_dir"]).mkdir(parents=True, exist_ok=True)
    _setup_plotting()
    seed_everything(cfg.seed)
    return cfg


def _setup_plotting() -> None:
    import matplotlib
    import plotly.io as pio

    try:  # inside a kernel: inline PNGs, and a PNG formatter for any Figure (image_grid's bare ones)
        from IPython import get_ipython

        shell = get_ipython()
        if shell is not None and hasattr(shell, "kernel"):
            shell.run_line_magic("matplotlib", "inline")
    except ImportError:
        pass

    # Setting the renderer again would embed plotly.js (~5 MB) a second time, so only set it once.
    if pio.renderers.default != PLOTLY_RENDERER:
        pio.renderers.default = PLOTLY_RENDERER
    pio.templates.default = "plotly_white"
    matplotlib.rcParams.update(
        {
            "figure.dpi": 100,
            "figure.figsize": (7.0, 4.0),
            "font.size": 10,
            "axes.spines.top": False,
            "axes.spines.right": False,
            "image.cmap": "gray",
            "image.interpolation": "nearest",  # pixels of 28x28 digits stay pixels
        }
    )


# ------------------------------------------------------------------------------------- training logs
def read_history(path: str | Path) -> list[dict[str, Any]]:
    """Records of a run's ``history.jsonl`` (``RUN/history.jsonl`` or the ``RUN`` directory itself).

    A half-written last line (the run is still going) is skipped; any other bad line is an error.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "history.jsonl"
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except ValueError:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}: line {i + 1} is not JSON") from None
    return records


HistoryLike = str | Path | Sequence[Mapping[str, Any]] | Sequence[str | Path] | Mapping[str, Any]


def _runs(history: HistoryLike) -> dict[str, list[Mapping[str, Any]]]:
    """Normalise the accepted inputs to ``{label: records}``.

    Accepted: a path; a list of records; a list of paths (labelled by their run directory); a dict
    ``{label: path or records}`` (e.g. ``{"seed 0": ..., "seed 1": ...}``).
    """
    if isinstance(history, str | Path):
        return {"": read_history(history)}
    if isinstance(history, Mapping):
        return {str(k): read_history(v) if isinstance(v, str | Path) else list(v) for k, v in history.items()}
    items = list(history)
    if not items or isinstance(items[0], Mapping):
        return {"": items}  # type: ignore[dict-item]
    paths = [Path(p) for p in items]  # type: ignore[arg-type]
    dirs = [p if p.is_dir() else p.parent for p in paths]
    labels = [d.name for d in dirs]
    if len(set(labels)) < len(labels):  # e.g. .../seed0/run and .../seed1/run: use the parent too
        labels = [f"{d.parent.name}/{d.name}" for d in dirs]
    return {label: read_history(p) for label, p in zip(labels, paths)}


def _curves(history: HistoryLike, prefix: str, title: str, ytitle: str, log_y: bool):
    import plotly.graph_objects as go

    fig = go.Figure()
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf"]
    dashes = ["solid", "dash", "dot", "dashdot"]
    runs = _runs(history)
    keys = sorted({k for records in runs.values() for r in records for k in r if k.startswith(prefix)})
    for r_i, (label, records) in enumerate(runs.items()):
        for k_i, key in enumerate(keys):
            points = [(r["step"], r[key]) for r in records if key in r and r[key] is not None]
            if not points:
                continue
            name = key.removeprefix(prefix) + (f" ({label})" if label else "")
            fig.add_trace(
                go.Scatter(
                    x=[p[0] for p in points],
                    y=[p[1] for p in points],
                    mode="lines",
                    name=name,
                    legendgroup=key,
                    line={"color": palette[k_i % len(palette)], "dash": dashes[r_i % len(dashes)]},
                    hovertemplate=f"{name}<br>step %{{x}}<br>%{{y:.4g}}<extra></extra>",
                )
            )
    fig.update_layout(title=title, xaxis_title="step", yaxis_title=ytitle, hovermode="x unified")
    if log_y and all(y > 0 for t in fig.data for y in t.y):
        fig.update_yaxes(type="log")
    return fig


def loss_curves(history: HistoryLike, title: str = "Training losses", log_y: bool = True):
    """One line per ``loss/<modality>/<task>`` key of ``history.jsonl`` (dash style per run/seed)."""
    return _curves(history, "loss/", title, "loss", log_y)


def task_weights(history: HistoryLike, title: str = "Task-balancing weights"):
    """One line per ``weight/<modality>/<task>`` key: how the balancer (DWA, uncertainty) moved."""
    return _curves(history, "weight/", title, "weight", log_y=False)


# ------------------------------------------------------------------------------------------ metrics
def metric_bars(metrics: Mapping[str, Mapping[str, Any]], title: str = "Metrics per task"):
    """One panel per metric name (accuracy, macro_f1, psnr, ...), one bar per task.

    Non-scalar entries (``confusion``) and counts (``n``) are left out; ``<metric>_input`` is drawn
    beside ``<metric>`` as the baseline (e.g. the PSNR of the noisy input next to the denoised one).
    """
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    def scalar(v: Any) -> bool:
        return isinstance(v, int | float) and not isinstance(v, bool)

    names = sorted(
        {
            m
            for row in metrics.values()
            for m, v in row.items()
            if scalar(v) and m != "n" and not m.endswith("_input")
        }
    )
    if not names:
        raise ValueError("metric_bars: no scalar metrics to plot")
    fig = make_subplots(rows=1, cols=len(names), subplot_titles=names)
    for col, name in enumerate(names, 1):
        tasks = [t for t, row in metrics.items() if scalar(row.get(name))]
        series = [(name, "#1f77b4")]
        if any(scalar(metrics[t].get(f"{name}_input")) for t in tasks):
            series.append((f"{name}_input", "#aaaaaa"))
        for key, color in series:
            values = [metrics[t].get(key) for t in tasks]
            fig.add_trace(
                go.Bar(
                    x=tasks,
                    y=values,
                    name=key,
                    marker_color=color,
                    text=[f"{v:.3g}" if scalar(v) else "" for v in values],
                    textposition="auto",
                    showlegend=len(series) > 1,
                    hovertemplate=f"%{{x}}<br>{key} %{{y:.4g}}<extra></extra>",
                ),
                row=1,
                col=col,
            )
    fig.update_layout(title=title, barmode="group", height=380, width=max(420, 300 * len(names)))
    return fig


def confusion_matrix(matrix: Any, labels: Sequence[str] | None = None, title: str = "Confusion matrix"):
    """A (true x predicted) count heatmap; rows are true classes (top to bottom), hover shows both."""
    import plotly.graph_objects as go

    m = _as_2d(matrix)
    labels = [str(x) for x in (labels if labels is not None else range(m.shape[0]))]
    if len(labels) != m.shape[0] or m.shape[0] != m.shape[1]:
        raise ValueError(f"confusion_matrix: matrix {m.shape} does not match {len(labels)} labels")
    fig = go.Figure(
        go.Heatmap(
            z=m,
            x=labels,
            y=labels,
            colorscale="Blues",
            text=m,
            texttemplate="%{text:.0f}" if np.allclose(m, m.round()) else "%{text:.2f}",
            hovertemplate="true %{y}<br>predicted %{x}<br>%{z}<extra></extra>",
        )
    )
    fig.update_layout(title=title, xaxis_title="predicted", yaxis_title="true", width=520, height=480)
    fig.update_yaxes(autorange="reversed", type="category")
    fig.update_xaxes(type="category")
    return fig


def attention_heatmap(
    matrix: Any,
    x_labels: Sequence[str] | None = None,
    y_labels: Sequence[str] | None = None,
    title: str = "Attention",
):
    """An attention map (queries x keys, rows summing to 1) with the weight under the cursor."""
    import plotly.graph_objects as go

    m = _as_2d(matrix)
    x = [str(v) for v in x_labels] if x_labels is not None else list(range(m.shape[1]))
    y = [str(v) for v in y_labels] if y_labels is not None else list(range(m.shape[0]))
    if len(x) != m.shape[1] or len(y) != m.shape[0]:
        raise ValueError(f"attention_heatmap: matrix {m.shape} vs {len(y)} query and {len(x)} key labels")
    fig = go.Figure(
        go.Heatmap(
            z=m,
            x=x,
            y=y,
            colorscale="Viridis",
            hovertemplate="query %{y}<br>key %{x}<br>weight %{z:.3f}<extra></extra>",
        )
    )
    fig.update_layout(title=title, xaxis_title="key", yaxis_title="query")
    fig.update_yaxes(autorange="reversed")
    return fig


def _as_2d(matrix: Any) -> np.ndarray:
    m = _numpy(matrix).astype(float)
    if m.ndim != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {m.shape}")
    return m


def _numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch here
        x = x.detach().float().cpu().numpy()
    return np.asarray(x)


# ------------------------------------------------------------------------------------------- images
def image_grid(
    images: Any, titles: Sequence[str] | None = None, ncols: int = 8, size: float = 1.4, cmap: str = "gray"
):
    """A static matplotlib gallery of ``images``: (N, H, W), (N, H, W, 3) or channel-first (N, C, H, W).

    Built as a bare ``Figure`` (not through pyplot) so a cell that returns it shows it exactly once.
    """
    from matplotlib.figure import Figure

    imgs = _numpy(images)
    if imgs.ndim == 4 and imgs.shape[1] in (1, 3) and imgs.shape[-1] not in (1, 3):
        imgs = imgs.transpose(0, 2, 3, 1)  # (N, C, H, W) -> (N, H, W, C)
    if imgs.ndim == 4 and imgs.shape[-1] == 1:
        imgs = imgs[..., 0]
    if imgs.ndim not in (3, 4) or len(imgs) == 0:
        raise ValueError(f"image_grid: expected (N, H, W[, C]) images, got shape {imgs.shape}")
    n = len(imgs)
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(size * ncols, size * nrows + (0.25 * nrows if titles else 0)), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if i < n:
            ax.imshow(imgs[i], cmap=cmap if imgs.ndim == 3 else None)
            if titles is not None and i < len(titles):
                ax.set_title(str(titles[i]), fontsize=8)
    return fig


# ----------------------------------------------------------------------------------- summary & seeds
def _jsonable(value: Any) -> Any:
    if hasattr(value, "item") and callable(value.item) and np.ndim(_numpy(value)) == 0:
        value = value.item()  # numpy / torch scalars
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN; the index shows "None"
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"summary values must be numbers or strings, got {type(value).__name__}: {value!r}")


def _table(name: str, table: Any) -> dict[str, list]:
    if (
        isinstance(table, Sequence)
        and not isinstance(table, str)
        and all(isinstance(r, Mapping) for r in table)
    ):
        columns = list(
            dict.fromkeys(k for r in table for k in r)
        )  # list of dicts -> columns in first-seen order
        table = {"columns": columns, "rows": [[r.get(c) for c in columns] for r in table]}
    if not isinstance(table, Mapping) or "rows" not in table:
        raise ValueError(f"table {name!r} must be {{'columns': [...], 'rows': [[...]]}} or a list of dicts")
    columns = [str(c) for c in table.get("columns", [])]
    rows = [[_jsonable(v) for v in row] for row in table["rows"]]
    for row in rows:
        if columns and len(row) != len(columns):
            raise ValueError(f"table {name!r}: row {row} has {len(row)} cells for {len(columns)} columns")
    return {"columns": columns, "rows": rows}


def write_summary(
    output_dir: str | Path,
    headline: Mapping[str, Any] | None = None,
    tables: Mapping[str, Any] | None = None,
) -> Path:
    """Add headline metrics and tables to ``<output_dir>/summary.json``, which the report index renders.

    Repeated calls merge (a later value for the same metric or table name wins), so a notebook can
    report as it goes. Tables are ``{"columns": [...], "rows": [[...], ...]}`` or a list of dicts.
    """
    path = Path(output_dir) / "summary.json"
    summary: dict[str, Any] = {"headline": {}, "tables": {}}
    if path.is_file():
        summary.update(json.loads(path.read_text()))
    summary["headline"].update({str(k): _jsonable(v) for k, v in (headline or {}).items()})
    summary["tables"].update({str(k): _table(str(k), v) for k, v in (tables or {}).items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2) + "\n")
    return path


# --------------------------------------------------------------------------------------- training
def stage_config(
    cfg: Config, stage: int, init_checkpoint: str | Path | None = None, overrides: Sequence[str] = ()
) -> Config:
    """``cfg`` for training ``stage``; with an upstream checkpoint, its network config (so the weights fit).

    As with ``workbench train --init`` the model section comes from the checkpoint and the training
    settings do not (the CLI also takes data and seed from it; here the notebook's parameters set them),
    and the notebook's ``overrides`` then apply on top, as the CLI's do: a training-time model setting
    such as ``model.spec_warp=0.2`` reaches the run instead of being replaced by the checkpoint's.
    """
    from workbench.config import load_config, read_saved_config, to_dict

    data = to_dict(cfg)
    if init_checkpoint:
        saved = Path(init_checkpoint) / "config.json"
        if not saved.is_file():  # the same refusal as `workbench train --init`
            raise CheckpointError(f"init_checkpoint={str(init_checkpoint)!r} is not a checkpoint directory "
                                  "(no config.json); pass RUN/checkpoint of the upstream stage")  # fmt: skip
        data["model"] = read_saved_config(saved)["model"]
    data["train"]["stage"] = stage
    return load_config(base=data, overrides=overrides)


def fresh_dir(path: str | Path) -> Path:
    """An empty directory at ``path`` (a notebook re-run in JupyterLab starts its run from scratch)."""
    import shutil

    path = Path(path)
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path
