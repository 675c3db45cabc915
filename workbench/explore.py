"""Model logic behind the attention explorer (app) and the evaluation notebook; no UI library here.

Everything takes a loaded :class:`~workbench.model.OmniVec2` and :class:`~workbench.batch.Batch`es and
returns tensors or plain dicts:

* :func:`single_stream_attention`: every self-attention map of ``h(g(f(x)))`` for one batch;
* :func:`rollout_heat`: attention rollout through f then g, as one weight per input token on the
  input's grid (what the whole backbone looks at);
* :func:`layer_heat`: one module/layer/head's attention, averaged over queries, on the token grid;
* :func:`overlay`: a heat grid upsampled onto a grey picture, as an RGB array;
* :func:`collect_predictions`: predictions, targets and confidences of a whole split;
* :func:`heat_picture` / :func:`token_labels`: any medium with a token-grid heat over it, and readable
  token names (hover text of heatmaps); :func:`panels`: captioned pictures in one image;
* :func:`attention_map`: one module/layer/head's matrix with its heat and the rollout, for one medium;
* :func:`cross_attention`: both directions of the fusion attention of a two-stream forward;
* :func:`silenced_outputs` / :func:`prediction_change`: predictions with chosen heads zeroed, and how
  far they moved; :func:`head_importance`: silence each head in turn over a validation batch;
  :func:`probe_head`: read any classification head on any medium's features.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from workbench.batch import Batch
from workbench.errors import ConfigError
from workbench.visualize import attention_rollout, token_heat


@torch.no_grad()
def single_stream_attention(model, batch: Batch, tasks: list[str] | None = None) -> dict[str, Tensor]:
    """``{"f.0": (B, H, N, N), ..., "g.0": ..., "head.image/digit.0": (B, H, 1+N, 1+N)}``."""
    model.eval()
    with model.capture_attention() as maps:
        model.forward_single(batch, tasks)
    return dict(maps)


def _backbone_layers(maps: dict[str, Tensor], modules: tuple[str, ...]) -> list[Tensor]:
    """The maps of ``modules`` in forward order (``f.0, f.1, ..., g.0, ...``)."""
    out = []
    for module in modules:
        keys = sorted((k for k in maps if k.split(".")[0] == module and k.split(".")[1].isdigit()),
                      key=lambda k: int(k.split(".")[1]))  # fmt: skip
        out += [maps[k] for k in keys]
    return out


def rollout_heat(model, batch: Batch, maps: dict[str, Tensor] | None = None, modules=("f", "g")) -> Tensor:
    """(B, *grid) how much each input token flows into the final features (rollout, averaged over queries)."""
    maps = maps if maps is not None else single_stream_attention(model, batch)
    roll = attention_rollout(_backbone_layers(maps, modules))  # (B, N, N)
    heat = _valid_mean(roll, model, batch)
    return token_heat(model, batch, heat)


def layer_heat(model, batch: Batch, maps: dict[str, Tensor], name: str, head: int | None = None) -> Tensor:
    """(B, *grid) attention received by each token in map ``name`` (one head, or the mean of heads).

    Heads with a leading class token (task heads) drop it, so the picture stays on the input grid.
    """
    a = maps[name].float()  # (B, H, Q, K)
    a = a.mean(1) if head is None else a[:, head]
    p = model.patchers[batch.modality](batch.x, batch.lengths)
    n = int(np.prod(p.grid))
    if a.shape[-1] == n + 1:  # class token first: keep what the class token attends to
        a = a[:, :1, 1:]
    heat = a.mean(1)  # (B, N)
    if p.padding is not None:
        heat = heat.masked_fill(p.padding, 0.0)
    return token_heat(model, batch, heat)


def _valid_mean(roll: Tensor, model, batch: Batch) -> Tensor:
    p = model.patchers[batch.modality](batch.x, batch.lengths)
    if p.padding is None:
        return roll.mean(1)
    valid = (~p.padding).float()  # (B, N)
    heat = (roll * valid[:, :, None]).sum(1) / valid.sum(1, keepdim=True)
    return heat * valid


def overlay(picture: np.ndarray | Tensor, heat: np.ndarray | Tensor, alpha: float = 0.55) -> np.ndarray:
    """A grey picture (H, W) in [0, 1] with a heat grid (gh, gw) upsampled onto it: (H, W, 3) uint8."""
    pic = np.asarray(picture.detach().cpu() if isinstance(picture, Tensor) else picture, dtype=np.float32)
    h = torch.as_tensor(
        np.asarray(heat.detach().cpu() if isinstance(heat, Tensor) else heat, dtype=np.float32)
    )
    h = torch.nn.functional.interpolate(h[None, None], size=pic.shape, mode="nearest")[0, 0].numpy()
    h = (h - h.min()) / (h.max() - h.min() + 1e-8)
    red = np.stack([h, 0.25 * h, 1 - h], -1)  # blue (cold) -> red (hot)
    rgb = (1 - alpha) * np.repeat(pic[..., None], 3, -1) + alpha * red * (
        0.35 + 0.65 * pic[..., None].clip(0.2, 1)
    )
    return (rgb.clip(0, 1) * 255).astype(np.uint8)


@torch.no_grad()
def collect_predictions(model, dataset, batch_size: int = 256) -> dict[str, Tensor]:
    """``{"pred", "y", "confidence", "digit"}`` for every item of a classification TaskDataset, in order."""
    from workbench.data import make_loader

    model.eval()
    out: dict[str, list[Tensor]] = {"pred": [], "y": [], "confidence": [], "digit": []}
    for batch in make_loader(dataset, batch_size, shuffle=False, seed=0, text_tokenizer=model.text_tokenizer):
        probs = model.forward_single(batch, [dataset.task])[dataset.task].float().softmax(-1)
        conf, pred = probs.max(-1)
        out["pred"].append(pred), out["y"].append(batch.y), out["confidence"].append(conf)
        out["digit"].append(batch.digit if batch.digit is not None else torch.full_like(batch.y, -1))
    return {k: torch.cat(v) for k, v in out.items()}


# ------------------------------------------------------------------------------------ pictures of heat
def zoom(rgb: np.ndarray, target: int = 224) -> np.ndarray:
    """Nearest-neighbour upscale so the shorter side reaches ``target`` px (crisp patches, no blur)."""
    k = max(1, target // max(1, min(rgb.shape[:2])))
    return rgb.repeat(k, 0).repeat(k, 1)


def _unit(x: np.ndarray) -> np.ndarray:
    return (x - x.min()) / (x.max() - x.min() + 1e-8)


def token_labels(model, batch: Batch) -> list[str]:
    """A readable name for every token of the first sample (axis labels and hover text of heatmaps).

    Discrete inputs name their sub-word pieces; time-frequency grids give milliseconds and mel bands;
    3-D grids give frames, rows and columns; 2-D grids rows and columns. The patcher's own geometry
    decides, so a new modality with one of these layouts is labelled without code here.
    """
    patcher = model.patchers[batch.modality]
    p = patcher(batch.x[:1], None if batch.lengths is None else batch.lengths[:1])
    if patcher.discrete:
        tok = model.text_tokenizer
        ids = p.values[0].tolist()
        return [tok.tokenizer.id_to_token(i) if tok else str(i) for i in ids]
    coords = p.coords.long().tolist()
    if hasattr(patcher, "hop"):  # time-frequency patches: (time patch, mel patch)
        ms = 1000 * patcher.hop * patcher.pt / 16_000
        return [f"{t * ms:.0f}-{(t + 1) * ms:.0f} ms, mel {f * patcher.pf}-{(f + 1) * patcher.pf - 1}"
                for t, f in coords]  # fmt: skip
    if len(p.grid) == 3:
        t = getattr(patcher, "t", 1)
        return [f"frames {a * t}-{a * t + t - 1}, row {r}, col {c}" for a, r, c in coords]
    if len(p.grid) == 2:
        return [f"row {r}, col {c}" for r, c in coords]
    return [f"token {c[0]}" for c in coords]


def _token_strip(pieces: list[str], weights: np.ndarray) -> np.ndarray:
    """Sub-word pieces on boxes coloured by weight (blue cold -> red hot): (H, W, 3) uint8."""
    from PIL import Image, ImageDraw

    w = _unit(np.asarray(weights, dtype=np.float32)) if len(weights) > 1 else np.ones(len(weights))
    sizes = [max(28, 9 * len(s) + 12) for s in pieces]
    img = Image.new("RGB", (sum(sizes) + 8, 40), "white")
    draw = ImageDraw.Draw(img)
    x = 4
    for piece, size, v in zip(pieces, sizes, w):
        colour = (int(255 * v), int(64 * v + 40), int(255 * (1 - v)))
        draw.rectangle([x, 4, x + size - 3, 35], fill=colour)
        draw.text((x + 5, 13), piece, fill="white")
        x += size
    return np.asarray(img)


def panels(pictures: list[np.ndarray], captions: list[str], gap: int = 8) -> np.ndarray:
    """Pictures (H, W, 3 uint8) with a caption above each, in one RGB image: side by side, or stacked
    when they are wide (token strips, frame strips), so the result stays readable at any width."""
    from PIL import Image, ImageDraw

    wide = max(p.shape[1] for p in pictures) > 2 * max(p.shape[0] for p in pictures)
    cap = 16
    if wide:
        width = max(p.shape[1] for p in pictures)
        size = (width, sum(p.shape[0] + cap for p in pictures) + gap * (len(pictures) - 1))
    else:
        size = (
            sum(p.shape[1] for p in pictures) + gap * (len(pictures) - 1),
            max(p.shape[0] for p in pictures) + cap,
        )
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    x = y = 0
    for picture, caption in zip(pictures, captions):
        draw.text((x + 2, y + 2), caption, fill="black")
        img.paste(Image.fromarray(np.ascontiguousarray(picture)), (x, y + cap))
        if wide:
            y += picture.shape[0] + cap + gap
        else:
            x += picture.shape[1] + gap
    return np.asarray(img)


def heat_picture(model, batch: Batch, heat: Tensor | np.ndarray, size: int = 224) -> np.ndarray:
    """One sample's input with a token-grid heat laid over it, as RGB uint8 ready to show.

    ``heat`` is (*grid) for the first sample (:func:`layer_heat`/:func:`rollout_heat` give (B, *grid)).
    Pictures follow the input's shape: a grey image gets the heat over its patches; a clip becomes a
    strip of frames, each with its tubelet's heat; a log-mel grid is drawn as a spectrogram (time to
    the right, low frequencies at the bottom); discrete tokens become coloured boxes with their text.
    """
    heat = np.asarray(heat.detach().cpu() if isinstance(heat, Tensor) else heat, dtype=np.float32)
    patcher = model.patchers[batch.modality]
    if patcher.discrete:
        return _token_strip(token_labels(model, batch), heat.reshape(-1))
    from workbench.visualize import picture

    p = patcher(batch.x[:1], None if batch.lengths is None else batch.lengths[:1])
    pic = picture(model, batch.slice(0, 1), p.values.float(), p.grid)[0].float().numpy()
    if pic.ndim == 2:  # (frames, mels): the spectrogram, heat (time patches, mel patches)
        rgb = overlay(_unit(pic), heat)
        return zoom(rgb.transpose(1, 0, 2)[::-1].copy(), size)
    if pic.ndim == 3:  # (C, H, W) picture, heat (gh, gw)
        return zoom(overlay(_unit(pic.mean(0)), heat), size)
    # (T, C, H, W) clip, heat (gt, gh, gw): each frame takes the heat of its time slot
    T = pic.shape[0]
    frames = [overlay(_unit(pic[t].mean(0)), heat[t * heat.shape[0] // T]) for t in range(T)]
    gap = np.full((frames[0].shape[0], 2, 3), 255, np.uint8)
    strip = np.concatenate([x for f in frames for x in (f, gap)][:-1], axis=1)
    return zoom(strip, size // 2)


# ------------------------------------------------------------------------------------ attention maps
def attention_map(
    model, batch: Batch, module: str, layer: int, head: int | None = None
) -> dict[str, Tensor | list[str]]:
    """One single-stream attention map of the first sample and the heats drawn from it.

    ``module`` is ``f``, ``g`` or ``head.<modality>/<task>`` (a head of the batch's modality); ``head``
    None averages the heads. Returns ``{"matrix": (Q, K), "heat": (*grid), "rollout": (*grid),
    "queries": [...], "keys": [...], "name": "f.0"}``; rows of ``matrix`` sum to 1 (softmax).
    """
    maps = single_stream_attention(model, batch)
    name = f"{module}.{int(layer)}"
    if name not in maps:
        known = sorted({k.rsplit(".", 1)[0] for k in maps})
        raise ConfigError(f"no attention layer {name!r} for a {batch.modality} input; "
                          f"modules are {', '.join(known)} with layers counted from 0")  # fmt: skip
    heads = maps[name].shape[1]
    if head is not None and not 0 <= int(head) < heads:
        raise ConfigError(f"{name} has {heads} heads; head {head} does not exist (count from 0)")
    a = maps[name][0].float()  # (H, Q, K)
    matrix = a.mean(0) if head is None else a[int(head)]
    labels = token_labels(model, batch)
    keys = ["[CLS]", *labels] if matrix.shape[-1] == len(labels) + 1 else labels
    return {
        "name": name,
        "matrix": matrix,
        "heat": layer_heat(model, batch, maps, name, None if head is None else int(head))[0],
        "rollout": rollout_heat(model, batch, maps)[0],
        "queries": keys if matrix.shape[0] == len(keys) else labels,
        "keys": keys,
    }


@torch.no_grad()
def cross_attention(model, a: Batch, b: Batch, module: str = "A", layer: int = 0) -> dict[str, object]:
    """The fusion attention between two media of a two-stream forward (first sample of each).

    ``module="A"``: layer 0 is the cross-modal fusion ``A.i<-j`` (a's tokens query b's) and ``A.j<-i``;
    layer 1 the fuse-back (each stream's fused tokens query its own tokenizer output). ``module="g"``:
    the off-diagonal blocks of g's attention over the concatenated streams (rows are not renormalised,
    so they sum to the share of attention that crosses over). Returns ``{"a<-b": (H, Na, Nb),
    "b<-a": (H, Nb, Na), "labels_a", "labels_b", "pair": {a task: logits, b task: logits}}``.
    """
    fusion = model.config.model.fusion
    if fusion == "late" or (module == "A" and model.A is None):
        raise ConfigError(f"this checkpoint fuses streams with model.fusion={fusion}: it has no "
                          f"{'cross-attention' if module == 'A' else 'joint attention'} to show")  # fmt: skip
    a = replace(a, task=model.tasks[model.task_keys(a.modality)[0]].name).slice(0, 1)
    b = replace(b, task=model.tasks[model.task_keys(b.modality)[0]].name).slice(0, 1)
    model.eval()
    with model.capture_attention() as maps:
        pred_a, pred_b = model.forward_pair(a, b)
    if module == "A":
        names = {0: ("A.i<-j", "A.j<-i"), 1: ("A.back.i", "A.back.j")}
        if int(layer) not in names:
            raise ConfigError(f"the fusion module A has layers 0 (cross-modal fusion) and 1 (fuse-back); "
                              f"not {layer}")  # fmt: skip
        ab, ba = (maps[n][0].float() for n in names[int(layer)])
    elif module == "g":
        name = f"g.{int(layer)}"
        if name not in maps:
            raise ConfigError(f"g has {model.config.model.depth_g} layers; layer {layer} does not exist")
        na = model.patchers[a.modality](a.x, a.lengths).values.shape[1]
        joint = maps[name][0].float()  # (H, Na+Nb, Na+Nb)
        ab, ba = joint[:, :na, na:], joint[:, na:, :na]
    else:
        raise ConfigError(f"cross-attention lives in module 'A' or 'g', not {module!r}")
    return {
        "a<-b": ab,
        "b<-a": ba,
        "labels_a": token_labels(model, a),
        "labels_b": token_labels(model, b),
        "pair": {a.key: pred_a[0], b.key: pred_b[0]},
    }


# ------------------------------------------------------------------------------------ probing heads
def head_targets(model, modality: str | None = None) -> list[tuple[str, int, int]]:
    """Every ``(module, layer, head)`` a single-stream forward of ``modality`` runs (all when None)."""
    out = []
    for owner, (layers, heads) in model.attention_layout().items():
        single = owner in ("f", "g", "head") or (
            owner.startswith("head.") and (modality is None or owner[5:].split("/")[0] == modality)
        )
        if single:
            out += [(owner, layer, h) for layer in range(layers) for h in range(heads)]
    return out


@torch.no_grad()
def silenced_outputs(model, batch: Batch, targets, tasks: list[str] | None = None) -> dict[str, Tensor]:
    """``forward_single`` with the heads ``targets`` [(module, layer, head), ...] zeroed."""
    model.eval()
    with model.silence_heads(list(targets)):
        return model.forward_single(batch, tasks)


def prediction_change(model, modality: str, before: dict[str, Tensor], after: dict[str, Tensor]) -> dict:
    """How much silencing moved each task's output (first sample).

    Classification: whether the top label changed, the total variation distance between the two
    class distributions (0 same, 1 disjoint) and the probability of the original label before/after.
    Dense: the mean absolute change of the output and the largest one.
    """
    out = {}
    for task, b in before.items():
        spec = model.tasks[f"{modality}/{task}"]
        a = after[task]
        if spec.kind == "classification":
            p, q = b.float().softmax(-1)[0], a.float().softmax(-1)[0]
            top = int(p.argmax())
            out[task] = {
                "label_before": spec.labels[top],
                "label_after": spec.labels[int(q.argmax())],
                "label_changed": int(q.argmax()) != top,
                "total_variation": round(0.5 * float((p - q).abs().sum()), 6),
                "p_label_before": round(float(p[top]), 6),
                "p_label_after": round(float(q[top]), 6),
            }
        else:
            d = (a.float() - b.float()).abs()[0]
            out[task] = {
                "mean_abs_change": round(float(d.mean()), 6),
                "max_abs_change": round(float(d.max()), 6),
            }
    return out


def _score(model, key: str, out: Tensor, y: Tensor) -> tuple[float, float]:
    """(metric, loss) of one task output on a batch: accuracy and cross-entropy, or PSNR and MSE."""
    loss = float(model.task_loss(key, out, y))
    if model.tasks[key].kind == "classification":
        return float((out.argmax(-1) == y).float().mean()), loss
    return 10 * float(np.log10(1.0 / max(loss, 1e-10))), loss


@torch.no_grad()
def head_importance(model, batch: Batch, targets=None) -> dict[str, object]:
    """Silence each head in turn over ``batch`` (one task's validation batch) and measure the damage.

    Returns ``{"rows": ["f.0", ..., "head.image/digit.0"], "heads": H, "metric": "accuracy" | "psnr",
    "baseline": m, "baseline_loss": l, "drop": [[m - m_silenced or None]] (rows x H), "loss_increase":
    [[...]], "n": B}``. Rows are every layer the single-stream forward of this task runs (f, g, the
    task's head); cells of heads a layer does not have are None. Positive drop = the head matters.
    """
    model.eval()
    key = batch.key
    metric = "accuracy" if model.tasks[key].kind == "classification" else "psnr"
    base, base_loss = _score(model, key, model.forward_single(batch, [batch.task])[batch.task], batch.y)
    targets = targets or [
        t
        for t in head_targets(model, batch.modality)
        if not t[0].startswith("head.") or t[0] == f"head.{key}"
    ]
    rows = list(dict.fromkeys(f"{m}.{layer}" for m, layer, _ in targets))
    width = max(h for *_, h in targets) + 1
    drop: list[list[float | None]] = [[None] * width for _ in rows]
    loss_up: list[list[float | None]] = [[None] * width for _ in rows]
    for module, layer, h in targets:
        out = silenced_outputs(model, batch, [(module, layer, h)], [batch.task])[batch.task]
        m, loss = _score(model, key, out, batch.y)
        r = rows.index(f"{module}.{layer}")
        drop[r][h], loss_up[r][h] = round(base - m, 6), round(loss - base_loss, 6)
    return {"task": key, "rows": rows, "heads": width, "metric": metric, "baseline": round(base, 6),
            "baseline_loss": round(base_loss, 6), "drop": drop, "loss_increase": loss_up, "n": len(batch)}  # fmt: skip


@torch.no_grad()
def probe_head(model, batch: Batch, task_key: str) -> Tensor:
    """Any classification head read on this medium's features h(g(f(x))), even another modality's
    head (the backbone is shared and is not told the modality): logits (B, C)."""
    spec = model.tasks.get(task_key)
    if spec is None:
        raise ConfigError(f"the model has no head {task_key!r}; it has {', '.join(model.tasks)}")
    if spec.modality == batch.modality:
        return model.forward_single(batch, [spec.name])[spec.name]
    if spec.kind != "classification":
        raise ConfigError(f"{task_key} is a dense head on the {spec.modality} grid: it cannot read "
                          f"a {batch.modality} input")  # fmt: skip
    model.eval()
    _, _, coords = model.tokenize(batch)
    z, padding = model.encode(batch)
    return model.heads(task_key, z, padding, coords)


# ------------------------------------------------------------------------------------------- examples
def save_medium(x, path_stem: Path) -> str:
    """One dataset item as the file a user would upload (chosen by the item's shape, not its modality):
    a string stays text; (L,) a 16 kHz WAV; (C, H, W) a PNG; (T, C, H, W) an H.264 MP4 at 4 frames/s
    (pictures enlarged 4x without smoothing, so they are visible in a browser)."""
    import soundfile as sf
    from PIL import Image

    from workbench.modalities import SAMPLE_RATE

    if isinstance(x, str):
        return x
    x = x.detach().float().cpu()
    if x.ndim == 1:
        path = path_stem.with_suffix(".wav")
        sf.write(path, x.numpy(), SAMPLE_RATE, subtype="PCM_16")
    elif x.ndim == 3:
        path = path_stem.with_suffix(".png")
        pixels = (x.mean(0).clamp(0, 1).numpy() * 255).round().astype(np.uint8)
        k = max(1, 112 // pixels.shape[0])  # big enough to see in a browser; the decoder refits it
        Image.fromarray(pixels.repeat(k, 0).repeat(k, 1)).save(path)
    else:
        import av

        path = path_stem.with_suffix(".mp4")
        frames = (x.mean(1).clamp(0, 1).numpy() * 255).round().astype(np.uint8)  # (T, H, W)
        k = max(1, 128 // frames.shape[1])
        with av.open(str(path), "w") as out:
            stream = out.add_stream("libx264", rate=4, options={"crf": "12"})
            stream.width, stream.height, stream.pix_fmt = frames.shape[2] * k, frames.shape[1] * k, "yuv420p"
            for f in frames:
                grey = av.VideoFrame.from_ndarray(f.repeat(k, 0).repeat(k, 1), format="gray")
                out.mux(stream.encode(grey.reformat(format="yuv420p")))
            out.mux(stream.encode())
    return str(path)


@torch.no_grad()
def write_examples(model, bench, directory: str | Path, count: int = 6) -> list[dict[str, str]]:
    """Label-aligned examples from the test split, written as files: one row per digit, each modality
    showing that digit, the item the model is most confident about (and right) where there is one.

    Returns ``[{"label": "digit 3", "image": "/.../image-3.png", "audio": ".wav", "text": "drei",
    "video": ".mp4"}, ...]`` (keys: the modalities both the model and the benchmark have).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    chosen: dict[str, dict[int, int]] = {}
    sets = {}
    for modality in (m for m in model.modalities if m in bench.modalities):
        spec = next((model.tasks[k] for k in model.task_keys(modality) if model.tasks[k].kind == "classification"),
                    None)  # fmt: skip
        if spec is None or spec.key not in {t.key for t in bench.tasks}:
            continue
        ds = sets[modality] = bench.dataset(modality, spec.name, "test")
        if len(ds) == 0 or bool((ds.digits < 0).any()):
            continue
        r = collect_predictions(model, ds)
        score = r["confidence"] + (r["pred"] == r["y"]).float()  # right first, then the most confident
        chosen[modality] = {int(d): int(torch.where(r["digit"] == d, score, -1.0).argmax())
                            for d in torch.unique(r["digit"]).tolist()}  # fmt: skip
    if not chosen:
        return []
    digits = sorted(set.intersection(*(set(c) for c in chosen.values())))
    digits = [digits[i] for i in np.linspace(0, len(digits) - 1, min(count, len(digits))).round().astype(int)]
    rows = []
    for d in dict.fromkeys(digits):
        row = {"label": f"digit {d}"}
        for modality, pick in chosen.items():
            row[modality] = save_medium(sets[modality][pick[d]][0], directory / f"{modality}-{d}")
        rows.append(row)
    return rows
