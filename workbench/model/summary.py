"""A plain-text description of a built network: components, parameter counts, tokens per modality.

Used by ``workbench model --preset NAME`` and by the notebooks.
"""

from __future__ import annotations

from workbench.model.omnivec2 import OmniVec2


def describe(model: OmniVec2) -> str:
    cfg = model.config.model
    w = cfg.fc_dims[-1]
    lines = [
        f"OmniVec2, preset {cfg.preset!r}: tokenizer={cfg.tokenizer}, task_head={cfg.task_head}, "
        f"fusion={cfg.fusion}",
        "",
        f"  tokenizers  patches/ids -> {cfg.dim} wide tokens with fixed sin-cos positions" + _stem(cfg),
        f"  f           {_n(cfg.depth_f, 'pre-norm block')} x {cfg.heads} heads at {cfg.dim}, then FC "
        f"{cfg.dim}->{cfg.fc_dims[0]}->{cfg.fc_dims[1]}->{cfg.fc_dims[2]} (ReLU between)",
        f"  A           cross-attention at {w} x {cfg.heads} heads: fuse (both ways, shared) and fuse back "
        f"(keys/values from the {cfg.dim} wide tokens)"
        if model.A is not None
        else f"  A           none ({cfg.fusion} fusion)",
        f"  g           {_n(cfg.depth_g, 'pre-norm block')} x {cfg.heads} heads at {w}",
        f"  heads       {cfg.task_head}: {_n(cfg.head_depth, 'block')} x {cfg.head_heads} heads at {cfg.head_dim}"
        + (f", {cfg.head_pool} read-out" if cfg.task_head == "specific" else "")
        if cfg.task_head != "autoencoder"
        else f"  heads       autoencoder: {_n(cfg.decoder_depth, 'block')} x {cfg.decoder_heads} heads at "
        f"{cfg.decoder_dim}",
        *(
            [
                f"  refiners    {', '.join(model.refiners)}: {cfg.dense_refine_depth} convolutions 3x3 at "
                f"{cfg.dense_refine} over the prediction and the input, added to the prediction"
            ]
            if len(model.refiners)
            else []
        ),
        f"  decoders    stage 1 and 2, per modality: {_n(cfg.decoder_depth, 'block')} x {cfg.decoder_heads} heads "
        f"at {cfg.decoder_dim}",
        "",
        f"{'component':<14}{'parameters':>14}",
    ]
    lines += [f"{name:<14}{count:>14,}" for name, count in model.parameter_counts().items()]
    lines += ["", f"{'part':<26}{'parameters':>14}"]
    lines += [f"{name:<26}{count:>14,}" for name, count in model.parameter_breakdown().items()]
    lines += ["", f"{'modality':<10}{'max tokens':>11}  {'values per token':>16}  token grid"]
    for m, p in model.patchers.items():
        per = "1 id" if p.discrete else str(p.patch_numel)
        lines.append(f"{m:<10}{p.max_tokens:>11}  {per:>16}  {p.describe()}")
    kinds = [
        f"{k} ({t.kind}, {t.num_classes} classes)" if t.labels else f"{k} ({t.kind} {t.shape})"
        for k, t in model.tasks.items()
    ]
    lines += ["", "tasks: " + ", ".join(kinds)]
    return "\n".join(lines)


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'s' if count != 1 else ''}"


def _stem(cfg) -> str:
    """How signals reach their tokens, when not the plain linear patch projection."""
    stems = {m: k for m, k in cfg.stem.items() if k != "linear"}
    if not stems or cfg.tokenizer != "specific":
        return ""
    trunk = {"pooled": "a pooled CNN stem", "strided": "a strided conv stem"}[cfg.stem_trunk]
    parts = [
        f"{m} through {trunk}{' beside the linear projection' if k == 'both' else ''}"
        for m, k in stems.items()
    ]
    return f" ({'; '.join(parts)})"
