"""``structvit demo``: a short tour of the op on a small grid, with nothing downloaded.

1. SA, ConvSA and StructSA as modules on one input: StructSA with the SA-equivalent
   initialisation reproduces SA; ConvSA and random StructSA do not.
2. The three exact forms (backends) agree with each other in float64.
3. Forward+backward time of each, as a ratio to SA measured in the same run.
4. Where one query of a StructSA layer puts its attention, per pattern.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from .nn import ConvSA, SelfAttention, StructSA
from .ops import struct_attention


def _timed(fn, repeats: int = 5) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


def run(grid=(4, 8, 8), dim=128, heads=2, patterns=8, batch=2, seed=0) -> dict:
    torch.manual_seed(seed)
    n = torch.Size(grid).numel()
    window = (3,) * len(grid)
    print(f"StructViT demo: tokens on a {'x'.join(map(str, grid))} grid (N={n}), dim={dim}, heads={heads}, "
          f"D={patterns}, window {'x'.join(map(str, window))}\n")
    sa = SelfAttention(dim, heads).double()
    layers = {
        "SA": sa,
        "ConvSA": ConvSA(dim, heads, window=window).double(),
        "StructSA (init='sa')": StructSA(dim, heads, window=window, num_patterns=patterns, init="sa").double(),
        "StructSA (random)": StructSA(dim, heads, window=window, num_patterns=patterns).double(),
    }
    for name, layer in layers.items():  # same qkv / proj everywhere, only the patterns differ
        if layer is not sa:
            layer.load_state_dict(sa.state_dict(), strict=False)
    layers["StructSA (init='sa')"].reset_patterns("sa")  # again in float64, so sum_d e_d = 0 to float64 precision
    x = torch.randn(batch, n, dim, dtype=torch.float64)
    y_sa = sa(x, grid)
    print("1. Output difference to SA with the same qkv/proj weights (max |y - y_SA|):")
    diffs = {}
    for name, layer in layers.items():
        diffs[name] = (layer(x, grid) - y_sa).abs().max().item()
        print(f"   {name:<22} {diffs[name]:.2e}")

    print("\n2. The exact forms of StructSA agree (float64, max |y - y_naive|):")
    m = layers["StructSA (random)"]
    q, k, v = m._qkv(x)
    outs = {b: struct_attention(q, k, v, m.u_k, m.u_v, grid, backend=b) for b in ("naive", "correlation", "keyconv")}
    agreement = {b: (outs[b] - outs["naive"]).abs().max().item() for b in ("correlation", "keyconv")}
    for b, d in agreement.items():
        print(f"   {b:<22} {d:.2e}")

    print("\n3. Forward+backward time, float32, ratio to SA measured in this run:")
    timings = {}
    for name, layer in layers.items():
        layer32 = layer.float()
        x32 = x.float()
        timings[name] = _timed(lambda: layer32(x32, grid).sum().backward())
    for name, t in timings.items():
        print(f"   {name:<22} {t * 1e3:7.1f} ms  {t / timings['SA']:5.1f}x")

    print("\n4. One query of StructSA (random init): share of its attention per pattern d, and its top key")
    with torch.no_grad():
        _, w = m.float()(x.float()[:1], grid, return_weights=True)  # (1, heads, N, D, N)
    query = n // 2
    share = w[0, 0, query].sum(-1)
    top = w[0, 0, query].flatten().argmax().item()
    print("   pattern share: " + " ".join(f"{s:.2f}" for s in share.tolist()))
    print(f"   most attended (pattern, key) of query {query}: ({top // n}, {top % n})")
    return {"diffs": diffs, "agreement": agreement, "timings": timings}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="structvit demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", type=int, nargs="+", default=[4, 8, 8], help="(H W) or (T H W)")
    p.add_argument("--patterns", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    res = run(grid=tuple(args.grid), patterns=args.patterns, seed=args.seed)
    ok = res["diffs"]["StructSA (init='sa')"] < 1e-10 and max(res["agreement"].values()) < 1e-10
    print("\ndemo " + ("OK: SA-equivalent init reproduces SA and all forms agree" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
