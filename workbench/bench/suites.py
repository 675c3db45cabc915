"""The compute benchmarks: the machine's roof, training steps, peers, bf16, scaling, and a profile.

Each section is a function ``(sizes, context) -> dict`` of JSON-ready figures; :mod:`workbench.bench`
runs them in order. Shapes come from :class:`Sizes` (``FULL``: the ``small`` preset at batch 64 as the
issue asks; ``QUICK``: the ``tiny`` preset at minimal sizes, a smoke run of every code path).

All inputs are synthetic (:mod:`workbench.model.synthetic`): a training step's speed does not depend on
what the pixels show. Only the bf16 accuracy comparison trains on the real embedded data.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from workbench.bench.timing import count_flops, measure, measure_interleaved, ratio, scaled, stat, threads
from workbench.config import Config, load_config
from workbench.modalities import TaskSpec, default_tasks
from workbench.model.benchmark import PAIRS  # the stage-2/3 stream pairs the step timer cycles through
from workbench.model.omnivec2 import FeatureTransform, OmniVec2, build_model
from workbench.model.synthetic import synthetic_batch


@dataclass(frozen=True)
class Sizes:
    """How big and how often: one instance per mode (``FULL``, ``QUICK``)."""

    name: str
    preset: str  # model preset of the training, peer, inference, scaling and profile sections
    batch: int  # samples per training step (stages 2-3: half per stream), and the peers' batch
    warmup: int  # untimed calls before each measurement (besides the FLOP-counting call, itself a warm-up)
    repeats: int  # timed calls per figure (fewer once budget_s is spent; never fewer than 3)
    budget_s: float  # seconds one figure may take before repeats stop early
    roof_sizes: tuple[int, ...]  # square fp32 GEMMs (n x n @ n x n)
    roof_sizes_emulated_bf16: tuple[int, ...]  # bf16 GEMMs where bf16 is emulated (~200x slower)
    peer_tokens: int  # tokens per sample in the peer comparison (a plain ViT-sized sequence)
    precision_preset_emulated: str  # the bf16-vs-fp32 model where bf16 is emulated
    precision_batch_emulated: int
    accuracy_steps: int  # optimiser steps of the short fp32 / bf16 training runs
    accuracy_batch: int
    accuracy_data_scale: float  # data.scale of the embedded data they train and test on
    latency_samples: int  # single-sample forwards per modality and mode (p99 needs >= 100)
    app_calls: int  # gradio_client rounds (every endpoint once) of the single client
    app_calls_concurrent: int  # rounds of each of the 8 concurrent clients
    app_warmup: tuple[int, int]  # untimed rounds per client: single client, each of the 8
    scale_tokens: tuple[int, ...]  # tokens per sample swept at batch scale_batch
    scale_batch: int
    scale_batches: tuple[int, ...]  # batch sizes swept at scale_batch_tokens tokens per sample
    scale_batch_tokens: int
    profile_steps: int  # stage-3 steps under torch.profiler (parsing ~7k events per step takes seconds)


FULL = Sizes(
    name="full", preset="small", batch=64, warmup=1, repeats=5, budget_s=25.0,
    roof_sizes=(1024, 2048, 3072), roof_sizes_emulated_bf16=(256, 512),
    peer_tokens=64, precision_preset_emulated="tiny", precision_batch_emulated=16,
    accuracy_steps=150, accuracy_batch=32, accuracy_data_scale=1.0, latency_samples=120,
    app_calls=15, app_calls_concurrent=3, app_warmup=(2, 1),
    scale_tokens=(64, 128, 256, 512, 1024), scale_batch=8,
    scale_batches=(1, 4, 16, 64), scale_batch_tokens=64, profile_steps=4,
)  # fmt: skip
QUICK = Sizes(
    name="quick", preset="tiny", batch=8, warmup=0, repeats=3, budget_s=1.0,
    roof_sizes=(512,), roof_sizes_emulated_bf16=(128,),
    peer_tokens=16, precision_preset_emulated="tiny", precision_batch_emulated=4,
    accuracy_steps=4, accuracy_batch=8, accuracy_data_scale=0.1, latency_samples=20,
    app_calls=2, app_calls_concurrent=1, app_warmup=(1, 0),
    scale_tokens=(64, 128, 256), scale_batch=2,
    scale_batches=(1, 4, 16), scale_batch_tokens=64, profile_steps=1,
)  # fmt: skip


def preset_config(preset: str, *overrides: str) -> Config:
    return load_config(overrides=[f"model.preset={preset}", *overrides])


# ------------------------------------------------------------------------------------ threads probe
def choose_threads(requested: int | None) -> tuple[int, dict[str, Any]]:
    """``requested``, or (None = auto) the faster of 1 and all threads on a small f forward+backward.

    On a shared machine the answer changes with the load: libgomp's worker threads spin-wait at every
    parallel region, and when another process holds the second core each region waits a scheduler
    slice (we measured a 1000-element sqrt at 8 ms with 2 threads vs 5 us with 1). The probe makes
    that visible instead of letting it silently scale every figure.
    """
    available = torch.get_num_threads()
    if requested:
        return requested, {"chosen": requested, "how": "--threads", "available": available}
    if available == 1:
        return 1, {"chosen": 1, "how": "only one thread", "available": 1}
    f = FeatureTransform(preset_config("small").model).train()
    x = torch.randn(4, 64, f.body.norm.normalized_shape[0])

    def run(n: int) -> Callable[[], None]:
        def call() -> None:
            with threads(n):
                f(x, None).sum().backward()

        return call

    times = measure_interleaved({"1": run(1), str(available): run(available)}, warmup=1, repeats=5)
    ms = {k: stat([t * 1000 for t in v], "ms") for k, v in times.items()}
    chosen = min(ms, key=lambda k: ms[k]["median"])
    return int(chosen), {
        "chosen": int(chosen),
        "how": "auto: the faster of 1 and all threads on a small-preset f forward+backward (batch 4)",
        "available": available,
        "probe_ms": ms,
    }


# ------------------------------------------------------------------------------------------ 1. roof
def _gemm_gflops(n: int, dtype: torch.dtype, sizes: Sizes, budget_s: float) -> dict[str, Any]:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    times = measure(lambda: a @ b, warmup=max(1, sizes.warmup), repeats=sizes.repeats, budget_s=budget_s)
    return scaled(stat(times, "s", 6), 2 * n**3 / 1e9, "GFLOP/s", invert=True)


def roof(sizes: Sizes, ctx: dict[str, Any]) -> dict[str, Any]:
    """fp32 and bf16 matmul GFLOP/s on square GEMMs.

    ``fp32_gflops`` is the figure of the size with the best median; ``fp32_roof_gflops``, the roof that
    MFU divides by, is the fastest single GEMM of any size: other processes' load can only slow a run
    down, so on a shared machine the best run is the closest estimate of the peak (and MFU errs low).
    """
    native = ctx["machine"]["native_bf16"]
    fp32 = {str(n): _gemm_gflops(n, torch.float32, sizes, sizes.budget_s) for n in sizes.roof_sizes}
    bf16_sizes = sizes.roof_sizes if native else sizes.roof_sizes_emulated_bf16
    bf16 = {str(n): _gemm_gflops(n, torch.bfloat16, sizes, sizes.budget_s / 2) for n in bf16_sizes}
    best32 = max(fp32.values(), key=lambda s: s["median"])
    best16 = max(bf16.values(), key=lambda s: s["median"])
    return {
        "fp32_roof_gflops": max(s["max"] for s in fp32.values()),
        "fp32_gflops": best32,
        "bf16_gflops": best16,
        "bf16_over_fp32": ratio(best16, best32),
        "bf16_native": native,
        "fp32_by_size": fp32,
        "bf16_by_size": bf16,
        "note": None
        if native
        else "bf16 is emulated on this CPU (no AVX-512-BF16/AMX): small bf16 GEMMs only, to bound the time",
    }


# ------------------------------------------------------------------------------ 2. training steps
def _stage_data(cfg: Config, tasks: dict[str, TaskSpec], batch: int, stage: int) -> dict:
    per_stream = batch // 2 if stage > 1 else batch  # "half the batch from each (modality, task)"
    return {
        k: synthetic_batch(t, per_stream, seed=i, audio_seconds=1.0, vocab_size=cfg.model.text_vocab_size)
        for i, (k, t) in enumerate(tasks.items())
    }


def stage_cycle(model: OmniVec2, opt, data: dict, stage: int, bf16: bool = False) -> list[Callable[[], None]]:
    """One training step per stream pair (stages 2-3, :data:`PAIRS`) or per modality (stage 1): the same
    step as :func:`workbench.model.benchmark.time_steps` (forward, losses, backward, AdamW step)."""
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else nullcontext

    def loss_of(items) -> torch.Tensor:
        if stage == 3:
            ka, kb = items
            pa, pb = model.forward_pair(data[ka], data[kb])
            return model.task_loss(ka, pa, data[ka].y) + model.task_loss(kb, pb, data[kb].y)
        if stage == 2:
            oa, ob = model.forward_masked_pair(data[items[0]], data[items[1]], 0.75, 0.75)
            return oa.loss + ob.loss
        return model.forward_masked(data[items], 0.75).loss

    def step(items) -> Callable[[], None]:
        def call() -> None:
            with autocast():
                loss = loss_of(items)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return call

    if stage == 1:  # one batch per modality (the masked objective ignores the task)
        firsts = {}
        for key, b in data.items():
            firsts.setdefault(b.modality, key)
        return [step(k) for k in firsts.values()]
    return [step(pair) for pair in PAIRS]


def _train_setup(preset: str, batch: int, stage: int, seed: int = 0):
    torch.manual_seed(seed)
    cfg = preset_config(preset)
    tasks = {t.key: t for t in default_tasks()}
    model = build_model(cfg, list(tasks.values())).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    return model, opt, _stage_data(cfg, tasks, batch, stage)


def _run_all(calls: list[Callable[[], None]]) -> Callable[[], None]:
    def run() -> None:
        for c in calls:
            c()

    return run


def training(sizes: Sizes, ctx: dict[str, Any]) -> dict[str, Any]:
    """Samples/s of each stage's step, counted model FLOPs and MFU against the measured fp32 roof."""
    roof32 = ctx["roof"]["fp32_roof_gflops"]
    out: dict[str, Any] = {"preset": sizes.preset, "batch": sizes.batch, "roof_fp32_gflops": roof32}
    for stage in (1, 2, 3):
        model, opt, data = _train_setup(sizes.preset, sizes.batch, stage)
        cycle = stage_cycle(model, opt, data, stage)
        run = _run_all(cycle)
        flops = count_flops(run)  # also the first warm-up call
        times = measure(run, warmup=sizes.warmup, repeats=sizes.repeats, budget_s=sizes.budget_s)
        s = stat(times, "s")
        n = len(cycle)
        gflops = scaled(s, flops["flops"] / 1e9, "GFLOP/s", invert=True)
        out[f"stage{stage}"] = {
            "steps_per_repeat": n,
            "seconds_per_step": scaled(s, 1 / n, "s"),
            "samples_per_s": scaled(s, n * sizes.batch, "samples/s", invert=True),
            "gflop_per_step": round(flops["flops"] / n / 1e9, 3),
            "attention_flop_share": flops["attention_share"],
            "model_gflops": gflops,
            "mfu": scaled(gflops, 1 / roof32, "fraction of the fp32 roof"),
        }
    return out


# -------------------------------------------------------------------------------------------- 3. peers
class _HFEncoder(nn.Module):
    """transformers' ViTModel without its patch embedding: its blocks and final LayerNorm on tokens."""

    def __init__(self, dim: int, depth: int, heads: int, mlp_ratio: float):
        super().__init__()
        from transformers import ViTConfig, ViTModel

        config = ViTConfig(
            hidden_size=dim,
            num_hidden_layers=depth,
            num_attention_heads=heads,
            intermediate_size=int(dim * mlp_ratio),
            hidden_act="gelu",  # exact GELU, as nn.GELU() in our blocks
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            layer_norm_eps=1e-5,
            attn_implementation="sdpa",
        )
        self.vit = ViTModel(config, add_pooling_layer=False)
        del self.vit.embeddings  # tokens go straight into the blocks, as into our f
        self.attn_implementation = self.vit.config._attn_implementation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layers = getattr(self.vit, "layers", None) or self.vit.encoder.layer  # transformers 5 | 4
        for layer in layers:
            x = layer(x)
            x = x[0] if isinstance(x, tuple) else x
        return self.vit.layernorm(x)


def _torch_encoder(dim: int, depth: int, heads: int, mlp_ratio: float) -> nn.Module:
    layer = nn.TransformerEncoderLayer(
        dim, heads, int(dim * mlp_ratio), dropout=0.0, activation="gelu", batch_first=True, norm_first=True
    )
    return nn.TransformerEncoder(layer, depth, norm=nn.LayerNorm(dim), enable_nested_tensor=False)


def peers(sizes: Sizes, ctx: dict[str, Any]) -> dict[str, Any]:
    """Forward+backward of our f against transformers' ViT encoder and nn.TransformerEncoder, same shapes."""
    m = preset_config(sizes.preset).model
    B, N, D = sizes.batch, sizes.peer_tokens, m.dim
    torch.manual_seed(0)
    f = FeatureTransform(m).train()
    hf = _HFEncoder(D, m.depth_f, m.heads, m.mlp_ratio).train()
    te = _torch_encoder(D, m.depth_f, m.heads, m.mlp_ratio).train()
    x = torch.randn(B, N, D)  # synthetic tokens, no padding
    candidates = {
        "ours_f_blocks": (f.body, lambda: f.body(x, None)),
        "hf_vit_sdpa": (hf, lambda: hf(x)),
        "torch_transformer_encoder": (te, lambda: te(x)),
        "ours_f_with_fc": (f, lambda: f(x, None)),
    }

    def fwd_bwd(module: nn.Module, forward: Callable) -> Callable[[], None]:
        def call() -> None:
            forward().sum().backward()
            module.zero_grad(set_to_none=True)

        return call

    fns = {k: fwd_bwd(mod, fwd) for k, (mod, fwd) in candidates.items()}
    flops = {k: count_flops(fn) for k, fn in fns.items()}
    times = measure_interleaved(fns, warmup=sizes.warmup, repeats=sizes.repeats, budget_s=sizes.budget_s)
    roof32 = ctx["roof"]["fp32_roof_gflops"]
    rows = {}
    for k, (mod, _) in candidates.items():
        s = stat([t * 1000 for t in times[k]], "ms")
        gflops = scaled(s, flops[k]["flops"] / 1e6, "GFLOP/s", invert=True)
        rows[k] = {
            "ms": s,
            "parameters": sum(p.numel() for p in mod.parameters()),
            "gflop": round(flops[k]["flops"] / 1e9, 3),
            "gflops": gflops,
            "mfu": round(gflops["median"] / roof32, 4),
        }
    ours = rows["ours_f_blocks"]["ms"]
    fastest = {k: round(ours["min"] / rows[k]["ms"]["min"], 3) for k in rows}
    return {
        "shape": {
            "batch": B,
            "tokens": N,
            "width": D,
            "depth": m.depth_f,
            "heads": m.heads,
            "mlp_hidden": int(D * m.mlp_ratio),
        },
        "hf_attn_implementation": hf.attn_implementation,
        "candidates": rows,
        "time_ratio_vs_hf_vit": ratio(ours, rows["hf_vit_sdpa"]["ms"]),
        "time_ratio_vs_torch_encoder": ratio(ours, rows["torch_transformer_encoder"]["ms"]),
        "time_ratio_of_fastest_runs": fastest,  # min / min: the least disturbed runs, on a busy machine
        "note": "ours_f_blocks = f's transformer blocks + LayerNorm (what the peers compute); "
        "ours_f_with_fc adds f's FC reducer. Ratios are our time / the peer's time (< 1: we are faster).",
    }


# --------------------------------------------------------------------------------- 4. bf16 vs fp32
# The task of the short accuracy runs: video motion learns within ~150 tiny-preset steps (~75% test
# accuracy), while image digit is still near chance there.
ACCURACY_TASK = ("video", "motion")


def _short_run(preset: str, sizes: Sizes, bf16: bool, seed: int = 0) -> dict[str, Any]:
    """Train one task's head (single stream) for ``sizes.accuracy_steps`` AdamW steps on the embedded
    data and return its test accuracy; the fp32 and bf16 runs share the init and the batch order."""
    from workbench.data import load_benchmark, make_loader

    cfg = preset_config(preset, f"data.scale={sizes.accuracy_data_scale}")
    bench = load_benchmark(cfg.data, seed=cfg.seed)
    modality, name = ACCURACY_TASK
    task = bench.task(modality, name)
    torch.manual_seed(seed)
    model = build_model(cfg, [task]).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else nullcontext
    train = make_loader(bench.dataset(modality, name, "train"), sizes.accuracy_batch, shuffle=True,
                        seed=seed, drop_last=True)  # fmt: skip
    tic = time.perf_counter()
    for b in itertools.islice(itertools.chain.from_iterable(itertools.repeat(train)), sizes.accuracy_steps):
        with autocast():
            loss = model.task_loss(task.key, model.forward_single(b)[task.name], b.y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    seconds = time.perf_counter() - tic
    model.eval()
    right = total = 0
    with torch.no_grad(), autocast():
        for b in make_loader(bench.dataset(modality, name, "test"), 250, shuffle=False, seed=seed):
            right += int((model.forward_single(b)[task.name].argmax(-1) == b.y).sum())
            total += len(b)
    return {
        "accuracy": round(right / total, 4),
        "test_samples": total,
        "final_loss": round(loss.item(), 4),
        "train_seconds": round(seconds, 2),
    }


def precision(sizes: Sizes, ctx: dict[str, Any]) -> dict[str, Any]:
    """Stage-3 step speed under bf16 autocast vs fp32, and test accuracy after a short run in each."""
    native = ctx["machine"]["native_bf16"]
    preset = sizes.preset if native else sizes.precision_preset_emulated
    batch = sizes.batch if native else sizes.precision_batch_emulated
    runs = {}
    for name, bf16 in (("fp32", False), ("bf16", True)):
        model, opt, data = _train_setup(preset, batch, 3)
        runs[name] = _run_all(stage_cycle(model, opt, data, 3, bf16=bf16))
    times = measure_interleaved(runs, warmup=1, repeats=sizes.repeats, budget_s=sizes.budget_s)
    n = len(PAIRS) * batch
    speed = {k: scaled(stat(v, "s"), n, "samples/s", invert=True) for k, v in times.items()}
    acc = {k: _short_run(preset, sizes, bf16=k == "bf16") for k in runs}
    return {
        "bf16_native": native,
        "step": {"stage": 3, "preset": preset, "batch": batch},
        "samples_per_s": speed,
        "bf16_speedup": ratio(speed["bf16"], speed["fp32"]),
        "accuracy_run": {
            "task": "/".join(ACCURACY_TASK),
            "preset": preset,
            "data_scale": sizes.accuracy_data_scale,
            "steps": sizes.accuracy_steps,
            "batch": sizes.accuracy_batch,
        },
        "accuracy": acc,
        "accuracy_difference_points": round(100 * (acc["bf16"]["accuracy"] - acc["fp32"]["accuracy"]), 2),
        "note": None
        if native
        else f"bf16 is emulated on this CPU: measured on the {preset!r} preset at batch {batch} (the small "
        "preset at batch 64 would take minutes per bf16 step); the speedup here says only that bf16 "
        "must stay off (train.mixed_precision=auto does that, see workbench/hardware.py)",
    }


# ------------------------------------------------------------------------------------------ 7. scaling
def scaling(sizes: Sizes, ctx: dict[str, Any]) -> dict[str, Any]:
    """Training-step time of f (forward, backward, AdamW) on synthetic tokens against tokens per sample
    and against batch size, with the share of FLOPs spent in attention."""
    m = preset_config(sizes.preset).model
    torch.manual_seed(0)
    f = FeatureTransform(m).train()
    opt = torch.optim.AdamW(f.parameters(), lr=1e-4)

    def point(B: int, N: int) -> dict[str, Any]:
        x = torch.randn(B, N, m.dim)

        def step() -> None:
            f(x, None).pow(2).mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        flops = count_flops(step)  # doubles as the warm-up call
        times = measure(step, warmup=0, repeats=sizes.repeats, budget_s=sizes.budget_s)
        s = stat([t * 1000 for t in times], "ms")
        return {
            "batch": B,
            "tokens": N,
            "ms_per_step": s,
            "us_per_token": round(s["median"] * 1000 / (B * N), 3),
            "gflop": round(flops["flops"] / 1e9, 3),
            "attention_flop_share": flops["attention_share"],
        }

    return {
        "model": f"f of the {sizes.preset!r} preset: {m.depth_f} blocks x {m.heads} heads at {m.dim}",
        "tokens": [point(sizes.scale_batch, n) for n in sizes.scale_tokens],
        "batch": [point(b, sizes.scale_batch_tokens) for b in sizes.scale_batches],
    }


# ----------------------------------------------------------------------------------------- profile
def profile(sizes: Sizes, ctx: dict[str, Any], top: int = 15) -> dict[str, Any]:
    """torch.profiler over the first ``sizes.profile_steps`` stage-3 steps of a repeat (after a warm-up
    repeat): the top ops by self CPU time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    model, opt, data = _train_setup(sizes.preset, sizes.batch, 3)
    cycle = stage_cycle(model, opt, data, 3)
    _run_all(cycle)()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        _run_all(cycle[: sizes.profile_steps])()
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    rows = [
        {
            "op": e.key,
            "self_ms": round(e.self_cpu_time_total / 1000, 2),
            "share": round(e.self_cpu_time_total / total, 4),
            "calls": e.count,
            "us_per_call": round(e.self_cpu_time_total / max(e.count, 1), 1),
        }
        for e in events[:top]
    ]
    return {
        "step": {"stage": 3, "preset": sizes.preset, "batch": sizes.batch, "steps": sizes.profile_steps},
        "self_cpu_ms_total": round(total / 1000, 1),
        "top_ops": rows,
    }
