"""Time one training step of the network on synthetic batches (no data needed).

``python -m workbench.model.benchmark [--preset small] [--batch 64] [--steps 10]`` prints samples/s of a
stage-3 two-stream step (forward_pair + both task losses + backward + AdamW step), a stage-2 masked pair
step and a stage-1 masked step (mask ratio 0.75), each in fp32 and under bf16 autocast. ``--batch`` is
the whole step: in stages 2-3 each stream gets half ("half from each (modality, task)").
"""

from __future__ import annotations

import argparse
import itertools
import time
from contextlib import nullcontext

import torch

from workbench.config import load_config
from workbench.modalities import default_tasks
from workbench.model.omnivec2 import build_model
from workbench.model.synthetic import synthetic_batch

PAIRS = [
    ("image/digit", "audio/digit"),
    ("text/language", "video/motion"),
    ("image/denoise", "text/digit"),
    ("audio/language", "video/digit"),
]


def time_steps(
    preset: str = "small", batch: int = 64, steps: int = 10, bf16: bool = False, stage: int = 3
) -> dict:
    torch.manual_seed(0)
    cfg = load_config(overrides=[f"model.preset={preset}"])
    tasks = {t.key: t for t in default_tasks()}
    model = build_model(cfg, list(tasks.values())).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    half = batch // 2
    data = {
        k: synthetic_batch(
            t, half if stage > 1 else batch, seed=i, audio_seconds=1.0, vocab_size=cfg.model.text_vocab_size
        )
        for i, (k, t) in enumerate(tasks.items())
    }
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()

    def step(i: int) -> None:
        with autocast:
            if stage == 3:
                ka, kb = PAIRS[i % len(PAIRS)]
                pa, pb = model.forward_pair(data[ka], data[kb])
                loss = model.task_loss(ka, pa, data[ka].y) + model.task_loss(kb, pb, data[kb].y)
            elif stage == 2:
                ka, kb = PAIRS[i % len(PAIRS)]
                oa, ob = model.forward_masked_pair(data[ka], data[kb], 0.75, 0.75)
                loss = oa.loss + ob.loss
            else:
                b = list(data.values())[i % len(data)]
                loss = model.forward_masked(b, 0.75).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for i in range(len(PAIRS)):  # warm-up: every pair once
        step(i)
    t0 = time.perf_counter()
    for i in itertools.islice(itertools.count(), steps):
        step(i)
    dt = (time.perf_counter() - t0) / steps
    return {
        "preset": preset,
        "stage": stage,
        "batch": batch,
        "precision": "bf16" if bf16 else "fp32",
        "seconds_per_step": round(dt, 4),
        "samples_per_s": round(batch / dt, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    for stage, bf16 in ((3, False), (3, True), (2, False), (2, True), (1, False), (1, True)):
        print(time_steps(args.preset, args.batch, args.steps, bf16, stage), flush=True)


if __name__ == "__main__":
    main()
