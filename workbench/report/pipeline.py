"""Run the registered notebooks headlessly (papermill) into ``reports/<run>/`` and convert each to HTML.

Layout of a run directory::

    <run>/index.html, index.json       status of every notebook, headline metrics, tables (index.py)
    <run>/<name>.ipynb, <name>.html    the executed notebook and its self-contained HTML
    <run>/artifacts/<name>/            the notebook's output_dir: checkpoints, summary.json, ...
    <run>/logs/<name>.log              the kernel process's own stdout/stderr (not cell output)

Everything is validated before the first kernel starts: the registry's wiring, the profile, and
that every existing notebook declares, in its ``parameters`` cell, each parameter it will be given.
A registered notebook whose file does not exist yet is reported as ``missing`` and skipped (so are
the notebooks that depend on it); a notebook that exists and fails stops the pipeline with
:class:`NotebookFailed` after its partial output, its HTML and the index are written.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from workbench.errors import ConfigError, WorkbenchError
from workbench.paths import reports_dir
from workbench.report.index import INDEX_PAGE, machine_info, write_index
from workbench.report.registry import (
    PROFILE_DEFAULTS,
    NotebookSpec,
    check_profile,
    closest_hint,
    critical_path,
    default_registry,
    input_refs,
    topological_order,
    validate,
    with_upstream,
)
from workbench.startup import skip_iri_format_check

skip_iri_format_check()  # before papermill and nbconvert import nbformat (workbench/startup.py)

_SOURCE_ROOT = Path(__file__).resolve().parents[2]  # the directory holding the workbench package
KERNEL_NAME = "python3"  # ipykernel's native spec: runs on the same interpreter as the pipeline
STATUSES = ("ok", "failed", "skipped", "missing")


class NotebookFailed(WorkbenchError):
    """A notebook raised (or its kernel died). Not bad user input: the CLI exits 1, not 2."""

    def __init__(self, message: str, result: PipelineResult) -> None:
        super().__init__(message)
        self.result = result


@dataclass
class NotebookResult:
    """What happened to one notebook; serialised as one row of index.json."""

    name: str
    title: str
    status: str  # ok | failed | skipped | missing
    reason: str = ""  # why skipped / missing / failed, one line
    seconds: float = 0.0
    notebook: str = ""  # executed .ipynb, relative to the run directory
    html: str = ""  # its HTML, relative to the run directory
    output_dir: str = ""  # relative to the run directory
    parameters: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)  # the notebook's summary.json
    error: dict[str, Any] = field(default_factory=dict)  # cell_index, exec_count, ename, evalue, source


@dataclass
class PipelineResult:
    run_dir: Path
    profile: str
    started: str  # ISO 8601, local time with offset
    seconds: float
    machine: dict[str, Any]
    notebooks: list[NotebookResult]
    overrides: list[str] = field(default_factory=list)  # the user's config overrides for every notebook

    @property
    def failed(self) -> list[NotebookResult]:
        """The notebooks that failed, in registry order."""
        return [r for r in self.notebooks if r.status == "failed"]

    @property
    def index_html(self) -> Path:
        return self.run_dir / INDEX_PAGE

    def to_dict(self) -> dict[str, Any]:
        return {
            "run": self.run_dir.name,
            "profile": self.profile,
            "overrides": list(self.overrides),
            "started": self.started,
            "seconds": round(self.seconds, 2),
            "machine": self.machine,
            "notebooks": [asdict(r) for r in self.notebooks],
        }


# ---------------------------------------------------------------------------------------- locations
def default_notebooks_dir() -> Path:
    """``$WORKBENCH_NOTEBOOKS``, else ``notebooks/`` beside the package (the repository checkout)."""
    env = os.environ.get("WORKBENCH_NOTEBOOKS")
    return Path(env) if env else _SOURCE_ROOT / "notebooks"


def default_run_dir(profile: str) -> Path:
    return reports_dir() / f"{profile}-{datetime.now():%Y%m%d-%H%M%S}"


def _prepare_run_dir(out: Path) -> None:
    """Create ``out``; refuse a non-empty directory that is not a previous report (never clobber data)."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {str(out)!r} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / "index.json").is_file():
        raise ConfigError(f"--out {str(out)!r} is a non-empty directory that is not a report; choose another")
    out.mkdir(parents=True, exist_ok=True)


# ---------------------------------------------------------------------------------------- parameters
def declared_parameters(path: Path) -> set[str]:
    """Names assigned in the notebook's ``parameters``-tagged cell (parsed, no kernel started)."""
    import nbformat
    from papermill.translators import PythonTranslator

    nb = nbformat.read(path, as_version=4)
    cell = next((c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])), None)
    if cell is None:
        raise ConfigError(f"notebook {path.name} has no cell tagged 'parameters' (papermill needs one)")
    return {p.name for p in PythonTranslator.inspect(cell)}


def notebook_parameters(
    spec: NotebookSpec, profile: str, run_dir: Path, declared: set[str], overrides: Sequence[str] = ()
) -> dict[str, Any]:
    """The parameters papermill injects: profile defaults the notebook declares, its own, its wiring.

    ``overrides`` (the user's ``key=value`` config overrides) go last in the ``overrides`` parameter of
    every notebook that declares one, so they win over the profile's and the notebook's own settings.
    """
    params = {k: v for k, v in PROFILE_DEFAULTS[profile].items() if k in declared}
    wired: dict[str, Any] = dict(spec.parameters_for(profile))
    if overrides and "overrides" in declared:
        base = wired.get("overrides", params.get("overrides", []))
        wired["overrides"] = [*base, *overrides]
    wired["output_dir"] = str(run_dir / "artifacts" / spec.name)
    for param, refs in input_refs(spec).items():
        paths = [str(run_dir / "artifacts" / ref) for ref in refs]
        wired[param] = paths[0] if isinstance(spec.inputs[param], str) else paths
    for name in wired:
        if name not in declared:
            raise ConfigError(
                f"notebook {spec.name} is given parameter {name!r} but its parameters cell does not "
                f"declare it{closest_hint(name, declared)}"
            )
    return params | wired


# ----------------------------------------------------------------------------------------- execution
def _kernel_manager_logging_to(log_path: Path, threads: int | None = None) -> type:
    """An AsyncKernelManager whose kernel process writes its own stdout/stderr to ``log_path``.

    Cell output still arrives through the kernel protocol; only process-level noise (the kernel's
    start-up warnings, C-level prints, a crash trace) goes to the log instead of the terminal.
    ``threads`` caps the kernel's OpenMP/torch threads (kernels running side by side share the cores;
    oversubscribed OpenMP threads spin-wait and run many times slower).
    """
    from jupyter_client.manager import AsyncKernelManager

    class LoggingKernelManager(AsyncKernelManager):
        async def _async_launch_kernel(self, kernel_cmd: list[str], **kw: Any) -> None:
            # The kernel imports the same workbench as this process, whatever its cwd (a stale
            # editable install can otherwise resolve `workbench` to a namespace package).
            env = dict(kw.get("env") or os.environ)
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_SOURCE_ROOT), env.get("PYTHONPATH", "")]))
            # Notebooks skip live ipywidgets when no browser is attached (an Output widget's
            # clear_output can leave nbclient waiting forever) and show static galleries instead.
            env["WORKBENCH_HEADLESS"] = "1"
            if threads is not None:
                env["OMP_NUM_THREADS"] = str(threads)
            kw["env"] = env
            log_path.parent.mkdir(parents=True, exist_ok=True)
            with log_path.open("ab") as fh:  # the child keeps its own copy of the descriptor
                kw.setdefault("stdout", fh)
                kw.setdefault("stderr", fh)
                await super()._async_launch_kernel(kernel_cmd, **kw)

    return LoggingKernelManager


def _one_line(text: str, limit: int = 200) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


# How long a kernel may take to answer its first request. papermill's 60 s failed a fresh-clone `make test`
# once (2026-12-05): two kernels starting beside a test worker while all three compiled their first imports
# on 2 cores. A slow start is not a notebook failure; a kernel that never answers still fails.
KERNEL_START_SECONDS = 300


def _execute(
    spec: NotebookSpec, source: Path, params: dict, run_dir: Path, cwd: Path, threads: int | None = None
) -> dict[str, Any]:
    """Run one notebook with papermill; return ``{}`` on success or a description of the failure."""
    import papermill
    from papermill.exceptions import PapermillExecutionError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            papermill.execute_notebook(
                str(source),
                str(run_dir / f"{spec.name}.ipynb"),
                parameters=params,
                kernel_name=KERNEL_NAME,
                language="python",
                cwd=str(cwd),
                progress_bar=False,
                log_output=False,
                start_timeout=KERNEL_START_SECONDS,
                kernel_manager_class=_kernel_manager_logging_to(
                    run_dir / "logs" / f"{spec.name}.log", threads
                ),
            )
    except PapermillExecutionError as err:
        first_line = next((ln for ln in (err.source or "").splitlines() if ln.strip()), "")
        return {
            "cell_index": err.cell_index,
            "exec_count": err.exec_count,
            "ename": err.ename,
            "evalue": _one_line(err.evalue),
            "source": _one_line(first_line, 80),
        }
    except Exception as err:  # kernel died, timed out, could not start: no cell to blame
        return {"cell_index": None, "exec_count": None, "ename": type(err).__name__, "evalue": _one_line(err)}
    return {}


def _describe_failure(res: NotebookResult, run_dir: Path) -> str:
    err = res.error
    if err.get("cell_index") is not None:
        where = f"in cell {err['cell_index']}"
        if err.get("exec_count") is not None:
            where += f" (In [{err['exec_count']}]: {err.get('source', '')!r})"
    elif err.get("ename") == "MissingOutput":
        where = "after its last cell"
    else:  # the kernel died or did not start: its own log says why
        where = f"outside the cells (kernel log: {run_dir / 'logs' / (res.name + '.log')})"
    kept = run_dir / (res.html or res.notebook) if (res.html or res.notebook) else run_dir / "logs"
    return (
        f"notebook {res.name} failed {where}: {err.get('ename')}: {err.get('evalue')}; partial output: {kept}"
    )


def _read_summary(output_dir: Path) -> tuple[dict[str, Any], str]:
    path = output_dir / "summary.json"
    if not path.is_file():
        return {}, ""
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        return {}, f"summary.json is unreadable: {_one_line(err)}"
    if not isinstance(summary, dict):
        return {}, "summary.json is not an object"
    return summary, ""


# ---------------------------------------------------------------------------------------------- run
def run_pipeline(
    profile: str = "quick",
    out: str | Path | None = None,
    *,
    registry: Sequence[NotebookSpec] | None = None,
    notebooks_dir: str | Path | None = None,
    only: Iterable[str] = (),
    jobs: int = 1,
    overrides: Sequence[str] = (),
    keep_going: bool = False,
    log: Callable[[str], None] | None = print,
) -> PipelineResult:
    """Execute the registry's notebooks in dependency order and write the report; return its result.

    ``only`` restricts the run to those notebooks and their upstream dependencies. ``jobs`` > 1 runs
    up to that many independent notebooks at once (each kernel gets ``cpu_count // jobs`` threads).
    ``overrides`` are config ``key=value`` pairs for every notebook that trains (validated first). After
    a failure nothing new starts, unless ``keep_going``: then every notebook that does not depend on a
    failed one still runs (``make -k``). Raises ConfigError (before any work) for bad input,
    NotebookFailed after the index is written if any notebook failed (naming the first, counting all).
    """
    say = log or (lambda _msg: None)
    check_profile(profile)
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ConfigError(f"--jobs must be a whole number >= 1; got {jobs!r}")
    overrides = list(overrides)
    if overrides:
        from workbench.config import load_config

        load_config(overrides=overrides)  # unknown keys and bad values fail here, before any kernel
    registry = tuple(default_registry() if registry is None else registry)
    validate(registry)
    order = topological_order(registry)
    only = list(only)
    selected = with_upstream(registry, only) if only else {s.name for s in registry}
    nb_dir = Path(notebooks_dir or default_notebooks_dir()).resolve()
    run_dir = Path(out or default_run_dir(profile)).resolve()

    # Resolve every notebook's parameters before starting a kernel: a typo fails in seconds, not hours.
    plans: list[tuple[NotebookSpec, Path, dict[str, Any] | None]] = []
    for spec in order:
        source = nb_dir / spec.path
        exists = spec.name in selected and source.is_file()
        declared = declared_parameters(source) if exists else set()
        params = notebook_parameters(spec, profile, run_dir, declared, overrides) if exists else None
        plans.append((spec, source, params))
    _prepare_run_dir(run_dir)

    started, t_start = datetime.now().astimezone(), time.perf_counter()
    results: dict[str, NotebookResult] = {}
    result = PipelineResult(
        run_dir, profile, started.isoformat(timespec="seconds"), 0.0, machine_info(), [], overrides
    )
    try:
        _schedule(
            plans, critical_path(order, profile), selected, jobs, run_dir, nb_dir, results, say, keep_going
        )
    finally:  # also on Ctrl-C: the index shows how far the run got
        result.notebooks = [
            results.get(s.name) or NotebookResult(s.name, s.title, "skipped", "interrupted") for s in order
        ]
        result.seconds = time.perf_counter() - t_start
        write_index(result.run_dir, result.to_dict())
    failed = result.failed
    if failed:
        message = _describe_failure(failed[0], run_dir)
        if len(failed) > 1:
            message += f"; {len(failed) - 1} more failed: {', '.join(r.name for r in failed[1:])}"
        raise NotebookFailed(message, result)
    return result


Plan = tuple[NotebookSpec, Path, "dict[str, Any] | None"]


def _schedule(
    plans: Sequence[Plan],
    priority: Mapping[str, float],
    selected: set[str],
    jobs: int,
    run_dir: Path,
    nb_dir: Path,
    results: dict[str, NotebookResult],
    say: Callable[[str], None],
    keep_going: bool = False,
) -> None:
    """Run every plan whose dependencies succeeded, at most ``jobs`` at once; fill ``results``.

    A notebook starts as soon as its dependencies are ``ok`` and a slot is free (with ``jobs`` > 1 the
    one with the most expected work below it first, see :func:`critical_path`, else in dependency
    order); one that cannot run is settled as missing/skipped once its dependencies are. After a
    failure nothing new starts (with ``keep_going``, only what depends on it is skipped); notebooks
    already running finish and are kept.
    """
    total = sum(spec.name in selected for spec, _, _ in plans)  # "[k/total]" counts what --only runs
    count = iter(range(1, total + 1))
    threads = max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else None
    pending = list(plans)
    running: dict[Future, tuple[NotebookSpec, NotebookResult]] = {}
    stopped_by = ""
    pool = ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="notebook") if jobs > 1 else None
    try:
        while pending or running:
            ready: list[tuple[NotebookSpec, Path, dict[str, Any]]] = []
            for spec, source, params in list(pending):  # dependency order: one pass settles whole chains
                if any(d not in results for d in spec.depends_on):
                    continue
                res = NotebookResult(spec.name, spec.title, "skipped", output_dir=f"artifacts/{spec.name}")
                blocked = [d for d in spec.depends_on if results[d].status != "ok"]
                if spec.name not in selected:
                    res.reason = "not selected (--only)"
                elif params is None:
                    res.status, res.reason = "missing", f"{spec.path} does not exist yet"
                    say(
                        f"[{next(count)}/{total}] warning: {spec.name} is registered but {source} does not exist; skipped"
                    )
                elif stopped_by:
                    res.reason = f"not run: {stopped_by} failed"
                elif blocked:
                    res.reason = f"needs {', '.join(f'{d} ({results[d].status})' for d in blocked)}"
                    say(f"[{next(count)}/{total}] {spec.name}: skipped, {res.reason}")
                else:
                    ready.append((spec, source, params))
                    continue
                results[spec.name] = res
                pending.remove((spec, source, params))
            if pool is not None:  # stable: ties (and jobs=1, always) keep the dependency order
                ready.sort(key=lambda plan: -priority[plan[0].name])
            for spec, source, params in ready[: max(0, jobs - len(running))]:
                pending.remove((spec, source, params))
                res = NotebookResult(spec.name, spec.title, "skipped", output_dir=f"artifacts/{spec.name}")
                args = (spec, source, params, run_dir, nb_dir, res, say, f"[{next(count)}/{total}]", threads)
                if pool is None:
                    _run_one(*args)
                    running[_done_future()] = (spec, res)
                else:
                    running[pool.submit(_run_one, *args)] = (spec, res)
            if not running:
                break
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                spec, res = running.pop(future)
                future.result()
                results[spec.name] = res
                if res.status == "failed" and not stopped_by and not keep_going:
                    stopped_by = spec.name
    finally:
        if pool is not None:  # on Ctrl-C, notebooks already running end before the index is written
            pool.shutdown(wait=True, cancel_futures=True)


def _done_future() -> Future:
    future: Future = Future()
    future.set_result(None)
    return future


def _run_one(
    spec: NotebookSpec,
    source: Path,
    params: dict[str, Any],
    run_dir: Path,
    nb_dir: Path,
    res: NotebookResult,
    say: Callable[[str], None],
    counter: str,
    threads: int | None = None,
) -> None:
    """Execute, convert to HTML, check declared outputs, read summary.json; fill ``res`` in place."""
    from workbench.report.html import notebook_to_html

    output_dir = run_dir / "artifacts" / spec.name
    executed = run_dir / f"{spec.name}.ipynb"
    # A re-run into the same report: never let stale outputs pass as new ones.
    if output_dir.exists():
        shutil.rmtree(output_dir)
    for stale in (executed, run_dir / f"{spec.name}.html", run_dir / "logs" / f"{spec.name}.log"):
        stale.unlink(missing_ok=True)
    output_dir.mkdir(parents=True)
    res.parameters = params
    say(f"{counter} {spec.name}: running ...")
    t0 = time.perf_counter()
    res.error = _execute(spec, source, params, run_dir, nb_dir, threads)
    res.seconds = round(time.perf_counter() - t0, 2)
    if executed.is_file():
        res.notebook = executed.name
        notebook_to_html(executed, run_dir / f"{spec.name}.html")
        res.html = f"{spec.name}.html"
    if not res.error:
        absent = [o for o in spec.outputs if not (output_dir / o).exists()]
        if absent:
            res.error = {
                "cell_index": None,
                "exec_count": None,
                "ename": "MissingOutput",
                "evalue": f"finished without writing its declared outputs {absent} in {output_dir}",
            }
    res.summary, problem = _read_summary(output_dir)
    res.status = "failed" if res.error else "ok"
    res.reason = f"{res.error['ename']}: {res.error['evalue']}" if res.error else problem
    say(f"{counter} {spec.name}: {res.status} ({res.seconds:.1f} s)")
