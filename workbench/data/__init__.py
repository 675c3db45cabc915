"""Data: the embedded multimodal digits benchmark, real-data loaders and the one media decoder.

Public API (see DATA_CARD.md for what the data is and where it comes from)::

    from workbench.data import load_benchmark, make_loader, make_paired_loader, aligned_pairs, describe
    bench = load_benchmark(cfg.data, seed=cfg.seed)      # builds the cache when missing
    ds = bench.dataset("image", "digit", "train")       # torch Dataset; items (x, y, digit)
    loader = make_loader(ds, 64, shuffle=True, seed=0)  # yields workbench.batch.Batch

Media decoding for uploads and ``workbench predict`` lives in :mod:`workbench.data.media`.
"""

from workbench.data.benchmark import Benchmark, TaskDataset
from workbench.data.describe import describe, format_table
from workbench.data.loaders import PairedDataset, aligned_pairs, make_loader, make_paired_loader
from workbench.data.sources import load_benchmark

__all__ = [
    "Benchmark",
    "PairedDataset",
    "TaskDataset",
    "aligned_pairs",
    "describe",
    "format_table",
    "load_benchmark",
    "make_loader",
    "make_paired_loader",
]
