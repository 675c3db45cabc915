"""The workbench attention explorer: a Gradio app over one trained OmniVec2 checkpoint.

    workbench app [--checkpoint CKPT] [--host 127.0.0.1] [--port 7860]     (or `make app`)
    python apps/explorer.py [--checkpoint CKPT] ...                          (the same)

Model logic lives in :mod:`workbench.inference` and :mod:`workbench.explore` (no gradio there). This
file is only the UI, in the order of Gradio's own demos: handlers (plain methods turning UI values
into calls of those modules and back), then the layout, then the event wiring. Every public event
carries the ``api_name`` of INTERFACES.md so scripts can call it with ``gradio_client``:

    from gradio_client import Client, handle_file
    c = Client("http://127.0.0.1:7860/")
    c.predict(image=handle_file("seven.png"), text="sieben", api_name="/predict")

Media slots are the same in every endpoint (``image``, ``audio``, ``text``, ``video``: files as
``handle_file(path)``, text as a string, any of them left out); endpoints that read one medium take
``modality`` (``auto`` = the first medium given, in that order). Anything wrong with an input raises
``gr.Error`` with the workbench's one-sentence message; the server keeps serving.

The model is shared by every session, and attention capture and head silencing switch module state
for the duration of a forward, so model calls hold one lock; decoding media runs outside it.
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no phoning home from a lab machine

import gradio as gr
import numpy as np
import torch

from workbench import explore
from workbench.config import Config, load_config, read_saved_config
from workbench.errors import CheckpointError, ConfigError, MediaError, WorkbenchError
from workbench.inference import Prediction, Predictor

sys.path.insert(0, str(Path(__file__).resolve().parent))  # apps/ is not a package: reach the sibling module
from explorer_figures import (
    attention_figure,
    change_table,
    cross_figures,
    importance_figures,
    latency_text,
)

MEDIA = ("image", "audio", "text", "video")  # the UI's input slots, in the order "auto" picks from
THEME = gr.themes.Soft(
    primary_hue="indigo",
    font=["ui-sans-serif", "system-ui", "sans-serif"],
    font_mono=["ui-monospace", "monospace"],
)  # system fonts: the page needs nothing from the internet
CSS = ".heat img { image-rendering: pixelated; }"
IMPORTANCE_ITEMS = 256  # validation items per head-importance scan


def _user_errors(fn):
    """Turn the workbench's user-facing errors into ``gr.Error`` (a message in the UI and the client)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except WorkbenchError as err:
            raise gr.Error(str(err), print_exception=False) from None

    return wrapper


def _scratch(prefix: str) -> Path:
    """A temporary directory removed when the process exits (drawings, example files)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def _head_index(head: str | int | None) -> int | None:
    if head in (None, "", "mean"):
        return None
    try:
        return int(head)
    except (TypeError, ValueError):
        raise ConfigError(f"head {head!r} is not 'mean' or a head number such as 0") from None


def _layer(layer: Any) -> int:
    try:
        return int(layer)
    except (TypeError, ValueError):
        raise ConfigError(f"layer {layer!r} is not a number (layers count from 0)") from None


def _rounded(t: torch.Tensor, digits: int = 5) -> list:
    return np.round(t.detach().float().cpu().numpy(), digits).tolist()


# -------------------------------------------------------------------------------------------- handlers
class Explorer:
    """The loaded checkpoint plus everything the handlers share (lock, benchmark, cached scans)."""

    def __init__(self, predictor: Predictor, cfg: Config, checkpoint: Path, bench=None, examples=None):
        self.predictor, self.model, self.cfg, self.checkpoint = predictor, predictor.model, cfg, checkpoint
        self.bench, self.examples = bench, examples or []
        self.lock = threading.Lock()
        self.layout = self.model.attention_layout()
        self.scratch = _scratch("workbench-app-")
        self._importance: dict[str, dict] = {}

    @classmethod
    def from_checkpoint(
        cls, checkpoint: str | Path, cfg: Config | None = None, examples: int = 6
    ) -> Explorer:
        """Load the model; load the benchmark of its config for examples and head scans when it is there."""
        checkpoint = Path(checkpoint)
        predictor = Predictor.from_checkpoint(checkpoint)
        cfg = cfg or load_config(base=read_saved_config(checkpoint / "config.json"))
        predictor.limits, predictor.top_k = cfg.data.limits, cfg.app.top_k
        bench, rows = None, []
        try:
            from workbench.data import load_benchmark

            bench = load_benchmark(cfg.data, seed=cfg.seed)
            rows = explore.write_examples(predictor.model, bench, _scratch("workbench-examples-"), examples)
        except WorkbenchError as err:  # the app still predicts on uploads without the benchmark
            print(f"workbench app: no examples or head scans ({err})", file=sys.stderr)
        return cls(predictor, cfg, checkpoint, bench, rows)

    # ------------------------------------------------------------------------------------ helpers
    @property
    def modalities(self) -> list[str]:
        return self.predictor.modalities

    @property
    def tasks(self) -> list:
        """Task specs grouped by modality: the order of the output components and of their values."""
        return [t for m in self.modalities for t in self.model.tasks.values() if t.modality == m]

    def _media(self, image, audio, text, video) -> dict[str, Any]:
        """The media given, by modality: file paths, or the text (an empty text box is not given).

        Media events run with ``preprocess=False``: files arrive as Gradio's FileData dicts, already in
        the upload cache, and go to the workbench decoder untouched, so its limits and messages apply
        (gr.Image's own preprocessing would decode every pixel of a huge image before any check).
        """
        given = {"image": image, "audio": audio, "text": text or None, "video": video}
        given = {m: v.get("path") if isinstance(v, dict) else v for m, v in given.items()}
        return {m: v for m, v in given.items() if v is not None and v != ""}

    def _one(self, modality: str, media: dict[str, Any]) -> tuple[str, Any]:
        if not media:
            raise MediaError("give a medium first: upload or draw an image, upload or record audio, type text "
                             "or upload a video")  # fmt: skip
        if modality in (None, "", "auto"):
            return next(iter(media.items()))
        if modality not in media:
            raise MediaError(f"no {modality} was given; given: {', '.join(media)}")
        return modality, media[modality]

    def _batch(self, modality: str, src: Any):
        return self.predictor.batch(modality, src)

    @staticmethod
    def _name(modality: str, src: Any) -> str:
        return src if modality == "text" else Path(str(src)).name

    # ---------------------------------------------------------------------------------- endpoints
    @_user_errors
    def predict(self, image: str | None = None, audio: str | None = None, text: str | None = None,
                video: str | None = None) -> tuple[list[dict], dict]:  # fmt: skip
        """Every task head of each medium's modality, single stream.

        Returns a list with one ``workbench predict --json`` object per medium given (image, audio,
        text, video order): ``{"input", "modality", "tasks": {task: {"label", "top": [[label, p], ...]}
        | {"psnr"}}, "latency_ms"}``.
        """
        media = self._media(image, audio, text, video)
        if not media:
            raise MediaError("give at least one medium: an image, audio, text or a video")
        preds: list[Prediction] = []
        for modality, src in media.items():
            batch = self._batch(modality, src)  # decoding runs outside the model lock
            with self.lock, torch.no_grad():
                tic = time.perf_counter()
                outputs = self.model.forward_single(batch)
                latency = (time.perf_counter() - tic) * 1000
            tasks = self.predictor.readable(batch, outputs)
            preds.append(Prediction(self._name(modality, src), modality, tasks, latency))
        return [p.to_json() for p in preds], {p.modality: p.tasks for p in preds}

    @_user_errors
    def attention(self, image: str | None = None, audio: str | None = None, text: str | None = None,
                  video: str | None = None, modality: str = "auto", module: str = "f", layer: int = 0,
                  head: str = "mean") -> tuple[np.ndarray, dict]:  # fmt: skip
        """Self-attention of one module/layer/head over one medium, and attention rollout.

        ``module``: ``f``, ``g`` or ``head.<modality>/<task>``; ``layer`` from 0; ``head`` ``mean`` or
        a number. Returns (one picture: the map's heat over the input beside the rollout's, JSON
        ``{"name", "shape": [Q, K], "matrix": Q x K (rows sum to 1), "queries", "keys", "heat",
        "rollout", ...}``). Task heads put a ``[CLS]`` token first; their heat is what it attends to.
        """
        modality, src = self._one(modality, self._media(image, audio, text, video))
        batch = self._batch(modality, src)
        with self.lock:
            r = explore.attention_map(self.model, batch, module, _layer(layer), _head_index(head))
            picture = explore.panels(
                [explore.heat_picture(self.model, batch, r[k]) for k in ("heat", "rollout")],
                [f"{r['name']}, head {head}", "rollout over f and g"],
            )
        info = {"input": self._name(modality, src), "modality": modality, "module": module,
                "layer": _layer(layer), "head": head, "name": r["name"], "shape": list(r["matrix"].shape),
                "matrix": _rounded(r["matrix"]), "queries": r["queries"], "keys": r["keys"],
                "heat": _rounded(r["heat"]), "rollout": _rounded(r["rollout"])}  # fmt: skip
        return picture, info

    @_user_errors
    def cross_attention(self, image: str | None = None, audio: str | None = None, text: str | None = None,
                        video: str | None = None, modality_a: str = "image", modality_b: str = "audio",
                        module: str = "A", layer: int = 0, head: str = "mean") -> tuple[dict, dict]:  # fmt: skip
        """The fusion attention between two media of different modalities (two-stream forward).

        ``module="A"``, ``layer=0``: a's tokens attend to b's (``a<-b``, shape Na x Nb, rows sum to
        1) and b's to a's (``b<-a``, Nb x Na); ``layer=1``: the fuse-back. ``module="g"``: the
        cross-stream blocks of g's joint attention. Returns JSON ``{"a<-b": {"shape", "matrix"},
        "b<-a": {...}, "labels_a", "labels_b", "pair": {task: {"label", "top"}}, ...}``.
        """
        media = self._media(image, audio, text, video)
        if modality_a == modality_b:
            raise MediaError(f"pick two different modalities (both are {modality_a})")
        (ma, sa), (mb, sb) = self._one(modality_a, media), self._one(modality_b, media)
        a, b = self._batch(ma, sa), self._batch(mb, sb)
        h = _head_index(head)
        with self.lock:
            r = explore.cross_attention(self.model, a, b, module, _layer(layer))
            ab, ba = (
                r[k].mean(0) if h is None else r[k][self._check_head(r[k], h)] for k in ("a<-b", "b<-a")
            )
            pics = (explore.heat_picture(self.model, a, ba.sum(0).reshape(self._grid(a))),
                    explore.heat_picture(self.model, b, ab.sum(0).reshape(self._grid(b))))  # fmt: skip
        pair = {}
        for key, logits in r["pair"].items():
            spec = self.model.tasks[key]
            probs = logits.float().softmax(-1)
            top = probs.topk(min(self.predictor.top_k, probs.numel()))
            pair[key] = {"label": spec.labels[int(top.indices[0])],
                         "top": [[spec.labels[int(i)], round(float(p), 4)] for p, i in zip(top.values, top.indices)]}  # fmt: skip
        info = {"a": ma, "b": mb, "input_a": self._name(ma, sa), "input_b": self._name(mb, sb),
                "module": module, "layer": _layer(layer), "head": head,
                "a<-b": {"shape": list(ab.shape), "matrix": _rounded(ab)},
                "b<-a": {"shape": list(ba.shape), "matrix": _rounded(ba)},
                "labels_a": r["labels_a"], "labels_b": r["labels_b"], "pair": pair}  # fmt: skip
        return info, {"a": pics[0], "b": pics[1]}

    def _grid(self, batch) -> tuple[int, ...]:
        return self.model.patchers[batch.modality](batch.x, batch.lengths).grid

    @staticmethod
    def _check_head(maps: torch.Tensor, h: int) -> int:
        if not 0 <= h < maps.shape[0]:
            raise ConfigError(f"the fusion attention has {maps.shape[0]} heads; head {h} does not exist")
        return h

    def _targets(self, heads: list[str] | str | None) -> list[tuple[str, int, int]]:
        """``["f.0.1", "g.0.*", "head.image/digit.0.0"]`` -> [(module, layer, head), ...]."""
        if isinstance(heads, str):
            heads = [h for h in heads.replace(",", " ").split() if h]
        out = []
        for item in heads or []:
            parts = str(item).rsplit(".", 2)
            if len(parts) != 3:
                raise ConfigError(f"head {item!r} is not module.layer.head, e.g. f.0.1 or g.0.* (all heads)")
            module, layer, head = parts
            if module not in self.layout:
                raise ConfigError(f"no attention module {module!r}; modules are {', '.join(self.layout)}")
            count = self.layout[module][1]
            try:
                out += [(module, _layer(layer), h) for h in (range(count) if head == "*" else [int(head)])]
            except ValueError:
                raise ConfigError(
                    f"head {item!r}: layer and head must be numbers (or * for every head)"
                ) from None
        return out

    @_user_errors
    def ablate_heads(self, image: str | None = None, audio: str | None = None, text: str | None = None,
                     video: str | None = None, modality: str = "auto",
                     heads: list[str] | None = None) -> tuple[dict, dict]:  # fmt: skip
        """Predictions of one medium with chosen attention heads silenced (their outputs zeroed).

        ``heads``: a list of ``module.layer.head`` strings (``f.0.1``, ``head.image/digit.0.0``;
        ``g.0.*`` = every head of that layer; an empty list silences nothing). Returns JSON
        ``{"silenced": [[module, layer, head]...], "before": tasks, "after": tasks, "change": {task:
        {"label_changed", "total_variation", "p_label_before", "p_label_after"} | {"mean_abs_change"}}}``.
        """
        modality, src = self._one(modality, self._media(image, audio, text, video))
        targets = self._targets(heads)
        batch = self._batch(modality, src)
        with self.lock, torch.no_grad():
            before = self.model.forward_single(batch)
            after = explore.silenced_outputs(self.model, batch, targets)
        info = {"input": self._name(modality, src), "modality": modality, "silenced": [list(t) for t in targets],
                "change": explore.prediction_change(self.model, modality, before, after)}  # fmt: skip
        views = {k: self.predictor.readable(batch, v) for k, v in (("before", before), ("after", after))}
        for k, tasks in views.items():
            info[k] = {t: {f: v for f, v in out.items() if f != "output"} for t, out in tasks.items()}
        return info, {"modality": modality, **views}

    @_user_errors
    def head_importance(self, modality: str = "image", task: str = "digit") -> dict:
        """Silence each head in turn over a validation batch of ``modality/task`` (up to 256 items).

        Returns JSON ``{"rows": ["f.0", ..., "head.<key>.0"], "heads": H, "metric": "accuracy" | "psnr",
        "baseline", "drop": rows x H (metric lost when that head is silenced; null where a layer has
        fewer heads), "loss_increase": rows x H, "n"}``.
        """
        key = f"{modality}/{task}"
        if key not in self.model.tasks:
            raise ConfigError(f"the model has no task {key!r}; it has {', '.join(self.model.tasks)}")
        if self.bench is None:
            raise ConfigError("the benchmark data is not available to this app: run `workbench data build`")
        with self.lock:
            if key not in self._importance:
                from workbench.data import make_loader

                ds = self.bench.dataset(modality, task, "val")
                loader = make_loader(ds, IMPORTANCE_ITEMS, shuffle=False, seed=0,
                                     text_tokenizer=self.model.text_tokenizer)  # fmt: skip
                self._importance[key] = explore.head_importance(self.model, next(iter(loader)))
            return self._importance[key]

    @_user_errors
    def probe_head(self, image: str | None = None, audio: str | None = None, text: str | None = None,
                   video: str | None = None, modality: str = "auto", task: str = "image/digit") -> dict:  # fmt: skip
        """Read any classification head (``modality/task``, even another modality's) on one medium.

        Returns ``{"input", "modality", "task", "label", "top": [[label, p], ...]}``.
        """
        spec = self.model.tasks.get(task)
        if spec is None or spec.kind != "classification":
            keys = ", ".join(k for k, t in self.model.tasks.items() if t.kind == "classification")
            raise ConfigError(f"{task!r} is not a classification head of this model; pick one of {keys}")
        modality, src = self._one(modality, self._media(image, audio, text, video))
        batch = self._batch(modality, src)
        with self.lock:
            logits = explore.probe_head(self.model, batch, task)
        probs = logits.float().softmax(-1)[0]
        top = probs.topk(min(self.predictor.top_k, probs.numel()))
        pairs = [[spec.labels[int(i)], round(float(p), 4)] for p, i in zip(top.values, top.indices)]
        return {"input": self._name(modality, src), "modality": modality, "task": task,
                "label": pairs[0][0], "top": pairs}  # fmt: skip

    # --------------------------------------------------------------------------- UI-only handlers
    def drawing_to_image(self, sketch: dict | None) -> str:
        """The sketchpad's composite flattened onto white and saved as PNG (the image slot's value)."""
        from PIL import Image

        pic = None if sketch is None else sketch.get("composite")
        if pic is None:
            raise gr.Error("draw a digit on the pad first")
        pic = np.asarray(pic, dtype=np.float32)
        if pic.ndim == 3 and pic.shape[-1] == 4:
            alpha = pic[..., 3:] / 255
            pic = pic[..., :3] * alpha + 255 * (1 - alpha)
        path = Path(tempfile.mkstemp(suffix=".png", prefix="drawing-", dir=self.scratch)[1])
        Image.fromarray(pic.clip(0, 255).astype(np.uint8)).save(path)
        return str(path)

    def render_predictions(self, state: dict | None) -> list:
        """Labels and pictures for every task component (None clears the ones not predicted)."""
        state = state or {}
        values = []
        for spec in self.tasks:
            out = state.get(spec.modality, {}).get(spec.name)
            values.append(None if out is None else _task_value(out))
        return values

    def render_ablation(self, state: dict | None) -> list:
        """Show the medium's modality's before/after row (hide the others) and fill its components."""
        state = state or {}
        shown = [gr.Row(visible=m == state.get("modality")) for m in self.modalities]
        values = []
        for spec in self.tasks:
            for view in ("before", "after"):
                out = state.get(view, {}).get(spec.name) if state.get("modality") == spec.modality else None
                values.append(None if out is None else _task_value(out))
        return shown + values


def _task_value(out: dict) -> Any:
    """A gr.Label value for classification output, a picture for a dense one."""
    if "top" in out:
        return {label: p for label, p in out["top"]}
    img = out["output"].detach().float().clamp(0, 1).cpu().numpy()
    img = img.reshape(-1, *img.shape[-2:]).mean(0)
    return explore.zoom((np.repeat(img[..., None], 3, -1) * 255).astype(np.uint8), 224)


# -------------------------------------------------------------------------------------------- layout
def build_app(ex: Explorer) -> gr.Blocks:
    """The Blocks app: shared media inputs on top, one tab per way of looking at the model."""
    model = ex.model
    mods = ex.modalities
    single_modules = [m for m in ex.layout if m in ("f", "g", "head") or m.startswith("head.")]
    max_heads = max(h for _, h in ex.layout.values())
    max_layers = max(ex.layout[m][0] for m in single_modules)
    head_choices = ["mean", *map(str, range(max_heads))]
    head_ids = [f"{m}.{layer}.{h}" for m in single_modules for layer in range(ex.layout[m][0])
                for h in range(ex.layout[m][1])]  # fmt: skip
    layer_ids = [f"{m}.{layer}.*" for m in single_modules for layer in range(ex.layout[m][0])]
    class_keys = [k for k, t in model.tasks.items() if t.kind == "classification"]
    tasks_of = {m: [t.name for t in model.tasks.values() if t.modality == m] for m in mods}

    with gr.Blocks(title="workbench attention explorer", analytics_enabled=False) as demo:
        gr.Markdown(f"## Workbench attention explorer\nCheckpoint `{ex.checkpoint}` · preset "
                    f"`{ex.cfg.model.preset}` · fusion `{ex.cfg.model.fusion}` · tasks: "
                    f"{', '.join(model.tasks)}")  # fmt: skip
        with gr.Row(equal_height=False):
            with gr.Column(min_width=220):
                with gr.Tab("Upload image"):
                    image = gr.Image(
                        type="filepath", label="image", sources=["upload", "clipboard"], height=220
                    )
                with gr.Tab("Draw"):
                    sketch = gr.Sketchpad(label="pick the brush, draw a digit", type="numpy", image_mode="RGBA",
                                          height=300, canvas_size=(280, 280), layers=False,
                                          brush=gr.Brush(default_size=18, colors=["#000000"], color_mode="fixed"))  # fmt: skip
                    use_drawing = gr.Button("Use drawing as the image", size="sm")
            audio = gr.Audio(
                type="filepath", label="audio (upload or record)", sources=["upload", "microphone"]
            )
            text = gr.Textbox(label="text", placeholder="e.g. sieben, the number seven", lines=2)
            video = gr.Video(label="video", sources=["upload"], height=220)
        media = [image, audio, text, video]
        if ex.examples:
            gr.Examples([[r.get(m) for m in MEDIA] for r in ex.examples], media,
                        label="Label-aligned test-split examples (one digit per row in every modality)",
                        example_labels=[r["label"] for r in ex.examples])  # fmt: skip

        with gr.Tab("Predict"):
            predict_btn = gr.Button("Predict every head", variant="primary")
            latency = gr.Markdown()
            task_outputs = []
            with gr.Row():
                for m in mods:
                    with gr.Column(min_width=180):
                        for spec in (t for t in ex.tasks if t.modality == m):
                            key = spec.key
                            if spec.kind == "classification":
                                comp = gr.Label(label=key, num_top_classes=ex.predictor.top_k,
                                                elem_id=f"predict-{key.replace('/', '-')}")  # fmt: skip
                            else:
                                comp = gr.Image(label=f"{key} output", height=200, elem_classes="heat")
                            task_outputs.append(comp)
            with gr.Accordion("JSON (as `workbench predict --json`)", open=False):
                predict_json = gr.JSON(label="predictions")
            predict_state = gr.State()

        with gr.Tab("Attention"):
            with gr.Row():
                att_modality = gr.Radio(["auto", *mods], value="auto", label="medium")
                att_module = gr.Dropdown(single_modules, value="f", label="module (f, g or a task head)")
                att_layer = gr.Dropdown(list(range(max_layers)), value=0, label="layer")
                att_head = gr.Dropdown(head_choices, value="mean", label="head")
            att_btn = gr.Button("Show attention", variant="primary")
            with gr.Row():
                att_img = gr.Image(label="attention heat over the input: this layer and head | rollout",
                                   format="png", elem_classes="heat")  # fmt: skip
                att_plot = gr.Plot(label="attention matrix (hover for tokens)")
            with gr.Accordion("raw matrix (JSON)", open=False):
                att_json = gr.JSON(label="attention")

        with gr.Tab("Cross-modal"):
            gr.Markdown("Two media of different modalities through the two-stream path: "
                        "`A.0` is the cross-modal fusion (each stream's tokens query the other's).")  # fmt: skip
            with gr.Row():
                cross_a = gr.Dropdown(mods, value=mods[0], label="stream a")
                cross_b = gr.Dropdown(mods, value=mods[1 % len(mods)], label="stream b")
                cross_module = gr.Radio(["A", "g"], value="A", label="module")
                cross_layer = gr.Dropdown(list(range(max(2, model.config.model.depth_g))), value=0,
                                          label="layer (A: 0 fusion, 1 fuse-back)")  # fmt: skip
                cross_head = gr.Dropdown(head_choices, value="mean", label="head")
            cross_btn = gr.Button("Show cross-attention", variant="primary")
            if ex.examples and len(mods) > 1:  # each pair fills its two slots and clears the others
                combos = [(a, b) for i, a in enumerate(mods) for b in mods[i + 1 :]]
                rows = [(r, a, b) for r in ex.examples[:2] for a, b in combos if a in r and b in r]
                gr.Examples([[r[m] if m in (a, b) else None for m in MEDIA] + [a, b] for r, a, b in rows],
                            [*media, cross_a, cross_b], label="label-aligned pairs from the test split (same digit)",
                            example_labels=[f"{a} + {b}, {r['label']}" for r, a, b in rows])  # fmt: skip
            with gr.Row():
                plot_ab = gr.Plot(label="a <- b")
                plot_ba = gr.Plot(label="b <- a")
            with gr.Row():
                pic_a = gr.Image(label="a: attention its tokens receive from b", elem_classes="heat")
                pic_b = gr.Image(label="b: attention its tokens receive from a", elem_classes="heat")
            with gr.Accordion("JSON", open=False):
                cross_json = gr.JSON(label="cross_attention")
            cross_state = gr.State()

        with gr.Tab("Probe heads"):
            with gr.Row():
                abl_modality = gr.Radio(["auto", *mods], value="auto", label="medium")
                abl_heads = gr.Dropdown(head_ids + layer_ids, value=[], multiselect=True, allow_custom_value=True,
                                        label="heads to silence (module.layer.head; * = every head)")  # fmt: skip
            abl_btn = gr.Button("Predict with these heads silenced", variant="primary")
            abl_table = gr.Markdown()
            abl_rows, abl_outputs = [], []
            for m in mods:  # one row per modality; the medium's row is shown after a run
                with gr.Row(visible=False) as row:
                    abl_rows.append(row)
                    for spec in (t for t in ex.tasks if t.modality == m):
                        key = spec.key
                        for view in ("before", "after"):
                            if spec.kind == "classification":
                                comp = gr.Label(label=f"{key} {view}", num_top_classes=3, min_width=140)
                            else:
                                comp = gr.Image(label=f"{key} {view}", height=160, elem_classes="heat")
                            abl_outputs.append(comp)
            with gr.Accordion("JSON", open=False):
                abl_json = gr.JSON(label="ablation")
            abl_state = gr.State()
            gr.Markdown("### Head importance: silence each head in turn over a validation batch")
            with gr.Row():
                imp_modality = gr.Dropdown(mods, value=mods[0], label="modality")
                imp_task = gr.Dropdown(tasks_of[mods[0]], value=tasks_of[mods[0]][0], label="task")
                imp_btn = gr.Button("Scan heads", variant="primary")
            with gr.Row():
                imp_plot = gr.Plot(label="metric lost per head")
                imp_loss_plot = gr.Plot(label="loss gained per head")
            with gr.Accordion("JSON", open=False):
                imp_json = gr.JSON(label="head_importance")
            gr.Markdown("### Probe any classification head on the medium (even another modality's head)")
            with gr.Row():
                probe_modality = gr.Radio(["auto", *mods], value="auto", label="medium")
                probe_task = gr.Dropdown(
                    class_keys, value=class_keys[0] if class_keys else None, label="head"
                )
                probe_btn = gr.Button("Probe", variant="primary")
            probe_label = gr.Label(label="head output", num_top_classes=ex.predictor.top_k)
            with gr.Accordion("JSON", open=False):
                probe_json = gr.JSON(label="probe")

        # ------------------------------------------------------------------------------- wiring
        # public endpoints return data (JSON, pictures); private chained events draw it, only on success
        private = dict(api_visibility="private", queue=False)
        use_drawing.click(ex.drawing_to_image, sketch, image, api_name="use_drawing", **private)
        predict_btn.click(
            ex.predict, media, [predict_json, predict_state], api_name="predict", preprocess=False
        ).success(
            ex.render_predictions, predict_state, task_outputs, api_name="render_predictions", **private
        ).success(latency_text, predict_json, latency, api_name="render_latency", **private)
        att_btn.click(ex.attention, [*media, att_modality, att_module, att_layer, att_head],
                      [att_img, att_json], api_name="attention", preprocess=False).success(
            attention_figure, att_json, att_plot, api_name="render_attention", **private)  # fmt: skip
        cross_btn.click(ex.cross_attention, [*media, cross_a, cross_b, cross_module, cross_layer, cross_head],
                        [cross_json, cross_state], api_name="cross_attention", preprocess=False).success(
            cross_figures, [cross_json, cross_state], [plot_ab, plot_ba, pic_a, pic_b],
            api_name="render_cross_attention", **private)  # fmt: skip
        abl_event = dict(
            fn=ex.ablate_heads,
            inputs=[*media, abl_modality, abl_heads],
            outputs=[abl_json, abl_state],
            preprocess=False,
        )
        for trigger, name in ((abl_btn.click, "ablate_heads"), (abl_heads.input, "ablate_heads_on_change")):
            extra = {} if name == "ablate_heads" else {"api_visibility": "private"}
            trigger(**abl_event, api_name=name, **extra).success(
                ex.render_ablation, abl_state, abl_rows + abl_outputs, api_name=f"render_{name}", **private
            ).success(change_table, abl_json, abl_table, api_name=f"render_{name}_table", **private)
        imp_modality.change(lambda m: gr.Dropdown(choices=tasks_of.get(m, []), value=(tasks_of.get(m) or [None])[0]),
                            imp_modality, imp_task, api_name="importance_tasks", **private)  # fmt: skip
        imp_btn.click(
            ex.head_importance,
            [imp_modality, imp_task],
            imp_json,
            api_name="head_importance",
            preprocess=False,
        ).success(
            importance_figures,
            imp_json,
            [imp_plot, imp_loss_plot],
            api_name="render_head_importance",
            **private,
        )
        probe_btn.click(ex.probe_head, [*media, probe_modality, probe_task], probe_json, api_name="probe_head", preprocess=False).success(
            lambda info: None if not info else dict(info["top"]), probe_json, probe_label,
            api_name="render_probe", **private)  # fmt: skip
    return demo


# -------------------------------------------------------------------------------------------- launch
def launch(checkpoint: str | Path, *, host: str | None = None, port: int | None = None, config_files=(),
           overrides=(), prevent_thread_lock: bool = False, quiet: bool = False, threads: int | None = 1) -> gr.Blocks:  # fmt: skip
    """Load ``checkpoint`` and serve the app (config: the checkpoint's, then files, then ``key=value``).

    Binds ``app.host``:``app.port`` (127.0.0.1:7860 unless told otherwise), a share link only with
    ``app.share=true``; the queue runs ``app.concurrency_limit`` calls at once and uploads are capped
    at ``data.limits.max_upload_mb``. Returns the running Blocks (``.local_url``; ``.close()`` stops it).

    ``threads`` sets torch's intra-op threads for the process (None leaves them alone). Requests are
    batches of one on small matrices: on a shared 2-core machine two OpenMP threads spin against each
    other and a forward takes ~100x longer (measured 339 ms vs 3 ms), so the default is one.
    """
    checkpoint = Path(checkpoint)
    if not (checkpoint / "config.json").is_file():
        raise CheckpointError(f"{checkpoint} is not a checkpoint directory (no config.json)")
    if threads:
        torch.set_num_threads(threads)
    cfg = load_config(
        files=config_files, overrides=overrides, base=read_saved_config(checkpoint / "config.json")
    )
    ex = Explorer.from_checkpoint(checkpoint, cfg)
    demo = build_app(ex)
    demo.queue(default_concurrency_limit=cfg.app.concurrency_limit)
    host, port = host or cfg.app.host, port or cfg.app.port
    try:
        demo.launch(
            server_name=host,
            server_port=port,
            share=cfg.app.share,
            max_file_size=int(cfg.data.limits.max_upload_mb * 1024 * 1024),
            prevent_thread_lock=prevent_thread_lock,
            show_error=True,
            quiet=quiet,
            theme=THEME,
            css=CSS,
            footer_links=["api"],
        )
    except OSError as err:  # Gradio's "Cannot find empty port" and bind errors
        raise ConfigError(f"cannot serve on {host}:{port} ({err}); pick another with --port N") from None
    return demo


if __name__ == "__main__":
    from workbench.cli import main

    sys.exit(main(["app", *sys.argv[1:]]))
