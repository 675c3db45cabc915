"""Round-trip latency of the explorer's endpoints through ``gradio_client`` on loopback.

    .venv/bin/python apps/measure_latency.py CKPT [--n 50] [--json FILE]

Serves the explorer on ``CKPT`` and a trivial Gradio app (a file in, its name out; text in, text
out) in the same process, then calls them in turn so both see the same machine load. Reports the
median and p95 of each, and the overhead of ``predict`` over the trivial app (issue #7's target:
at most 30 ms above it; attention endpoints under 300 ms at p95).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import tempfile
import time
from pathlib import Path

from bench_app import _free_port, _trivial, client  # the benchmark suite's trivial app and client settings
from gradio_client import Client, handle_file


def _stats(ms: list[float]) -> dict[str, float]:
    ms = sorted(ms)
    return {"median_ms": round(statistics.median(ms), 2), "p95_ms": round(ms[int(0.95 * (len(ms) - 1))], 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--n", type=int, default=50, help="calls per endpoint (after 5 warm-up calls)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()

    spec = importlib.util.spec_from_file_location(
        "workbench_explorer", Path(__file__).with_name("explorer.py")
    )
    app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app)
    explorer = app.launch(args.checkpoint, port=_free_port(), prevent_thread_lock=True, quiet=True)
    trivial = _trivial().queue()
    trivial.launch(server_port=_free_port(), prevent_thread_lock=True, quiet=True)
    ex, tr = client(explorer.local_url), client(trivial.local_url)  # ssl_verify=False: see bench_app.py
    ex_urls = client(explorer.local_url, download_files=False)  # pictures as URLs only
    ex_default = Client(explorer.local_url, verbose=False)  # gradio_client's defaults

    from workbench.config import from_dict, read_saved_config
    from workbench.data import load_benchmark
    from workbench.explore import save_medium

    cfg = from_dict(read_saved_config(Path(args.checkpoint) / "config.json"))
    bench = load_benchmark(cfg.data, seed=cfg.seed)
    tmp = Path(tempfile.mkdtemp(prefix="latency-"))
    image = save_medium(bench.dataset("image", "digit", "test")[0][0], tmp / "image")
    audio = save_medium(bench.dataset("audio", "digit", "test")[0][0], tmp / "audio")

    calls = {
        "trivial file": lambda: tr.predict(handle_file(image), api_name="/file"),
        "trivial text": lambda: tr.predict("sieben", api_name="/text"),
        "predict image": lambda: ex.predict(image=handle_file(image), api_name="/predict"),
        "predict text": lambda: ex.predict(text="sieben", api_name="/predict"),
        "attention image f": lambda: ex.predict(image=handle_file(image), module="f", api_name="/attention"),
        "attention image head": lambda: ex.predict(
            image=handle_file(image), module="head.image/digit", head="0", api_name="/attention"
        ),
        "attention image f, no download": lambda: ex_urls.predict(
            image=handle_file(image), module="f", api_name="/attention"
        ),
        "attention image f, client defaults": lambda: ex_default.predict(
            image=handle_file(image), module="f", api_name="/attention"
        ),
        "attention audio g": lambda: ex.predict(audio=handle_file(audio), module="g", api_name="/attention"),
        "cross_attention image-audio": lambda: ex.predict(
            image=handle_file(image), audio=handle_file(audio), api_name="/cross_attention"
        ),
    }
    times: dict[str, list[float]] = {k: [] for k in calls}
    for i in range(5 + args.n):  # interleaved, so every endpoint sees the same load
        for name, call in calls.items():
            tic = time.perf_counter()
            call()
            if i >= 5:
                times[name].append((time.perf_counter() - tic) * 1000)
    results = {k: _stats(v) for k, v in times.items()}
    for kind, trivial_name in (("image", "trivial file"), ("text", "trivial text")):
        results[f"predict {kind} overhead"] = {
            k: round(results[f"predict {kind}"][k] - results[trivial_name][k], 2)
            for k in ("median_ms", "p95_ms")
        }
    for name, r in results.items():
        print(f"{name:32s} median {r['median_ms']:8.2f} ms   p95 {r['p95_ms']:8.2f} ms")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    explorer.close()
    trivial.close()


if __name__ == "__main__":
    main()
