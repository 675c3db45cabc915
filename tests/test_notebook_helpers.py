"""workbench.notebook (parameter validation, figures, summary) and notebook stripping, without a kernel."""

from __future__ import annotations

import json
import subprocess
import sys

import nbformat
import numpy as np
import pytest
import torch

from workbench import notebook as wn
from workbench.errors import CheckpointError, ConfigError
from workbench.report.index import render_index
from workbench.report.strip import strip_outputs

# ------------------------------------------------------------------------------------------ setup()


@pytest.mark.parametrize(
    ("params", "closest"),
    [
        ({"stpes": 3}, "'steps'"),
        ({"model_preset": "tiny"}, "'model.preset'"),
        ({"init_chekpoint": ""}, "'init_checkpoint'"),
        ({"train.setps": 3}, "'train.steps'"),
    ],
)
def test_setup_rejects_unknown_parameter_naming_closest_key(params, closest):
    with pytest.raises(ConfigError, match=f"unknown notebook parameter .*closest valid key is {closest}"):
        wn.setup(params)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"steps": "many"}, "'train.steps'"),
        ({"preset": "tinny"}, "did you mean 'tiny'"),
        ({"seeds": ["a"]}, "seeds=\\['a'\\] must be a list of int"),
        ({"seeds": []}, "empty"),
        ({"overrides": "train.lr=0.1"}, "must be a list of str"),
        ({"overrides": ["train.lrr=0.1"]}, "closest valid key is 'train.lr'"),
        ({"profile": "quik"}, "did you mean 'quick'"),
        ({"adapt_datasets": [["fsd", "x"]]}, "names 'fsd'; the kinds are \\['fsdd', 'idx', 'uci-digits'\\]"),
        ({"adapt_datasets": ["fsdd", "x"]}, "must be a list of \\[kind, directory\\] pairs"),
        ({"adapt_seeds": []}, "adapt_seeds=\\[\\] is empty"),
        ({"adapt_epochs": 0}, "adapt_epochs=0 must be a whole number >= 1"),
    ],
)
def test_setup_rejects_ill_typed_parameters(params, message):
    with pytest.raises(ConfigError, match=message):
        wn.setup(params)


def test_setup_maps_parameters_onto_the_config(tmp_path):
    out = tmp_path / "out" / "nb"
    cfg = wn.setup(
        {
            "profile": "tiny",
            "seeds": [7, 8],
            "steps": 5,
            "preset": "tiny",
            "output_dir": str(out),
            "overrides": ["train.lr=0.01", "model.preset=tiny"],
            "train.batch_size": 4,
            "init_checkpoint": "",
            "lr": None,  # None keeps the config default
        }
    )
    assert (cfg.seed, cfg.train.steps, cfg.model.preset, cfg.train.lr, cfg.train.batch_size) == (
        7,
        5,
        "tiny",
        0.01,
        4,
    )
    assert cfg.model.dim == 32  # the preset was applied underneath
    assert out.is_dir()
    first = torch.rand(3)
    wn.setup({"seed": 7})
    assert torch.equal(torch.rand(3), first)  # seeded the same way

    import plotly.io as pio

    assert pio.renderers.default == wn.PLOTLY_RENDERER


def test_a_stage_notebook_resolves_the_defaults_of_its_own_stage(tmp_path):
    """Stage notebooks pass their stage to setup: steps and lr left at their defaults must be that
    stage's (as `workbench train --stage N`), not stage 3's carried over by stage_config."""
    from workbench.config import STAGE_LR, STAGE_STEPS

    for stage in (1, 2, 3):
        cfg = wn.stage_config(wn.setup({"preset": "tiny", "output_dir": str(tmp_path)}, stage=stage), stage)
        assert (cfg.train.stage, cfg.train.steps, cfg.train.lr) == (
            stage,
            STAGE_STEPS[stage],
            STAGE_LR[stage],
        )
    cfg = wn.setup({"preset": "tiny", "output_dir": str(tmp_path), "overrides": ["train.lr=1e-3"]}, stage=1)
    assert cfg.train.lr == 1e-3  # explicit values still win


def test_stage_config_takes_the_network_from_the_checkpoint_and_the_overrides_on_top(tmp_path):
    """With an upstream checkpoint the model section is the checkpoint's (its widths), and the notebook's
    overrides still apply over it, as over `workbench train --init`: a training-time model setting is
    not silently replaced by the checkpoint's value."""
    from workbench.config import load_config, save_config

    save_config(load_config(overrides=["model.preset=tiny", "model.depth_f=2"]), tmp_path / "ckpt")
    overrides = ["model.spec_warp=0.2", "train.steps=7"]
    params = {"preset": "small", "output_dir": str(tmp_path), "overrides": overrides}
    cfg = wn.stage_config(wn.setup(params, stage=3), 3, tmp_path / "ckpt", overrides)
    assert (cfg.model.preset, cfg.model.dim, cfg.model.depth_f) == ("tiny", 32, 2)  # the checkpoint's network
    assert cfg.model.spec_warp == 0.2 and cfg.train.steps == 7  # and the notebook's overrides
    assert wn.stage_config(wn.setup(params, stage=3), 3, tmp_path / "ckpt").model.spec_warp == 0.0


def test_setup_checks_checkpoint_directories(tmp_path):
    with pytest.raises(CheckpointError, match="init_checkpoint"):
        wn.setup({"init_checkpoint": str(tmp_path / "nope")})
    assert wn.setup({"checkpoint": str(tmp_path)}).seed == 0


# ----------------------------------------------------------------------------------------- figures
def _history(path, steps=(10, 20, 30), partial_last=False):
    lines = [
        json.dumps(
            {
                "step": s,
                "lr": 1e-3,
                "samples_per_s": 150.2,
                "loss/image/digit": 1.0 / s,
                "loss/audio/language": 2.0 / s,
                "weight/image/digit": 1.0 + s / 100,
            }
        )
        for s in steps
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + ('\n{"step": 4' if partial_last else "\n"))
    return path


def test_loss_curves_and_task_weights(tmp_path):
    path = _history(tmp_path / "run" / "history.jsonl", partial_last=True)
    fig = wn.loss_curves(path)
    assert sorted(t.name for t in fig.data) == ["audio/language", "image/digit"]
    digit = next(t for t in fig.data if t.name == "image/digit")
    assert list(digit.x) == [10, 20, 30] and digit.y[0] == pytest.approx(0.1)
    assert fig.layout.yaxis.type == "log"
    weights = wn.task_weights(tmp_path / "run")  # a run directory works too
    assert [t.name for t in weights.data] == ["image/digit"] and weights.data[0].y[-1] == pytest.approx(1.3)


def test_loss_curves_label_runs(tmp_path):
    paths = [_history(tmp_path / f"seed{i}" / "run" / "history.jsonl") for i in range(2)]
    names = sorted(t.name for t in wn.loss_curves(paths).data)
    assert names == [
        "audio/language (seed0/run)",
        "audio/language (seed1/run)",
        "image/digit (seed0/run)",
        "image/digit (seed1/run)",
    ]
    assert len(wn.loss_curves({"a": paths[0], "b": wn.read_history(paths[1])}).data) == 4


def test_read_history_rejects_corruption_in_the_middle(tmp_path):
    path = tmp_path / "history.jsonl"
    path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match="line 2"):
        wn.read_history(path)


METRICS = {
    "image/digit": {"accuracy": 0.98, "macro_f1": 0.97, "n": 500, "confusion": [[1, 0], [0, 1]]},
    "audio/digit": {"accuracy": 0.91, "macro_f1": 0.90, "n": 300},
    "image/denoise": {"psnr": 21.3, "psnr_input": 12.0, "n": 500},
}


def test_metric_bars_one_panel_per_metric():
    fig = wn.metric_bars(METRICS)
    assert [a.text for a in fig.layout.annotations] == ["accuracy", "macro_f1", "psnr"]
    by_name = {(t.name, t.xaxis): t for t in fig.data}
    assert list(by_name[("accuracy", "x")].x) == ["image/digit", "audio/digit"]
    assert list(by_name[("psnr", "x3")].y) == [21.3] and list(by_name[("psnr_input", "x3")].y) == [12.0]
    assert not any(t.name in ("n", "confusion") for t in fig.data)


def test_confusion_matrix_and_attention_heatmap():
    fig = wn.confusion_matrix([[5, 1], [0, 4]], labels=["0", "1"], title="digits")
    assert np.array_equal(np.asarray(fig.data[0].z), [[5, 1], [0, 4]]) and list(fig.data[0].x) == ["0", "1"]
    assert fig.layout.yaxis.autorange == "reversed"
    with pytest.raises(ValueError, match="labels"):
        wn.confusion_matrix([[1, 2], [3, 4]], labels=["a"])
    attn = torch.softmax(torch.randn(3, 5), dim=-1)
    fig = wn.attention_heatmap(attn, x_labels=list("abcde"), y_labels=["q0", "q1", "q2"])
    assert np.asarray(fig.data[0].z).shape == (3, 5) and "query %{y}" in fig.data[0].hovertemplate
    with pytest.raises(ValueError, match="2-D"):
        wn.attention_heatmap(torch.rand(2, 3, 5))


@pytest.mark.parametrize("shape", [(5, 8, 8), (5, 1, 8, 8), (5, 8, 8, 3)])
def test_image_grid(tmp_path, shape):
    fig = wn.image_grid(np.random.rand(*shape), titles=list("abcde"), ncols=3)
    shown = [ax for ax in fig.axes if ax.images]
    assert len(shown) == 5 and len(fig.axes) == 6 and shown[0].get_title() == "a"
    fig.savefig(tmp_path / "grid.png")
    assert (tmp_path / "grid.png").read_bytes()[:4] == b"\x89PNG"


# -------------------------------------------------------------------------------- summary & seeds
def test_write_summary_merges_and_converts(tmp_path):
    wn.write_summary(tmp_path, headline={"acc": np.float32(0.5), "bad": float("nan")})
    wn.write_summary(
        tmp_path,
        headline={"acc": torch.tensor(0.75), "steps": 10},
        tables={"T": [{"row": "a", "image": 1.0}, {"row": "b", "video": 2}]},
    )
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["headline"] == {"acc": 0.75, "bad": None, "steps": 10}
    assert summary["tables"]["T"] == {
        "columns": ["row", "image", "video"],
        "rows": [["a", 1.0, None], ["b", None, 2]],
    }
    with pytest.raises(ValueError, match="2 cells for 3 columns"):
        wn.write_summary(tmp_path, tables={"U": {"columns": ["a", "b", "c"], "rows": [[1, 2]]}})


def test_mean_spread():
    assert wn.mean_spread([0.8, 0.9, 1.0]) == pytest.approx((0.9, 0.1))
    assert wn.mean_spread([0.5]) == (0.5, 0.0)
    assert wn.format_mean_spread([0.8, 0.9, 1.0], scale=100) == "90.0 ± 10.0"
    assert wn.format_mean_spread([0.853], scale=100, digits=1) == "85.3"


# ------------------------------------------------------------------------------- strip and index
def test_strip_outputs(tmp_path):
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell("steps = 1")
    params.metadata["tags"] = ["parameters"]
    injected = nbformat.v4.new_code_cell("steps = 2")
    injected.metadata["tags"] = ["injected-parameters"]
    ran = nbformat.v4.new_code_cell("print(steps)", execution_count=3)
    ran.outputs = [nbformat.v4.new_output("stream", text="2\n")]
    ran.metadata["papermill"] = {"duration": 0.1}
    nb.cells = [params, injected, ran]
    nb.metadata["papermill"] = {"parameters": {"steps": 2}}
    path = tmp_path / "n.ipynb"
    nbformat.write(nb, path)

    assert strip_outputs(path, check=True) and nbformat.read(path, as_version=4).cells[2].outputs
    assert strip_outputs(path)
    clean = nbformat.read(path, as_version=4)
    assert [c.source for c in clean.cells] == ["steps = 1", "print(steps)"]
    assert clean.cells[1].outputs == [] and clean.cells[1].execution_count is None
    assert clean.cells[0].metadata.tags == ["parameters"] and "papermill" not in clean.metadata
    assert clean.metadata.kernelspec.name == "workbench"
    assert not strip_outputs(path)  # idempotent


def test_index_escapes_and_renders_without_summaries():
    data = {
        "run": "r<1>",
        "profile": "quick",
        "started": "2026-01-01T00:00:00+00:00",
        "seconds": 75.0,
        "machine": {"cpu_count": 2, "cpus_usable": 2, "torch": "2.13.0"},
        "notebooks": [
            {
                "name": "13_table12",
                "title": "<script>",
                "status": "missing",
                "reason": "",
                "seconds": 0,
                "html": "",
                "summary": {},
            },
        ],
    }
    html = render_index(data)
    assert "r&lt;1&gt;" in html and "&lt;script&gt;" in html and "<script>" not in html
    assert "No Table 12 in this run (13_table12 is missing)" in html and "1 min 15 s" in html


def test_strip_check_mode_exit_code(tmp_path):
    from workbench.report.strip import main as strip_main

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("1", execution_count=1)]
    nbformat.write(nb, tmp_path / "x.ipynb")
    assert strip_main(["--check", str(tmp_path / "x.ipynb")]) == 1
    assert strip_main([str(tmp_path / "x.ipynb")]) == 0
    assert strip_main(["--check", str(tmp_path / "x.ipynb")]) == 0


def test_a_kernel_importing_the_helpers_skips_jsonschemas_iri_grammar_and_still_validates(repo):
    """workbench/startup.py: a process that imports workbench.notebook (every notebook kernel) or the
    pipeline never builds rfc3987_syntax's grammar (5 s per process on a slow CPU), and nbformat still
    validates. Run in a fresh interpreter: this test process imported jsonschema long ago."""
    code = (
        "import sys, json\n"
        "import workbench.notebook\n"
        "import plotly.io as pio\n"
        "pio.renderers.default\n"  # the renderers module imports nbformat, which imports jsonschema
        "import nbformat, jsonschema\n"
        "nb = nbformat.read(sys.argv[1], as_version=4)\n"
        "nbformat.validate(nb)\n"
        "checker = jsonschema.FormatChecker()\n"
        "bad = not checker.conforms('not an email', 'email')\n"
        "print(json.dumps({'skipped': 'rfc3987_syntax' in sys.modules and sys.modules['rfc3987_syntax'] is None,"
        " 'jsonschema': 'jsonschema' in sys.modules, 'email_checked': bad}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(repo / "notebooks" / "00_data_tour.ipynb")],
        capture_output=True, text=True, check=True, timeout=120,
    ).stdout  # fmt: skip
    assert json.loads(out.strip().splitlines()[-1]) == {
        "skipped": True,
        "jsonschema": True,
        "email_checked": True,
    }
