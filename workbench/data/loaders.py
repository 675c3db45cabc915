"""DataLoaders that yield :class:`~workbench.batch.Batch`, unpaired or label-aligned.

OmniVec2 fuses batches of *unrelated* samples from two modalities (METHOD.md, stage 2), so the
default is two independent loaders. Label-aligned pairing (both streams show the same digit) is
for contrastive objectives, fusion comparisons and cross-modal attention pictures:
:func:`aligned_pairs` picks, for every sample of A, a sample of B with the same digit, and
:func:`make_paired_loader` yields ``(Batch, Batch)`` tuples of aligned rows.

Data order depends only on ``seed`` (and on which dataset is loaded): each loader owns a
``torch.Generator`` seeded from ``seed`` and the dataset's ``modality/task/split``, so model
initialisation or other random draws never change which samples come when, and two streams
loaded with the same seed are not shuffled in lockstep (the video clips of a split are made from
that split's images in row order: equal permutations would silently pair them).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from workbench.batch import Batch
from workbench.data.benchmark import COLLATE, Rows, TaskDataset
from workbench.errors import ConfigError
from workbench.seeding import generator


class Collate:
    """A batch's :class:`Rows` (what ``TaskDataset.__getitems__`` fetches) or a list of ``(x, y, digit)``
    items -> one :class:`Batch` (picklable, for worker processes)."""

    def __init__(self, modality: str, task: str, input_kind: str, text_tokenizer=None):
        self.modality, self.task, self.input_kind, self.tokenizer = modality, task, input_kind, text_tokenizer

    def __call__(self, items: Rows | list) -> Batch:
        if isinstance(items, Rows):
            x, lengths, y, digit = items.gather(self.tokenizer)
        else:
            xs, ys, digits = zip(*items)
            x, lengths = COLLATE[self.input_kind](list(xs), self.tokenizer)
            y = torch.stack([torch.as_tensor(v) for v in ys])  # (B,) int64 or (B, *shape) float32
            digit = torch.stack([torch.as_tensor(d) for d in digits]).long()
        return Batch(self.modality, self.task, x, y, lengths, None if bool((digit < 0).any()) else digit)


def _collate_for(dataset: TaskDataset, text_tokenizer) -> Collate:
    if dataset.input_kind == "strings" and text_tokenizer is None:
        raise ValueError(
            f"{dataset.spec.key} holds raw text: pass text_tokenizer=TextTokenizer to the loader"
        )
    return Collate(dataset.modality, dataset.task, dataset.input_kind, text_tokenizer)


def stream_seed(seed: int, dataset: TaskDataset) -> int:
    """The loader seed of one dataset: ``seed`` mixed with a stable hash of ``modality/task/split``."""
    return (seed * 1_000_003 + zlib.crc32(f"{dataset.spec.key}/{dataset.split}".encode())) % 2**62


class EpochShuffle(Sampler[int]):
    """A new seeded permutation every epoch: epoch ``e`` is ``randperm(n, seed + e)``.

    The order of epoch ``e`` depends only on ``(seed, e)``, never on how many epochs were drawn
    before, so a resumed run replays exactly the batches an uninterrupted run would see. Accelerate
    calls ``set_epoch`` on prepared loaders (and every data-parallel rank draws the same permutation,
    then keeps its own shard of it).
    """

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        yield from torch.randperm(self.n, generator=generator(self.seed + self.epoch)).tolist()

    def __len__(self) -> int:
        return self.n


def make_loader(dataset: TaskDataset, batch_size: int, *, shuffle: bool, seed: int, text_tokenizer=None,
                drop_last: bool = False, num_workers: int = 0) -> DataLoader:  # fmt: skip
    """A DataLoader over one (modality, task, split) yielding :class:`Batch`; order depends only on ``seed``
    (mixed with the dataset's name, so different streams shuffle differently) and the epoch.

    Text datasets need ``text_tokenizer`` (a :class:`~workbench.model.text_tokenizer.TextTokenizer`).
    """
    sampler = EpochShuffle(len(dataset), stream_seed(seed, dataset)) if shuffle else None
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last, num_workers=num_workers,
                      collate_fn=_collate_for(dataset, text_tokenizer), persistent_workers=num_workers > 0)  # fmt: skip


# ---------------------------------------------------------------------------------------- pairing
def aligned_pairs(ds_a: TaskDataset, ds_b: TaskDataset, seed: int) -> torch.Tensor:
    """(len(ds_a),) index into ``ds_b`` of a partner showing the same digit as each item of ``ds_a``.

    Partners are drawn without replacement within each digit, cycling through a seeded permutation
    of B's items of that digit, so B is used evenly. Raises ConfigError if a digit of A has no
    item in B, or if either side does not know its digits.
    """
    da, db = ds_a.digits, ds_b.digits
    for ds, d in ((ds_a, da), (ds_b, db)):
        if len(d) and bool((d < 0).any()):
            raise ConfigError(
                f"{ds.spec.key} does not know the digit of its samples: label-aligned pairing needs it"
            )
    g = generator(seed)
    partner = torch.empty(len(da), dtype=torch.long)
    for digit in torch.unique(da).tolist():
        rows_a = torch.nonzero(da == digit).flatten()
        rows_b = torch.nonzero(db == digit).flatten()
        if rows_b.numel() == 0:
            raise ConfigError(f"cannot pair {ds_a.spec.key} with {ds_b.spec.key}: the {ds_b.split} split "
                              f"of {ds_b.spec.key} has no sample of digit {digit}")  # fmt: skip
        reps = -(-rows_a.numel() // rows_b.numel())  # ceil
        order = torch.cat([rows_b[torch.randperm(rows_b.numel(), generator=g)] for _ in range(reps)])
        partner[rows_a] = order[: rows_a.numel()]
    return partner


class PairedDataset(Dataset):
    """Items ``(item_a, item_b)`` where B's item shows the same digit as A's (see :func:`aligned_pairs`)."""

    def __init__(self, ds_a: TaskDataset, ds_b: TaskDataset, seed: int):
        self.a, self.b = ds_a, ds_b
        self.partner = aligned_pairs(ds_a, ds_b, seed)

    def __len__(self) -> int:
        return len(self.a)

    def __getitem__(self, i: int):
        return self.a[i], self.b[int(self.partner[i])]

    def __getitems__(self, indices: list[int]) -> PairRows:
        return PairRows(self.a.__getitems__(indices), self.b.__getitems__(self.partner[indices].tolist()))


class PairRows(Sequence):
    """The two sides of a paired batch, each gathered as one (:class:`Rows`); items are ``(a[j], b[j])``."""

    def __init__(self, a: Rows, b: Rows):
        self.a, self.b = a, b

    def __len__(self) -> int:
        return len(self.a)

    def __getitem__(self, j):
        return self.a[j], self.b[j]


class PairCollate:
    def __init__(self, first: Collate, second: Collate):
        self.first, self.second = first, second

    def __call__(self, items: PairRows | list) -> tuple[Batch, Batch]:
        if isinstance(items, PairRows):
            return self.first(items.a), self.second(items.b)
        a, b = zip(*items)
        return self.first(list(a)), self.second(list(b))


def make_paired_loader(ds_a: TaskDataset, ds_b: TaskDataset, batch_size: int, *, shuffle: bool, seed: int,
                       text_tokenizer=None, drop_last: bool = False, num_workers: int = 0) -> DataLoader:  # fmt: skip
    """A DataLoader yielding ``(Batch_a, Batch_b)`` whose rows show the same digit (label-aligned pairing)."""
    paired = PairedDataset(ds_a, ds_b, seed)
    collate = PairCollate(_collate_for(ds_a, text_tokenizer), _collate_for(ds_b, text_tokenizer))
    return DataLoader(paired, batch_size=batch_size, shuffle=shuffle, generator=generator(stream_seed(seed, ds_a) + 1),
                      drop_last=drop_last, num_workers=num_workers, collate_fn=collate,
                      persistent_workers=num_workers > 0)  # fmt: skip
