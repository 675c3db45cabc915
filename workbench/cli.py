"""The ``workbench`` command line (also ``python -m workbench``).

Each subcommand parses its arguments, resolves the typed config *before any work*, and then calls
into the library. Heavy imports (torch models, gradio, papermill) happen inside the handlers so that
``--help`` stays instant. Exit codes: 0 success, 2 bad input or configuration (one line on stderr),
1 anything else.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from workbench import __version__
from workbench.errors import ConfigError, NotYetAvailable, WorkbenchError

EPILOG = """\
config overrides are dotted key=value pairs, e.g.  train.steps=200 model.preset=tiny seed=1
(see configs/*.yaml and README.md for every key). Exit codes: 0 ok, 2 bad input, 1 other errors."""


def _positive_int(text: str) -> int:
    """argparse type: a whole number >= 1 (argparse reports the error in one line, exit 2)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def _pending(what: str, issue: int) -> NotYetAvailable:
    return NotYetAvailable(f"`workbench {what}` is not available yet: it lands with issue #{issue}")


def _config(args: argparse.Namespace, base: dict | None = None):
    from workbench.config import load_config

    return load_config(files=args.config or (), overrides=args.overrides, base=base)


# ---------------------------------------------------------------------------------------- handlers
def cmd_data_build(args: argparse.Namespace) -> int:
    import time

    from workbench.data import describe, load_benchmark

    cfg = _config(args)
    t0 = time.perf_counter()
    bench = load_benchmark(cfg.data, seed=cfg.seed, root=args.root, force=args.force)
    desc = describe(bench)
    sizes = ", ".join(
        f"{k} {sum(c['total'] for c in v['splits'].values())}" for k, v in desc["tasks"].items()
    )
    print(f"data ready in {time.perf_counter() - t0:.1f} s at {desc['cache']}")
    print(f"{len(bench.tasks)} tasks: {sizes}")
    return 0


def cmd_data_describe(args: argparse.Namespace) -> int:
    import json

    from workbench.data import describe, format_table, load_benchmark

    cfg = _config(args)
    desc = describe(load_benchmark(cfg.data, seed=cfg.seed, root=args.root))
    print(json.dumps(desc, indent=1, ensure_ascii=False) if args.json else format_table(desc))
    return 0


def cmd_model(args: argparse.Namespace) -> int:
    """Build the network of a preset (on the config's modalities' default tasks) and describe it."""
    from workbench.config import load_config
    from workbench.modalities import default_tasks
    from workbench.model import build_model
    from workbench.model.summary import describe

    preset = [f"model.preset={args.preset}"] if args.preset else []
    cfg = load_config(files=args.config or (), overrides=[*preset, *args.overrides])
    print(describe(build_model(cfg, default_tasks(cfg.data.modalities))))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from workbench.train import resolve_run, train

    cfg, run = resolve_run(args.stage, args.config or (), args.overrides, args.init, args.out, args.resume)
    result = train(cfg, run, init=args.init, resume=args.resume)
    print(
        f"stage {cfg.train.stage}: {result.steps} steps in {result.seconds:.0f}s; checkpoint: {result.checkpoint}"
    )
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from workbench.config import load_config, read_saved_config
    from workbench.data import load_benchmark
    from workbench.evaluate import accuracy_by, evaluate, target_lines
    from workbench.inference import Predictor

    predictor = Predictor.from_checkpoint(args.checkpoint)  # refuses a bad checkpoint before any work
    cfg = load_config(files=args.config or (), overrides=args.overrides,
                      base=read_saved_config(Path(args.checkpoint) / "config.json"))  # fmt: skip
    bench = load_benchmark(cfg.data, seed=cfg.seed)
    metrics = evaluate(predictor.model, bench, args.split)
    if args.by:  # per template / voice / ...: beside each task's totals, under "by_<column>"
        for key, groups in accuracy_by(predictor.model, bench, args.by, args.split).items():
            metrics[key][f"by_{args.by}"] = groups
    text = json.dumps(metrics, indent=2) + "\n"
    (Path(args.checkpoint) / "metrics.json").write_text(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text)
    for key, row in metrics.items():
        shown = ", ".join(f"{k}={v:.4f}" for k, v in row.items() if isinstance(v, float))
        print(f"{args.split:5s} {key:18s} {shown} (n={row['n']})")
        for name, group in row.get(f"by_{args.by}", {}).items():
            print(f"{'':24s}{name:20s} accuracy={group['accuracy']:.4f} (n={group['n']})")
    if args.targets:
        print("targets of the Training issue (full profile, test split):")
        print("\n".join("  " + line for line in target_lines(metrics)))
    return 0


class _Medium(argparse.Action):
    """Collect --image/--audio/--video/--text in the order given on the command line."""

    def __call__(self, parser, namespace, values, option_string=None):
        media = getattr(namespace, "media", None) or []
        media.append((self.dest, values))
        namespace.media = media


def cmd_predict(args: argparse.Namespace) -> int:
    import json

    from workbench.inference import Predictor

    if not getattr(args, "media", None):
        raise WorkbenchError("give at least one medium: --image F, --audio F, --video F or --text S")
    predictor = Predictor.from_checkpoint(args.checkpoint)
    for modality, src in args.media:
        pred = predictor.predict(modality, src, name=src)
        if args.json:
            print(json.dumps(pred.to_json()), flush=True)
            continue
        parts = []
        for task, out in pred.tasks.items():
            if "top" in out:
                parts.append(f"{task}={out['label']} ({out['top'][0][1]:.2f})")
            else:
                parts.append(f"{task}: PSNR to the input {out['psnr']:.1f} dB")
        print(f"{src} [{modality}] " + ", ".join(parts) + f"  ({pred.latency_ms:.1f} ms)", flush=True)
    return 0


def cmd_adapt(args: argparse.Namespace) -> int:
    from workbench.adapt import adapt, write_result

    r = adapt(
        args.checkpoint,
        args.dataset,
        args.dir,
        fraction=args.fraction,
        epochs=args.epochs,
        seed=args.seed,
        features=args.features,
        overrides=args.overrides,
    )
    if args.json:
        write_result(r, args.json)
    print(f"{r.task} ({r.dataset}, {r.features} features): accuracy {r.accuracy:.4f}, macro-F1 "
          f"{r.macro_f1:.4f} on {r.test_samples} test samples; two FC layers trained on {r.train_samples} "
          f"({r.fraction:.0%}) in {r.seconds:.0f}s")  # fmt: skip
    return 0


def cmd_pipeline(args: argparse.Namespace) -> int:
    from workbench.report import NotebookFailed, run_pipeline

    if args.plan:
        return _print_plan(args)
    try:
        result = run_pipeline(
            args.profile,
            args.out,
            only=args.only or (),
            jobs=args.jobs,
            overrides=args.overrides,
            keep_going=args.keep_going,
        )
    except NotebookFailed as err:  # a notebook's bug, not bad input: exit 1, the index is still written
        print(f"workbench pipeline: error: {err}", file=sys.stderr)
        print(f"report (partial): {err.result.index_html}")
        return 1
    counts = {s: sum(r.status == s for r in result.notebooks) for s in ("ok", "missing", "skipped")}
    done = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    print(f"pipeline {result.profile}: {done} in {result.seconds:.0f}s; report: {result.index_html}")
    return 0


def _print_plan(args: argparse.Namespace) -> int:
    """``workbench pipeline --plan``: the expected order, jobs and minutes, without running anything."""
    from workbench.report.registry import default_registry, plan

    try:
        slots = plan(default_registry(), args.profile, args.jobs, args.only or ())
    except ConfigError as err:
        print(f"workbench pipeline: error: {err}", file=sys.stderr)
        return 2
    print(f"plan for --profile {args.profile} --jobs {args.jobs} (one-thread minutes measured on 2 cores):")
    for s in slots:
        print(f"  job {s.job + 1}  {s.start:6.1f} -> {s.end:6.1f} min  {s.name}")
    print(f"expected total: {max((s.end for s in slots), default=0):.0f} min")
    return 0


def cmd_app(args: argparse.Namespace) -> int:
    """Serve apps/explorer.py (the UI lives beside the package, in the source tree) on a checkpoint."""
    import importlib.util
    from pathlib import Path

    from workbench.paths import latest_checkpoint, runs_dir

    cfg = _config(args)
    checkpoint = args.checkpoint or cfg.app.checkpoint or latest_checkpoint()
    if not checkpoint:
        raise WorkbenchError(
            f"no checkpoint found under {runs_dir()}/*/checkpoint; make one with "
            "`workbench train --stage 3 --out runs/demo` (or `make run`), then run `workbench app` again "
            "or pass --checkpoint runs/demo/checkpoint"
        )
    path = Path(__file__).resolve().parents[1] / "apps" / "explorer.py"
    if not path.is_file():
        raise WorkbenchError(
            f"the app's source {path} is missing: run `workbench app` from a source checkout"
        )
    spec = importlib.util.spec_from_file_location("workbench_explorer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.launch(checkpoint, host=args.host, port=args.port, config_files=args.config or (),
                  overrides=args.overrides)  # fmt: skip
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    import shlex

    from workbench.bench import run_bench

    run_bench(
        args.quick,
        args.out,
        threads=args.threads,
        only=args.only or (),
        pipeline_seconds=args.pipeline_seconds,
        test_seconds=args.test_seconds,
        command=shlex.join(["workbench", *args.argv]),
    )
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from workbench.config import to_yaml

    print(to_yaml(_config(args)), end="")
    return 0


# ------------------------------------------------------------------------------------------ parser
def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config", action="append", metavar="FILE", help="YAML config file (repeatable; later wins)"
    )
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="workbench",
        description="Multimodal multitask transformers (OmniVec2): data, training, evaluation, reports, app.",
        epilog=EPILOG,
        formatter_class=fmt,
    )
    parser.add_argument("--version", action="version", version=f"workbench {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(
        name: str, handler: Callable, help: str, description: str | None = None
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(
            name, help=help, description=description or help, epilog=EPILOG, formatter_class=fmt
        )
        p.set_defaults(handler=handler)
        return p

    data = add("data", None, "build or describe the embedded multimodal digits dataset")
    data_sub = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    p = data_sub.add_parser("build", help="build/refresh the embedded dataset cache (offline, deterministic)")
    p.add_argument(
        "--root", metavar="DIR", help="cache directory (default: data.cache_dir or ~/.cache/workbench)"
    )
    p.add_argument("--force", action="store_true", help="rebuild even if the cache is up to date")
    _add_config_args(p)
    p.set_defaults(handler=cmd_data_build)
    p = data_sub.add_parser("describe", help="counts per modality, task, split and class")
    p.add_argument("--root", metavar="DIR", help="cache directory")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _add_config_args(p)
    p.set_defaults(handler=cmd_data_describe)

    p = add("model", cmd_model, "print the network of a preset: components, parameter counts, shapes")
    p.add_argument("--preset", default=None, help="model preset (tiny | small | base | ...)")
    _add_config_args(p)

    p = add(
        "train",
        cmd_train,
        "train one OmniVec2 stage (1 unimodal masked, 2 pairwise masked, 3 multitask)",
        "Train one stage. Chain stages with --init (the previous run's checkpoint); continue a stopped "
        "run with --resume. Runs under `accelerate launch` unchanged for multi-process / multi-GPU.",
    )
    p.add_argument("--stage", type=int, choices=(1, 2, 3), required=True, help="training stage")
    p.add_argument("--init", metavar="CKPT", help="initialise from this checkpoint directory")
    p.add_argument("--out", metavar="RUN", help="run directory (default runs/stage<N>-<time>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last state")
    _add_config_args(p)

    p = add("evaluate", cmd_evaluate, "evaluate a checkpoint single-stream on a split")
    p.add_argument("--checkpoint", required=True, metavar="CKPT", help="checkpoint directory")
    p.add_argument("--split", default="test", choices=("train", "val", "test"))
    p.add_argument("--json", metavar="FILE", help="write the metrics JSON here")
    p.add_argument("--by", metavar="COLUMN",
                   help="also the accuracy per value of a data column: template (text phrasings), voice (audio)")  # fmt: skip
    p.add_argument("--targets", action="store_true",
                   help="also each Training-issue target beside the measured value, met or missed")  # fmt: skip
    _add_config_args(p)

    p = add("predict", cmd_predict, "predict every task head of each medium's modality")
    p.add_argument("--checkpoint", required=True, metavar="CKPT", help="checkpoint directory")
    for name, meta, what in (("image", "FILE", "PNG/JPEG/WebP/BMP/GIF"), ("audio", "FILE", "WAV/FLAC/OGG/MP3"),
                             ("video", "FILE", "MP4/WebM/AVI/GIF"), ("text", "TEXT", "a string")):  # fmt: skip
        p.add_argument(f"--{name}", dest=name, action=_Medium, metavar=meta, help=f"{what} (repeatable)")
    p.add_argument("--json", action="store_true", help="one JSON object per input, in input order")

    p = add(
        "adapt",
        cmd_adapt,
        "adapt a frozen checkpoint to an unseen dataset with two FC layers (paper 4.2)",
        "Freeze the network, train two fully connected layers on a stratified fraction of a new dataset's "
        "training split (FSDD speech recordings, MNIST-format IDX files such as Fashion-MNIST, or "
        "scikit-learn's UCI handwritten digits drawn as MNIST is), and "
        "report test accuracy.",
    )
    p.add_argument("--checkpoint", required=True, metavar="CKPT")
    p.add_argument("--dataset", required=True, choices=("fsdd", "idx", "uci-digits"))
    p.add_argument(
        "--dir",
        metavar="DIR",
        help="FSDD recordings/ or a directory of *-ubyte.gz (uci-digits comes with scikit-learn: none)",
    )
    p.add_argument(
        "--fraction", type=float, default=0.1, help="share of the training split used (default 0.1)"
    )
    p.add_argument("--epochs", type=int, default=200, help="epochs of the two FC layers (default 200)")
    p.add_argument(
        "--features",
        choices=("network", "last", "random", "input"),
        default="network",
        help="what the two layers read: the network's tokens at three depths, averaged (default), or "
        "its last layer's only; for reference, the same architecture freshly initialised, or its front end "
        "alone (pixels, log-mel statistics)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="FILE", help="write the result here")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="data.key=value",
        help="data settings over the checkpoint's, e.g. data.fsdd_holdout_speakers=[george]",
    )

    p = add("pipeline", cmd_pipeline, "run the notebooks headlessly (papermill) into a browsable report")
    p.add_argument(
        "--profile",
        default="quick",
        choices=("tiny", "quick", "full"),
        help="quick: one seed, few steps; full: three seeds, full step counts; tiny: seconds (tests)",
    )
    p.add_argument("--out", metavar="DIR", help="report directory (default reports/<profile>-<time>)")
    p.add_argument(
        "--only",
        action="append",
        metavar="NAME",
        help="run only this notebook and what it depends on (repeatable)",
    )
    p.add_argument(
        "--jobs",
        type=_positive_int,
        default=1,
        metavar="N",
        help="run up to N independent notebooks at once, each kernel with cpu_count/N threads (default 1)",
    )
    p.add_argument(
        "--keep-going",
        action="store_true",
        help="after a notebook fails, still run every notebook that does not depend on it (default: start "
        "nothing new); exit 1 at the end all the same",
    )
    p.add_argument(
        "--plan",
        action="store_true",
        help="print the expected order, job and minutes of every notebook (measured here), run nothing",
    )
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="config overrides for every notebook that trains (after the profile's), e.g. model.preset=tiny",
    )

    p = add("app", cmd_app, "serve the Gradio attention explorer")
    p.add_argument("--checkpoint", metavar="CKPT", help="checkpoint directory (default: newest in runs/)")
    p.add_argument("--host", default=None, help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (default 7860)")
    _add_config_args(p)

    p = add(
        "bench",
        cmd_bench,
        "run the benchmark suite",
        "Measure the machine's matmul roof, each stage's training step (samples/s, MFU), our f against "
        "transformers' ViT and nn.TransformerEncoder, bf16 vs fp32, inference latency, the app's round "
        "trip and scaling; write the JSON, a markdown table and a plot (see benchmarks/README.md).",
    )
    p.add_argument("--quick", action="store_true", help="a smoke run at minimal sizes (used by make test)")
    p.add_argument(
        "--out",
        metavar="FILE",
        help="results JSON; the table (.md) and plot (-scaling.png) go beside it "
        "(default benchmarks/results/<time>.json, and a full run refreshes benchmarks/latest.md)",
    )
    p.add_argument(
        "--threads", type=int, metavar="N", help="torch threads (default: the faster of 1 and all, probed)"
    )
    p.add_argument(
        "--only",
        action="append",
        metavar="SECTION",
        help="run only this section (repeatable): roof, training, peers, precision, inference, app, "
        "scaling, walltime, profile",
    )
    p.add_argument(
        "--pipeline-seconds",
        type=float,
        metavar="S",
        help="measured wall time of the quick pipeline (default: read from the newest reports/quick-*)",
    )
    p.add_argument("--test-seconds", type=float, metavar="S", help="measured wall time of `make test`")

    p = add("config", cmd_config, "print the resolved config (defaults <- preset <- files <- overrides)")
    _add_config_args(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return int(args.handler(args) or 0)
    except WorkbenchError as err:
        print(f"workbench {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
