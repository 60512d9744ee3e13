"""The single homes of ops: argument validators (checks), CPU detection (cpuinfo), the
round-robin timer (timing)."""
from __future__ import annotations

import platform

import pytest
import torch

from structvit.ops import checks, cpuinfo, timing


@pytest.mark.parametrize("value", [True, False, 1.0, "3", None, -1, 0])
def test_positive_int_refuses_bools_floats_and_non_positive(value):
    with pytest.raises(ValueError, match=r"n must be a positive int, got"):
        checks.check_positive_int("n", value)


def test_window_stride_grid():
    assert checks.check_window("window", 3) == (3, 3)
    assert checks.check_window("window", (1, 3, 5)) == (1, 3, 5)
    for bad in [(3, 4), (True, 3), (3,), "33", (3, 3, 3, 3), 0]:
        with pytest.raises(ValueError, match=r"window must be 2 or 3 odd positive ints"):
            checks.check_window("window", bad)
    assert checks.check_stride("kv_stride", 2, 3) == (2, 2, 2)
    assert checks.check_stride("kv_stride", 2, 3, int_form=(1, 0, 0)) == (1, 2, 2)
    for bad in [0, (1, 0, 1), (2, 2), True, (1.0, 1, 1)]:
        with pytest.raises(ValueError, match=r"kv_stride must be a positive int or 3 positive ints"):
            checks.check_stride("kv_stride", bad, 3)
    assert checks.check_grid("grid", torch.Size([4, 5]), 20) == (1, 4, 5)
    with pytest.raises(ValueError, match=r"grid=\(4, 5\) has 20 positions but the inputs have N=21"):
        checks.check_grid("grid", (4, 5), 21)


@pytest.mark.parametrize("value", [float("inf"), float("nan"), 0.0, -2, True, "1"])
def test_positive_number_must_be_finite(value):
    with pytest.raises(ValueError, match=r"scale must be a finite positive number"):
        checks.check_positive_number("scale", value)


def test_check_tensor_names_the_argument():
    x = torch.zeros(2, 3)
    with pytest.raises(TypeError, match=r"x must be float32 or float64, got float16"):
        checks.check_tensor("x", x.half(), dtypes=(torch.float32, torch.float64))
    with pytest.raises(TypeError, match=r"y must be float32, got float64"):
        checks.check_tensor("y", x.double(), like=x)
    with pytest.raises(ValueError, match=r"x must have shape \(3, 2\), got \(2, 3\)"):
        checks.check_tensor("x", x, shape=(3, 2))
    with pytest.raises(ValueError, match=r"x must be contiguous"):
        checks.check_tensor("x", x.t(), contiguous=True)


@pytest.mark.skipif(platform.system() != "Linux", reason="reads /proc/cpuinfo")
def test_cpuinfo_reads_the_flags_once():
    with open("/proc/cpuinfo") as f:
        line = next(line for line in f if line.startswith(("flags", "Features")))
    assert cpuinfo.cpu_flags() == frozenset(line.partition(":")[2].split())
    assert set(cpuinfo.isa_extensions()) == set(cpuinfo.ISA_EXTENSIONS)
    assert cpuinfo.machine_fingerprint().startswith(platform.machine())
    assert cpuinfo.cpu_model()


def test_timed_rounds_warms_up_syncs_and_retimes_the_close_pair():
    calls, syncs = [], []
    now = [0.0]
    cost = {"a": 1.0, "b": 1.02, "c": 3.0}

    def fn(name):
        def run():
            calls.append(name)
            now[0] += cost[name]
        return run

    times = timing.timed_rounds({n: fn(n) for n in cost}, 2, warmup=2, close=0.05, extra=3,
                                sync=lambda: syncs.append(1), clock=lambda: now[0])
    assert calls[:6] == ["a", "a", "b", "b", "c", "c"]  # the warm-up, untimed
    assert [len(times[n]) for n in "abc"] == [5, 5, 2]  # 2 rounds, then 3 more of the close two
    assert times["c"] == [3.0, 3.0]
    assert len(syncs) == 2 * (5 + 5 + 2)  # before and after every timed call
    again = timing.timed_rounds({n: fn(n) for n in cost}, 2, clock=lambda: now[0])
    assert {n: len(t) for n, t in again.items()} == {"a": 2, "b": 2, "c": 2}
