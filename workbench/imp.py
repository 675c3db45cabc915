"""IMP (METHOD.md section 4; Akbari et al. 2023) as a runnable comparison: dense vs mixture-of-experts.

Both variants are the IMP recipe on the same widths: one modality-agnostic encoder (the unified
tokenizer, no fusion layers, one-block task heads), trained from scratch by alternating gradient
descent (``train.schedule=alternating``: one (modality, task) per update, resolution varied between
updates). They differ only in the feed-forward layers of f and g: ``dense`` has the usual GELU MLPs,
``moe`` routes each token to ``model.moe_top_k`` of ``model.moe_experts`` MLPs in every
``model.moe_every``-th block (:mod:`workbench.model.moe`).

Each (variant, seed) run writes ``<out>/<variant>/seed<k>/result.json`` with the test metrics, the
parameter counts (total, and active per token), the training time per update and, for MoE, the share
of tokens each expert of each MoE layer receives per modality on the test split. :func:`run_variants`
skips runs whose result exists, so a re-executed notebook only trains what is missing.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from workbench.config import MODEL_PRESETS, Config, from_dict, to_dict
from workbench.seeding import runs_per_seed
from workbench.stats import format_mean_spread, mean_spread

VARIANTS: dict[str, dict[str, Any]] = {
    "dense": {"moe_experts": 0},  # the same encoder with dense MLPs
    "moe": {},  # the config's MoE settings (the imp preset: 4 experts, top-2, every 2nd block)
}


def imp_parameters(preset: str) -> dict[str, Any]:
    """Dotted config keys that make any preset's widths an IMP run (notebook ``setup`` base layer, so a
    user's ``overrides`` still win): the imp preset's choices and the alternating schedule, stage 3."""
    keys: dict[str, Any] = {"train.stage": 3, "train.schedule": "alternating"}
    if preset != "imp":
        keys |= {f"model.{k}": v for k, v in MODEL_PRESETS["imp"].items()}
    return keys


def variant_config(cfg: Config, variant: str, seed: int | None = None) -> Config:
    data = to_dict(cfg)
    data["model"] |= VARIANTS[variant]
    if variant == "moe" and not data["model"]["moe_experts"]:
        data["model"]["moe_experts"] = MODEL_PRESETS["imp"]["moe_experts"]
    if seed is not None:
        data["seed"] = seed
    return from_dict(data)


@torch.no_grad()
def expert_load_by_modality(
    model, bench, split: str = "test", batches: int = 4, batch_size: int = 64
) -> dict[str, dict[str, list[float]]]:
    """``{modality: {moe layer: [share of token assignments per expert]}}`` over up to ``batches``
    batches of each modality's first classification task (at full resolution, eval mode)."""
    from workbench.data import make_loader
    from workbench.model.moe import moe_modules

    layers = moe_modules(model)
    if not layers:
        return {}
    model.eval()
    out: dict[str, dict[str, list[float]]] = {}
    for modality in model.modalities:
        spec = next((t for t in bench.tasks if t.modality == modality and t.kind == "classification"), None)
        if spec is None or spec.key not in model.tasks:
            continue
        loader = make_loader(bench.dataset(modality, spec.name, split), batch_size, shuffle=False, seed=0,
                             text_tokenizer=model.text_tokenizer)  # fmt: skip
        counts = {name: torch.zeros(m.num_experts) for name, m in layers.items()}
        for i, batch in enumerate(loader):
            if i >= batches:
                break
            model.forward_single(batch, tasks=[spec.name])
            for name, m in layers.items():
                counts[name] += m.last_counts.float().cpu()
        out[modality] = {name: (c / c.sum().clamp(min=1)).tolist() for name, c in counts.items()}
    return out


def run_variant(cfg: Config, variant: str, out: str | Path) -> dict[str, Any]:
    """Train one variant for ``cfg.seed`` into ``out``; write and return its ``result.json`` record."""
    from workbench.data import load_benchmark
    from workbench.model import OmniVec2
    from workbench.model.moe import active_parameters
    from workbench.train import train

    out = Path(out)
    vcfg = variant_config(cfg, variant)
    result = train(vcfg, out / "run")
    model = OmniVec2.from_pretrained(result.checkpoint)
    bench = load_benchmark(vcfg.data, seed=vcfg.seed)
    counts = model.parameter_counts()
    decoders = counts.get("decoders1", 0) + counts.get("decoders2", 0)  # masked pre-training only: unused
    encoder = counts["tokenizers"] + counts["f"] + counts["g"] + counts.get("A", 0)
    record = {
        "variant": variant,
        "seed": vcfg.seed,
        "test": {
            k: {m: v for m, v in row.items() if m != "confusion"} for k, row in result.metrics["test"].items()
        },
        "params_total": counts["total"] - decoders,  # tokenizers, f, g, heads (and A if any)
        "params_active": active_parameters(model) - decoders,
        "params_encoder": encoder,
        "seconds_per_step": result.seconds / max(result.steps, 1),
        "steps": result.steps,
        "expert_load": expert_load_by_modality(model, bench),
        "config": to_dict(vcfg),
    }
    (out / "result.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def run_variants(
    cfg: Config, seeds: list[int], out: str | Path, variants: tuple[str, ...] = tuple(VARIANTS)
) -> dict[str, dict[int, dict]]:
    """``{variant: {seed: record}}`` for every (variant, seed), reusing finished runs under ``out``."""
    return runs_per_seed(cfg, variants, seeds, out, run_variant)


# --------------------------------------------------------------------------------------- summaries
def accuracy_table(results: Mapping[str, Mapping[int, dict]]) -> dict:
    """Test metric per task (accuracy %, PSNR dB for dense tasks), mean ± sd over seeds, per variant."""
    variants = list(results)
    tasks = list(next(iter(next(iter(results.values())).values()))["test"])
    rows = []
    for task in tasks:
        row: list = [task]
        for v in variants:
            runs = [r["test"][task] for r in results[v].values()]
            if "accuracy" in runs[0]:
                row.append(format_mean_spread([r["accuracy"] for r in runs], 100))
            else:
                row.append(format_mean_spread([r["psnr"] for r in runs], 1, 2) + " dB")
        if len(variants) == 2:
            a, b = variants
            key = "accuracy" if "accuracy" in results[a][next(iter(results[a]))]["test"][task] else "psnr"
            scale = 100 if key == "accuracy" else 1
            ma = mean_spread([r["test"][task][key] for r in results[a].values()])[0]
            mb = mean_spread([r["test"][task][key] for r in results[b].values()])[0]
            row.append(round((mb - ma) * scale, 2))
        rows.append(row)
    columns = ["task", *[f"{v} (mean ± sd)" for v in variants]]
    if len(variants) == 2:
        columns.append(f"{variants[1]} - {variants[0]}")
    return {"columns": columns, "rows": rows}


def mean_accuracy(records: Mapping[int, dict]) -> list[float]:
    """Per seed, the mean test accuracy over every classification task."""
    out = []
    for r in records.values():
        accs = [row["accuracy"] for row in r["test"].values() if "accuracy" in row]
        out.append(sum(accs) / len(accs))
    return out


def cost_table(results: Mapping[str, Mapping[int, dict]]) -> dict:
    """Parameters (all but the unused pre-training decoders; active per token; encoder) and training
    milliseconds per update, per variant."""
    rows = []
    for v, runs in results.items():
        first = next(iter(runs.values()))
        rows.append([
            v,
            first["params_total"],
            first["params_active"],
            first["params_encoder"],
            format_mean_spread([r["seconds_per_step"] * 1000 for r in runs.values()], 1, 0),
            format_mean_spread(mean_accuracy(runs), 100),
        ])  # fmt: skip
    columns = ["variant", "params (no decoders)", "params active per token", "params encoder (tok+f+g)",
               "ms per update (mean ± sd)", "mean classification accuracy % (mean ± sd)"]  # fmt: skip
    return {"columns": columns, "rows": rows}


def mean_expert_load(records: Mapping[int, dict]) -> dict[str, dict[str, list[float]]]:
    """``{layer: {modality: [share per expert]}}`` averaged over seeds."""
    out: dict[str, dict[str, list[float]]] = {}
    runs = [r["expert_load"] for r in records.values() if r.get("expert_load")]
    if not runs:
        return out
    for modality, layers in runs[0].items():
        for layer in layers:
            shares = torch.tensor([r[modality][layer] for r in runs]).mean(0)
            out.setdefault(layer, {})[modality] = shares.tolist()
    return out


def load_table(records: Mapping[int, dict]) -> dict:
    """Expert load summary: per MoE layer and modality, each expert's share (%), the busiest expert's
    share and the normalised entropy of the shares (1 = perfectly even, 0 = one expert takes all)."""
    import math

    rows = []
    for layer, by_modality in mean_expert_load(records).items():
        for modality, shares in by_modality.items():
            E = len(shares)
            entropy = -sum(s * math.log(s) for s in shares if s > 0) / math.log(E) if E > 1 else 1.0
            rows.append([layer, modality, " / ".join(f"{100 * s:.0f}" for s in shares),
                         round(100 * max(shares), 1), round(entropy, 3)])  # fmt: skip
    columns = ["layer", "modality", "share per expert %", "busiest expert %", "evenness (entropy / log E)"]
    return {"columns": columns, "rows": rows}


def format_table(table: Mapping[str, list]) -> str:
    """A ``{"columns", "rows"}`` table as aligned plain text (for notebook output)."""
    cells = [[str(c) for c in table["columns"]], *[[str(c) for c in row] for row in table["rows"]]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])
