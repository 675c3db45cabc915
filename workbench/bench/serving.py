"""The serving benchmarks: in-process inference latency and throughput, and the app's round trip.

Inference runs ``model.forward_single`` under ``torch.no_grad`` on synthetic batches, exactly what
:meth:`workbench.inference.Predictor.predict` times (decoding the medium is not part of it). The app
section needs Gradio, which the package never imports: it loads ``apps/bench_app.py`` from the source
checkout (as ``workbench app`` loads ``apps/explorer.py``) on a checkpoint written on the fly from an
untrained network (latency does not depend on the weights).
"""

from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path
from typing import Any

import torch

from workbench.bench.suites import Sizes, preset_config
from workbench.bench.timing import measure_interleaved, percentiles, scaled, stat, threads
from workbench.modalities import default_tasks
from workbench.model.omnivec2 import build_model
from workbench.model.synthetic import synthetic_batch

APP_SCRIPT = Path(__file__).resolve().parents[2] / "apps" / "bench_app.py"


# ---------------------------------------------------------------------------------------- 5. inference
def inference(sizes: Sizes, ctx: dict[str, Any]) -> dict[str, Any]:
    """Single-sample latency p50/p95/p99 per modality with and without attention capture; batch-64
    throughput per modality."""
    cfg = preset_config(sizes.preset)
    torch.manual_seed(0)
    model = build_model(cfg, default_tasks()).eval()
    vocab = cfg.model.text_vocab_size
    out: dict[str, Any] = {"preset": sizes.preset, "modalities": {}}
    for modality in model.modalities:
        task = next(t for t in model.tasks.values() if t.modality == modality)
        one = synthetic_batch(task, 1, audio_seconds=1.0, vocab_size=vocab)
        many = synthetic_batch(task, 64, audio_seconds=1.0, vocab_size=vocab)

        def plain(b=one) -> None:
            model.forward_single(b)

        def captured(b=one) -> None:
            with model.capture_attention():
                model.forward_single(b)

        with torch.no_grad():
            single = measure_interleaved(
                {"plain": plain, "capture": captured}, warmup=5, repeats=sizes.latency_samples
            )
            batch = measure_interleaved(
                {"batch": lambda b=many: model.forward_single(b)},
                warmup=sizes.warmup,
                repeats=sizes.repeats,
                budget_s=sizes.budget_s,
            )["batch"]
        lat = {k: percentiles([t * 1000 for t in v]) for k, v in single.items()}
        out["modalities"][modality] = {
            "tokens": int(model.tokenize(one)[1].shape[1]),
            "latency_ms": lat["plain"],
            "latency_ms_capture": lat["capture"],
            "capture_cost": round(lat["capture"]["p50"] / lat["plain"]["p50"], 3),
            "batch64_samples_per_s": scaled(stat(batch, "s"), 64, "samples/s", invert=True),
        }
    return out


# ----------------------------------------------------------------------------------------------- 6. app
def write_checkpoint(directory: Path, preset: str) -> Path:
    """An untrained network of ``preset`` with a small text tokenizer, saved as a checkpoint directory."""
    from workbench.data.phrases import word
    from workbench.model.text_tokenizer import TextTokenizer

    cfg = preset_config(preset, "data.scale=0.1")  # the app loads its examples from this (small) data
    torch.manual_seed(0)
    model = build_model(cfg, default_tasks())
    words = [word(n, lang) for n in range(10) for lang in ("en", "de", "fr", "es", "it")]
    tok = TextTokenizer.train(words * 3, vocab_size=min(cfg.model.text_vocab_size, 256))
    model.text_tokenizer = tok
    return model.save_pretrained(directory, cfg, tok)


def _load_app_script():
    spec = importlib.util.spec_from_file_location("workbench_bench_app", APP_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def app(sizes: Sizes, ctx: dict[str, Any]) -> dict[str, Any]:
    """``gradio_client`` round trips of ``predict`` and of a trivial Gradio app, 1 and 8 clients."""
    if not APP_SCRIPT.is_file():
        return {"skipped": f"{APP_SCRIPT} is missing: run the benchmark from a source checkout"}
    try:
        import gradio  # noqa: F401
        import gradio_client  # noqa: F401
    except ImportError as err:
        return {"skipped": f"Gradio is not installed ({err})"}
    script = _load_app_script()
    with tempfile.TemporaryDirectory(prefix="workbench-bench-") as tmp, threads(None):
        checkpoint = write_checkpoint(Path(tmp) / "checkpoint", sizes.preset)
        # The app sets torch to one thread (see apps/explorer.launch); threads(None) restores ours after.
        result = script.measure(
            checkpoint,
            calls={1: sizes.app_calls, 8: sizes.app_calls_concurrent},
            warmup={1: sizes.app_warmup[0], 8: sizes.app_warmup[1]},
            scratch=Path(tmp),
        )
    for n, row in result["clients"].items():
        for kind in ("image", "text"):
            if f"predict {kind}" in row and f"trivial {kind}" in row:
                row[f"predict {kind} overhead_ms"] = round(
                    row[f"predict {kind}"]["p50"] - row[f"trivial {kind}"]["p50"], 2
                )
        result["clients"][n] = row
    result["preset"] = sizes.preset
    return result
