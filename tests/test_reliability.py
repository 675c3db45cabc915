"""Reliability and safety (issue #10): a crash loses no training, bad inputs get one clear error, the app
holds under concurrent load, and nothing unsafe is loaded or exposed.

- Crash and resume: `workbench train` killed with SIGKILL at a seeded-random checkpoint resumes with
  `--resume` to weights bit-identical to an uninterrupted run; a save interrupted half-way (the real
  save code, stopped inside Accelerate's write) never becomes the "latest" state; a NaN loss stops the
  run with one line naming step, stage and stream, and keeps the last good state.
- Bad-input corpus: one table of malformed media, config files and command-line values, each with the
  message it must produce, through `workbench predict` / `workbench train` / `workbench app` (in-process
  `main()` for every case, one through a real subprocess) and every app endpoint through gradio_client
  (a `gr.Error` reaches the client; the next good request is still answered).
- Load: 16 gradio_client clients x 25 `/predict` calls on loopback; every answer arrives and matches the
  single-client answer for its medium; p50/p95 are printed.
- Safety: loopback and no share link by default; uploads capped by config; the app never reads a file
  the client did not upload; no pickle loading, no eval/exec in the source; a pickle planted in a resume
  state is not executed; every notebook parameter goes through the typed config.
"""

from __future__ import annotations

import ast
import io
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image
from safetensors.torch import load_file

from workbench import explore
from workbench.cli import main
from workbench.config import from_dict, read_saved_config
from workbench.data import load_benchmark
from workbench.errors import WorkbenchError
from workbench.hardware import torch_threads
from workbench.train import latest_state, resolve_run, train

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402
from test_app import _free_port, _load_app  # noqa: E402  (tests/ is on sys.path: pytest's rootdir-relative import)

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SEED = 10  # picks the step the training run is killed at
TINY = ["model.preset=tiny", "data.scale=0.1", "train.batch_size=32", "train.warmup_steps=5",
        "train.log_every=10", "train.tracker=none"]  # fmt: skip
CRASH_RUN = [*TINY, "train.steps=16", "train.checkpoint_every=2"]  # stage 1: ~0.1 s per update
ENV_1_THREAD = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
# Float reduction order depends on torch's thread count: every run compared here uses one thread
# (in-process: torch_threads(1); subprocesses: OMP_NUM_THREADS=1).


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoint" / "model.safetensors"))


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} of {len(a)} tensors differ, e.g. {different[:3]}"


def _cli(argv: list[str], capsys) -> tuple[int, str]:
    """``workbench ARGV`` in-process: (exit code, stderr). argparse errors exit through SystemExit."""
    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


def _assert_one_clear_line(err: str, command: str, expect: str) -> None:
    """One ``workbench CMD: error: ...`` line, no traceback. argparse's own errors put usage lines before
    it, and name no command when the top-level parser finds the unknown argument (``workbench: error:``)."""
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith((f"workbench {command}: error: ", "workbench: error: "))]
    assert len(errors) == 1, err
    usage = [ln for ln in lines if ln not in errors]
    assert not usage or (
        usage[0].startswith("usage: workbench") and all(ln.startswith(" ") for ln in usage[1:])
    ), err
    assert len(errors[0]) < 500, errors[0]
    assert re.search(expect, errors[0]), (expect, errors[0])


# ================================================================================ 1. crash and resume
@dataclass
class Killed:
    run: Path
    kill_after: int  # the seeded-random checkpoint step
    log: Path
    state: int | None = None  # the newest complete state when the kill was sent
    returncode: int | None = None
    error: str = ""


def _kill_at_checkpoint(proc: subprocess.Popen, killed: Killed, timeout: float = 240) -> None:
    """Watch ``RUN/state`` and SIGKILL the run once a complete state at or after ``kill_after`` exists
    (older ones are pruned as it runs, so any newer one will do)."""
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            state = latest_state(killed.run) if (killed.run / "state").is_dir() else None
            if state is not None and int(state.name) >= killed.kill_after:
                killed.state = int(state.name)
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.005)
        else:
            killed.error = (
                "the run ended before the kill" if proc.poll() is not None else "no checkpoint appeared"
            )
    finally:
        if proc.poll() is None and killed.state is None:
            proc.kill()
        killed.returncode = proc.wait(timeout=60)


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory):
    """`workbench train --stage 1` in a subprocess, SIGKILLed by a watcher thread at a checkpoint. It starts
    first and runs while the in-process reference trains (the subprocess spends most of its time importing)."""
    root = tmp_path_factory.mktemp("killed")
    killed = Killed(root / "run", random.Random(SEED).randrange(4, 12, 2), root / "train.log")
    with killed.log.open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "workbench", "train", "--stage", "1", "--out",
                                 str(killed.run), *CRASH_RUN], stdout=log, stderr=subprocess.STDOUT,
                                env=ENV_1_THREAD)  # fmt: skip
    watcher = threading.Thread(target=_kill_at_checkpoint, args=(proc, killed), daemon=True)
    watcher.start()
    yield killed, watcher
    if proc.poll() is None:
        proc.kill()


@pytest.fixture(scope="module")
def reference(killed_run, tmp_path_factory) -> Path:
    """The uninterrupted stage-1 run every interrupted one must match bit for bit."""
    run = tmp_path_factory.mktemp("crash") / "reference"
    with torch_threads(1):
        train(resolve_run(1, (), CRASH_RUN, out=str(run))[0], run)
    return run


def test_sigkill_at_a_random_checkpoint_then_resume_equals_uninterrupted(killed_run, reference, capsys):
    killed, watcher = killed_run
    watcher.join(timeout=300)
    assert not killed.error, killed.error + "\n" + killed.log.read_text()[-2000:]
    assert killed.returncode == -signal.SIGKILL
    assert not (killed.run / "checkpoint").exists()  # the kill landed mid-run, before the final checkpoint
    last = latest_state(killed.run)
    assert last is not None and int(last.name) >= killed.kill_after
    print(f"SIGKILL after state {last.name} of 16 (seeded target >= {killed.kill_after})")

    with torch_threads(1):
        code, err = _cli(["train", "--stage", "1", "--out", killed.run, "--resume", *CRASH_RUN], capsys)
    assert code == 0, err
    assert json.loads((killed.run / "metrics.json").read_text())["steps"] == 16
    _assert_same_weights(_weights(reference), _weights(killed.run))
    assert not list((killed.run / "state").glob("tmp-*"))


class _KilledDuringSave(BaseException):
    """Stands in for SIGKILL inside Accelerate's save: nothing after it runs (not even except: blocks)."""


def test_a_save_interrupted_half_way_is_never_the_latest(reference, tmp_path, monkeypatch):
    """Stop the real save code of step 8 inside Accelerate's write, leaving a half-written model file,
    then resume: the last complete state (6) is picked, loads, and the run ends identical to the
    uninterrupted one."""
    from accelerate import Accelerator

    save_state = Accelerator.save_state

    def dying_save(self, output_dir=None, **kwargs):
        out = save_state(self, output_dir, **kwargs)
        if Path(output_dir).name == "tmp-8":
            weights = Path(output_dir) / "model.safetensors"
            weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
            raise _KilledDuringSave
        return out

    run = tmp_path / "run"
    cfg = resolve_run(1, (), CRASH_RUN, out=str(run))[0]
    monkeypatch.setattr(Accelerator, "save_state", dying_save)
    with torch_threads(1), pytest.raises(_KilledDuringSave):
        train(cfg, run)
    monkeypatch.undo()
    states = sorted(p.name for p in (run / "state").iterdir())
    assert states == ["4", "6", "tmp-8"], states  # keep_checkpoints=2, and the broken one under its temp name
    assert not (run / "state" / "tmp-8" / "trainer_state.json").exists()
    assert latest_state(run) == run / "state" / "6"
    with torch_threads(1):
        resumed = train(resolve_run(1, (), CRASH_RUN, out=str(run), resume=True)[0], run, resume=True)
    assert resumed.steps == 16
    _assert_same_weights(_weights(reference), _weights(run))
    assert sorted(p.name for p in (run / "state").iterdir()) == ["14", "16"]  # the temp dir was replaced
    # the resumed run replayed steps 7-8: history holds each step once, in order
    steps = [json.loads(line)["step"] for line in (run / "history.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 16, steps


def test_a_non_finite_loss_stops_naming_step_stage_and_task_and_keeps_the_last_good_state(
    reference, tmp_path, monkeypatch, capsys
):
    """Update 5 of `workbench train` yields NaN: exit 2 with one line naming the step, the stage and the
    stream; no checkpoint; state 4 is kept, and resuming from it (fault gone) matches the reference."""
    from workbench.train.objectives import OBJECTIVES

    forward, seen = OBJECTIVES[1].forward, {}

    def poisoned(self, batches, step, micro=0):
        loss, parts = forward(self, batches, step, micro)
        if step == 5:
            seen["keys"] = ", ".join(b.key for b in batches)
            loss = loss * float("nan")
        return loss, parts

    monkeypatch.setattr(OBJECTIVES[1], "forward", poisoned)
    run = tmp_path / "run"
    with torch_threads(1):
        code, err = _cli(["train", "--stage", "1", "--out", run, *CRASH_RUN], capsys)
    monkeypatch.undo()
    assert code == 2, err
    # the bar is closed before the message: its frames come first, never glued to or after the message
    bar, message = err.split("non-finite", 1)
    assert "stage 1:" not in message, err
    err = re.sub(r"\r?stage \d:\s+\d+%\|[^\]]*\]\n?", "", bar) + "non-finite" + message
    where = rf"non-finite loss \(nan\) at step 5 of stage 1 on {re.escape(seen['keys'])}; the last good state"
    _assert_one_clear_line(err, "train", where)
    assert latest_state(run) == run / "state" / "4" and not (run / "checkpoint").exists()
    with torch_threads(1):
        train(resolve_run(1, (), CRASH_RUN, out=str(run), resume=True)[0], run, resume=True)
    _assert_same_weights(_weights(reference), _weights(run))


# ============================================================================== 2. bad-input corpus
@dataclass(frozen=True)
class Case:
    """One malformed medium and the message it must produce."""

    id: str
    modality: str  # the media slot it goes into
    build: str  # a key of the bad_files fixture, or for text the text itself
    expect: str  # regex of the message every interface must give
    app_expect: str | None = None  # where the app's message differs (e.g. an empty text box = no medium)
    app: bool = True  # whether it can reach the app at all (a missing file cannot be uploaded)


NOT_GIVEN = "give at least one medium|give a medium first|no text was given"
MEDIA_CORPUS = [
    Case("png-corrupt", "image", "png-corrupt", "not a readable image"),
    Case("png-truncated", "image", "png-truncated", "truncated or corrupt"),
    Case("png-header-only", "image", "png-header-only", "not a readable image"),
    Case("jpeg-corrupt", "image", "jpeg-corrupt", "not a readable image"),
    Case("jpeg-truncated", "image", "jpeg-truncated", "truncated or corrupt"),
    Case("tiff-not-accepted", "image", "tiff", "is a TIFF image: use PNG"),
    Case("image-huge-pixels", "image", "huge-png", r"6000x5000 pixels; the limit is 25,000,000"),
    Case("image-blank", "image", "blank-png", "is blank"),
    Case("image-empty-file", "image", "empty", r"is empty \(0 bytes\)"),
    Case("image-binary-junk", "image", "junk", "not a readable image"),
    Case("wav-bytes-named-png", "image", "wav-as-png", "not a readable image"),
    Case("mp4-bytes-named-png", "image", "mp4-as-png", "not a readable image"),
    Case("image-missing-file", "image", "missing", "does not exist", app=False),
    Case("wav-corrupt", "audio", "wav-corrupt", "not a readable audio file"),
    Case("wav-truncated", "audio", "wav-truncated", "truncated: its audio data stops"),
    Case("flac-corrupt", "audio", "flac-corrupt", "not a readable audio file"),
    Case("flac-truncated", "audio", "flac-truncated", "truncated or corrupt"),
    Case("audio-silence", "audio", "silence", "silent"),
    Case("audio-nan-samples", "audio", "nan-wav", r"invalid \(NaN or infinite\) samples"),
    Case("audio-over-model-length", "audio", "long-3s", r"3\.\d+ s long; the model takes at most 2 s"),
    Case("audio-over-limit", "audio", "long-31s", r"31\.0 s long; the limit is 30 s"),
    Case("audio-binary-junk", "audio", "junk", "not a readable audio file"),
    Case("png-bytes-named-wav", "audio", "png-as-wav", "has no audio stream"),
    Case("audio-empty-file", "audio", "empty", r"is empty \(0 bytes\)"),
    Case("mp4-corrupt", "video", "mp4-corrupt", "not a readable video"),
    Case("mp4-truncated", "video", "mp4-truncated", "not a readable video"),
    Case("video-zero-frames", "video", "zero-frame-avi", "has no video frames"),
    Case("video-too-many-frames", "video", "601-frame-avi", "has 601 frames; the limit is 600"),
    Case("png-bytes-named-mp4", "video", "png-as-mp4", "piped png sequence file: use MP4"),
    Case("wav-bytes-named-mp4", "video", "wav-as-mp4", "WAV.* file: use MP4"),
    Case("video-binary-junk", "video", "junk", "not a readable video"),
    Case("text-empty", "text", "", "the text is empty", app_expect=NOT_GIVEN),  # an empty box is no medium
    Case("text-only-whitespace", "text", "  \n\t ", "the text is empty"),
    Case("text-only-control-chars", "text", "\x00\x01\x7f\u200b", "the text is empty"),
    Case("text-enormous", "text", "seven " * 20_000, r"120,000 characters long; the limit is 2,000"),
    Case("text-over-model-tokens", "text", "x " * 500, "500 tokens long; the limit is 64"),
]

NO_CKPT = "/nonexistent/checkpoint"
# appended to train commands: a case that wrongly passed validation would train for seconds, not hours
GUARD = ["model.preset=tiny", "data.scale=0.1", "train.steps=1", "train.tracker=none"]
# (id, command, the bad config file's content, regex): `workbench COMMAND --config bad.yaml`
CONFIG_CORPUS = [
    ("yaml-syntax-error", "train", "train:\n  steps: [1, 2\n", r"not valid YAML"),
    ("yaml-unknown-key", "train", "train:\n  step: 3\n", r"unknown config key 'train\.step'.*closest valid key is 'train\.steps'"),
    ("yaml-wrong-type", "train", "train:\n  batch_size: lots\n", r"bad value for 'train\.batch_size'"),
    ("yaml-bad-value", "train", "train:\n  lr: 100\n", r"train\.lr=100\.0 is outside"),
    ("yaml-bad-choice", "train", "model:\n  fusion: telepathy\n", r"model\.fusion='telepathy' is not one of"),
    ("yaml-a-list", "train", "- train.steps=3\n", r"must hold a mapping of keys, not a list"),
    ("yaml-binary-junk", "train", bytes(range(256)) * 4, r"config file .* is not valid YAML"),
    ("yaml-unknown-key-app", "app", "app:\n  hots: 0.0.0.0\n", r"unknown config key 'app\.hots'.*'app\.host'"),
    ("yaml-bad-port-app", "app", "app:\n  port: 70000\n", r"app\.port=70000 is outside"),
]  # fmt: skip
# (id, argv with {ckpt} = a good checkpoint, {broken} = broken copies of it, {tmp} = an empty directory, regex)
ARGV_CORPUS = [
    ("override-unknown-key", ["train", "--stage", "1", *GUARD, "train.step=3"], r"closest valid key is 'train\.steps'"),
    ("override-wrong-type", ["train", "--stage", "1", *GUARD, "train.batch_size=abc"], r"bad value for 'train\.batch_size'"),
    ("override-bad-value", ["train", "--stage", "1", *GUARD, "train.keep_checkpoints=0"], r"keep_checkpoints=0 is outside"),
    ("override-unknown-preset", ["train", "--stage", "1", *GUARD, "model.preset=tinny"], r"did you mean 'tiny'"),
    ("override-not-key-value", ["train", "--stage", "1", *GUARD, "train.steps"], r"is not key=value"),
    ("override-contradicts-stage", ["train", "--stage", "1", *GUARD, "train.stage=2"], r"contradicts --stage 1"),
    ("train-stage-out-of-range", ["train", "--stage", "7"], r"argument --stage: invalid choice: '?7'?"),
    ("train-config-missing", ["train", "--stage", "1", "--config", "{tmp}/nope.yaml"], r"nope\.yaml' does not exist"),
    ("train-resume-nothing", ["train", "--stage", "1", "--resume", "--out", "{tmp}/empty-run"], r"--resume: .*does not exist"),
    ("train-init-not-a-checkpoint", ["train", "--stage", "2", "--init", "{tmp}", *GUARD], r"--init .*no config\.json"),
    ("train-out-holds-a-run", ["train", "--stage", "1", "--out", "{ckpt}/..", *GUARD], r"already holds a run; pass --resume"),
    ("predict-no-checkpoint", ["predict", "--checkpoint", NO_CKPT, "--text", "seven"], r"not a checkpoint"),
    ("predict-no-media", ["predict", "--checkpoint", "{ckpt}"], r"give at least one medium"),
    ("predict-flag-without-value", ["predict", "--checkpoint", "{ckpt}", "--image"], r"argument --image: expected one argument"),
    ("predict-unknown-flag", ["predict", "--checkpoint", "{ckpt}", "--smell", "x"], r"unrecognized arguments: --smell"),
    ("app-port-not-a-number", ["app", "--port", "http"], r"argument --port: invalid int value"),
    ("app-bad-override", ["app", "--checkpoint", NO_CKPT, "app.share=maybe"], r"bad value for 'app\.share'"),
    ("predict-checkpoint-truncated-weights", ["predict", "--checkpoint", "{broken}/truncated-weights", "--text", "7"],
     r"model\.safetensors is not a readable safetensors file"),
    ("predict-checkpoint-config-not-json", ["predict", "--checkpoint", "{broken}/config-not-json", "--text", "7"],
     r"config\.json is not valid JSON"),
    ("predict-checkpoint-config-unknown-key", ["predict", "--checkpoint", "{broken}/config-unknown-key", "--text",
     "7"], r"does not match this code's config: unknown config key 'model\.wdith'"),
    ("train-init-truncated-weights", ["train", "--stage", "2", "--init", "{broken}/truncated-weights",
     "--out", "{tmp}/run", *GUARD], r"model\.safetensors is not a readable safetensors file"),
    ("evaluate-bad-split", ["evaluate", "--checkpoint", "{ckpt}", "--split", "dev"], r"argument --split: invalid choice"),
]  # fmt: skip


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A stage-3 checkpoint after a handful of updates: enough for every endpoint, cheap to make."""
    run = tmp_path_factory.mktemp("app") / "run"
    with torch_threads(1):
        return train(resolve_run(3, (), [*TINY, "train.steps=4"], out=str(run))[0], run).checkpoint


@pytest.fixture(scope="module")
def good(checkpoint, tmp_path_factory) -> dict[str, str]:
    """One test-split item per modality as the file a user would upload (text as the string)."""
    out = tmp_path_factory.mktemp("good")
    cfg = from_dict(read_saved_config(checkpoint / "config.json"))
    bench = load_benchmark(cfg.data, seed=cfg.seed)
    return {m: explore.save_medium(bench.dataset(m, "digit", "test")[0][0], out / m)
            for m in ("image", "audio", "text", "video")}  # fmt: skip


@pytest.fixture(scope="module")
def broken_checkpoints(checkpoint, tmp_path_factory) -> Path:
    """Copies of the checkpoint with one thing wrong each."""
    root = tmp_path_factory.mktemp("broken")
    for name in ("truncated-weights", "config-not-json", "config-unknown-key"):
        shutil.copytree(checkpoint, root / name)
    weights = root / "truncated-weights" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    (root / "config-not-json" / "config.json").write_text("{model: tiny")
    saved = json.loads((checkpoint / "config.json").read_text())
    saved["model"]["wdith"] = 64
    (root / "config-unknown-key" / "config.json").write_text(json.dumps(saved))
    return root


def _tone(seconds: float, rate: int) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)


def _avi(path: Path, frames: int, size: int = 16) -> None:
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = size, size, "yuv420p"
        out.start_encoding()  # a valid header even with no frames
        frame = av.VideoFrame.from_ndarray(np.zeros((size, size), np.uint8), format="gray")
        for _ in range(frames):
            out.mux(stream.encode(frame))
        out.mux(stream.encode())


@pytest.fixture(scope="module")
def bad_files(good, tmp_path_factory) -> dict[str, str]:
    """Every bad medium of the corpus as a file (name -> path); texts are given as themselves."""
    d = tmp_path_factory.mktemp("bad")
    rng = np.random.default_rng(SEED)
    png, wav, mp4 = (Path(good[m]).read_bytes() for m in ("image", "audio", "video"))
    jpeg, flac, tiff, huge, blank = io.BytesIO(), io.BytesIO(), io.BytesIO(), io.BytesIO(), io.BytesIO()
    with Image.open(good["image"]) as img:
        img.convert("RGB").save(jpeg, "JPEG", quality=90)
        img.save(tiff, "TIFF")
    Image.new("L", (6000, 5000)).save(huge, "PNG")  # 30 M pixels in ~30 kB
    Image.new("L", (200, 200), 255).save(blank, "PNG")
    sf.write(flac, sf.read(good["audio"], dtype="float32")[0], 16000, format="FLAC")
    files = {
        "png-corrupt": ("x.png", b"\x89PNG\r\n\x1a\n" + rng.bytes(400)),
        "png-truncated": ("x.png", png[: len(png) // 2]),
        "png-header-only": ("x.png", png[:40]),
        "jpeg-corrupt": ("x.jpg", b"\xff\xd8\xff\xe0" + rng.bytes(400)),
        "jpeg-truncated": ("x.jpg", jpeg.getvalue()[: len(jpeg.getvalue()) // 2]),
        "tiff": ("x.tiff", tiff.getvalue()),
        "huge-png": ("huge.png", huge.getvalue()),
        "blank-png": ("blank.png", blank.getvalue()),
        "empty": ("empty.bin", b""),
        "junk": ("junk.bin", rng.bytes(4096)),
        "wav-as-png": ("sound.png", wav),
        "mp4-as-png": ("clip.png", mp4),
        "wav-corrupt": ("x.wav", b"RIFF\x24\x08\x00\x00WAVEfmt " + rng.bytes(400)),
        "wav-truncated": ("x.wav", wav[: len(wav) // 2]),
        "flac-corrupt": ("x.flac", b"fLaC" + rng.bytes(400)),
        "flac-truncated": ("x.flac", flac.getvalue()[: len(flac.getvalue()) // 2]),
        "png-as-wav": ("picture.wav", png),
        "mp4-corrupt": ("x.mp4", b"\x00\x00\x00\x18ftypmp42" + rng.bytes(400)),
        "mp4-truncated": ("x.mp4", mp4[: len(mp4) // 2]),
        "png-as-mp4": ("picture.mp4", png),
        "wav-as-mp4": ("sound.mp4", wav),
    }
    out = {}
    for key, (name, data) in files.items():
        (d / key).mkdir()
        (d / key / name).write_bytes(data)
        out[key] = str(d / key / name)
    for key, samples, rate, subtype in (("silence", np.zeros(16000, np.float32), 16000, "PCM_16"),
                                        ("nan-wav", np.full(16000, np.nan, np.float32), 16000, "FLOAT"),
                                        ("long-3s", _tone(3, 16000), 16000, "PCM_16"),
                                        ("long-31s", _tone(31, 8000), 8000, "PCM_16")):  # fmt: skip
        out[key] = str(d / f"{key}.wav")
        sf.write(out[key], samples, rate, subtype=subtype)
    for key, frames in (("zero-frame-avi", 0), ("601-frame-avi", 601)):
        out[key] = str(d / f"{key}.avi")
        _avi(Path(out[key]), frames)
    out["missing"] = str(d / "no-such-file.png")
    return out


def _source(case: Case, bad_files: dict) -> str:
    return case.build if case.modality == "text" else bad_files[case.build]


def _corpus_table() -> list[tuple[str, str]]:
    """(id, interfaces) of every case, for the size check and the closing note."""
    rows = [(c.id, "predict + app" if c.app else "predict") for c in MEDIA_CORPUS]
    rows += [(c[0], c[1]) for c in CONFIG_CORPUS] + [(c[0], c[1][0]) for c in ARGV_CORPUS]
    return rows


def test_the_corpus_is_large_and_every_id_unique():
    ids = [i for i, _ in _corpus_table()]
    assert len(ids) >= 30 and len(set(ids)) == len(ids)
    assert {c.modality for c in MEDIA_CORPUS} == {"image", "audio", "video", "text"}


@pytest.mark.parametrize("case", MEDIA_CORPUS, ids=lambda c: c.id)
def test_bad_media_through_predict_cli(case, checkpoint, bad_files, capsys):
    code, err = _cli(["predict", "--checkpoint", checkpoint, f"--{case.modality}", _source(case, bad_files)],
                     capsys)  # fmt: skip
    assert code == 2, err
    _assert_one_clear_line(err, "predict", case.expect)


@pytest.mark.parametrize("case", CONFIG_CORPUS, ids=lambda c: c[0])
def test_bad_config_files_through_train_and_app_cli(case, checkpoint, tmp_path, capsys):
    _, command, text, expect = case
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(text if isinstance(text, bytes) else text.encode())
    if command == "train":
        argv = ["train", "--stage", "1", "--config", bad, "--out", tmp_path / "run", *GUARD]
    else:  # a config that wrongly passed would meet the missing checkpoint, not start a server
        argv = ["app", "--checkpoint", NO_CKPT, "--config", bad]
    code, err = _cli(argv, capsys)
    assert code == 2, err
    _assert_one_clear_line(err, command, expect)
    assert not (tmp_path / "run" / "state").exists()  # refused before any work


@pytest.mark.parametrize("case", ARGV_CORPUS, ids=lambda c: c[0])
def test_bad_command_line_values(case, checkpoint, broken_checkpoints, tmp_path, capsys):
    _, argv, expect = case
    argv = [a.format(ckpt=checkpoint, broken=broken_checkpoints, tmp=tmp_path) for a in argv]
    code, err = _cli(argv, capsys)
    assert code == 2, err
    _assert_one_clear_line(err, argv[0], expect)


def test_the_console_command_itself(checkpoint, bad_files):
    """One case through a real `python -m workbench` process: exit 2, exactly one stderr line, no traceback.
    (One is enough: main() above is what the console script calls; test_cli.py does the same for a bad
    override of `workbench train`; each process spends ~5 s importing torch.)"""
    case = next(c for c in MEDIA_CORPUS if c.id == "png-bytes-named-wav")
    out = subprocess.run([sys.executable, "-m", "workbench", "predict", "--checkpoint", str(checkpoint),
                          "--audio", _source(case, bad_files)], capture_output=True, text=True, env=ENV_1_THREAD,
                         timeout=300)  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    _assert_one_clear_line(out.stderr, "predict", case.expect)
    assert out.stdout == ""


# ------------------------------------------------------------------------------------------ the app
@pytest.fixture(scope="module")
def app(checkpoint):
    with torch_threads(None):  # launch() sets one torch thread for the process: restore it after
        demo = _load_app().launch(checkpoint, port=_free_port(), prevent_thread_lock=True, quiet=True)
        yield demo
        demo.close()


def _client(app) -> Client:
    # ssl_verify=False: plain HTTP on loopback either way, but with verification on, gradio_client builds an
    # SSL context (loading the CA bundle) for every request: ~0.1 s of CPU each, 10x the request itself.
    return Client(app.local_url, verbose=False, ssl_verify=False)


@pytest.fixture(scope="module")
def client(app) -> Client:
    return _client(app)


MEDIA_ENDPOINTS = ("predict", "attention", "cross_attention", "ablate_heads", "probe_head")


@pytest.fixture(scope="module")
def clients(app) -> dict[str, Client]:
    """One client per endpoint, as five users at once: several jobs submitted at once through ONE
    gradio_client can lose one to a client-side race (a CancelledError, gradio-app/gradio#9968)."""
    return {endpoint: _client(app) for endpoint in MEDIA_ENDPOINTS}


def _slot(modality: str, src: str) -> dict:
    return {modality: src if modality == "text" else handle_file(src)}


def _endpoint_calls(modality: str, src: str, good: dict) -> dict[str, dict]:
    """Every endpoint that takes a medium, called with the bad one (cross-attention pairs it with a good
    medium of another modality)."""
    other = "audio" if modality == "image" else "image"
    bad = _slot(modality, src)
    calls = {
        "predict": dict(**bad, api_name="/predict"),
        "attention": dict(**bad, modality="auto", module="f", layer=0, head="mean", api_name="/attention"),
        "cross_attention": dict(**bad, **_slot(other, good[other]), modality_a=modality, modality_b=other,
                                api_name="/cross_attention"),
        "ablate_heads": dict(**bad, heads=["f.0.0"], api_name="/ablate_heads"),
        "probe_head": dict(**bad, task=f"{other}/digit", api_name="/probe_head"),
    }  # fmt: skip
    assert tuple(calls) == MEDIA_ENDPOINTS
    return calls


@pytest.mark.parametrize("case", [c for c in MEDIA_CORPUS if c.app], ids=lambda c: c.id)
def test_bad_media_through_every_app_endpoint(case, client, clients, good, bad_files):
    expect = case.app_expect or case.expect
    calls = _endpoint_calls(case.modality, _source(case, bad_files), good)
    jobs = {endpoint: clients[endpoint].submit(**kwargs) for endpoint, kwargs in calls.items()}  # all at once
    for endpoint, job in jobs.items():
        with pytest.raises(AppError) as err:
            job.result(timeout=120)
        message = str(err.value)
        assert re.search(expect, message), (endpoint, message)
        assert "Traceback" not in message and len(message) < 500, (endpoint, message)
    (answer,) = client.predict(**_slot(case.modality, good[case.modality]), api_name="/predict")
    assert answer["modality"] == case.modality and answer["tasks"]


def test_bad_parameters_through_the_app_and_it_keeps_serving(client, good):
    image = handle_file(good["image"])
    calls = [
        (dict(image=image, module="f", layer="top", api_name="/attention"), "layer 'top' is not a number"),
        (dict(image=image, module="f", layer=0, head="loud", api_name="/attention"), "head 'loud' is not 'mean'"),
        (dict(image=image, module="telepathy", layer=0, api_name="/attention"), "telepathy"),
        (dict(image=image, heads=["f.zero.0"], api_name="/ablate_heads"), "layer 'zero' is not a number"),
        (dict(image=image, heads=["f.0"], api_name="/ablate_heads"), "not module.layer.head"),
        (dict(image=image, audio=handle_file(good["audio"]), modality_a="image", modality_b="audio", head="99",
              api_name="/cross_attention"), "head 99 does not exist"),
        (dict(image=image, modality="video", api_name="/ablate_heads"), "no video was given"),
        (dict(modality="smell", task="digit", api_name="/head_importance"), "no task 'smell/digit'"),
    ]  # fmt: skip
    for kwargs, expect in calls:
        with pytest.raises(AppError, match=expect):
            client.predict(**kwargs)
    assert client.predict(image=image, api_name="/predict")[0]["tasks"]["digit"]["label"]


# ======================================================================================== 3. load
# The clients run as threads of their own process: in the server's process they would share its GIL and
# measure mostly themselves (4x slower on two cores); a separate process is also what a real client is.
LOAD_CLIENTS = r"""
import json, sys, threading, time
from gradio_client import Client, handle_file

url, clients, per_client, media = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4])
kinds = list(media)
results, errors, lock = [], [], threading.Lock()
start = threading.Barrier(clients)

def worker(i):
    try:
        c = Client(url, verbose=False, ssl_verify=False)
        start.wait(timeout=120)
        for j in range(per_client):
            m = kinds[(i + j) % len(kinds)]
            tic = time.perf_counter()
            (got,) = c.predict(**{m: media[m] if m == "text" else handle_file(media[m])}, api_name="/predict")
            with lock:
                results.append({"client": i, "sent": m, "seconds": time.perf_counter() - tic, "answer": got})
    except Exception as err:
        start.abort()
        with lock:
            errors.append(f"client {i}: {type(err).__name__}: {err}")

threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
tic = time.perf_counter()
for t in threads:
    t.start()
for t in threads:
    t.join()
print(json.dumps({"results": results, "errors": errors, "seconds": time.perf_counter() - tic}))
"""


def test_sixteen_clients_times_twentyfive_predicts(app, client, good):
    clients, per_client = 16, 25
    want = {m: client.predict(**_slot(m, good[m]), api_name="/predict")[0] for m in good}
    out = subprocess.run([sys.executable, "-c", LOAD_CLIENTS, app.local_url, str(clients), str(per_client),
                          json.dumps(good)], capture_output=True, text=True, timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    load = json.loads(out.stdout.strip().splitlines()[-1])
    assert not load["errors"], load["errors"][:5]
    results = load["results"]
    assert len(results) == clients * per_client  # no lost requests
    assert {r["client"] for r in results} == set(range(clients))
    for r in results:  # every answer is its own request's, unchanged by the concurrent ones
        got, expected = r["answer"], want[r["sent"]]
        assert got["modality"] == r["sent"]
        labels = {t: o.get("label", o.get("psnr")) for t, o in got["tasks"].items()}
        assert labels == {t: o.get("label", o.get("psnr")) for t, o in expected["tasks"].items()}
    ms = sorted(1000 * r["seconds"] for r in results)
    p50, p95 = statistics.median(ms), ms[int(0.95 * (len(ms) - 1))]
    print(f"load: {clients} clients x {per_client} /predict (image, audio, text, video in turn) = {len(ms)} "
          f"answers in {load['seconds']:.1f} s ({len(ms) / load['seconds']:.0f} req/s); latency p50 {p50:.0f} ms, "
          f"p95 {p95:.0f} ms, max {ms[-1]:.0f} ms")  # fmt: skip


# ====================================================================================== 4. safety
def test_running_app_is_on_loopback_without_a_share_link(app):
    assert app.server_name == "127.0.0.1"
    assert not app.share and app.share_url is None
    assert app.local_url.startswith("http://127.0.0.1:")


def test_launch_defaults_and_what_changes_them(checkpoint, monkeypatch, capsys):
    """`workbench app` binds 127.0.0.1 with no share link and caps uploads, unless told otherwise."""
    import gradio as gr

    from workbench.cli import build_parser
    from workbench.config import AppConfig

    assert AppConfig().host == "127.0.0.1" and AppConfig().share is False
    assert build_parser().parse_args(["app"]).host is None  # None = the config's host
    calls = []
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kw: calls.append(kw))
    with torch_threads(1):
        for argv in (["app", "--checkpoint", checkpoint],
                     ["app", "--checkpoint", checkpoint, "--host", "0.0.0.0", "app.share=true",
                      "data.limits.max_upload_mb=2"]):  # fmt: skip
            assert _cli(argv, capsys)[0] == 0
    keys = ("server_name", "share", "max_file_size")
    default, asked = ({k: kw[k] for k in keys} for kw in calls)
    assert default == {"server_name": "127.0.0.1", "share": False, "max_file_size": 50 * 1024 * 1024}
    assert asked == {"server_name": "0.0.0.0", "share": True, "max_file_size": 2 * 1024 * 1024}


def test_the_app_never_reads_a_file_the_client_did_not_upload(app, good, tmp_path):
    """Media events skip Gradio's preprocessing (the workbench decoder reads the file): a client naming a
    server path itself must still be refused by Gradio's upload-folder check."""
    import httpx

    private = tmp_path / "private.png"
    shutil.copy(good["image"], private)  # a perfectly readable image, but not an upload
    data = [{"path": str(private), "meta": {"_type": "gradio.FileData"}}, None, None, None]
    with httpx.Client(base_url=app.local_url, timeout=60) as http:
        event = http.post("/gradio_api/call/predict", json={"data": data}).json()["event_id"]
        stream = http.get(f"/gradio_api/call/predict/{event}").text
    assert "event: error" in stream and "event: complete" not in stream, stream[:500]
    assert "digit" not in stream  # no prediction was made from it


BANNED_CALLS = {"eval", "exec", "compile", "__import__"}
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def _unsafe(source: str, name: str) -> list[str]:
    """Unsafe loading or code execution in Python source: pickle modules, torch.load without
    weights_only=True, numpy/pandas pickle loading, eval/exec/compile, yaml's unsafe loaders."""
    found = []
    for node in ast.walk(ast.parse(source, name)):
        where = f"{name}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import | ast.ImportFrom):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found += [f"{where} imports {m}" for m in mods if m.split(".")[0] in PICKLE_MODULES]
        elif isinstance(node, ast.Call):
            func = node.func
            kw = {k.arg: k.value for k in node.keywords}
            if isinstance(func, ast.Name) and func.id in BANNED_CALLS:
                found.append(f"{where} calls {func.id}()")
            elif isinstance(func, ast.Attribute):
                owner = ast.unparse(func.value)
                if func.attr == "load" and owner == "torch":
                    ok = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
                    if not ok:
                        found.append(f"{where} torch.load without weights_only=True")
                unsafe_yaml = "Loader" in kw and not ast.unparse(kw["Loader"]).endswith("SafeLoader")
                if func.attr in ("read_pickle", "unsafe_load", "full_load") or (
                    func.attr == "load" and owner == "yaml" and unsafe_yaml
                ):
                    found.append(f"{where} {owner}.{func.attr}()")
                if (
                    func.attr == "load"
                    and isinstance(kw.get("allow_pickle"), ast.Constant)
                    and kw["allow_pickle"].value
                ):
                    found.append(f"{where} {owner}.load(allow_pickle=True)")
    return found


def test_the_source_scan_finds_what_it_looks_for():
    bad = ("import pickle\nfrom dill import loads\nimport torch, numpy as np, yaml\nx = eval(input())\n"
           "exec(s)\ntorch.load(f)\ntorch.load(f, weights_only=False)\nnp.load(f, allow_pickle=True)\n"
           "yaml.load(s, Loader=yaml.Loader)\n")  # fmt: skip
    assert len(_unsafe(bad, "bad.py")) == 8
    good = (
        "import torch, yaml\nmodel.eval()\ntorch.load(f, weights_only=True)\nspec.loader.exec_module(m)\n"
        "ast.literal_eval(s)\nyaml.load(s, Loader=yaml.SafeLoader)\n"
    )
    assert _unsafe(good, "good.py") == []


def test_no_pickle_loading_and_no_eval_or_exec_in_the_source():
    files = sorted([*(REPO / "workbench").rglob("*.py"), *(REPO / "apps").rglob("*.py")])
    assert len(files) > 30
    found = [hit for f in files for hit in _unsafe(f.read_text(), str(f.relative_to(REPO)))]
    assert not found, found
    # notebooks' code cells too (IPython magics and shell lines are not Python)
    for nb in sorted((REPO / "notebooks").glob("*.ipynb")):
        for i, cell in enumerate(json.loads(nb.read_text())["cells"]):
            if cell["cell_type"] == "code":
                src = "".join(cell["source"])
                src = "\n".join("" if ln.lstrip().startswith(("%", "!")) else ln for ln in src.splitlines())
                assert not _unsafe(src, f"{nb.name}[{i}]"), (nb.name, i)


def test_a_pickle_planted_in_a_resume_state_is_not_executed(reference, tmp_path):
    """Resume states hold Accelerate's optimizer/scheduler/RNG files, which are pickles: they must be read
    with torch.load(weights_only=True), so a planted payload is refused, never run."""
    import pickle

    class Payload:
        def __reduce__(self):
            return open, (str(tmp_path / "pwned"), "w")

    run = tmp_path / "run"
    shutil.copytree(reference, run)
    state = latest_state(run)
    for name in ("optimizer.bin", "scheduler.bin", "random_states_0.pkl"):
        assert (state / name).is_file(), name
        (state / name).write_bytes(pickle.dumps(Payload(), protocol=2))
    with (
        torch_threads(1),
        pytest.raises(WorkbenchError, match=r"cannot be loaded \(UnpicklingError: Weights only load failed"),
    ):
        train(resolve_run(1, (), CRASH_RUN, out=str(run), resume=True)[0], run, resume=True)
    assert not (tmp_path / "pwned").exists()


def test_checkpoints_hold_no_pickles(checkpoint):
    names = sorted(p.name for p in checkpoint.iterdir())
    assert "model.safetensors" in names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))], names


def _notebook_parameters(path: Path) -> tuple[dict, ast.Call]:
    """The parameters cell's assignments and the ``wn.setup(dict(...))`` call of a notebook."""
    cells = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    params = next(c for c in cells if "parameters" in c.get("metadata", {}).get("tags", []))
    values = {t.id: ast.literal_eval(n.value) for n in ast.parse("".join(params["source"])).body
              if isinstance(n, ast.Assign) for t in n.targets}  # fmt: skip
    for cell in cells:
        for node in ast.walk(ast.parse("".join(cell["source"]))):
            if isinstance(node, ast.Call) and ast.unparse(node.func).endswith("setup"):
                return values, node
    raise AssertionError(f"{path.name} never calls wn.setup")


@pytest.mark.parametrize("path", sorted((REPO / "notebooks").glob("*.ipynb")), ids=lambda p: p.stem)
def test_every_notebook_parameter_goes_through_the_typed_config(path):
    """Each name of the papermill `parameters` cell is handed to `wn.setup`, which names the closest valid
    key for a misspelt one (a parameter the setup call left out would reach the notebook unchecked)."""
    from workbench import notebook as wn
    from workbench.errors import ConfigError

    values, call = _notebook_parameters(path)
    (arg,) = call.args
    passed = {k.arg for k in arg.keywords} if isinstance(arg, ast.Call) else {k.value for k in arg.keys}
    assert set(values) <= passed, f"{path.name}: {set(values) - passed} bypass wn.setup"
    for name in values:
        typo = name + name[-1] + "x"  # seeds -> seedssx
        with pytest.raises(
            ConfigError, match=f"unknown notebook parameter '{typo}'.*closest valid key is '{name}'"
        ):
            wn.setup({**values, typo: values[name]})


def test_stage_config_refuses_a_directory_that_is_not_a_checkpoint(tmp_path):
    from workbench import notebook as wn
    from workbench.config import load_config
    from workbench.errors import CheckpointError, ConfigError

    cfg = load_config(overrides=["model.preset=tiny"])
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        wn.stage_config(cfg, 2, tmp_path)
    with pytest.raises(ConfigError, match=r"train\.stage=4"):
        wn.stage_config(cfg, 4)
