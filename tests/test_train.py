"""The training loop end to end on the embedded data with the `tiny` preset.

Properties: three chained stages learn (well above chance on every classification task) and write
checkpoints, metrics and the resolved config; the same seed gives the same metrics; a run stopped
after step k and resumed ends with weights identical to an uninterrupted run; two gloo processes
train in step (identical weights on both ranks) and evaluation gathers the whole split.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from workbench.config import load_config
from workbench.errors import ConfigError, WorkbenchError
from workbench.train import resolve_run, train

pytestmark = pytest.mark.slow

TINY = [
    "model.preset=tiny",
    "train.batch_size=32",
    "train.log_every=10",
    "train.warmup_steps=20",
    "train.tracker=none",
    "train.lr=1e-3",
    "data.scale=0.1",
]


def _cfg(stage: int, *overrides: str, init=None):
    return resolve_run(stage, (), [*TINY, *overrides], init=str(init) if init else None, out="unused")[0]


@pytest.fixture(scope="module")
def three_stages(tmp_path_factory):
    root = tmp_path_factory.mktemp("stages")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # exact numbers depend on the thread count; one thread is also immune to load
    r1 = train(_cfg(1, "train.steps=100"), root / "s1")
    r2 = train(_cfg(2, "train.steps=100", init=r1.checkpoint), root / "s2", init=r1.checkpoint)
    r3 = train(_cfg(3, "train.steps=600", init=r2.checkpoint), root / "s3", init=r2.checkpoint)
    torch.set_num_threads(threads)
    return r1, r2, r3


def test_three_stages_learn_and_write_everything(three_stages):
    r1, r2, r3 = three_stages
    for r in (r1, r2, r3):
        for name in ("config.json", "model.safetensors"):
            assert (r.checkpoint / name).is_file()
        assert (r.run_dir / "config.yaml").is_file() and (r.run_dir / "metrics.json").is_file()
        assert json.loads((r.run_dir / "metrics.json").read_text())["steps"] == r.steps
        assert (r.run_dir / "history.jsonl").read_text().strip()
    assert (r1.checkpoint / "tokenizer.json").is_file()
    # the saved config records the precision that ran, never "auto"
    from workbench.hardware import resolve_precision

    saved = load_config([r1.run_dir / "config.yaml"])
    assert saved.train.mixed_precision == resolve_precision("auto") in ("no", "bf16")
    assert set(r2.metrics["loaded_components"]) == {"tokenizers", "f"}  # stage 2 starts from stage 1's f
    assert set(r3.metrics["loaded_components"]) == {"tokenizers", "f", "A", "g"}  # decoders are discarded
    # stage 1/2 report masked-prediction loss per modality
    assert set(r1.metrics["val"]) == {"image", "audio", "text", "video"}
    test = r3.metrics["test"]
    margins = {}
    for key, row in test.items():
        if "accuracy" in row:
            margins[key] = row["accuracy"] - 1 / len(row["confusion"])  # above chance
        else:  # denoise: the head must restore more than it damages
            assert row["psnr"] > row["psnr_input"], (key, row)
    # ~800 tiny updates (600 in stage 3) learn, but not every task yet: text/digit on unseen templates
    # stays near chance (the open recipe work of the Training issue). Measured at seed 0 (one thread):
    # margins over chance 0.03-0.26, mean 0.128. So: all but two tasks clearly above chance, none below
    # it, and well above it on average.
    assert sum(m > 0.05 for m in margins.values()) >= len(margins) - 2, margins
    assert all(m > -0.02 for m in margins.values()), margins
    assert sum(margins.values()) / len(margins) > 0.08, margins


def test_target_table_reads_every_target_from_real_stage3_metrics(three_stages):
    from workbench.evaluate import TARGETS, target_table

    test = three_stages[2].metrics["test"]
    assert set(TARGETS) <= set(test)  # every target names a task the default run evaluates
    rows = {row[0]: row for row in target_table(test)["rows"]}
    assert list(rows) == list(TARGETS)
    gain = test["image/denoise"]["psnr"] - test["image/denoise"]["psnr_input"]
    assert rows["image/denoise"][3] == pytest.approx(gain)
    assert rows["text/digit"][3] == pytest.approx(test["text/digit"]["accuracy"])
    for task, _metric, target, value, met in rows.values():
        assert met is (value >= target), task
    # exactly at the target meets it; a task not evaluated is reported as such, not as missed
    at = {k: dict(v) for k, v in test.items()} | {"audio/digit": {**test["audio/digit"], "accuracy": 0.95}}
    del at["video/motion"]
    rows = {row[0]: row for row in target_table(at)["rows"]}
    assert rows["audio/digit"][4] is True and rows["video/motion"][3:] == [None, None]


def test_stage3_logs_task_losses_and_weights(three_stages):
    history = [
        json.loads(line) for line in (three_stages[2].run_dir / "history.jsonl").read_text().splitlines()
    ]
    keys = set().union(*history)
    assert any(k.startswith("weight/") for k in keys) and any(k.startswith("loss/") for k in keys)
    weights = [r[k] for r in history for k in r if k.startswith("weight/")]
    assert any(abs(w - 1.0) > 1e-6 for w in weights)  # DWA moved the weights off 1
    # every record has the mean gradient norm before clipping and the share of clipped updates
    assert all(0 < r["grad_norm"] < float("inf") and 0 <= r["clipped"] <= 1 for r in history)


def test_tasks_sharing_inputs_are_evaluated_in_one_pass_with_the_same_metrics(three_stages):
    """audio/digit and audio/language read one table of clips: evaluation runs g(f(x)) once for both
    heads. Every task's metrics must equal those of evaluating it alone."""
    from workbench.data import load_benchmark
    from workbench.evaluate import evaluate, shared_input_groups
    from workbench.model.omnivec2 import OmniVec2

    r3 = three_stages[2]
    cfg = load_config([r3.run_dir / "config.yaml"])
    model = OmniVec2.from_pretrained(r3.checkpoint)
    bench = load_benchmark(cfg.data, seed=cfg.seed)
    groups = [[s.key for s in g] for g in shared_input_groups(bench, bench.tasks, "val")]
    assert ["audio/digit", "audio/language"] in groups and ["video/digit", "video/motion"] in groups
    assert ["image/denoise"] in groups  # corrupted images: not the inputs of image/digit
    calls = []
    forward = model.forward_single
    model.forward_single = lambda batch, tasks=None: calls.append(batch.modality) or forward(batch, tasks)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the fixture trained and evaluated
    together = evaluate(model, bench, "val")
    passes = len(calls)
    alone = {}
    for spec in bench.tasks:
        alone |= evaluate(model, bench, "val", tasks=[spec])
    torch.set_num_threads(threads)
    assert together == alone and list(together) == [s.key for s in bench.tasks]
    assert passes < len(calls) - passes  # fewer forwards than one pass per task
    assert together == r3.metrics["val"]  # what the run reported


def test_stage2_is_evaluated_through_the_path_it_trained(three_stages):
    """Stage 2 trains decoders2 behind f, A, g; its validation loss must come from there, not from the
    stage-1 decoders (fresh and untrained in a stage-2 run)."""
    from workbench.data import load_benchmark
    from workbench.evaluate import evaluate_masked
    from workbench.model.omnivec2 import OmniVec2

    r2 = three_stages[1]
    cfg = load_config([r2.run_dir / "config.yaml"])
    model = OmniVec2.from_pretrained(r2.checkpoint)
    bench = load_benchmark(cfg.data, seed=cfg.seed)
    before = evaluate_masked(model, bench, "val", cfg)
    assert {m: v["masked_loss"] for m, v in before.items()} == pytest.approx(
        {m: v["masked_loss"] for m, v in r2.metrics["val"].items()}, rel=1e-4
    )  # what the run reported is this evaluation
    with torch.no_grad():
        for p in model.decoders1.parameters():
            p.zero_()
    assert evaluate_masked(model, bench, "val", cfg) == before  # decoders1 play no part
    with torch.no_grad():
        for p in model.decoders2.parameters():
            p.zero_()
    after = evaluate_masked(model, bench, "val", cfg)
    assert all(after[m]["masked_loss"] != before[m]["masked_loss"] for m in before)


def _weights(run_dir):
    return load_file(str(run_dir / "checkpoint" / "model.safetensors"))


def _validation_records(run, steps: list[int], metric: str) -> None:
    """``train.eval_every`` wrote ``val/<key>/<metric>`` records at exactly ``steps``, one per evaluated
    key of the run's own end-of-run validation, and left the training records as they were."""
    records = [json.loads(line) for line in (run.run_dir / "history.jsonl").read_text().splitlines()]
    val = [r for r in records if any(k.startswith("val/") for k in r)]
    assert [r["step"] for r in val] == steps  # not at the last step: that one is metrics.json
    for r in val:
        logged = {k[len("val/") : -len(f"/{metric}")] for k in r if k.endswith(f"/{metric}")}
        assert logged == {k for k, row in run.metrics["val"].items() if metric in row}
        assert all(0 <= r[k] <= 1 for k in r if k.endswith("/accuracy"))
    assert all("lr" not in r for r in val) and any("lr" in r for r in records)


@pytest.mark.parametrize(
    "options",
    [(), ("train.single_stream=0", "train.layer_decay=0.75"), ("train.ema_decay=0.9",)],
    ids=["default", "pairs_layer_decay", "ema"],
)
def test_same_seed_same_result_and_resume_equals_uninterrupted(tmp_path, options):
    cfg = _cfg(3, "train.steps=12", "train.checkpoint_every=4", "train.balance_window=3", *options)
    full = train(cfg, tmp_path / "full")
    if not options:  # same seed, same result: once is enough (a whole extra run); resume is per option
        # ... also with mid-run validation, which must not change the training (eval mode, RNG draws)
        watched = _cfg(3, "train.steps=12", "train.checkpoint_every=4", "train.balance_window=3",
                       "train.eval_every=5")  # fmt: skip
        again = train(watched, tmp_path / "again")
        assert full.metrics["test"] == again.metrics["test"]
        a, b = _weights(full.run_dir), _weights(again.run_dir)
        assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
        _validation_records(again, [5, 10], "accuracy")

    assert train(cfg, tmp_path / "resumed", stop_after=6) is None  # interrupted after update 6
    assert not (tmp_path / "resumed" / "checkpoint").exists()
    resumed = train(cfg, tmp_path / "resumed", resume=True)
    assert resumed.steps == 12
    a, b = _weights(full.run_dir), _weights(resumed.run_dir)
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] == b[k]).all(), k
    if "train.ema_decay=0.9" in options:  # the checkpoint is the average, not the last update's weights
        raw = load_file(str(full.run_dir / "state" / "12" / "model.safetensors"))
        assert sum(not torch.equal(a[k], raw["model." + k]) for k in a if "model." + k in raw) > len(a) // 2


def test_mid_run_validation_of_a_pretraining_stage(tmp_path):
    """Stage 1/2 validate their masked-prediction loss mid-run, as at the end, and train as without it
    (stage 3's case is in the same-seed test above)."""
    plain = train(_cfg(1, "train.steps=8"), tmp_path / "plain")
    watched = train(_cfg(1, "train.steps=8", "train.eval_every=3"), tmp_path / "watched")
    a, b = _weights(plain.run_dir), _weights(watched.run_dir)
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert plain.metrics["val"] == watched.metrics["val"]
    _validation_records(watched, [3, 6], "masked_loss")


def test_stage3_reads_text_in_larger_batches_by_default(tmp_path):
    """``train.batch_scale`` left unset is the stage's default: text x3 in stage 3, nothing scaled in
    stages 1 and 2; the loop feeds each stream its own batch size (counted in the process record)."""
    from workbench.modalities import default_tasks
    from workbench.model import build_model
    from workbench.train.objectives import MultitaskSupervised

    assert _cfg(1).train.batch_scale == _cfg(2).train.batch_scale == {}
    cfg = _cfg(3, "train.steps=8")
    assert cfg.train.batch_scale == {"text": 3.0}
    run = train(cfg, tmp_path / "run")
    trained = json.loads((run.run_dir / "processes" / "0.json").read_text())["samples"]
    tasks = default_tasks()
    plan = MultitaskSupervised(build_model(cfg, tasks), cfg, tasks).plan
    drawn = [key for step in range(8) for key in plan(step)]
    assert any(k.startswith("text/") for k in drawn)
    assert trained == sum(48 if k.startswith("text/") else 16 for k in drawn)


def test_resume_without_state_is_a_clear_error(tmp_path):
    with pytest.raises(Exception, match=r"no config\.json|does not exist"):
        resolve_run(3, (), TINY, out=str(tmp_path / "nothing"), resume=True)


def test_pretraining_stages_start_without_torchmetrics():
    """Stages 1 and 2 score masked-prediction loss only: a process that trains them never imports
    torchmetrics (whose package root imports scipy.signal and transformers, ~5 s of every start)."""
    probe = ("import sys; from workbench import cli; from workbench.train import loop; "
             "from workbench.evaluate import evaluate_masked; print(sorted(m for m in sys.modules "
             "if m.split('.')[0] in ('torchmetrics', 'transformers', 'scipy')))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_two_process_launch(tmp_path):
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    run = tmp_path / "ddp"
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "workbench.cli", "train", "--stage", "3",
           "--out", str(run), *TINY, "train.steps=6", "train.batch_size=16"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    ranks = [json.loads((run / "processes" / f"{r}.json").read_text()) for r in (0, 1)]
    assert {r["world_size"] for r in ranks} == {2}
    assert all(r["steps"] == 6 and r["samples"] > 0 for r in ranks)
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]  # gradients were all-reduced
    metrics = json.loads((run / "metrics.json").read_text())
    from workbench.data import load_benchmark

    bench = load_benchmark(load_config(overrides=TINY).data, seed=0)
    for key, row in metrics["test"].items():  # gather_for_metrics saw the whole split, no duplicates
        modality, task = key.split("/")
        assert row["n"] == len(bench.dataset(modality, task, "test")), key


def test_evaluate_by_template_splits_each_text_total_into_its_phrasings(three_stages, tmp_path, capsys):
    """``workbench evaluate --by template``: per held-out phrasing, and the parts add up to the total."""
    from workbench.cli import main
    from workbench.data.phrases import split_templates

    ckpt = tmp_path / "checkpoint"
    shutil.copytree(three_stages[2].checkpoint, ckpt)  # evaluate writes metrics.json beside the weights
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the fixture trained and evaluated
    try:
        code = main(["evaluate", "--checkpoint", str(ckpt), "--split", "val", "--by", "template",
                     "--targets", "--json", str(tmp_path / "m.json")])  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    metrics = json.loads((tmp_path / "m.json").read_text())
    seed = load_config([three_stages[2].run_dir / "config.yaml"]).seed
    for key in ("text/digit", "text/language"):
        row, groups = metrics[key], metrics[key]["by_template"]
        assert sorted(groups) == sorted(split_templates(seed)["val"])  # the held-out phrasings, by name
        assert sum(g["n"] for g in groups.values()) == row["n"]
        total = sum(g["accuracy"] * g["n"] for g in groups.values()) / row["n"]
        assert abs(total - row["accuracy"]) < 1e-6  # torchmetrics' total, recounted per phrasing
    assert all("by_template" not in metrics[k] for k in metrics if not k.startswith("text/"))
    printed = capsys.readouterr().out
    assert all(name in printed for name in metrics["text/digit"]["by_template"])  # under its task's line
    from workbench.evaluate import TARGETS, target_table

    verdicts = {row[0]: row[4] for row in target_table(metrics)["rows"]}  # --targets: one line per target
    lines = printed.split("targets of the Training issue")[1].splitlines()[1:]
    assert [line.split()[0] for line in lines] == list(TARGETS)
    assert [line.split()[-1] for line in lines] == ["met" if verdicts[k] else "missed" for k in TARGETS]
    assert main(["evaluate", "--checkpoint", str(ckpt), "--by", "colour"]) == 2
    assert "no task of this benchmark has a column 'colour'" in capsys.readouterr().err


def test_evaluate_by_voice_names_the_held_out_variants(three_stages):
    """``--by voice``: audio accuracy per eSpeak variant, named, the test split's variants only."""
    from workbench.data import load_benchmark
    from workbench.data.digits import split_voices
    from workbench.evaluate import accuracy_by
    from workbench.inference import Predictor

    cfg = load_config([three_stages[2].run_dir / "config.yaml"])
    model = Predictor.from_checkpoint(three_stages[2].checkpoint).model
    groups = accuracy_by(model, load_benchmark(cfg.data, seed=cfg.seed), "voice", "test")
    assert set(groups) == {"audio/digit", "audio/language"}  # the only tables with the column
    for key, rows in groups.items():
        assert sorted(rows) == sorted(split_voices(cfg.seed, cfg.data.scale)["test"]), key
        assert all(0.0 <= r["accuracy"] <= 1.0 and r["n"] > 0 for r in rows.values())


def test_weight_average_follows_the_warmed_up_decay(tmp_path):
    """``train.ema_decay``'s average: a copy at the first update, then the lerp with decay
    min(d, (1 + n) / (10 + n)); saved and loaded with its update count; the live weights untouched."""
    from workbench.train.averaging import WeightAverage

    net = torch.nn.Linear(3, 2)
    ema = WeightAverage(net, 0.5)
    expect = None
    for n in range(6):
        with torch.no_grad():
            net.weight.add_(float(n + 1))  # the optimiser's update n
        w = net.weight.detach().clone()
        d = min(0.5, (1 + n) / (10 + n))  # n = updates averaged before this one
        expect = w if expect is None else d * expect + (1 - d) * w
        ema.update(net)
        assert torch.allclose(ema.module.weight, expect), n
    assert ema.updates == 6 and not ema.module.weight.requires_grad
    assert not torch.equal(ema.module.weight, net.weight)  # the average trails the live weights
    other = WeightAverage(torch.nn.Linear(3, 2), 0.5)
    ema.save(tmp_path)
    other.load(tmp_path)
    assert other.updates == 6 and torch.equal(other.module.weight, ema.module.weight)


def test_resume_with_an_average_the_state_lacks_is_a_clear_error(tmp_path):
    assert train(_cfg(1, "train.steps=3"), tmp_path / "run", stop_after=1) is None
    with pytest.raises(WorkbenchError, match="holds no weight average"):
        train(_cfg(1, "train.steps=3", "train.ema_decay=0.99"), tmp_path / "run", resume=True)
    with pytest.raises(ConfigError, match=r"train.ema_decay=1.0 is outside"):
        _cfg(1, "train.ema_decay=1.0")
