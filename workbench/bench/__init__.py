"""``workbench bench``: how close the workbench runs to this machine's limit and to the best peers.

One run measures, side by side under the same machine load (issue #9)::

    1 roof        fp32 / bf16 matmul GFLOP/s on large GEMMs                         (suites.roof)
    2 training    samples/s of each stage's step, counted FLOPs, MFU vs the roof     (suites.training)
    3 peers       our f vs transformers' ViT (sdpa) and nn.TransformerEncoder        (suites.peers)
    4 precision   bf16 autocast vs fp32: speed, and accuracy after a short run       (suites.precision)
    5 inference   single-sample p50/p95/p99 per modality, with attention capture     (serving.inference)
    6 app         gradio_client round trip of predict vs a trivial Gradio app        (serving.app)
    7 scaling     step time vs tokens per sample and vs batch size (+ a plot)        (suites.scaling)
    8 walltime    the quick pipeline and make test, when given (never run here)      (walltime)
    9 profile     torch.profiler's top ops of the stage-3 step                       (suites.profile)

Every figure is the median of repeated runs after warm-up, with min and max (:mod:`.timing`).
Results: ``<out>.json``, ``<out>.md`` (the table, :mod:`.report`), ``<out>-scaling.png``; by default
``benchmarks/results/<timestamp>.*``, and a full run also refreshes ``benchmarks/latest.md``.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from workbench.errors import ConfigError

SECTIONS = ("roof", "training", "peers", "precision", "inference", "app", "scaling", "walltime", "profile")


def benchmarks_dir() -> Path:
    """``benchmarks/`` in the working directory (as ``runs/`` and ``reports/``)."""
    return Path("benchmarks")


def walltime(pipeline_seconds: float | None, test_seconds: float | None) -> dict[str, Any]:
    """Wall time of the quick pipeline and of ``make test``: too slow to run inside the benchmark, so
    recorded only when given (or, for the pipeline, read from the newest quick report's index.json)."""
    out: dict[str, Any] = {}
    if pipeline_seconds is not None:
        out["quick_pipeline_s"] = {"seconds": pipeline_seconds, "source": "--pipeline-seconds"}
    else:
        from workbench.paths import reports_dir

        found = []
        for index in reports_dir().glob("quick-*/index.json"):
            try:
                info = json.loads(index.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if info.get("profile") == "quick" and info.get("seconds"):
                statuses = [nb.get("status") for nb in info.get("notebooks", [])]
                found.append((info.get("started", ""), index, info["seconds"], statuses))
        if found:
            started, index, seconds, statuses = max(found)
            out["quick_pipeline_s"] = {
                "seconds": seconds,
                "source": str(index),
                "started": started,
                "all_ok": bool(statuses) and all(s == "ok" for s in statuses),
            }
        else:
            out["quick_pipeline_s"] = {"seconds": None, "source": "not measured in this run"}
    out["make_test_s"] = {
        "seconds": test_seconds,
        "source": "--test-seconds" if test_seconds is not None else "not measured in this run",
    }
    return out


def _out_paths(out: str | Path | None, started: datetime) -> tuple[Path, bool]:
    if out:
        path = Path(out)
        if path.suffix != ".json":
            raise ConfigError(f"--out {out}: give a .json file (the table and plot are written beside it)")
        return path, False
    return benchmarks_dir() / "results" / f"{started:%Y%m%d-%H%M%S}.json", True


def run_bench(
    quick: bool = False,
    out: str | Path | None = None,
    *,
    threads: int | None = None,
    only: Sequence[str] = (),
    pipeline_seconds: float | None = None,
    test_seconds: float | None = None,
    command: str = "workbench bench",
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the suite and write JSON, markdown table and scaling plot; returns the results dict."""
    unknown = [s for s in only if s not in SECTIONS]
    if unknown:
        raise ConfigError(f"unknown section {unknown[0]!r}; sections are {', '.join(SECTIONS)}")
    if threads is not None and threads < 1:
        raise ConfigError(f"--threads {threads}: give a positive number of threads")
    for name, value in (("--pipeline-seconds", pipeline_seconds), ("--test-seconds", test_seconds)):
        if value is not None and value <= 0:
            raise ConfigError(f"{name} {value}: give the measured wall time in seconds (> 0)")
    started = datetime.now().astimezone()
    path, default_location = _out_paths(out, started)

    from workbench.bench import report, serving, suites, timing

    sizes = suites.QUICK if quick else suites.FULL
    wanted = set(only or SECTIONS)
    if wanted & {"training", "peers"}:
        wanted.add("roof")  # MFU needs the roof
    runners: dict[str, Callable[[suites.Sizes, dict], dict]] = {
        "roof": suites.roof,
        "training": suites.training,
        "peers": suites.peers,
        "precision": suites.precision,
        "inference": serving.inference,
        "app": serving.app,
        "scaling": suites.scaling,
        "walltime": lambda s, c: walltime(pipeline_seconds, test_seconds),
        "profile": suites.profile,
    }
    t_start = time.perf_counter()
    results: dict[str, Any] = {
        "schema": 1,
        "started": started.isoformat(timespec="seconds"),
        "mode": sizes.name,
        "command": command,
        "machine": timing.machine(),
    }
    n_threads, results["threads"] = suites.choose_threads(threads)
    say(f"bench ({sizes.name}): {n_threads} torch thread(s); writing {path}")
    results["sections"] = {}
    with timing.threads(n_threads):
        for name in SECTIONS:
            if name not in wanted:
                continue
            tic = time.perf_counter()
            section = runners[name](sizes, {**results, **results["sections"]})
            section["seconds"] = round(time.perf_counter() - tic, 1)
            results["sections"][name] = section
            say(f"  {name:10s} {section['seconds']:6.1f} s  {report.headline(name, section)}")
    results["machine"]["load_average_end"] = timing.load_average()
    results["seconds"] = round(time.perf_counter() - t_start, 1)
    results["targets"] = report.targets(results)
    files = {"json": path, **report.write(results, path)}  # the table and the plot beside the JSON
    if default_location and not quick:  # the committed copy that the README points at
        files["latest"] = benchmarks_dir() / "latest.md"
        plot = None
        if "plot" in files:
            plot = benchmarks_dir() / "latest-scaling.png"
            shutil.copyfile(files["plot"], plot)
        files["latest"].write_text(report.markdown(results, plot.name if plot else None))
    results["files"] = {k: str(v) for k, v in files.items()}
    path.write_text(json.dumps(results, indent=1) + "\n")
    say(f"bench done in {results['seconds']:.0f} s: {files['markdown']}")
    return results


__all__ = ["SECTIONS", "benchmarks_dir", "run_bench", "walltime"]
