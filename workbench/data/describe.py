"""Counts per modality, task, split and class: ``workbench data describe [--json]``."""

from __future__ import annotations

import torch

from workbench.data.benchmark import SPLITS, Benchmark


def describe(bench: Benchmark) -> dict:
    """``{"source", "cache", "tasks": {"image/digit": {"modality", "task", "kind", "splits": {split:
    {"total": n, "per_class": {label: n}}}}}}``. Dense tasks count per digit (their class is the digit)."""
    tasks = {}
    for spec in bench.tasks:
        splits = {}
        for split in SPLITS:
            ds = bench.dataset(spec.modality, spec.name, split)
            if spec.kind == "classification":
                names, idx = spec.labels, ds.labels
            else:
                names, idx = tuple(str(d) for d in range(10)), ds.digits[ds.digits >= 0]
            counts = torch.bincount(idx, minlength=len(names)).tolist() if len(names) else []
            splits[split] = {"total": len(ds), "per_class": dict(zip(names, counts))}
        tasks[spec.key] = {"modality": spec.modality, "task": spec.name, "kind": spec.kind, "splits": splits}
    cache = bench.meta.get("cache") or bench.meta.get("fsdd_cache") or bench.root
    return {"source": bench.source, "cache": str(cache), "tasks": tasks}


def format_table(desc: dict) -> str:
    """A plain-text table of :func:`describe`'s counts, one row per (modality, task, split)."""
    header = ("modality", "task", "split", "total", "per class")
    rows = []
    for info in desc["tasks"].values():
        for split, c in info["splits"].items():
            per = " ".join(f"{k}:{v}" for k, v in c["per_class"].items())
            if info["kind"] != "classification":
                per = "by digit " + per
            rows.append((info["modality"], info["task"], split, str(c["total"]), per))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    fmt = "  ".join(f"{{:{'>' if i == 3 else '<'}{w}}}" for i, w in enumerate(widths)) + "  {}"
    lines = [f"source: {desc['source']}   cache: {desc['cache']}", fmt.format(*header)]
    lines += [fmt.format(*r) for r in rows]
    return "\n".join(lines)
