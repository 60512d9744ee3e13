"""Data loaders that make training resumable to the bit, and evaluation exact on many processes.

Lightning restores the model, optimiser, schedule and loop counters from a checkpoint;
what it cannot restore is *which samples come next* and *the random draws of their
augmentation*. :class:`ResumableLoader` wraps the data module's training loader so that

* the order of epoch ``e`` is a permutation drawn from ``(seed, e)`` alone, split into
  one contiguous slice of every global batch per process (so one process with batch
  ``B`` and ``P`` processes with batch ``B / P`` see the same global batches);
* the augmentation of every sample is seeded from ``(seed, e, position)``: the torch,
  numpy and ``random`` generators are reseeded before each ``__getitem__`` (also in
  worker processes);
* ``state_dict()`` records the epoch and the batches already handed out, and
  ``load_state_dict()`` makes the next iteration skip them: Lightning saves this state in
  its checkpoints (``_Stateful`` loaders) and restores it with ``--ckpt_path``.

:class:`ShardedEvalLoader` splits validation/test data over processes without the
padding of ``DistributedSampler`` (which repeats samples and biases metrics), so the
metrics of ``P`` processes equal those of one.
"""
from __future__ import annotations

import random
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

__all__ = ["ResumableLoader", "ShardedEvalLoader", "sample_seed"]

_MASK = (1 << 63) - 1


def sample_seed(seed: int, epoch: int, position: int) -> int:
    """A 63-bit seed for one sample, a fixed function of (seed, epoch, position in the epoch)."""
    seed = int(seed) & ((1 << 64) - 1)
    ss = np.random.SeedSequence([seed & 0xFFFFFFFF, seed >> 32, int(epoch), int(position) + 1])
    return int(ss.generate_state(1, dtype=np.uint64)[0]) & _MASK


def _seed_all(s: int) -> None:
    torch.manual_seed(s)
    np.random.seed(s % (2 ** 32))
    random.seed(s)


class _SeededDataset(Dataset):
    """Items are ``(index, seed)`` pairs: reseed every generator, then read ``index``."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, item):
        index, seed = item
        _seed_all(seed)
        return self.dataset[index]


class _EpochSampler(Sampler):
    """This process's share of the global batches of one epoch, from ``start`` on."""

    def __init__(self, n: int, batch_size: int, rank: int, world: int, seed: int, shuffle: bool, drop_last: bool):
        self.n, self.batch_size, self.rank, self.world = n, batch_size, rank, world
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self.epoch, self.start = 0, 0

    def positions(self) -> list[int]:
        """Positions (in the epoch's order) that this process reads, in order, batch by batch."""
        g = self.batch_size * self.world  # global batch
        out = []
        for b in range(self.num_batches()):
            lo = b * g + self.rank * self.batch_size
            hi = lo + self.batch_size
            if self.world == 1:
                hi = min(hi, self.n)  # one process: the last batch may be short
            out.extend(p % self.n for p in range(lo, hi))  # several: the last global batch wraps around
        return out

    def num_batches(self) -> int:
        g = self.batch_size * self.world
        return self.n // g if self.drop_last else -(-self.n // g)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.shuffle:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(
                sample_seed(self.seed, self.epoch, -1))).tolist()
        else:
            order = list(range(self.n))
        pos = self.positions()[self.start * self.batch_size:]
        return iter([(order[p], sample_seed(self.seed, self.epoch, p)) for p in pos])

    def __len__(self) -> int:
        return max(0, len(self.positions()) - self.start * self.batch_size)


class ResumableLoader:
    """Training loader with a saved position (see the module docstring).

    Built from an existing ``DataLoader`` (its dataset, batch size, workers, collate
    function, ``drop_last``); ``rank``/``world`` select this process's share. Not a
    ``DataLoader`` subclass on purpose: Lightning then leaves it alone (no sampler
    injection) and only uses ``__iter__``, ``__len__``, ``state_dict`` and
    ``load_state_dict``.
    """

    def __init__(self, loader: DataLoader, seed: int = 0, rank: int = 0, world: int = 1, shuffle: bool = True):
        if not isinstance(loader, DataLoader):
            raise TypeError(f"ResumableLoader wraps a torch DataLoader, got {type(loader).__name__}")
        self.loader = loader
        self.dataset = loader.dataset
        self.batch_size = int(loader.batch_size)
        self.sampler = _EpochSampler(len(loader.dataset), self.batch_size, rank, world, int(seed), shuffle,
                                     bool(loader.drop_last))
        nw = loader.num_workers
        self._dl = DataLoader(_SeededDataset(loader.dataset), batch_size=self.batch_size, sampler=self.sampler,
                              num_workers=nw, collate_fn=loader.collate_fn, pin_memory=loader.pin_memory,
                              drop_last=False, persistent_workers=False, timeout=loader.timeout,
                              prefetch_factor=loader.prefetch_factor if nw > 0 else None)
        self.epoch = 0
        self._yielded = 0
        self._resume_at = None  # (epoch, batches) to skip at the next __iter__
        #: batches that make an epoch for the trainer (``limit_train_batches``); None: all
        self.epoch_batches = None

    def __len__(self) -> int:
        return self.sampler.num_batches()

    def __iter__(self) -> Iterator[Any]:
        if self._resume_at is not None:
            self.epoch, start = self._resume_at
            self._resume_at = None
        else:
            if self._yielded:  # a new epoch after a finished (or abandoned) one
                self.epoch += 1
            start = 0
        end = self.sampler.num_batches() if self.epoch_batches is None else min(self.epoch_batches,
                                                                               self.sampler.num_batches())
        if start >= end:  # the saved epoch was complete: start the next one
            self.epoch, start = self.epoch + 1, 0
        self.sampler.epoch, self.sampler.start = self.epoch, start
        self._yielded = start
        for batch in self._dl:
            self._yielded += 1
            yield batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches": self._yielded, "seed": self.sampler.seed}

    def load_state_dict(self, state: dict) -> None:
        self._resume_at = (int(state["epoch"]), int(state["batches"]))


class ShardedEvalLoader:
    """Evaluation loader for process ``rank`` of ``world``: contiguous, unpadded shards
    (their sizes differ by at most one batch), in the original order."""

    def __init__(self, loader: DataLoader, rank: int, world: int):
        n = len(loader.dataset)
        lo, hi = n * rank // world, n * (rank + 1) // world
        self.loader = loader
        self.indices = list(range(lo, hi))
        self._dl = DataLoader(torch.utils.data.Subset(loader.dataset, self.indices), batch_size=loader.batch_size,
                              shuffle=False, num_workers=loader.num_workers, collate_fn=loader.collate_fn,
                              pin_memory=loader.pin_memory, drop_last=False)

    def __len__(self) -> int:
        return len(self._dl)

    def __iter__(self):
        return iter(self._dl)
