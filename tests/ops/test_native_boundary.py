"""The native ops' boundary: every inconsistent call is refused with a Python error that
names the argument, never a crash, a signal or garbage.

The calls run in a subprocess (one for all of them), so that a call which did corrupt
memory shows up as a signal naming the case, not as a dead test run. The kernels' own
checks (behind the Python ones) are called directly through ctypes there too. The same
script runs under AddressSanitizer in ``test_boundary_under_asan`` (slow, opt-in) and
``make asan``.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from structvit.ops import native

HAS_NATIVE = native.available()
pytestmark = pytest.mark.skipif(not HAS_NATIVE, reason=f"native kernels unavailable: {native.unavailable_reason()}")

# The script the subprocess runs: every case prints one JSON line (flushed) before and
# after its call, so a crash names the case it happened in.
SCRIPT = r'''
import json, math, sys, ctypes
import torch
import structvit.ops  # registers the custom ops
from structvit.ops import native

ops = torch.ops.structvit
f32, f64 = torch.float32, torch.float64


def report(**fields):
    print(json.dumps(fields), flush=True)


def case(name, expect, fn, check=None):
    """expect: the word the error message must contain (the argument), or None: must succeed."""
    report(start=name)
    try:
        result = fn()
    except Exception as e:
        report(name=name, expect=expect, error=type(e).__name__, message=str(e)[:300])
        return
    ok = check(result) if check is not None else True
    report(name=name, expect=expect, error=None, message="returned" if ok else "returned a wrong result")


# ---------------------------------------------------------------- pattern_conv_forward
x = torch.randn(1, 2, 16, 8)
w = torch.randn(2, 2, 9, 8)
G, K, S = [1, 4, 4], [1, 3, 3], [1, 1, 1]
fwd = ops.pattern_conv_forward
case("conv_fwd valid", None, lambda: fwd(x, w, G, K, S), lambda y: y.shape == (1, 2, 32, 8))
case("conv_fwd half (the issue's example)", "x", lambda: fwd(x.half(), w.half(), G, K, S))
case("conv_fwd bfloat16", "x", lambda: fwd(x.bfloat16(), w.bfloat16(), G, K, S))
case("conv_fwd int8", "x", lambda: fwd(x.to(torch.int8), w.to(torch.int8), G, K, S))
case("conv_fwd bool", "x", lambda: fwd(x > 0, w > 0, G, K, S))
case("conv_fwd int64", "x", lambda: fwd(x.long(), w.long(), G, K, S))
case("conv_fwd mixed f32/f64", "w", lambda: fwd(x, w.double(), G, K, S))
case("conv_fwd mixed f64/f32", "w", lambda: fwd(x.double(), w, G, K, S))
case("conv_fwd w heads", "w", lambda: fwd(x, torch.randn(3, 2, 9, 8), G, K, S))
case("conv_fwd w channels", "w", lambda: fwd(x, torch.randn(2, 2, 9, 4), G, K, S))
case("conv_fwd window larger than weight", "window", lambda: fwd(x, w, G, [1, 5, 5], S))
case("conv_fwd window smaller than weight", "window", lambda: fwd(x, torch.randn(2, 2, 25, 8), G, K, S))
case("conv_fwd window even", "window", lambda: fwd(x, torch.randn(2, 2, 4, 8), G, [1, 2, 2], S))
case("conv_fwd window zero", "window", lambda: fwd(x, torch.randn(2, 2, 0, 8), G, [1, 0, 3], S))
case("conv_fwd window rank", "window", lambda: fwd(x, w, G, [3, 3], S))
case("conv_fwd grid product", "grid", lambda: fwd(x, w, [1, 4, 5], K, S))
case("conv_fwd grid rank", "grid", lambda: fwd(x, w, [4, 4], K, S))
case("conv_fwd grid zero", "grid", lambda: fwd(x[:, :, :0], w, [0, 4, 4], K, S))
case("conv_fwd grid negative", "grid", lambda: fwd(x, w, [1, -4, -4], K, S))
case("conv_fwd stride zero", "stride", lambda: fwd(x, w, G, K, [1, 0, 1]))
case("conv_fwd stride negative", "stride", lambda: fwd(x, w, G, K, [1, -1, 1]))
case("conv_fwd stride rank", "stride", lambda: fwd(x, w, G, K, [1, 1]))
case("conv_fwd x 3-D", "x", lambda: fwd(x[0], w, G, K, S))
case("conv_fwd w 3-D", "w", lambda: fwd(x, w[0], G, K, S))
case("conv_fwd batch 0", None, lambda: fwd(x[:0], w, G, K, S), lambda y: y.shape == (0, 2, 32, 8))
case("conv_fwd channels 0", None, lambda: fwd(x[..., :0], w[..., :0], G, K, S), lambda y: y.shape == (1, 2, 32, 0))
case("conv_fwd patterns 0", None, lambda: fwd(x, w[:, :0], G, K, S), lambda y: y.shape == (1, 2, 0, 8))
case("conv_fwd heads 0", None, lambda: fwd(x[:, :0], w[:0], G, K, S), lambda y: y.shape == (1, 0, 32, 8))
xt = torch.randn(1, 16, 2, 8).transpose(1, 2)  # a strided view, as a slice of a qkv projection
case("conv_fwd strided x", None, lambda: fwd(xt, w, G, K, S),
     lambda y: torch.allclose(y, fwd(xt.contiguous(), w, G, K, S)))
xc = torch.randn(1, 2, 8, 16).transpose(2, 3)  # channels not contiguous: copied
case("conv_fwd x channels strided", None, lambda: fwd(xc, w, G, K, S),
     lambda y: torch.allclose(y, fwd(xc.contiguous(), w, G, K, S)))
xe = torch.randn(1, 1, 16, 8).expand(1, 2, 16, 8)  # stride 0 over heads
case("conv_fwd expanded x", None, lambda: fwd(xe, w, G, K, S),
     lambda y: torch.allclose(y, fwd(xe.contiguous(), w, G, K, S)))
case("conv_fwd window larger than grid", None,
     lambda: fwd(x, torch.randn(2, 2, 3 * 9 * 9, 8), G, [3, 9, 9], S), lambda y: y.shape == (1, 2, 32, 8))
case("conv_fwd stride larger than grid", None, lambda: fwd(x, w, G, K, [5, 7, 7]), lambda y: y.shape == (1, 2, 2, 8))

# ---------------------------------------------------------------- pattern_conv_backward
gy = torch.randn(1, 2, 32, 8)
bwd = ops.pattern_conv_backward
case("conv_bwd valid", None, lambda: bwd(gy, x, w, G, K, S, True, True),
     lambda r: r[0].shape == x.shape and r[1].shape == w.shape)
case("conv_bwd grad_y shape", "grad_y", lambda: bwd(gy[:, :, :31], x, w, G, K, S, True, True))
case("conv_bwd grad_y channels", "grad_y", lambda: bwd(gy[..., :4], x, w, G, K, S, True, True))
case("conv_bwd grad_y batch", "grad_y", lambda: bwd(torch.randn(3, 2, 32, 8), x, w, G, K, S, True, True))
case("conv_bwd grad_y dtype", "grad_y", lambda: bwd(gy.double(), x, w, G, K, S, True, True))
case("conv_bwd grad_y int8", "grad_y", lambda: bwd(gy.to(torch.int8), x, w, G, K, S, True, True))
case("conv_bwd half", "x", lambda: bwd(gy.half(), x.half(), w.half(), G, K, S, True, True))
case("conv_bwd w mixed", "w", lambda: bwd(gy, x, w.double(), G, K, S, True, True))
case("conv_bwd window vs weight", "window", lambda: bwd(gy, x, w, G, [1, 5, 5], S, True, True))
case("conv_bwd grid product", "grid", lambda: bwd(gy, x, w, [1, 2, 4], K, S, True, True))
case("conv_bwd stride changes N'", "grad_y", lambda: bwd(gy, x, w, G, K, [1, 2, 2], True, True))
case("conv_bwd stride zero", "stride", lambda: bwd(gy, x, w, G, K, [0, 1, 1], True, True))
case("conv_bwd batch 0", None, lambda: bwd(gy[:0], x[:0], w, G, K, S, True, True),
     lambda r: r[0].shape == (0, 2, 16, 8) and bool((r[1] == 0).all()))
case("conv_bwd patterns 0", None, lambda: bwd(gy[:, :, :0], x, w[:, :0], G, K, S, True, True),
     lambda r: bool((r[0] == 0).all()) and r[1].shape == (2, 0, 9, 8))
case("conv_bwd strided grad_y", None, lambda: bwd(torch.randn(1, 32, 2, 8).transpose(1, 2), x, w, G, K, S, True, True),
     lambda r: r[0].shape == x.shape)

# ---------------------------------------------------------------- fused_forward
q, k, v = torch.randn(1, 2, 16, 4), torch.randn(1, 2, 16, 4), torch.randn(1, 2, 16, 6)
uk, uv = torch.randn(2, 2, 1, 3, 3), torch.randn(2, 2, 1, 3, 3)
ff = ops.fused_forward
C = 1 << 20


def ffwd(q=q, k=k, v=v, uk=uk, uv=uv, grid=G, joint=True, scale=0.5, chunk=C, kept=2):
    return ff(q, k, v, uk, uv, grid, joint, scale, chunk, kept)


case("fused_fwd valid", None, lambda: ffwd(), lambda r: r[0].shape == (1, 2, 16, 6))
case("fused_fwd half", "q", lambda: ffwd(*(t.half() for t in (q, k, v, uk, uv))))
case("fused_fwd int8", "q", lambda: ffwd(*(t.to(torch.int8) for t in (q, k, v, uk, uv))))
case("fused_fwd bool", "q", lambda: ffwd(*(t > 0 for t in (q, k, v, uk, uv))))
case("fused_fwd k dtype", "k", lambda: ffwd(k=k.double()))
case("fused_fwd v dtype", "v", lambda: ffwd(v=v.half()))
case("fused_fwd u_k dtype", "u_k", lambda: ffwd(uk=uk.double()))
case("fused_fwd u_v dtype", "u_v", lambda: ffwd(uv=uv.to(torch.int8)))
case("fused_fwd k shape", "k", lambda: ffwd(k=torch.randn(1, 2, 16, 5)))
case("fused_fwd v tokens", "v", lambda: ffwd(v=torch.randn(1, 2, 15, 6)))
case("fused_fwd v heads", "v", lambda: ffwd(v=torch.randn(1, 3, 16, 6)))
case("fused_fwd u_k heads", "u_k", lambda: ffwd(uk=torch.randn(3, 2, 1, 3, 3), uv=torch.randn(3, 2, 1, 3, 3)))
case("fused_fwd u_k no patterns", "u_k", lambda: ffwd(uk=uk[:, :0], uv=uv[:, :0]))
case("fused_fwd u_k even window", "u_k", lambda: ffwd(uk=torch.randn(2, 2, 1, 2, 2), uv=torch.randn(2, 2, 1, 2, 2)))
case("fused_fwd u_k 4-D", "u_k", lambda: ffwd(uk=uk[:, :, 0], uv=uv[:, :, 0]))
case("fused_fwd u_v shape", "u_v", lambda: ffwd(uv=torch.randn(2, 2, 1, 5, 5)))
case("fused_fwd u_v patterns", "u_v", lambda: ffwd(uv=torch.randn(2, 3, 1, 3, 3)))
case("fused_fwd grid product", "grid", lambda: ffwd(grid=[1, 4, 5]))
case("fused_fwd grid rank", "grid", lambda: ffwd(grid=[4, 4]))
case("fused_fwd grid zero", "grid", lambda: ffwd(grid=[0, 4, 4]))
case("fused_fwd scale nan", "scale", lambda: ffwd(scale=math.nan))
case("fused_fwd scale inf", "scale", lambda: ffwd(scale=math.inf))
case("fused_fwd scale zero", "scale", lambda: ffwd(scale=0.0))
case("fused_fwd chunk zero", "chunk_elements", lambda: ffwd(chunk=0))
case("fused_fwd chunk negative", "chunk_elements", lambda: ffwd(chunk=-7))
case("fused_fwd kept 3", "kept", lambda: ffwd(kept=3))
case("fused_fwd kept -1", "kept", lambda: ffwd(kept=-1))
case("fused_fwd q 3-D", "q", lambda: ffwd(q=q[0]))
case("fused_fwd batch 0", None, lambda: ffwd(q[:0], k[:0], v[:0]), lambda r: r[0].shape == (0, 2, 16, 6))
case("fused_fwd channels 0", None, lambda: ffwd(q[..., :0], k[..., :0]), lambda r: r[0].shape == (1, 2, 16, 6))
case("fused_fwd value channels 0", None, lambda: ffwd(v=v[..., :0]), lambda r: r[0].shape == (1, 2, 16, 0))
case("fused_fwd per-head chunks of one row", None, lambda: ffwd(chunk=16, kept=0),
     lambda r: torch.allclose(r[0], ffwd(kept=0)[0], atol=1e-5))
case("fused_fwd shared patterns", None, lambda: ffwd(uk=uk[:1], uv=uv[:1]), lambda r: r[0].shape == (1, 2, 16, 6))
case("fused_fwd window larger than grid", None,
     lambda: ffwd(uk=torch.randn(2, 2, 3, 9, 9), uv=torch.randn(2, 2, 3, 9, 9)), lambda r: bool(r[0].isfinite().all()))
case("fused_fwd non-contiguous q", None, lambda: ffwd(q=torch.randn(1, 16, 2, 4).transpose(1, 2)),
     lambda r: r[0].shape == (1, 2, 16, 6))

# ---------------------------------------------------------------- fused_backward
out, lse, at, s0 = ffwd()
go = torch.randn(1, 2, 16, 6)
fb = ops.fused_backward
empty = q.new_empty(0)


def fbwd(go=go, q=q, k=k, v=v, uk=uk, uv=uv, out=out, lse=lse, at=at, s0=s0, grid=G, joint=True, scale=0.5, chunk=C):
    return fb(go, q, k, v, uk, uv, out, lse, at, s0, grid, joint, scale, chunk)


case("fused_bwd valid", None, lambda: fbwd(), lambda r: r[3].shape == uk.shape)
case("fused_bwd valid, nothing kept", None, lambda: fbwd(at=empty, s0=empty),
     lambda r: all(torch.allclose(a, b, atol=1e-5) for a, b in zip(r, fbwd())))
case("fused_bwd grad_out shape", "grad_out", lambda: fbwd(go=go[..., :5]))
case("fused_bwd grad_out dtype", "grad_out", lambda: fbwd(go=go.double()))
case("fused_bwd grad_out int8", "grad_out", lambda: fbwd(go=go.to(torch.int8)))
case("fused_bwd out shape", "out", lambda: fbwd(out=out[:, :, :15]))
case("fused_bwd lse shape", "lse", lambda: fbwd(lse=lse[:, :15]))
case("fused_bwd lse per pattern", "lse", lambda: fbwd(joint=False))
case("fused_bwd lse strided", "lse", lambda: fbwd(lse=torch.randn(2, 16, 2)[..., :1]))
case("fused_bwd lse dtype", "lse", lambda: fbwd(lse=lse.double()))
case("fused_bwd at_kept shape", "at_kept", lambda: fbwd(at=at[:, :, :15]))
case("fused_bwd at_kept strided", "at_kept", lambda: fbwd(at=at.transpose(1, 2)))
case("fused_bwd s0_kept dtype", "s0_kept", lambda: fbwd(s0=s0.double()))
case("fused_bwd s0_kept shape", "s0_kept", lambda: fbwd(s0=torch.randn(2, 16, 17)))
case("fused_bwd s0 without at", "s0_kept", lambda: fbwd(at=empty))
case("fused_bwd u_k window vs kept", "u_k", lambda: fbwd(uk=torch.randn(2, 2, 1, 3, 4)))
case("fused_bwd grid product", "grid", lambda: fbwd(grid=[1, 2, 4]))
case("fused_bwd half", "q", lambda: fbwd(*(t.half() for t in (go, q, k, v, uk, uv, out, lse, at, s0))))
case("fused_bwd scale inf", "scale", lambda: fbwd(scale=math.inf))
case("fused_bwd chunk zero", "chunk_elements", lambda: fbwd(chunk=0))

# ---------------------------------------------------------------- the kernels' own checks
lib = native.load()


def conv_args(**over):
    fields = dict(B=1, heads=2, C=8, D=2, T=1, H=4, W=4, kt=1, kh=3, kw=3, st=1, sh=1, sw=1, groups=1,
                  x_sb=256, x_sh=128, x_sn=8, y_sb=512, y_sh=256, y_sn=8, x_len=256, w_len=288, y_len=512, threads=1)
    fields.update(over)
    return native.ConvArgs(**fields)


xb, wb, yb = torch.randn(256), torch.randn(288), torch.empty(512)
kernel = lib.structvit_pattern_conv_forward_f32
case("kernel conv valid", None, lambda: native.call(kernel, conv_args(), xb, wb, yb))
for name, over in [("x_len short", dict(x_len=255)), ("w_len short", dict(w_len=287)), ("y_len short", dict(y_len=511)),
                   ("even window", dict(kh=2)), ("zero stride", dict(sw=0)), ("negative size", dict(C=-8)),
                   ("y not contiguous", dict(y_sn=16)), ("x strides reach past x", dict(x_sn=9)),
                   ("overflow", dict(B=1 << 62, x_len=1 << 62)), ("groups", dict(groups=2)), ("threads", dict(threads=0)),
                   ("zero grid", dict(H=0))]:
    case(f"kernel conv {name}", "", lambda over=over: native.call(kernel, conv_args(**over), xb, wb, yb))
case("kernel conv null pointer", "", lambda: native.call(kernel, conv_args(), None, wb, yb))


def fused_args(**over):
    fields = dict(T=1, H=4, W=4, kt=1, kh=3, kw=3, D=2, heads=2, hu=2, BH=2, R=16, joint=1, at_saved=0, threads=1,
                  s0_len=512, at_len=512, lse_len=32, uk_len=36, uv_len=36, dat_len=0, rowdot_len=0, ds0_len=0,
                  duk_len=0, duv_len=0, scale=0.5)
    fields.update(over)
    return native.FusedArgs(**fields)


s0b, ukb, uvb, atb, lseb = torch.randn(512), torch.randn(36), torch.randn(36), torch.empty(512), torch.empty(32)
kernel = lib.structvit_fused_forward_f32
case("kernel fused valid", None, lambda: native.call(kernel, fused_args(), s0b, ukb, uvb, atb, lseb))
for name, over in [("s0_len short", dict(s0_len=511)), ("lse_len short", dict(lse_len=31)),
                   ("lse per pattern", dict(joint=0)), ("uk_len short", dict(uk_len=35)), ("hu", dict(hu=3)),
                   ("D zero", dict(D=0)), ("even window", dict(kw=4)), ("rows", dict(R=17)),
                   ("overflow", dict(BH=1 << 40, R=1 << 40)), ("joint", dict(joint=2))]:
    case(f"kernel fused {name}", "", lambda over=over: native.call(kernel, fused_args(**over), s0b, ukb, uvb, atb, lseb))
report(done=True)
'''


def run_script(env: dict | None = None, timeout: int = 600) -> tuple[list[dict], subprocess.CompletedProcess]:
    res = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=timeout,
                         env={**os.environ, **(env or {})}, cwd=Path(__file__).parents[1])
    lines = []
    for line in res.stdout.splitlines():
        try:
            lines.append(json.loads(line))
        except ValueError:
            pass
    return lines, res


def check_results(lines: list[dict], res: subprocess.CompletedProcess) -> None:
    started = [line["start"] for line in lines if "start" in line]
    if res.returncode != 0 or not any(line.get("done") for line in lines):
        how = (f"signal {signal.Signals(-res.returncode).name}" if res.returncode < 0 else f"exit {res.returncode}")
        pytest.fail(f"the subprocess died ({how}) in case {started[-1] if started else '?'!r}:\n{res.stderr[-3000:]}")
    results = [line for line in lines if "name" in line]
    assert len(results) == len(started) > 90
    failures = []
    for r in results:
        if r["expect"] is None:
            if r["error"] is not None or r["message"] != "returned":
                failures.append(f"{r['name']}: expected to run, got {r['error']}: {r['message']}")
        elif r["name"].startswith("kernel "):  # the C side: a refusal with its message
            if r["error"] != "KernelRefused":
                failures.append(f"{r['name']}: expected the kernel to refuse, got {r['error']}: {r['message']}")
        elif r["error"] not in ("ValueError", "TypeError") or r["expect"] not in r["message"]:
            failures.append(f"{r['name']}: expected a ValueError/TypeError naming {r['expect']!r}, "
                            f"got {r['error']}: {r['message']}")
    assert not failures, "\n".join(failures)


def test_every_inconsistent_call_raises_a_python_error_naming_the_argument():
    lines, res = run_script()
    check_results(lines, res)


def test_the_issue_example_raises_type_error():
    """x half with a float weight layout: refused before the kernel reads anything."""
    code = ("import torch, structvit.ops\n"
            "x = torch.randn(1, 2, 16, 8); w = torch.randn(2, 2, 9, 8)\n"
            "try:\n"
            "    torch.ops.structvit.pattern_conv_forward(x.half(), w.half(), [1, 4, 4], [1, 3, 3], [1, 1, 1])\n"
            "except TypeError as e:\n"
            "    print('refused:', e)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "refused: x must be float32 or float64, got float16" in res.stdout


def asan_preload() -> str | None:
    """LD_PRELOAD for an uninstrumented python: GCC's AddressSanitizer runtime, then the C++
    runtime (ASan intercepts __cxa_throw, which it must find already loaded), or None."""
    paths = []
    for name in ("libasan.so", "libstdc++.so"):
        try:
            path = subprocess.run(["gcc", f"-print-file-name={name}"], capture_output=True, text=True,
                                  timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None
        if not (path and os.path.isabs(path) and os.path.exists(path)):
            return None
        paths.append(os.path.realpath(path))
    return ":".join(paths)


@pytest.mark.slow
def test_boundary_under_asan(tmp_path):
    """The kernels built with -fsanitize=address (STRUCTVIT_NATIVE_SANITIZE=address) and the
    same calls run clean: every refusal raised, every accepted call within bounds."""
    runtime = asan_preload()
    if runtime is None:
        pytest.skip("gcc's libasan.so not found")
    env = {"STRUCTVIT_NATIVE_SANITIZE": "address", "STRUCTVIT_CACHE": str(tmp_path), "LD_PRELOAD": runtime,
           # python itself is not instrumented: its leaks are not the kernels'
           "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=1"}
    lines, res = run_script(env, timeout=1500)
    assert "AddressSanitizer" not in res.stderr, res.stderr[-4000:]
    check_results(lines, res)
    libraries = list(tmp_path.glob("structvit_kernels_*.so"))
    assert libraries and all(b"__asan_" in lib.read_bytes() for lib in libraries)  # instrumented builds ran


def test_abi_check_compares_version_fields_and_size(monkeypatch):
    import ctypes

    lib = native.load()
    assert native.abi_mismatch(lib) is None
    monkeypatch.setattr(native, "ABI_VERSION", native.ABI_VERSION + 1)
    assert f"expected {native.ABI_VERSION}" in native.abi_mismatch(lib)
    monkeypatch.undo()

    class Swapped(native._KernelArgs):  # the first two fields in the other order: same size, other meaning
        _fields_ = [native.ConvArgs._fields_[1], native.ConvArgs._fields_[0], *native.ConvArgs._fields_[2:]]

    monkeypatch.setitem(native.ARG_STRUCTS, "conv", Swapped)
    assert "conv argument structure" in native.abi_mismatch(lib)

    class Longer(native._KernelArgs):
        _fields_ = [*native.FusedArgs._fields_, ("extra", ctypes.c_int64)]

    monkeypatch.setitem(native.ARG_STRUCTS, "fused", Longer)
    monkeypatch.setitem(native.ARG_STRUCTS, "conv", native.ConvArgs)
    assert "fused argument structure" in native.abi_mismatch(lib)


def test_argument_structures_need_every_field():
    with pytest.raises(TypeError, match=r"missing fields \['y_len'\]"):
        native.ConvArgs(**{name: 1 for name, _ in native.ConvArgs._fields_ if name != "y_len"})
    with pytest.raises(TypeError, match=r"unknown fields \['dims'\]"):
        native.FusedArgs(dims=0, **{name: 1 for name, _ in native.FusedArgs._fields_})
