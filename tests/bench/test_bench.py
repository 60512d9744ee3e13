"""The benchmark package (structvit.bench): keyword entry points, the GPU columns and the
floor row (timings are never asserted; the CUDA tests run where a GPU is present)."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from structvit import bench
from structvit.bench import cli, common, op

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_bench_sa_over_pattern_keys_is_structsa_without_its_convolutions():
    """The floor row ("sa-keys": SDPA over D * N' keys) is StructSA with centre-delta patterns,
    whose convolutions copy the strided keys and values D times."""
    case = bench.OP_CASES["tiny_c"]
    (q, k, v), (u_k, u_v) = bench.make_op_inputs(case, torch.device("cpu"), torch.float64)
    with torch.no_grad():
        for u in (u_k, u_v):
            u.zero_()[..., 1, 1, 1] = 1.0  # 3x3x3 window: the centre
    floor = bench.op_fn(case, "sa-keys")(q, k, v)
    struct = bench.op_fn(case, "keyconv")(q, k, v, u_k, u_v)
    torch.testing.assert_close(floor, struct, rtol=0, atol=1e-12)


def test_bench_run_op_takes_keywords(tmp_path, capsys):
    out = tmp_path / "page.md"
    tables = bench.run_op(cases=["tiny_c"], backends=["keyconv", "sa-keys"], repeats=1, measure_memory=False,
                          write=str(out), argv=["op", "--cases", "tiny_c"])
    assert len(tables) == 1 and "| SA over D * N' keys (the floor) |" in tables[0] and "| keyconv |" in tables[0]
    assert out.read_text().count("| keyconv |") == 1
    with pytest.raises(ValueError, match="cases: unknown case 'huge'"):
        bench.run_op(cases=["huge"])
    with pytest.raises(ValueError, match="backends: unknown backend"):
        bench.run_op(cases=["tiny"], backends=["fast"])
    assert bench.GPU_CASES == [f"gpu_{key}" for key in bench.PAPER_CASES]
    big = bench.OP_CASES["gpu_video_c8_s2"]
    assert (big.batch, big.heads, big.head_dim, big.patterns, big.stride3) == (16, 5, 64, 8, (1, 2, 2))
    assert bench.OP_CASES["gpu_image_c4_s1"].batch == 128


def test_bench_gpu_columns_from_kernel_times():
    """GPU time split into the conv kernels (Triton's and PyTorch's depthwise ones, by name) and
    the table's ratios to SA and to the floor row."""
    kernels = [("pattern_conv_forward_kernel", 300.0), ("conv_depthwise2d_forward_kernel", 100.0),
               ("flash_fwd_kernel", 500.0), ("elementwise_kernel", 100.0)]
    split = common.split_kernel_time(kernels, sdpa_us=500.0)
    assert split == pytest.approx({"total": 1e-3, "conv": 4e-4, "sdpa": 5e-4})
    row = {"seconds": 2e-3, "peak": 2 << 20, "auto": False, "mem_ratio": 2.0, "time_ratio": 2.0}
    rows = [{**row, "backend": "SA (sdpa)", "gpu": {"total": 5e-4, "conv": 0.0, "sdpa": 5e-4}, "gpu_ratio": 1.0},
            {**row, "backend": "keyconv", "gpu": split, "gpu_ratio": 2.0},
            {**row, "backend": "SA over D * N' keys (the floor)", "floor": True,
             "gpu": {"total": 8e-4, "conv": 0.0, "sdpa": 8e-4}, "gpu_ratio": 1.6},
            {"backend": "fused", "skipped": "cannot serve channel-wise patterns"}]
    table = bench.format_op_table(bench.OP_CASES["tiny_c"], rows)
    line = next(x for x in table.splitlines() if x.startswith("| keyconv |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[1:5] == ["1.00 ms", "2.00x", "1.25x", "40%"]
    assert "| fused | skipped (cannot serve channel-wise patterns) |" in table


def test_bench_write_defaults_and_module_entry():
    """--write without a path writes the device's results page; python -m structvit.bench runs."""
    parser = cli.build_parser()
    args = parser.parse_args(["op", "--device", "cuda", "--write"])
    assert cli._write_path(args, "op") == "docs/results/performance-gpu.md"
    args = parser.parse_args(["model", "--write"])
    assert cli._write_path(args, "model") == "docs/results/performance-model.md"
    assert cli._write_path(parser.parse_args(["op", "--write", "x.md"]), "op") == "x.md"
    assert cli._write_path(parser.parse_args(["op"]), "op") is None
    res = subprocess.run([sys.executable, "-m", "structvit.bench", "model", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0 and "--precision" in res.stdout


def test_bench_run_model_takes_keywords(one_thread):
    lines = bench.run_model(what=["infer"], models=["structvit_tiny"], image_batch=1, repeats=1)
    row = next(line for line in lines if line.startswith("| structvit_tiny |"))
    assert row.split("|")[2].strip() == "1x3x112x112"
    with pytest.raises(ValueError, match="precision must be one of"):
        bench.run_model(what=["infer"], models=["structvit_tiny"], precision="fp8")


@cuda
def test_bench_cuda_op_and_model_tables(tmp_path):
    """On the GPU: GPU time, conv share and the floor row in the op table; the bf16 training
    table in GPU time with peak memory."""
    tables = bench.run_op(cases=["tiny_c"], device="cuda", repeats=1)
    assert "| SA over D * N' keys (the floor) |" in tables[0] and "conv kernels' share" in tables[0]
    lines = bench.run_model(what=["train"], models=["structvit_tiny"], device="cuda", image_batch=2, repeats=1,
                            precision="bf16-mixed", write=str(tmp_path / "m.md"))
    row = next(line for line in lines if line.startswith("| structvit_tiny |"))
    assert " ms |" in row and "MiB" in row
    assert op.GPU_CASES and (tmp_path / "m.md").exists()


def test_bench_model_unknown_name_is_one_line(capsys):
    """A bad --models name is the user's argument: argparse's one-line error (exit 2), no traceback."""
    from structvit.bench.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["model", "--models", "not_a_model"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--models: unknown model 'not_a_model'" in err and "Traceback" not in err
