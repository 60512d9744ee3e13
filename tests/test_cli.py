"""The `structvit` command, the op tour of the demo and the op benchmark (run small; timings never asserted)."""
from __future__ import annotations

import math

import pytest

from structvit import bench, cli
from structvit.nn import StructSA


def test_help_lists_commands(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in cli.COMMANDS:
        assert name in out


def test_unknown_command(capsys):
    assert cli.main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


def test_demo_op_tour_checks_equivalence(capsys):
    # `structvit demo --op`: the op tour (the training demo itself is tested in test_engine_cli.py)
    assert cli.main(["demo", "--op", "--grid", "3", "4", "--patterns", "2"]) == 0
    out = capsys.readouterr().out
    assert "op tour OK" in out
    diffs = {ln.split()[1]: float(ln.split()[-1]) for ln in out.splitlines() if ln.startswith("  StructSA")}
    assert diffs["(init='sa')"] < 1e-12 and diffs["(random)"] > 1e-3  # random patterns are not SA


@pytest.mark.slow  # ~95 s on CPU
def test_bench_op_rows(capsys):
    rows = bench.bench_op_case("tiny", bench.OP_CASES["tiny"], ["naive", "keyconv", "auto", "auto-mem"], device="cpu",
                               dtype="float32", repeats=1, memory_limit=4096)
    assert [r["backend"].split()[0] for r in rows] == ["SA", "naive", "keyconv", "auto", "auto,"]
    assert rows[-1]["backend"].startswith("auto, memory_limit 0.00390625 MiB (")
    assert rows[0]["time_ratio"] == 1.0
    assert all(r["seconds"] > 0 for r in rows)
    assert all(r["peak"] is None or r["peak"] >= 0 for r in rows)
    table = bench.format_op_table(bench.OP_CASES["tiny"], rows)
    assert table.count("\n| ") == 6  # column header and 5 rows
    assert bench.main(["op", "--cases", "tiny", "--backends", "correlation", "--repeats", "1"]) == 0
    assert "| correlation |" in capsys.readouterr().out


def test_bench_op_paper_form_fast(tmp_path, capsys):
    """Channel-wise patterns with a key/value stride: SA timed in the same run, the
    dot-product-only backends skipped with the reason, the machine's ISA printed and written."""
    case = bench.OP_CASES["tiny_c"]
    assert case.layout == "channel" and case.keys == 2 * 2 * 2  # ceil(4 / 2) ** 2 per frame, 2 frames
    rows = bench.bench_op_case("tiny_c", case, ["keyconv", "fused", "auto", "keyconv-torch"], device="cpu",
                               dtype="float32", repeats=1, measure_memory=False)
    assert [r["backend"] for r in rows] == ["SA (sdpa)", "keyconv", "fused", "auto (keyconv)",
                                            "keyconv (PyTorch convolutions)"]
    assert rows[2]["skipped"] == "cannot serve channel-wise patterns" and rows[4]["seconds"] > 0
    from structvit import config

    assert config.settings().native_conv  # the keyconv-torch row switched the kernel off only for its calls
    profiled = bench.bench_op_case("tiny_c", case, ["keyconv"], device="cpu", dtype="float32", repeats=1,
                                   measure_memory=False, profile_top=3)
    names = [name for name, _ in profiled[1]["profile"]]
    assert len(names) <= 4 and all(t >= 0 for _, t in profiled[1]["profile"])
    assert "Where the time goes" in bench.format_op_table(case, profiled)
    assert rows[0]["time_ratio"] == 1.0 and rows[1]["seconds"] > 0 and rows[1]["peak"] is None
    out = tmp_path / "perf.md"
    assert bench.main(["op", "--cases", "tiny_c", "--backends", "keyconv", "--repeats", "1", "--no-memory",
                       "--write", str(out)]) == 0
    printed = capsys.readouterr().out
    info = bench.cpu_info()
    assert set(info["isa"]) == {"avx512f", "avx2", "fma"}
    assert f"# machine: CPU {info['model']}" in printed and "avx2 " in printed
    text = out.read_text()
    assert "command: `python -m structvit.bench op --cases tiny_c" in text and "- ISA: avx512f: " in text
    assert "| keyconv |" in text and "N'=8 keys" in text
    assert set(bench.PAPER_CASES) == {f"{k}_c{d}_s{s}" for k in ("image", "video") for d in (4, 8) for s in (1, 2)}
    assert bench.OP_CASES["video_c8_s2"].stride3 == (1, 2, 2) and bench.OP_CASES["image_c4_s2"].keys == 49


def test_bench_rejects_unknown_case():
    with pytest.raises(SystemExit):
        bench.main(["op", "--cases", "huge"])


def test_bench_model_training_table_and_floor(capsys, one_thread):
    """The training table: both steps, the SDPA share of the all-SA step and the floor it sets."""
    assert bench.main(["model", "--what", "train", "--models", "structvit_tiny", "--repeats", "1",
                       "--image-batch", "2"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("| structvit_tiny |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    share, floor = float(cells[5].rstrip("%")) / 100, float(cells[6].rstrip("x"))
    assert 0 < share < 1 and floor >= 1
    model = bench._model("structvit_tiny")
    layers = [m for m in model.modules() if isinstance(m, StructSA)]
    want = sum(m.num_patterns / math.prod(m.kv_stride) for m in layers) / len(layers)
    assert bench.key_factor(model) == pytest.approx(want)
    assert floor == pytest.approx(1 + share * (want - 1), abs=0.008)  # from the rounded share
    s42 = bench._model("structvit_s_4_2", struct_blocks="all")
    assert bench.key_factor(s42) == pytest.approx(1.0)  # D = 4 keys at stride 2: N' = N / 4


def test_bench_model_pairs_every_family_with_its_sa_version():
    """StructViT models are paired with struct_blocks=(0, 0) (UniFormer), the DeiT-style ones
    with attention="sa" (DeiT): `bench model` runs on every registered name."""
    for name in ("structvit_tiny", "structvit_deit_tiny"):
        pair = bench._pair(name, "auto")
        assert any(isinstance(m, StructSA) for m in pair["all"].modules())
        assert not any(isinstance(m, StructSA) for m in pair["sa"].modules()), name


def test_bench_model_inference_table(capsys):
    assert bench.main(["model", "--what", "infer", "--models", "structvit_tiny", "--repeats", "1",
                       "--image-batch", "1"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("| structvit_tiny |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "1x3x112x112" and float(cells[3]) > 0 and float(cells[4]) > 0
    assert 0 < float(cells[6].rstrip("%")) < 100 and float(cells[7].rstrip("x")) >= 1
    # the backends auto ran in the model's StructSA layers (structvit_tiny: (2, 1) -> 3 layers)
    counts = [part.strip().rsplit(" x", 1) for part in cells[9].split(",")]
    assert all(name in ("naive", "correlation", "keyconv", "fused") for name, _ in counts)
    assert sum(int(n) for _, n in counts) == 3


def test_file_errors_of_any_command_are_one_line(tmp_path, capsys):
    """A folder that cannot be written (here: under a regular file) ends a command in one line
    naming the path; the traceback setting shows the traceback instead."""
    from structvit import config

    blocker = tmp_path / "file.txt"
    blocker.write_text("")
    out = blocker / "figures"
    argv = ["viz", "attention", "--model", "structvit_tiny", "--model-kwargs",
            '{"depths": [1, 1, 1, 1], "embed_dims": [16, 32, 64, 128], "head_dim": 16, "num_patterns": 2}',
            "--out", str(out)]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(lines) == 1 and "Traceback" not in err and str(out) in lines[0], err[-2000:]
    config.set_traceback(True)
    try:
        with pytest.raises(NotADirectoryError):
            cli.main(argv)
    finally:
        config.reload_from_environment()
