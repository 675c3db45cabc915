"""The benchmark's outputs: the markdown table, the targets check, the scaling plot, console headlines.

A figure ``12.3 (11.9-13.0)`` is the median of repeated runs after warm-up, then (min-max). The targets
are the issue's goals for the ``small`` preset; a quick run checks them too but at the tiny preset's
sizes, so its "met" column says nothing about the real model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

MISSING = "not measured in this run"


# ------------------------------------------------------------------------------------------ formatting
def num(x: float | None, unit: str = "") -> str:
    if x is None:
        return "-"
    a = abs(x)
    s = f"{x:.0f}" if a >= 100 else f"{x:.1f}" if a >= 10 else f"{x:.2f}" if a >= 0.1 else f"{x:.3g}"
    return f"{s} {unit}".rstrip()


def fig(s: dict[str, Any] | None, unit: str = "", scale: float = 1.0) -> str:
    """``median (min-max)`` of a stat."""
    if not s:
        return "-"
    return f"{num(s['median'] * scale, unit)} ({num(s['min'] * scale)}-{num(s['max'] * scale)})"


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return [*lines, ""]


# --------------------------------------------------------------------------------------------- targets
def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's goals next to what this run measured (only for sections that ran)."""
    s = results["sections"]
    rows: list[dict[str, Any]] = []

    def add(name: str, goal: str, value: float | None, met: bool | None, shown: str) -> None:
        rows.append({"target": name, "goal": goal, "value": value, "shown": shown, "met": met})

    if "training" in s:
        mfu = s["training"]["stage3"]["mfu"]["median"]
        add("training step MFU (stage 3)", ">= 60% of the fp32 roof", mfu, mfu >= 0.6, pct(mfu))
    if "peers" in s:
        for key, who in (("time_ratio_vs_hf_vit", "transformers ViT (sdpa)"),
                         ("time_ratio_vs_torch_encoder", "nn.TransformerEncoder")):  # fmt: skip
            r = s["peers"][key]
            add(f"f time / {who}", "<= 1.0", r, r <= 1.0, f"{r:.3f}")
    if "precision" in s:
        p = s["precision"]
        add("bf16 speed / fp32", ">= 1.4", p["bf16_speedup"], p["bf16_speedup"] >= 1.4,
            f"{p['bf16_speedup']:.3g}" + ("" if p["bf16_native"] else " (bf16 emulated)"))  # fmt: skip
        d = p["accuracy_difference_points"]
        add("bf16 accuracy - fp32", "within 0.5 points", d, abs(d) <= 0.5, f"{d:+.2f} points")
    if "inference" in s:
        mods = s["inference"]["modalities"]
        worst = max(mods, key=lambda m: mods[m]["capture_cost"])
        c = mods[worst]["capture_cost"]
        add("attention capture / plain forward", "<= 2x", c, c <= 2.0, f"{c:.2f}x (worst: {worst})")
        if "image" in mods:
            p95 = mods["image"]["latency_ms"]["p95"]
            add("single-image predict p95 (in-process)", "<= 10 ms", p95, p95 <= 10.0, f"{p95:.2f} ms")
    if "app" in s and "clients" in s["app"] and "1" in s["app"]["clients"]:
        one = s["app"]["clients"]["1"]
        over = one.get("predict image overhead_ms")
        if over is not None:
            add("app predict round trip - trivial app's (1 client)", "<= 30 ms", over, over <= 30.0,
                f"{over:.1f} ms")  # fmt: skip
        for name in ("attention image", "cross_attention image+text"):
            if name in one:
                p95 = one[name]["p95"]
                add(f"app {name.split()[0]} p95 (1 client)", "< 300 ms", p95, p95 < 300.0, f"{p95:.0f} ms")
    return rows


def headline(name: str, section: dict[str, Any]) -> str:
    """One console line per finished section."""
    if "skipped" in section:
        return f"skipped: {section['skipped']}"
    if name == "roof":
        return (f"fp32 {fig(section['fp32_gflops'], 'GFLOP/s')} (roof {num(section['fp32_roof_gflops'])}), "
                f"bf16 {fig(section['bf16_gflops'], 'GFLOP/s')}")  # fmt: skip
    if name == "training":
        st = section["stage3"]
        return f"stage 3: {fig(st['samples_per_s'], 'samples/s')}, MFU {pct(st['mfu']['median'])}"
    if name == "peers":
        return (f"f / ViT {section['time_ratio_vs_hf_vit']:.2f}, "
                f"f / nn.TransformerEncoder {section['time_ratio_vs_torch_encoder']:.2f}")  # fmt: skip
    if name == "precision":
        return f"bf16 / fp32 speed {section['bf16_speedup']:.3g}, accuracy {section['accuracy_difference_points']:+.2f} points"
    if name == "inference":
        mods = section["modalities"]
        return ", ".join(f"{m} p95 {v['latency_ms']['p95']:.1f} ms" for m, v in mods.items())
    if name == "app":
        one = section["clients"]["1"]
        return f"predict image p50 {one['predict image']['p50']:.1f} ms vs trivial {one['trivial image']['p50']:.1f} ms"
    if name == "scaling":
        last = section["tokens"][-1]
        return f"{last['tokens']} tokens: {fig(last['ms_per_step'], 'ms')}, attention {pct(last['attention_flop_share'])} of FLOPs"
    if name == "walltime":
        got = {k: v for k, v in section.items() if isinstance(v, dict)}
        return ", ".join(
            f"{k}: {v['seconds'] if v['seconds'] is not None else MISSING}" for k, v in got.items()
        )
    if name == "profile":
        top = section["top_ops"][0]
        return f"top op {top['op']} {pct(top['share'])}"
    return ""


# ---------------------------------------------------------------------------------------------- table
def markdown(results: dict[str, Any], plot_name: str | None = None) -> str:
    m, s = results["machine"], results["sections"]
    th = results["threads"]
    bf16 = "native" if m["native_bf16"] else "emulated (native_bf16() is False: no AVX-512-BF16/AMX)"
    quick = results["mode"] == "quick"
    load = f"{m.get('load_average_start')} at the start, {m.get('load_average_end')} at the end"
    probe = "".join(f"; {n} thread(s): {num(v['median'], 'ms')}" for n, v in th.get("probe_ms", {}).items())
    out = [
        f"# workbench bench: {results['mode']} run, {results['started']}",
        "",
        f"- machine: {m['cpu']} ({m['cpu_capability']}), {m['cpus_usable']} usable cores; bf16 {bf16}",
        f"- torch {m['torch']}, {th['chosen']} torch thread(s) ({th['how']}{probe}); OMP_WAIT_POLICY "
        f"{m['omp_wait_policy']}; load average {load}",
        f"- `{results['command']}`: {results['seconds']:.0f} s; commit {m.get('git_commit', '?')}",
        "- every figure: median (min-max) of repeated runs after warm-up; see benchmarks/README.md",
        "",
    ]
    if quick:
        out += ["**Quick run: tiny preset, minimal sizes. A smoke test; not comparable to the targets.**", ""]
    if results.get("targets"):
        out += ["## Targets (issue #9, small preset)", ""]
        rows = [
            [t["target"], t["goal"], t["shown"], "yes" if t["met"] else "**no**"] for t in results["targets"]
        ]
        out += _table(["target", "goal", "measured", "met"], rows)

    if "roof" in s:
        r = s["roof"]
        sizes = sorted({*r["fp32_by_size"], *r["bf16_by_size"]}, key=int)
        rows = [
            [f"{n}x{n} @ {n}x{n}", fig(r["fp32_by_size"].get(n)), fig(r["bf16_by_size"].get(n))]
            for n in sizes
        ]
        out += ["## 1. Roof: matmul GFLOP/s", ""]
        out += _table(["GEMM", "fp32", "bf16"], rows)
        out += [f"Roof (fastest single run, what MFU divides by): fp32 **{num(r['fp32_roof_gflops'])} GFLOP/s**; "
                f"best medians: fp32 {num(r['fp32_gflops']['median'])}, bf16 {num(r['bf16_gflops']['median'])} "
                f"GFLOP/s (bf16/fp32 = {r['bf16_over_fp32']:.3g})." + (f" {r['note']}." if r.get("note") else ""),
                ""]  # fmt: skip

    if "training" in s:
        t = s["training"]
        out += [f"## 2. Training step: preset `{t['preset']}`, batch {t['batch']}", ""]
        rows = []
        for stage in (1, 2, 3):
            st = t[f"stage{stage}"]
            rows.append([stage, fig(st["samples_per_s"]), fig(st["seconds_per_step"], scale=1000),
                         num(st["gflop_per_step"]), fig(st["model_gflops"]), pct(st["mfu"]["median"]),
                         pct(st["attention_flop_share"])])  # fmt: skip
        out += _table(
            ["stage", "samples/s", "ms/step", "GFLOP/step", "model GFLOP/s", "MFU", "attention FLOPs"], rows
        )
        out += ["FLOPs counted with torch.utils.flop_counter (matmuls and attention, forward + backward; the "
                "CPU attention kernel added); MFU = model GFLOP/s / fp32 roof. One repeat = one step per "
                "stream pair (stages 2-3) or per modality (stage 1).", ""]  # fmt: skip

    if "peers" in s:
        p = s["peers"]
        sh = p["shape"]
        out += [f"## 3. Peers: forward+backward, batch {sh['batch']} x {sh['tokens']} tokens x {sh['width']} "
                f"wide, {sh['depth']} blocks, {sh['heads']} heads, MLP {sh['mlp_hidden']}", ""]  # fmt: skip
        names = {"ours_f_blocks": "ours: f blocks", "hf_vit_sdpa": "transformers ViTModel encoder (sdpa)",
                 "torch_transformer_encoder": "nn.TransformerEncoder (norm_first, gelu)",
                 "ours_f_with_fc": "ours: f with FC reducer"}  # fmt: skip
        ours = p["candidates"]["ours_f_blocks"]["ms"]["median"]
        rows = [[names.get(k, k), fig(c["ms"]), num(c["gflops"]["median"]), pct(c["mfu"]),
                 f"{c['parameters']:,}", f"{ours / c['ms']['median']:.2f}",
                 f"{p['time_ratio_of_fastest_runs'][k]:.2f}"]
                for k, c in p["candidates"].items()]  # fmt: skip
        out += _table(["encoder", "ms", "GFLOP/s", "MFU", "parameters", "our f blocks' time / this",
                       "same, fastest runs"], rows)  # fmt: skip
        out += ["Each repeat times every encoder in turn, so all see the same load; *fastest runs* divides "
                "the minima (the least disturbed runs).", ""]  # fmt: skip

    if "precision" in s:
        p = s["precision"]
        st, ar = p["step"], p["accuracy_run"]
        a = p["accuracy"]
        out += ["## 4. bf16 autocast vs fp32", ""]
        rows = [
            [f"stage-3 step samples/s (`{st['preset']}`, batch {st['batch']})", fig(p["samples_per_s"]["fp32"]),
             fig(p["samples_per_s"]["bf16"]), f"{p['bf16_speedup']:.3g}x"],
            [f"{ar['task']} test accuracy after {ar['steps']} steps (`{ar['preset']}`, batch {ar['batch']})",
             pct(a["fp32"]["accuracy"]), pct(a["bf16"]["accuracy"]), f"{p['accuracy_difference_points']:+.2f} points"],
        ]  # fmt: skip
        out += _table(["", "fp32", "bf16", "bf16 vs fp32"], rows)
        if p.get("note"):
            out += [f"Note: {p['note']}.", ""]

    if "inference" in s:
        inf = s["inference"]
        out += [
            f"## 5. Inference: preset `{inf['preset']}`, forward_single under no_grad, {th['chosen']} thread(s)",
            "",
        ]
        rows = []
        for mod, v in inf["modalities"].items():
            lat, cap = v["latency_ms"], v["latency_ms_capture"]
            rows.append([mod, v["tokens"], num(lat["p50"]), num(lat["p95"]), num(lat["p99"]),
                         num(cap["p50"]), num(cap["p95"]), num(cap["p99"]), f"{v['capture_cost']:.2f}x",
                         fig(v["batch64_samples_per_s"])])  # fmt: skip
        out += _table(["modality", "tokens", "p50 ms", "p95 ms", "p99 ms", "capture p50", "capture p95",
                       "capture p99", "capture cost", "batch 64: samples/s"], rows)  # fmt: skip

    if "app" in s:
        a = s["app"]
        out += ["## 6. App: gradio_client round trip on loopback", ""]
        if "skipped" in a:
            out += [f"Skipped: {a['skipped']}", ""]
        else:
            rows = []
            for n, row in a["clients"].items():
                for name in ("trivial image", "predict image", "trivial text", "predict text", "attention image",
                             "cross_attention image+text", "attention image (client defaults)"):  # fmt: skip
                    if name in row:
                        kind = name.split()[1]
                        over = row.get(f"predict {kind} overhead_ms") if name.startswith("predict") else None
                        r = row[name]
                        rows.append([n, name, num(r["p50"]), num(r["p95"]), num(r["p99"]),
                                     "-" if over is None else num(over), row["requests_per_s"]])  # fmt: skip
            out += _table(["clients", "endpoint", "p50 ms", "p95 ms", "p99 ms", "p50 over trivial, ms",
                           "requests/s (all endpoints)"], rows)  # fmt: skip
            out += [f"Explorer on an untrained `{a['preset']}` checkpoint; both apps queue "
                    f"{a['concurrency_limit']} calls at once (app.concurrency_limit); Gradio {a['gradio']}. "
                    "Clients use `ssl_verify=False` (plain http on loopback: no TLS either way); with "
                    "gradio_client's default every request first builds an SSL context, the "
                    "`(client defaults)` row.", ""]  # fmt: skip

    if "scaling" in s:
        sc = s["scaling"]
        out += [f"## 7. Scaling: training step of {sc['model']} (forward, backward, AdamW)", ""]
        if plot_name:
            out += [f"![scaling]({plot_name})", ""]
        rows = [[p["batch"], p["tokens"], fig(p["ms_per_step"]), num(p["us_per_token"]), pct(p["attention_flop_share"])]
                for p in sc["tokens"] + sc["batch"]]  # fmt: skip
        out += _table(["batch", "tokens/sample", "ms/step", "us/token", "attention FLOPs"], rows)

    if "walltime" in s:
        w = s["walltime"]
        out += ["## 8. Wall time", ""]
        rows = []
        for name, v, flag in (("quick pipeline", w["quick_pipeline_s"], "--pipeline-seconds S"),
                              ("make test", w["make_test_s"], "--test-seconds S")):  # fmt: skip
            if v["seconds"] is None:
                rows.append([name, MISSING, f"too slow to run inside the benchmark: time it, pass {flag}"])
            else:
                rows.append([name, num(v["seconds"], "s"), v["source"]])
        out += _table(["what", "wall time", "source"], rows)

    if "profile" in s:
        pr = s["profile"]
        st = pr["step"]
        out += [f"## 9. Profile: stage-3 step, `{st['preset']}`, batch {st['batch']}, {st['steps']} steps "
                f"({pr['self_cpu_ms_total']} ms self CPU)", ""]  # fmt: skip
        rows = [[f"`{r['op']}`", num(r["self_ms"]), pct(r["share"]), r["calls"], num(r["us_per_call"])]
                for r in pr["top_ops"]]  # fmt: skip
        out += _table(["op", "self ms", "share", "calls", "us/call"], rows)

    secs = ", ".join(f"{k} {v['seconds']:.0f} s" for k, v in s.items())
    out += [f"Section times: {secs}.", ""]
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------- plot
def plot_scaling(section: dict[str, Any], path: Path) -> Path:
    """Two panels: step time against tokens per sample (with attention's FLOP share) and against batch."""
    from matplotlib.figure import Figure

    fig_ = Figure(figsize=(11, 4.2), layout="constrained")
    ax_tok, ax_batch = fig_.subplots(1, 2)
    tok = section["tokens"]
    x = [p["tokens"] for p in tok]
    y = [p["ms_per_step"]["median"] for p in tok]
    err = [[p["ms_per_step"]["median"] - p["ms_per_step"]["min"] for p in tok],
           [p["ms_per_step"]["max"] - p["ms_per_step"]["median"] for p in tok]]  # fmt: skip
    ax_tok.errorbar(x, y, yerr=err, marker="o", capsize=3, label="ms / step")
    linear = [y[0] * n / x[0] for n in x]
    ax_tok.plot(x, linear, ls="--", color="grey", label="linear in tokens (from the first point)")
    ax_tok.set(xscale="log", yscale="log", xlabel="tokens per sample", ylabel="ms per step",
               title=f"batch {tok[0]['batch']}: time vs tokens per sample")  # fmt: skip
    ax_tok.set_xticks(x, [str(n) for n in x])
    share = ax_tok.twinx()
    share.plot(
        x,
        [100 * p["attention_flop_share"] for p in tok],
        color="tab:red",
        marker="s",
        label="attention % of FLOPs",
    )
    share.set(ylabel="attention share of FLOPs (%)", ylim=(0, 100))
    lines = ax_tok.get_legend_handles_labels()
    more = share.get_legend_handles_labels()
    ax_tok.legend(lines[0] + more[0], lines[1] + more[1], loc="upper left", fontsize=8)

    bt = section["batch"]
    xb = [p["batch"] for p in bt]
    yb = [p["ms_per_step"]["median"] for p in bt]
    ax_batch.plot(xb, yb, marker="o", label="ms / step")
    ax_batch.plot(xb, [yb[0] * b / xb[0] for b in xb], ls="--", color="grey", label="linear in batch")
    ax_batch.set(xscale="log", yscale="log", xlabel="batch size", ylabel="ms per step",
                 title=f"{bt[0]['tokens']} tokens per sample: time vs batch")  # fmt: skip
    ax_batch.set_xticks(xb, [str(b) for b in xb])
    ax_batch.legend(loc="upper left", fontsize=8)
    fig_.suptitle(section["model"], fontsize=10)
    fig_.savefig(path, dpi=110)
    return path


def write(results: dict[str, Any], json_path: Path) -> dict[str, Path]:
    """Write the markdown table (and the scaling plot) beside ``json_path``; return their paths."""
    json_path.parent.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    plot_name = None
    if "scaling" in results["sections"]:
        files["plot"] = plot_scaling(
            results["sections"]["scaling"], json_path.with_name(f"{json_path.stem}-scaling.png")
        )
        plot_name = files["plot"].name
    files["markdown"] = json_path.with_suffix(".md")
    files["markdown"].write_text(markdown(results, plot_name))
    return files
