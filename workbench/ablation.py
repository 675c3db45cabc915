"""The paper's Table 12 ablation (METHOD.md section 3) as runnable rows on the embedded data.

A row fixes three choices: which modalities pre-training sees (``single``: only the column's own
modality; ``multiple``: all of them), the tokenizer (``specific`` per modality, or one ``unified``
Meta-Transformer projection), and the task head (``specific`` per task, one ``unified`` Uni-Perceiver
head, or the ``autoencoder`` head: the stage-1 setting without multimodal stages).

Protocol (same budget for every row, documented so the numbers can be trusted):

* ``single`` rows train, for each column modality m separately, stage 1 on m alone and then stage 3
  on m's tasks alone (stage 3 pairs m with itself, since no other modality is present);
* ``multiple`` rows train stages 1 -> 2 -> 3 once on every modality of the benchmark;
* every task gets the same number of supervised updates (``budget="task"``, the default): a stage-3
  update trains two (modality, task) streams, so a ``single`` row's ``steps`` updates give each of its
  modality's 2 tasks ``steps`` stream-batches, and a ``multiple`` row, whose updates are shared by all
  8 tasks, trains ``steps * 8 / 2`` updates to give each task as many. The paper fine-tunes every row
  on the column's dataset alike; with equal updates *per run* (``budget="run"``, our first protocol)
  a ``multiple`` row gave each task a quarter of a ``single`` row's training and lost for that reason
  alone. Pre-training keeps ``pretrain_steps`` per stage in both kinds of rows;
* the score of a column is the single-stream test top-1 accuracy of that modality's ``digit`` task
  (the classification task shared by all columns: iN2018 -> image, K400 -> video, ESC50 -> audio).

Each finished run writes ``<row dir>/seed<k>/result.json``; :func:`collect` gathers them from any
number of directories, and :func:`table` reduces them to mean and spread over seeds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from workbench.config import Config, from_dict, to_dict
from workbench.errors import ConfigError
from workbench.seeding import runs_per_seed
from workbench.stats import format_mean_spread, mean_spread

COLUMNS = {"image": "iN2018", "video": "K400", "audio": "ESC50"}  # our modality -> the paper's dataset


@dataclass(frozen=True)
class Row:
    id: str
    pretraining: str  # single | multiple
    tokenizer: str  # specific | unified
    head: str  # autoencoder | unified | specific
    paper: dict[str, float] = field(default_factory=dict)  # column modality -> the paper's top-1 (%)

    @property
    def label(self) -> str:
        return f"{self.pretraining} / {self.tokenizer} tokenizer / {self.head} head"


TABLE12 = (
    Row("r1", "single", "specific", "autoencoder", {"image": 74.2, "video": 78.6, "audio": 82.4}),
    Row("r2", "single", "unified", "autoencoder", {"image": 74.1, "video": 78.3, "audio": 82.1}),
    Row("r3", "multiple", "unified", "unified", {"image": 80.1, "video": 81.8, "audio": 82.7}),
    Row("r4", "multiple", "specific", "unified", {"image": 85.4, "video": 84.8, "audio": 86.8}),
    Row("r5", "multiple", "unified", "specific", {"image": 86.1, "video": 85.2, "audio": 87.0}),
    Row("r6", "multiple", "specific", "specific", {"image": 90.3, "video": 88.4, "audio": 92.4}),
)
ROWS = {r.id: r for r in TABLE12}


def _variant(cfg: Config, row: Row, stage: int, modalities: list[str] | None = None) -> Config:
    data = to_dict(cfg)
    data["model"]["tokenizer"] = row.tokenizer
    data["model"]["task_head"] = row.head
    data["train"]["stage"] = stage
    if modalities is not None:
        data["data"]["modalities"] = modalities
    return from_dict(data)


BUDGETS = ("task", "run")


def stage3_steps(row: Row, steps: int, modalities: list[str], budget: str = "task") -> dict[str, int]:
    """Stage-3 updates of each run of ``row``: ``{column modality | "all": updates}``.

    ``steps`` is what a ``single`` row trains per column. ``budget="task"`` gives every task as many
    stream-batches as a ``single`` row gives each of its tasks; ``"run"`` gives every run ``steps``.
    """
    from workbench.modalities import default_tasks

    if budget not in BUDGETS:
        raise ConfigError(f"budget={budget!r} is not one of {list(BUDGETS)}")
    tasks = [t for t in default_tasks() if t.modality in modalities]
    columns = [m for m in COLUMNS if m in modalities]
    if row.pretraining == "single":
        return {m: steps for m in columns}
    if budget == "run":
        return {"all": steps}
    per_column = max(sum(t.modality == m for t in tasks) for m in columns)  # 2 on the embedded data
    return {"all": -(-steps * len(tasks) // per_column)}  # ceil(steps * tasks / per_column)


def run_row(
    cfg: Config, row: Row, out: str | Path, *, pretrain_steps: int | None = None, budget: str = "task"
) -> dict[str, float]:
    """Train one row for ``cfg.seed`` into ``out``; return ``{column modality: test accuracy}``.

    ``cfg.train.steps`` is a ``single`` row's stage-3 budget per column, scaled for ``multiple`` rows
    by :func:`stage3_steps`; each pre-training stage gets ``pretrain_steps`` (default: the same).
    """
    from workbench.train import train

    out = Path(out)
    pre = pretrain_steps or cfg.train.steps
    columns = [m for m in COLUMNS if m in cfg.data.modalities]
    supervised = stage3_steps(row, cfg.train.steps, list(cfg.data.modalities), budget)
    scores: dict[str, float] = {}

    def stage(c: Config, n: int, steps: int, run: Path, init=None):
        c = from_dict(to_dict(c) | {"train": to_dict(c)["train"] | {"steps": steps, "stage": n}})
        return train(c, run, init=init)

    if row.pretraining == "single":
        for m in columns:
            r1 = stage(_variant(cfg, row, 1, [m]), 1, pre, out / m / "stage1")
            r3 = stage(_variant(cfg, row, 3, [m]), 3, supervised[m], out / m / "stage3", init=r1.checkpoint)
            scores[m] = r3.metrics["test"][f"{m}/digit"]["accuracy"]
    else:
        r1 = stage(_variant(cfg, row, 1), 1, pre, out / "stage1")
        r2 = stage(_variant(cfg, row, 2), 2, pre, out / "stage2", init=r1.checkpoint)
        r3 = stage(_variant(cfg, row, 3), 3, supervised["all"], out / "stage3", init=r2.checkpoint)
        scores = {m: r3.metrics["test"][f"{m}/digit"]["accuracy"] for m in columns}
    result = {
        "row": row.id,
        "seed": cfg.seed,
        "accuracy": scores,
        "config": to_dict(cfg),
        "pretrain_steps": pre,
        "budget": budget,
        "stage3_steps": supervised,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    return scores


def run_rows(
    cfg: Config, rows: list[str], seeds: list[int], out: str | Path, **kw
) -> dict[str, dict[int, dict]]:
    """Every (row, seed) into ``out/<row>/seed<k>/``, skipping runs whose result already exists."""
    return runs_per_seed(
        cfg, rows, seeds, out, lambda c, row_id, run: run_row(c, ROWS[row_id], run, **kw),
        cached=lambda record: record["accuracy"],
    )  # fmt: skip


def collect(directories: list[str | Path]) -> dict[str, dict[int, dict[str, float]]]:
    """``{row: {seed: {modality: accuracy}}}`` from every ``result.json`` under ``directories``."""
    found: dict[str, dict[int, dict[str, float]]] = {}
    for d in directories:
        for path in sorted(Path(d).rglob("result.json")):
            r = json.loads(path.read_text())
            if r.get("row") in ROWS:
                found.setdefault(r["row"], {})[int(r["seed"])] = r["accuracy"]
    return found


def table(results: dict[str, dict[int, dict[str, float]]]) -> dict:
    """Table 12 with our numbers: ``{"columns": [...], "rows": [[...], ...]}`` (accuracy in %)."""
    columns = ["pre-training", "tokenizer", "task head"]
    for m, name in COLUMNS.items():
        columns += [f"{name} paper", f"{m} ours (mean ± sd)"]
    columns.append("seeds")
    rows = []
    for row in TABLE12:
        runs = results.get(row.id, {})
        line: list = [row.pretraining, row.tokenizer, row.head]
        for m in COLUMNS:
            values = [100 * r[m] for r in runs.values() if m in r]
            line.append(row.paper.get(m))
            line.append(format_mean_spread(values) if values else "not run")
        line.append(len(runs))
        rows.append(line)
    return {"columns": columns, "rows": rows}


def ordering(results: dict[str, dict[int, dict[str, float]]]) -> dict[str, dict[str, list[str]]]:
    """Per column, the row ids from best to worst: ours (by mean) and the paper's."""
    out = {}
    for m in COLUMNS:
        ours = {rid: mean_spread([r[m] for r in runs.values() if m in r])[0]
                for rid, runs in results.items() if any(m in r for r in runs.values())}  # fmt: skip
        out[m] = {
            "ours": sorted(ours, key=ours.get, reverse=True),
            "paper": sorted(
                (r.id for r in TABLE12 if r.id in ours), key=lambda i: ROWS[i].paper[m], reverse=True
            ),
        }
    return out


def compare(results: dict[str, dict[int, dict[str, float]]], pairs: list[tuple[str, str, str]]) -> dict:
    """Differences between rows, ours beside the paper's: ``pairs`` = [(what, row_a, row_b), ...],
    difference = a - b in accuracy points, per column. Pairs with a row not run yet are left out."""
    rows = []
    for what, a, b in pairs:
        if a not in results or b not in results:
            continue
        for m, name in COLUMNS.items():
            va = [100 * r[m] for r in results[a].values() if m in r]
            vb = [100 * r[m] for r in results[b].values() if m in r]
            if not va or not vb:
                continue
            ours = mean_spread(va)[0] - mean_spread(vb)[0]
            paper = ROWS[a].paper[m] - ROWS[b].paper[m]
            agrees = "yes" if (ours > 0) == (paper > 0) else "no"
            rows.append([what, f"{a} vs {b}", name, round(ours, 2), round(paper, 2), agrees])
    return {
        "columns": ["comparison", "rows", "column", "ours (points)", "paper (points)", "same sign"],
        "rows": rows,
    }
