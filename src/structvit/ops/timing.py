"""The round-robin timer: time several callables so that their ratios survive a busy machine.

Timing the candidates in turn, round after round, exposes them to the same background
load. Each round takes them in a new random order (seeded, so runs repeat): a candidate
that leaves freed memory to be page-faulted in again, or caches cold, then slows a
different successor each round instead of always the same one (rotating a fixed order
would keep every candidate but one behind the same predecessor).
"""
from __future__ import annotations

import random
import time
from typing import Callable

from .checks import check_positive_int


def timed_rounds(fns: dict[str, Callable[[], object]], repeats: int, *, warmup: int = 1, close: float = 0.0,
                 extra: int = 0, sync: Callable[[], None] | None = None, clock: Callable[[], float] = time.perf_counter,
                 seed: int = 0) -> dict[str, list[float]]:
    """Every timed run (seconds) of each zero-argument callable.

    ``warmup`` untimed calls each, then ``repeats`` rounds, each in a new seeded random
    order; then, while the two fastest minima are within ``close`` of each other
    (relative), up to ``extra`` rounds of just those two. ``sync`` runs before and after
    each timed call (e.g. ``torch.cuda.synchronize`` for asynchronous devices).
    """
    check_positive_int("repeats", repeats)
    order = random.Random(seed)
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}

    def round_of(names) -> None:
        names = list(names)
        order.shuffle(names)
        for name in names:
            if sync is not None:
                sync()
            t0 = clock()
            fns[name]()
            if sync is not None:
                sync()
            times[name].append(clock() - t0)

    for _ in range(repeats):
        round_of(fns)
    for _ in range(extra if len(fns) > 1 else 0):
        first, second = sorted(fns, key=lambda name: min(times[name]))[:2]
        if min(times[second]) > (1 + close) * min(times[first]):
            break
        round_of((first, second))
    return times
