"""The attention explorer end to end: launched in-process, every endpoint called through gradio_client.

A tiny checkpoint is trained once per session on the small data variant; the app serves it on a
free loopback port. Properties: predictions match `workbench predict` on the same files and name
the right digit for clear test images (the most typical of each digit, chosen without any model, read by
a second checkpoint trained on images alone); attention matrices have the token-grid shapes and softmax
rows; cross-attention comes in both directions with transposed shapes; silencing nothing changes
nothing while silencing a whole layer changes the outputs; the head scan is layers x heads; every
bad input gets its one-sentence error and the next good request is still answered; a real browser
(Debian's Chromium through Playwright) uploads an image and sees the predictions appear.
"""

from __future__ import annotations

import importlib.util
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from workbench import explore
from workbench.config import from_dict, read_saved_config
from workbench.data import load_benchmark
from workbench.inference import Predictor
from workbench.train import resolve_run, train

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
# Every endpoint but the reader's needs a trained network's shapes, softmax rows and latencies, not its
# accuracy: 30 updates (the reader below is the checkpoint that has to read digits).
TRAIN = ["model.preset=tiny", "data.scale=0.1", "train.steps=30", "train.batch_size=64", "train.lr=5e-4",
         "train.warmup_steps=10", "train.log_every=100", "train.tracker=none"]  # fmt: skip
# A checkpoint that reads digits: image/digit alone (image/denoise never drawn: its head stays as built),
# every update through the inference path, xavier init. Measured: 79.6% test accuracy and 19 of the 20
# typical images below right in 300 updates (~37 s, 1 thread); 600 shared with image/denoise gave 72.8%
# and 16 of 20 in twice the time.
READER = ["model.preset=tiny", "model.init=xavier", "data.modalities=[image]", "data.scale=0.5",
          "train.steps=300", "train.batch_size=64", "train.lr=3e-3", "train.warmup_steps=20",
          "train.task_sampling={image/denoise: 0}", "train.single_stream=1", "train.log_every=100",
          "train.tracker=none"]  # fmt: skip


# ------------------------------------------------------------------------------------------ fixtures
def _train(overrides: list[str], out: Path) -> Path:
    cfg = resolve_run(3, (), overrides, init=None, out="unused")[0]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is faster, and immune to other processes' load
    try:
        return train(cfg, out).checkpoint
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return _train(TRAIN, tmp_path_factory.mktemp("app") / "run")


@pytest.fixture(scope="module")
def reader(tmp_path_factory) -> Path:
    return _train(READER, tmp_path_factory.mktemp("reader") / "run")


def _load_app():
    spec = importlib.util.spec_from_file_location("workbench_explorer_test", REPO / "apps" / "explorer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app(checkpoint):
    threads = torch.get_num_threads()  # launch() sets one torch thread for the process: restore it after
    demo = _load_app().launch(checkpoint, port=_free_port(), prevent_thread_lock=True, quiet=True)
    yield demo
    demo.close()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def client(app) -> Client:
    return Client(app.local_url, verbose=False, ssl_verify=False)  # plain http: no per-request SSL context


@pytest.fixture(scope="module")
def typical_images(reader, tmp_path_factory) -> list[tuple[str, str]]:
    """(PNG file, digit) of the two test images of each digit that correlate best with the mean
    training image of that digit: clear examples chosen from the data alone, no model involved."""
    out = tmp_path_factory.mktemp("typical")
    cfg = from_dict(read_saved_config(reader / "config.json"))
    bench = load_benchmark(cfg.data, seed=cfg.seed)
    train_set, test_set = bench.dataset("image", "digit", "train"), bench.dataset("image", "digit", "test")

    def flat(ds):
        x = torch.stack([torch.as_tensor(ds[i][0]) for i in range(len(ds))]).flatten(1).float()
        x = x - x.mean(1, keepdim=True)
        return x / x.norm(dim=1, keepdim=True)

    x_train, x_test = flat(train_set), flat(test_set)
    y_train, y_test = train_set.labels, test_set.labels
    files = []
    for d in range(10):
        mean = x_train[y_train == d].mean(0)
        rows = torch.nonzero(y_test == d).flatten()
        for i in rows[(x_test[rows] @ mean).argsort(descending=True)[:2]].tolist():
            files.append(
                (explore.save_medium(test_set[i][0], out / f"digit{d}-{i}"), test_set.spec.labels[d])
            )
    return files


@pytest.fixture(scope="module")
def media(checkpoint, tmp_path_factory) -> dict:
    """Test-split items as files: the five images the checkpoint is most confident about and one of
    each other modality."""
    out = tmp_path_factory.mktemp("media")
    predictor = Predictor.from_checkpoint(checkpoint)
    model = predictor.model
    cfg = from_dict(read_saved_config(checkpoint / "config.json"))
    bench = load_benchmark(cfg.data, seed=cfg.seed)
    images = bench.dataset("image", "digit", "test")
    r = explore.collect_predictions(model, images)
    score = r["confidence"] + (r["pred"] == r["y"]).float()
    clear = score.argsort(descending=True)[:5].tolist()
    files = {
        "images": [explore.save_medium(images[i][0], out / f"clear-{i}") for i in clear],
    }
    for modality in ("audio", "text", "video"):
        ds = bench.dataset(modality, "digit", "test")
        files[modality] = explore.save_medium(ds[0][0], out / f"{modality}-0")
    files["image"] = files["images"][0]
    return files


def _all_media(media) -> dict:
    return dict(image=handle_file(media["image"]), audio=handle_file(media["audio"]), text=media["text"],
                video=handle_file(media["video"]))  # fmt: skip


# ------------------------------------------------------------------------------------------ predict
def test_predict_every_medium_matches_the_cli(client, media, checkpoint):
    got = client.predict(**_all_media(media), api_name="/predict")
    assert [g["modality"] for g in got] == ["image", "audio", "text", "video"]
    predictor = Predictor.from_checkpoint(checkpoint)
    for g, (modality, src) in zip(got, [(m, media[m]) for m in ("image", "audio", "text", "video")]):
        want = predictor.predict(modality, src).to_json()
        assert set(g["tasks"]) == {t.name for t in predictor.model.tasks.values() if t.modality == modality}
        for task, out in want["tasks"].items():
            if "top" in out:
                assert g["tasks"][task]["label"] == out["label"]
                assert [p for _, p in g["tasks"][task]["top"]] == pytest.approx(
                    [p for _, p in out["top"]], abs=1e-3
                )
                probs = [p for _, p in g["tasks"][task]["top"]]
                assert probs == sorted(probs, reverse=True) and len(probs) == 3
            else:
                assert g["tasks"][task]["psnr"] == pytest.approx(out["psnr"], abs=1e-2)
        assert g["latency_ms"] > 0


def test_predict_names_the_digit_of_clear_test_images(reader, typical_images):
    threads = torch.get_num_threads()
    demo = _load_app().launch(reader, port=_free_port(), prevent_thread_lock=True, quiet=True)
    try:
        c = Client(demo.local_url, verbose=False, ssl_verify=False)
        predictor = Predictor.from_checkpoint(reader)
        right = 0
        for path, digit in typical_images:  # PNG file -> upload -> the app's decoder -> the model
            (got,) = c.predict(image=handle_file(path), api_name="/predict")
            label = got["tasks"]["digit"]["label"]
            assert label == predictor.predict("image", path).to_json()["tasks"]["digit"]["label"]
            right += label == digit
    finally:
        demo.close()
        torch.set_num_threads(threads)
    assert right >= 14, f"{right} of {len(typical_images)} typical test images read right (chance: 2)"


def test_concurrent_requests_are_all_answered(client, media):
    jobs = [client.submit(image=handle_file(p), api_name="/predict") for p in media["images"][:4]]
    answers = [j.result(timeout=60) for j in jobs]
    assert all(a[0]["modality"] == "image" for a in answers)


# ---------------------------------------------------------------------------------------- attention
@pytest.mark.parametrize("modality", ["image", "audio", "text", "video"])
def test_attention_matrices_have_grid_shapes_and_softmax_rows(client, media, modality, checkpoint):
    model = Predictor.from_checkpoint(checkpoint).model
    batch = Predictor(model).batch(modality, media[modality])
    grid = model.patchers[modality](batch.x, batch.lengths).grid
    n = int(np.prod(grid))
    for module, head, size in (("f", "mean", n), ("g", "1", n), (f"head.{modality}/digit", "0", n + 1)):
        picture, info = client.predict(**_all_media(media), modality=modality, module=module, layer=0,
                                             head=head, api_name="/attention")  # fmt: skip
        m = np.array(info["matrix"])
        assert m.shape == (size, size) == tuple(info["shape"])
        assert np.allclose(m.sum(-1), 1, atol=1e-3)
        assert np.array(info["heat"]).shape == grid and np.array(info["rollout"]).shape == grid
        assert len(info["keys"]) == size
        with Image.open(picture) as img:  # the layer's heat beside (or above) the rollout's
            assert img.mode == "RGB" and min(img.size) >= 28 + 16
    if modality == "text":
        assert info["keys"][1:] == model.text_tokenizer.tokens(media["text"])


def test_cross_attention_both_directions(client, media, checkpoint):
    model = Predictor.from_checkpoint(checkpoint).model
    sizes = {m: model.patchers[m](b.x, b.lengths).values.shape[1]
             for m, b in ((m, Predictor(model).batch(m, media[m])) for m in ("image", "audio"))}  # fmt: skip
    info = client.predict(image=handle_file(media["image"]), audio=handle_file(media["audio"]), modality_a="image",
                          modality_b="audio", module="A", layer=0, head="mean", api_name="/cross_attention")  # fmt: skip
    ab, ba = np.array(info["a<-b"]["matrix"]), np.array(info["b<-a"]["matrix"])
    assert ab.shape == (sizes["image"], sizes["audio"]) and ba.shape == ab.shape[::-1]
    assert np.allclose(ab.sum(-1), 1, atol=1e-3) and np.allclose(ba.sum(-1), 1, atol=1e-3)
    assert len(info["labels_a"]) == ab.shape[0] and len(info["labels_b"]) == ab.shape[1]
    assert set(info["pair"]) == {"image/digit", "audio/digit"}
    joint = client.predict(image=handle_file(media["image"]), audio=handle_file(media["audio"]), modality_a="audio",
                           modality_b="image", module="g", layer=0, head="1", api_name="/cross_attention")  # fmt: skip
    g_ab, g_ba = np.array(joint["a<-b"]["matrix"]), np.array(joint["b<-a"]["matrix"])
    assert g_ab.shape == (sizes["audio"], sizes["image"]) and g_ba.shape == g_ab.shape[::-1]
    assert (g_ab.sum(-1) < 1 + 1e-3).all()  # the share of each row's attention that crosses streams


# ------------------------------------------------------------------------------------ probing heads
def test_silencing_nothing_changes_nothing_and_a_whole_layer_changes_outputs(client, media):
    kw = dict(image=handle_file(media["image"]), api_name="/ablate_heads")
    none = client.predict(heads=[], **kw)
    assert none["silenced"] == [] and none["before"] == none["after"]
    assert all(c.get("total_variation", c.get("mean_abs_change")) == 0 for c in none["change"].values())
    layer = client.predict(heads=["f.0.*"], **kw)
    assert layer["silenced"] == [["f", 0, 0], ["f", 0, 1]]
    assert (
        layer["change"]["digit"]["total_variation"] > 0 and layer["change"]["denoise"]["mean_abs_change"] > 0
    )
    one = client.predict(heads=["head.image/digit.0.1"], **kw)
    assert one["change"]["digit"]["total_variation"] > 0
    assert one["change"]["denoise"]["mean_abs_change"] == 0  # another task's head: untouched


def test_head_importance_is_layers_by_heads(client, checkpoint):
    layout = Predictor.from_checkpoint(checkpoint).model.attention_layout()
    info = client.predict(modality="image", task="digit", api_name="/head_importance")
    assert info["rows"] == ["f.0", "g.0", "head.image/digit.0"] and info["heads"] == layout["f"][1]
    for field in ("drop", "loss_increase"):
        m = np.array(info[field], dtype=float)
        assert m.shape == (len(info["rows"]), info["heads"]) and np.isfinite(m).all()
    assert info["metric"] == "accuracy" and 0 <= info["baseline"] <= 1 and info["n"] > 0
    assert np.abs(np.array(info["loss_increase"])).max() > 0  # silencing a head moves the loss somewhere


def test_probe_any_head_on_a_medium(client, media):
    info = client.predict(image=handle_file(media["image"]), task="audio/digit", api_name="/probe_head")
    assert info["task"] == "audio/digit" and info["label"] in [str(d) for d in range(10)]
    assert sum(p for _, p in info["top"]) <= 1 + 1e-6


# --------------------------------------------------------------------------------------- bad inputs
def _bad_media(tmp: Path) -> dict[str, tuple[dict, str]]:
    import av

    (tmp / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(300))
    (tmp / "notes.png").write_text("this is not a picture")
    sf.write(tmp / "silence.wav", np.zeros(16000, np.float32), 16000)
    t = np.arange(3 * 16000) / 16000
    sf.write(tmp / "long.wav", (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 16000)
    Image.new("L", (6000, 5000)).save(tmp / "huge.png")
    with av.open(str(tmp / "empty.avi"), "w") as out:  # a valid container with a video stream, no frames
        stream = out.add_stream("mpeg4", rate=4)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        out.start_encoding()
    f = lambda name: handle_file(str(tmp / name))  # noqa: E731
    return {
        "corrupt file": ({"image": f("corrupt.png")}, "not a readable image|corrupt"),
        "wrong type": ({"image": f("notes.png")}, "not a readable image"),
        "empty text": ({"text": "   \n "}, "text is empty"),
        "silence": ({"audio": f("silence.wav")}, "silent"),
        "over-long audio": ({"audio": f("long.wav")}, r"3\.\d+ s long"),
        "huge image": ({"image": f("huge.png")}, "6000x5000 pixels"),
        "zero-frame video": ({"video": f("empty.avi")}, "no video frames"),
        "missing medium": ({}, "give at least one medium"),
    }


def test_every_bad_input_gets_its_error_and_the_app_keeps_serving(client, media, tmp_path):
    good = dict(image=handle_file(media["image"]), api_name="/predict")
    for case, (kwargs, message) in _bad_media(tmp_path).items():
        with pytest.raises(AppError, match=message):
            client.predict(**kwargs, api_name="/predict")
        assert client.predict(**good)[0]["modality"] == "image", case
    endpoint_errors = [
        (dict(image=handle_file(media["image"]), module="f", layer=7, api_name="/attention"), "no attention layer"),
        (dict(image=handle_file(media["image"]), heads=["q.0.0"], api_name="/ablate_heads"), "no attention module"),
        (dict(image=handle_file(media["image"]), modality_a="image", modality_b="image",
              api_name="/cross_attention"), "two different modalities"),
        (dict(modality="image", task="colour", api_name="/head_importance"), "no task 'image/colour'"),
        (dict(modality="video", api_name="/attention"), "give a medium first"),
        (dict(image=handle_file(media["image"]), task="image/denoise", api_name="/probe_head"), "not a classification"),
    ]  # fmt: skip
    for kwargs, message in endpoint_errors:
        with pytest.raises(AppError, match=message):
            client.predict(**kwargs)
    assert client.predict(**good)[0]["tasks"]["digit"]["label"]


# -------------------------------------------------------------------------------------- command line
def test_cli_without_a_checkpoint_names_the_command_that_makes_one(tmp_path):
    env = {**os.environ, "WORKBENCH_RUNS": str(tmp_path / "runs")}
    out = subprocess.run([sys.executable, "-m", "workbench", "app"], capture_output=True, text=True, env=env,
                         timeout=120)  # fmt: skip
    assert out.returncode == 2
    assert "workbench train --stage 3 --out runs/demo" in out.stderr and "Traceback" not in out.stderr


# ------------------------------------------------------------------------------------------ browser
@pytest.mark.browser
@pytest.mark.skipif(
    not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed (.ci/run installs it)"
)
def test_browser_uploads_an_image_and_sees_the_predictions(app, client, media, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    (want,) = client.predict(image=handle_file(media["image"]), api_name="/predict")
    shot = tmp_path / "predict.png"
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu", "--disable-quic"]
        )
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(app.local_url)
            page.locator("input[type=file]").first.set_input_files(
                media["image"]
            )  # the image slot comes first
            page.get_by_role("button", name="Predict every head").click()
            label = page.locator("#predict-image-digit [data-testid=label-output-value]")
            expect(label).to_have_text(want["tasks"]["digit"]["label"], timeout=30_000)
            expect(page.get_by_text("Model latency: image")).to_be_visible(timeout=30_000)
            page.screenshot(path=str(shot), full_page=True)
            # the drawing pad: pick the brush, draw a stroke, use it as the image, predict again
            page.get_by_role("tab", name="Draw").click()
            page.get_by_role("button", name="Brush").click()
            box = page.locator("canvas").first.bounding_box()
            x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
            page.mouse.move(x, y - 60)
            page.mouse.down()
            page.mouse.move(x, y + 60, steps=20)
            page.mouse.up()
            page.get_by_role("button", name="Use drawing as the image").click()
            page.get_by_role("tab", name="Upload image").click()
            expect(page.locator("img[src*='drawing-']")).to_be_visible(timeout=30_000)
            page.get_by_text("Model latency: image").evaluate("e => e.textContent = ''")
            page.get_by_role("button", name="Predict every head").click()
            expect(page.get_by_text("Model latency: image")).to_be_visible(timeout=30_000)
            expect(label).to_have_text(re.compile(r"^\d$"))
            page.screenshot(path=str(tmp_path / "drawing.png"), full_page=True)
        finally:
            browser.close()
    print(f"screenshots: {shot}, {tmp_path / 'drawing.png'}")
    with Image.open(shot) as img:
        assert img.size[0] >= 1000 and img.size[1] >= 600
