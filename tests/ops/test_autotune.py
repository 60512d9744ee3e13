"""The measured "auto": modes, the per-machine cache file, and that it only ever picks a
backend that can serve the call. No test asserts a timing: measurements are faked where
a test needs a particular winner."""
from __future__ import annotations

import json

import pytest
import torch

from reference import random_inputs
from structvit import config
from structvit.ops import autotune, native, resolve_backend, struct_attention
from structvit.ops.dispatch import choose_backend

HAS_NATIVE = native.available()


@pytest.fixture
def tune(tmp_path, monkeypatch):
    """A private cache directory, measuring on (also for tiny calls), nothing in memory;
    settings restored afterwards."""
    saved = config.settings()
    config.set_cache_dir(tmp_path)
    config.set_autotune("measure")
    monkeypatch.setattr(autotune, "MIN_MACS", 0)
    autotune.reset()
    yield tmp_path
    config._settings = saved
    autotune.reset()


def _probe(**changes) -> autotune.Probe:
    fields = dict(q_shape=(2, 2, 20, 8), cv=8, uk_shape=(2, 1, 2, 1, 4, 5), uv_shape=(2, 1, 2, 1, 4, 5),
                  grid=(1, 4, 5), stride=(1, 1, 1), normalize="joint", dtype=torch.float32, device="cpu",
                  training=True)
    fields.update(changes)
    return autotune.Probe(**fields)


def _fake_measure(winner: str, calls: list, spread: float = 1.0):
    """A stand-in for autotune.measure: ``winner`` fastest; each candidate's runs differ by ``spread``."""
    def measure(probe, candidates, memory_limit):
        calls.append(tuple(candidates))
        return {name: [t, t * spread, t] for name in candidates for t in [0.001 if name == winner else 0.01]}
    return measure


def test_measure_mode_times_once_and_records(tune, monkeypatch):
    calls = []
    monkeypatch.setattr(autotune, "measure", _fake_measure("correlation", calls))
    probe = _probe()
    assert autotune.choose(probe, ["fused", "keyconv", "correlation"], "keyconv", 1e9, None, True) == "correlation"
    assert autotune.choose(probe, ["fused", "keyconv", "correlation"], "keyconv", 1e9, None, True) == "correlation"
    assert len(calls) == 1  # the second call is served from memory
    data = json.loads(autotune.cache_file().read_text())
    entry = data["choices"][probe.key(None)]
    assert entry["backend"] == "correlation" and set(entry["seconds"]) == {"fused", "keyconv", "correlation"}
    # another process (here: memory forgotten) reads the file instead of measuring again
    autotune.reset()
    assert autotune.choose(probe, ["fused", "keyconv", "correlation"], "keyconv", 1e9, None, True) == "correlation"
    assert len(calls) == 1
    # a different shape class (here: inference instead of training) is measured on its own
    assert autotune.choose(_probe(training=False), ["keyconv", "correlation"], "keyconv", 1e9, None, True)
    assert len(calls) == 2


def test_deterministic_mode_never_measures(tune, monkeypatch):
    calls = []
    monkeypatch.setattr(autotune, "measure", _fake_measure("correlation", calls))
    config.set_autotune("deterministic")
    probe = _probe()
    assert autotune.choose(probe, ["keyconv", "correlation"], "keyconv", 1e9, None, True) == "keyconv"  # the rule
    assert calls == []
    # a recorded choice (measured earlier, by any process) is used
    config.set_autotune("measure")
    autotune.choose(probe, ["keyconv", "correlation"], "keyconv", 1e9, None, True)
    config.set_autotune("deterministic")
    autotune.reset()
    assert autotune.choose(probe, ["keyconv", "correlation"], "keyconv", 1e9, None, True) == "correlation"
    assert len(calls) == 1


def test_off_switch_ignores_records_and_never_measures(tune, monkeypatch):
    calls = []
    monkeypatch.setattr(autotune, "measure", _fake_measure("correlation", calls))
    probe = _probe()
    autotune.choose(probe, ["keyconv", "correlation"], "keyconv", 1e9, None, True)
    config.set_autotune("off")
    assert autotune.choose(probe, ["keyconv", "correlation"], "keyconv", 1e9, None, True) == "keyconv"
    assert choose_backend(2, 2, 20, 8, 2, 20, probe=probe, measurable=True) == choose_backend(2, 2, 20, 8, 2, 20)
    assert len(calls) == 1


def test_small_or_unmeasurable_calls_use_the_cost_model(tune, monkeypatch):
    calls = []
    monkeypatch.setattr(autotune, "measure", _fake_measure("correlation", calls))
    assert autotune.choose(_probe(), ["keyconv", "correlation"], "keyconv", 1e9, None, False) == "keyconv"
    monkeypatch.setattr(autotune, "MIN_MACS", 10 ** 12)
    assert autotune.choose(_probe(), ["keyconv", "correlation"], "keyconv", 1e9, None, True) == "keyconv"
    assert calls == []
    from torch.utils.flop_counter import FlopCounterMode

    q = torch.randn(1, 1, 4, 4)
    assert autotune.can_measure(q)
    with FlopCounterMode(display=False):
        assert not autotune.can_measure(q)
    with torch.device("cpu"):
        assert not autotune.can_measure(q)


@pytest.mark.parametrize("damage", [b"", b"{not json", b"\xff\xfe", b'{"version": 1, "choices": []}',
                                    b'{"version": 999, "choices": {}}', b"[1, 2]"])
def test_damaged_cache_file_is_ignored_and_rewritten(tune, monkeypatch, damage):
    calls = []
    monkeypatch.setattr(autotune, "measure", _fake_measure("keyconv", calls))
    path = autotune.cache_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(damage)
    probe = _probe()
    assert autotune.choose(probe, ["keyconv", "correlation"], "correlation", 1e9, None, True) == "keyconv"
    assert len(calls) == 1
    data = json.loads(path.read_text())
    assert data["version"] == autotune.FILE_VERSION and data["choices"][probe.key(None)]["backend"] == "keyconv"


def test_unwritable_cache_directory_still_chooses(tune, monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(autotune, "measure", _fake_measure("keyconv", calls))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    config.set_cache_dir(blocker)  # a file where the directory should be
    autotune.reset()
    assert autotune.choose(_probe(), ["keyconv", "correlation"], "correlation", 1e9, None, True) == "keyconv"


def test_recorded_backend_that_cannot_serve_is_not_chosen(tune, monkeypatch):
    """A record says "fused", but this call cannot use the kernel (e.g. it is unavailable now,
    or dropout): the choice comes from the candidates that can serve."""
    calls = []
    monkeypatch.setattr(autotune, "measure", _fake_measure("fused", calls))
    probe = _probe()
    assert autotune.choose(probe, ["fused", "keyconv"], "keyconv", 1e9, None, True) == "fused"
    assert autotune.choose(probe, ["keyconv", "correlation"], "keyconv", 1e9, None, True) in ("keyconv",
                                                                                                 "correlation")


def test_real_measurement_picks_a_serving_backend_and_matches_it(tune):
    """End to end with real timings on a small call: the choice is one of the backends that
    can serve it, the result is that backend's, and the record holds every candidate's time."""
    grid = (3, 4, 5)
    q, k, v, u_k, u_v = random_inputs(2, 2, grid, 8, 2, (3, 3, 3), dtype=torch.float32, requires_grad=True)
    chosen = resolve_backend(q, u_k, grid)
    expected = {"keyconv", "correlation"} | ({"fused"} if HAS_NATIVE else set())
    assert chosen in expected
    out = struct_attention(q, k, v, u_k, u_v, grid)
    torch.testing.assert_close(out, struct_attention(q, k, v, u_k, u_v, grid, backend=chosen), rtol=0, atol=0)
    (entry,) = json.loads(autotune.cache_file().read_text())["choices"].values()
    assert set(entry["seconds"]) == expected and entry["backend"] == chosen
    assert all(s > 0 for s in entry["seconds"].values())
    # channel-wise patterns, strides, dropout, weights: one serving backend, nothing measured
    channelwise = torch.randn(2, 8, 2, 3, 3, 3)
    assert resolve_backend(q, channelwise, grid) == "keyconv"
    assert resolve_backend(q, u_k, grid, kv_stride=(1, 2, 2)) == "keyconv"
    assert resolve_backend(q, u_k, grid, return_weights=True) == "correlation"
    assert resolve_backend(q, u_k, grid, dropout_p=0.1) in ("keyconv", "correlation")
    assert len(json.loads(autotune.cache_file().read_text())["choices"]) == 1


def test_setting_values(monkeypatch):
    saved = config.settings()
    try:
        for raw, value in (("measure", "measure"), ("OFF", "off"), (" deterministic ", "deterministic")):
            monkeypatch.setenv("STRUCTVIT_AUTOTUNE", raw)
            assert config.reload_from_environment().autotune == value
        monkeypatch.setenv("STRUCTVIT_AUTOTUNE", "sometimes")
        with pytest.raises(ValueError, match="STRUCTVIT_AUTOTUNE"):
            config.reload_from_environment()
        with pytest.raises(ValueError, match="mode must be one of"):
            config.set_autotune("fast")
        monkeypatch.setenv("STRUCTVIT_AUTOTUNE", "off")
        monkeypatch.setenv("STRUCTVIT_NATIVE_ARCH", "haswell")
        assert config.reload_from_environment().native_arch == "haswell"
        monkeypatch.setenv("STRUCTVIT_NATIVE_ARCH", "-O0 -fsomething")
        with pytest.raises(ValueError, match="STRUCTVIT_NATIVE_ARCH"):
            config.reload_from_environment()
    finally:
        config._settings = saved


def test_timed_rounds_retime_only_the_two_close_candidates():
    """A fake clock: each callable advances it by its cost. Candidates within CLOSE of each
    other get extra rounds (just those two); a clear winner gets none."""
    now = [0.0]
    calls = {}

    def fn(name, cost):
        def run():
            calls[name] = calls.get(name, 0) + 1
            now[0] += cost
        return run

    times = autotune.timed_rounds({"a": fn("a", 1.0), "b": fn("b", 1.02), "c": fn("c", 2.0)}, repeats=3, close=0.05,
                                  extra=4, clock=lambda: now[0])
    assert calls == {"a": 1 + 3 + 4, "b": 1 + 3 + 4, "c": 1 + 3}  # warm-up, rounds, extra rounds of a and b
    assert len(times["a"]) == 7 and len(times["c"]) == 3 and min(times["a"]) == pytest.approx(1.0)
    calls.clear()
    autotune.timed_rounds({"a": fn("a", 1.0), "b": fn("b", 1.5)}, repeats=3, close=0.05, extra=4, clock=lambda: now[0])
    assert calls == {"a": 4, "b": 4}


def test_noisy_record_is_measured_again_by_later_processes(tune, monkeypatch):
    """A measurement whose runs disagreed is recorded as noisy: this process keeps it, the next
    processes (memory reset) measure again until MAX_TRIES; deterministic mode just uses it."""
    calls = []
    monkeypatch.setattr(autotune, "measure", _fake_measure("keyconv", calls, spread=2 * autotune.NOISY))
    probe = _probe()
    args = (["keyconv", "correlation"], "correlation", 1e9, None, True)
    assert autotune.choose(probe, *args) == "keyconv"
    assert autotune.choose(probe, *args) == "keyconv" and len(calls) == 1  # final in this process
    entry = json.loads(autotune.cache_file().read_text())["choices"][probe.key(None)]
    assert entry["noisy"] and entry["tries"] == 1
    config.set_autotune("deterministic")
    autotune.reset()
    assert autotune.choose(probe, *args) == "keyconv" and len(calls) == 1
    config.set_autotune("measure")
    for tries in range(2, autotune.MAX_TRIES + 1):
        autotune.reset()
        assert autotune.choose(probe, *args) == "keyconv"
        assert len(calls) == tries
    autotune.reset()
    assert autotune.choose(probe, *args) == "keyconv" and len(calls) == autotune.MAX_TRIES  # kept for good
    # a quiet measurement is final at once
    monkeypatch.setattr(autotune, "measure", _fake_measure("correlation", calls))
    other = _probe(training=False)
    autotune.choose(other, *args)
    autotune.reset()
    assert autotune.choose(other, *args) == "correlation" and len(calls) == autotune.MAX_TRIES + 1
    assert "noisy" not in json.loads(autotune.cache_file().read_text())["choices"][other.key(None)]


def test_forget_deletes_the_records_and_measures_again(tune, monkeypatch):
    calls = []
    monkeypatch.setattr(autotune, "measure", _fake_measure("keyconv", calls))
    probe = _probe()
    args = (["keyconv", "correlation"], "correlation", 1e9, None, True)
    autotune.choose(probe, *args)
    other_machine = autotune.cache_file("0123456789abcdef")
    other_machine.write_text(autotune.cache_file().read_text())
    assert autotune.forget() == [autotune.cache_file()]
    assert not autotune.cache_file().exists() and other_machine.exists()
    monkeypatch.setattr(autotune, "measure", _fake_measure("correlation", calls))
    assert autotune.choose(probe, *args) == "correlation" and len(calls) == 2  # measured again
    assert sorted(autotune.forget(all_machines=True)) == sorted([autotune.cache_file(), other_machine])
    assert autotune.forget() == []


def test_bench_autotune_command_shows_and_forgets(tune, monkeypatch, capsys):
    from structvit import bench

    calls = []
    monkeypatch.setattr(autotune, "measure", _fake_measure("keyconv", calls))
    probe = _probe()
    autotune.choose(probe, ["keyconv", "correlation"], "correlation", 1e9, None, True)
    assert bench.main(["autotune"]) == 0
    out = capsys.readouterr().out
    assert "1 recorded choices" in out and probe.key(None) in out and "keyconv 1.0 ms" in out
    assert bench.main(["autotune", "--forget"]) == 0
    assert "deleted" in capsys.readouterr().out and not autotune.cache_file().exists()
    assert bench.main(["autotune", "--forget"]) == 0
    assert "nothing recorded" in capsys.readouterr().out


def test_bench_auto_rows_are_compared_with_the_fastest_backend(tune):
    """``bench op``'s auto rows carry their time over the fastest explicit backend row of the
    same run (the acceptance figure), with --stat min as well as the median."""
    from structvit import bench

    case = bench.OP_CASES["tiny"]
    rows = bench.bench_op_case("tiny", case, ["naive", "keyconv", "auto"], device="cpu", dtype="float32", repeats=2,
                               measure_memory=False, stat="min")
    timed = {r["backend"]: r for r in rows if "seconds" in r}
    auto = next(r for r in timed.values() if r["backend"].startswith("auto"))
    fastest = min(timed["naive"]["seconds"], timed["keyconv"]["seconds"])
    assert auto["fastest_ratio"] == pytest.approx(auto["seconds"] / fastest)
    assert "fastest_ratio" not in timed["keyconv"] and "fastest_ratio" not in timed["SA (sdpa)"]
    assert "x the fastest explicit backend" in bench.format_op_table(case, rows)
