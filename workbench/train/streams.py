"""Endless, resumable batch streams: one prepared DataLoader per (modality, task).

The stage objectives draw from several streams in an order decided per step, so a single
``skip_first_batches`` on one loader (the Accelerate resume idiom) is applied per stream: each stream
remembers its epoch and how many batches of that epoch it has handed out. Shuffling comes from the
loader's epoch-seeded sampler (:class:`workbench.data.loaders.EpochShuffle`), so epoch ``e`` of a
stream is the same list of batches whether the run was interrupted or not.
"""

from __future__ import annotations

from collections.abc import Iterator

from accelerate import Accelerator
from accelerate.data_loader import skip_first_batches
from torch.utils.data import DataLoader

from workbench.batch import Batch


class BatchStream:
    """Cycle over a prepared DataLoader forever; ``state()``/``load_state()`` give exact resume."""

    def __init__(self, loader: DataLoader):
        self.loader = loader
        self.epoch = 0
        self.position = 0  # batches handed out in the current epoch
        self._it: Iterator | None = None

    def _start_epoch(self) -> None:
        if hasattr(self.loader, "set_epoch"):
            self.loader.set_epoch(self.epoch)
        source = skip_first_batches(self.loader, self.position) if self.position else self.loader
        if source is not self.loader and hasattr(source, "set_epoch"):
            source.set_epoch(self.epoch)
        self._it = iter(source)

    def __next__(self) -> Batch:
        if self._it is None:
            self._start_epoch()
        try:
            batch = next(self._it)
        except StopIteration:
            self.epoch, self.position = self.epoch + 1, 0
            self._start_epoch()
            batch = next(self._it)
        self.position += 1
        return batch

    def __iter__(self) -> BatchStream:
        return self

    def state(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state(self, state: dict) -> None:
        self.epoch, self.position, self._it = int(state["epoch"]), int(state["position"]), None


class StreamSet:
    """Named streams, created lazily so stages that use few of them prepare only those."""

    def __init__(self, accelerator: Accelerator, make_loader):
        self.accelerator = accelerator
        self.make_loader = make_loader  # key -> DataLoader (not yet prepared)
        self.streams: dict[str, BatchStream] = {}
        self._pending_state: dict[str, dict] = {}

    def __getitem__(self, key: str) -> BatchStream:
        if key not in self.streams:
            stream = BatchStream(self.accelerator.prepare_data_loader(self.make_loader(key)))
            if key in self._pending_state:
                stream.load_state(self._pending_state.pop(key))
            self.streams[key] = stream
        return self.streams[key]

    def next(self, key: str) -> Batch:
        return next(self[key])

    def state(self) -> dict:
        return {**self._pending_state, **{k: s.state() for k, s in self.streams.items()}}

    def load_state(self, state: dict) -> None:
        self._pending_state = dict(state)
        for key, stream in self.streams.items():
            if key in self._pending_state:
                stream.load_state(self._pending_state.pop(key))
