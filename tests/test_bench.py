"""`workbench bench --quick` end to end, in-process through the CLI (issue #9).

One quick run per session; the tests read its JSON: every section is there, every figure is a sane
positive median inside its own min-max, FLOP counts and MFU are plausible, attention's share of the
FLOPs grows with the tokens per sample, wall times that were not given say so instead of being made
up, and the markdown table and the scaling plot are written beside the JSON.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from workbench.bench import SECTIONS
from workbench.bench.suites import QUICK
from workbench.bench.timing import count_flops, percentiles, stat
from workbench.cli import main
from workbench.hardware import native_bf16
from workbench.modalities import MODALITIES

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("bench") / "quick.json"
    threads = torch.get_num_threads()
    assert main(["bench", "--quick", "--out", str(out), "--pipeline-seconds", "42.5"]) == 0
    assert torch.get_num_threads() == threads, "the benchmark must restore the process's thread count"
    return out, json.loads(out.read_text())


def _stats(node, path=""):
    """Every {median, min, max} figure in the results, with where it is."""
    if isinstance(node, dict):
        if {"median", "min", "max"} <= node.keys():
            yield path, node
        for k, v in node.items():
            yield from _stats(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _stats(v, f"{path}[{i}]")


def test_every_section_is_there(run):
    _, r = run
    assert list(r["sections"]) == list(SECTIONS)
    assert r["mode"] == "quick" and r["seconds"] > 0
    for name, section in r["sections"].items():
        assert "skipped" not in section, f"{name} was skipped: {section.get('skipped')}"
        assert section["seconds"] >= 0
    assert r["machine"]["native_bf16"] == native_bf16()
    assert r["threads"]["chosen"] >= 1


def test_every_figure_is_a_positive_median_within_min_and_max(run):
    _, r = run
    figures = list(_stats(r["sections"]))
    assert len(figures) > 30
    for path, s in figures:
        assert all(math.isfinite(s[k]) and s[k] > 0 for k in ("median", "min", "max")), path
        assert s["min"] <= s["median"] <= s["max"], path
        assert s.get("n", 1) >= 1, path


def test_roof_training_and_mfu_are_plausible(run):
    _, r = run
    s = r["sections"]
    assert s["roof"]["fp32_roof_gflops"] >= s["roof"]["fp32_gflops"]["median"] > 1
    assert s["roof"]["bf16_native"] == native_bf16()
    for stage in (1, 2, 3):
        st = s["training"][f"stage{stage}"]
        assert st["gflop_per_step"] > 0
        assert 0 < st["attention_flop_share"] < 1
        assert 0 < st["mfu"]["median"] < 2  # a noisy roof can be beaten a little, never by 2x
        assert st["samples_per_s"]["median"] == pytest.approx(
            QUICK.batch / st["seconds_per_step"]["median"], rel=5e-3
        )


def test_peers_ran_on_identical_shapes(run):
    _, r = run
    p = r["sections"]["peers"]
    assert p["hf_attn_implementation"] == "sdpa"
    rows = p["candidates"]
    # same depth, width, heads and MLP: the same FLOPs (ViT splits q/k/v projections, same count)
    assert rows["hf_vit_sdpa"]["gflop"] == pytest.approx(rows["ours_f_blocks"]["gflop"], rel=1e-6)
    assert rows["torch_transformer_encoder"]["gflop"] == pytest.approx(
        rows["ours_f_blocks"]["gflop"], rel=1e-6
    )
    assert rows["torch_transformer_encoder"]["parameters"] == rows["ours_f_blocks"]["parameters"]
    assert p["time_ratio_vs_hf_vit"] > 0 and p["time_ratio_vs_torch_encoder"] > 0


def test_precision_inference_and_app(run):
    _, r = run
    s = r["sections"]
    pr = s["precision"]
    assert pr["bf16_speedup"] > 0
    for k in ("fp32", "bf16"):
        assert 0 <= pr["accuracy"][k]["accuracy"] <= 1 and pr["accuracy"][k]["test_samples"] > 0
    assert set(s["inference"]["modalities"]) == set(MODALITIES)
    for row in s["inference"]["modalities"].values():
        for lat in (row["latency_ms"], row["latency_ms_capture"]):
            assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"]
            assert lat["n"] == QUICK.latency_samples
        assert row["capture_cost"] > 0
    app = s["app"]
    assert set(app["clients"]) == {"1", "8"}
    for n, row in app["clients"].items():
        names = ["trivial image", "predict image", "trivial text", "predict text"]
        names += ["attention image", "cross_attention image+text"] if n == "1" else []
        for name in names:
            assert row[name]["p50"] > 0
        assert row["requests_per_s"] > 0
    goals = {t["target"]: t for t in r["targets"]}
    for name in ("app predict round trip - trivial app's (1 client)", "app attention p95 (1 client)",
                 "app cross_attention p95 (1 client)"):  # fmt: skip
        assert goals[name]["value"] is not None and isinstance(goals[name]["met"], bool)


def test_attention_share_grows_with_tokens(run):
    _, r = run
    sc = r["sections"]["scaling"]
    assert [p["tokens"] for p in sc["tokens"]] == list(QUICK.scale_tokens)
    shares = [p["attention_flop_share"] for p in sc["tokens"]]
    assert shares == sorted(shares) and shares[0] < shares[-1]
    assert len({p["attention_flop_share"] for p in sc["batch"]}) == 1  # batch does not change the mix


def test_wall_times_are_recorded_or_said_missing(run):
    out, r = run
    w = r["sections"]["walltime"]
    assert w["quick_pipeline_s"] == {"seconds": 42.5, "source": "--pipeline-seconds"}
    assert w["make_test_s"]["seconds"] is None
    assert "not measured in this run" in out.with_suffix(".md").read_text()


def test_table_and_plot_are_written_beside_the_json(run):
    out, r = run
    md = out.with_suffix(".md").read_text()
    for heading in ("Targets", "1. Roof", "2. Training", "3. Peers", "4. bf16", "5. Inference", "6. App",
                    "7. Scaling", "8. Wall time", "9. Profile"):  # fmt: skip
        assert f"## {heading}" in md
    assert "| 3 |" in md  # the stage-3 row
    png = out.with_name(f"{out.stem}-scaling.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert r["files"]["markdown"] == str(out.with_suffix(".md"))


def test_bad_input_is_refused_before_any_work(tmp_path, capsys):
    assert main(["bench", "--quick", "--only", "nope"]) == 2
    assert "unknown section 'nope'" in capsys.readouterr().err
    assert main(["bench", "--quick", "--out", str(tmp_path / "x.txt")]) == 2
    assert not any(tmp_path.iterdir())


def test_flop_counter_counts_cpu_attention():
    B, H, N, D = 2, 3, 16, 8
    q, k, v = (torch.randn(B, H, N, D, requires_grad=True) for _ in range(3))
    fwd = count_flops(lambda: F.scaled_dot_product_attention(q, k, v))
    assert fwd["flops"] == 2 * (2 * B * H * N * N * D)  # q k^T and att v
    assert fwd["attention_share"] == 1.0
    both = count_flops(lambda: F.scaled_dot_product_attention(q, k, v).sum().backward())
    assert both["flops"] > 2 * fwd["flops"]


def test_statistics():
    s = stat([3.0, 1.0, 2.0], "s")
    assert (s["median"], s["min"], s["max"], s["n"]) == (2.0, 1.0, 3.0, 3)
    p = percentiles([float(i) for i in range(1, 101)])
    assert (p["p50"], p["p95"], p["p99"], p["max"]) == (50.5, 95.0, 99.0, 100.0)
