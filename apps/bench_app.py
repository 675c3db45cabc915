"""The app section of ``workbench bench``: ``gradio_client`` round trips of the explorer's ``predict``
against a trivial Gradio app (the overhead floor), served in the same process, with 1 and N clients.

``workbench bench`` loads this file from the source tree (the package never imports Gradio) and calls
:func:`measure`. The trivial app takes what ``predict`` takes (a file, or text) and returns a JSON list,
so the difference between the two is the model, decoding and the handler, not Gradio's plumbing.
``apps/measure_latency.py`` measures every endpoint, one client at a time.

Clients are made with ``ssl_verify=False`` (:func:`client`): the apps are plain ``http://`` on
loopback, so no TLS happens either way, but ``gradio_client`` opens a fresh ``httpx`` client for
the queue join, the event stream and every file it uploads or downloads, and with verification on
each one builds an SSL context from the CA bundle first: 40-60 ms of client CPU per request here,
which a browser never pays and which buried the server's share (a trivial text round trip: ~290 ms
with the default, ~70 ms without, in one run). The one-client rows also time ``attention`` with the
default client, so both figures stay visible.
"""

from __future__ import annotations

import importlib.util
import socket
import threading
import time
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
from gradio_client import Client, handle_file
from PIL import Image


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def client(url: str, **kwargs: Any) -> Client:
    """A ``gradio_client`` for a loopback ``http://`` app, without per-request SSL contexts (see above)."""
    return Client(url, verbose=False, ssl_verify=False, **kwargs)


def _trivial() -> gr.Blocks:
    with gr.Blocks(analytics_enabled=False) as demo:
        f, t, out = gr.File(), gr.Textbox(), gr.JSON()
        gr.Button().click(
            lambda x: [{"input": Path(x["path"]).name}], f, out, api_name="file", preprocess=False
        )
        gr.Button().click(lambda x: [{"input": x}], t, out, api_name="text")
    return demo


def _explorer():
    spec = importlib.util.spec_from_file_location(
        "workbench_explorer", Path(__file__).with_name("explorer.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _percentiles(ms: list[float]) -> dict[str, Any]:
    v = sorted(ms)
    rank = lambda q: v[min(len(v) - 1, max(0, round(q * len(v)) - 1))]  # noqa: E731
    return {"p50": round(float(np.median(v)), 2), "p95": round(rank(0.95), 2), "p99": round(rank(0.99), 2),
            "min": round(v[0], 2), "max": round(v[-1], 2), "n": len(v), "unit": "ms"}  # fmt: skip


def _round_trips(urls: tuple[str, str], image: str, calls: int, clients: int, warmup: int = 2) -> dict:
    """``clients`` threads, each with its own clients, calling every endpoint in turn ``calls`` times."""
    endpoints = ("trivial image", "predict image", "trivial text", "predict text")
    if clients == 1:  # the attention endpoints' targets are single-user latencies
        endpoints += ("attention image", "cross_attention image+text", "attention image (client defaults)")
    times: dict[str, list[float]] = {k: [] for k in endpoints}
    lock, start = threading.Lock(), threading.Barrier(clients + 1)
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            ex, tr = client(urls[0]), client(urls[1])
            ex_default = Client(urls[0], verbose=False)  # ssl_verify=True: an SSL context per request
            call = {
                "trivial image": lambda: tr.predict(handle_file(image), api_name="/file"),
                "predict image": lambda: ex.predict(image=handle_file(image), api_name="/predict"),
                "trivial text": lambda: tr.predict("sieben", api_name="/text"),
                "predict text": lambda: ex.predict(text="sieben", api_name="/predict"),
                "attention image": lambda: ex.predict(image=handle_file(image), modality="image", module="f",
                                                      layer=0, head="mean", api_name="/attention"),
                "cross_attention image+text": lambda: ex.predict(
                    image=handle_file(image), text="sieben", modality_a="image", modality_b="text", module="A",
                    layer=0, head="mean", api_name="/cross_attention"),
                "attention image (client defaults)": lambda: ex_default.predict(
                    image=handle_file(image), modality="image", module="f", layer=0, head="mean",
                    api_name="/attention"),
            }  # fmt: skip
            for name in endpoints * warmup:
                call[name]()
        except BaseException as err:  # reported below; the barrier must still be reached
            errors.append(err)
        start.wait()
        if errors:
            return
        mine: dict[str, list[float]] = {k: [] for k in endpoints}
        for _ in range(calls):  # interleaved, so both apps see the same load
            for name in endpoints:
                tic = time.perf_counter()
                call[name]()
                mine[name].append((time.perf_counter() - tic) * 1000)
        with lock:
            for k, v in mine.items():
                times[k].extend(v)

    pool = [threading.Thread(target=worker, daemon=True) for _ in range(clients)]
    for t in pool:
        t.start()
    start.wait()
    tic = time.perf_counter()
    for t in pool:
        t.join()
    wall = time.perf_counter() - tic
    if errors:
        raise RuntimeError(f"a gradio_client call failed: {errors[0]!r}") from errors[0]
    row: dict[str, Any] = {k: _percentiles(v) for k, v in times.items()}
    row["requests_per_s"] = round(sum(len(v) for v in times.values()) / wall, 2)
    row["calls_per_client"] = calls
    return row


def measure(
    checkpoint: str | Path,
    calls: dict[int, int] | None = None,
    warmup: dict[int, int] | None = None,
    scratch: str | Path | None = None,
) -> dict:
    """Serve the explorer on ``checkpoint`` and the trivial app on free loopback ports; time round trips.

    ``calls`` maps a number of concurrent clients to the rounds each client makes (every endpoint
    once per round), ``warmup`` to its untimed rounds first; defaults ``{1: 40, 8: 10}``, ``{1: 2, 8: 1}``.
    """
    from workbench.config import load_config, read_saved_config

    calls, warmup = calls or {1: 40, 8: 10}, warmup or {1: 2, 8: 1}
    scratch = Path(scratch or ".")
    image = scratch / "digit.png"
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((28, 28)) * 255).astype(np.uint8)).save(image)
    limit = load_config(base=read_saved_config(Path(checkpoint) / "config.json")).app.concurrency_limit
    tic = time.perf_counter()
    explorer = _explorer().launch(checkpoint, port=_free_port(), prevent_thread_lock=True, quiet=True)
    trivial = _trivial().queue(default_concurrency_limit=limit)  # the same queue as the explorer's
    trivial.launch(server_port=_free_port(), prevent_thread_lock=True, quiet=True)
    launch_s = time.perf_counter() - tic
    try:
        urls = (explorer.local_url, trivial.local_url)
        rows = {
            str(n): _round_trips(urls, str(image), rounds, n, warmup.get(n, 1)) for n, rounds in calls.items()
        }
    finally:
        explorer.close()
        trivial.close()
    return {
        "clients": rows,
        "concurrency_limit": limit,
        "launch_s": round(launch_s, 2),
        "gradio": gr.__version__,
    }
