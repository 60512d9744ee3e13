"""Which backend runs a StructSA call: capabilities, memory planning and the cost model.

Everything "auto" decides lives here, together with every constant it uses. Where the
constants come from (the measurements behind them are in docs/results/performance*.md,
produced by ``python -m structvit.bench op``):

- ``DEFAULT_MEMORY_LIMIT`` (1 GiB): attention-sized working memory a call may hold
  beyond its inputs, outputs and their gradients unless ``memory_limit`` says otherwise;
  a round bound that keeps the video models trainable on a 16-24 GiB machine.
- ``MEMORY_BOUND_WEIGHT`` (100): multiply-add equivalents charged per element of the
  correlation form's D*N^2 maps for its memory-bound passes (key-grid convolution,
  softmax and their backward); set so that the correlation form loses to the
  key-convolution form at the benchmark shapes, as measured, although it has fewer
  multiply-adds.
- ``FUSED_KERNEL_WEIGHT`` (per ISA of the kernel's build) and ``KEYCONV_WEIGHT`` (1.05): the
  fused kernel costs about ``1 + FUSED_KERNEL_WEIGHT[isa] * M * D / C`` times plain
  attention (fwd+bwd) and keyconv about ``KEYCONV_WEIGHT * D`` times; the mean of the fits to
  the per-head ``bench op`` rows (image, video, video155, image7, video555; 1 and 2 threads)
  of the AVX-512 and AVX2 (``haswell``) builds on one Zen 4 machine
  (docs/results/performance*.md); the portable build's (SSE2, 4 lanes) from its image and video rows
  on 2 threads (docs/results/performance-generic.md); NEON, never measured, gets a little more. Other CPUs differ, which is why "auto"
  measures (:mod:`.autotune`): the cost model decides only where nothing is measured
  (small calls, tracing, ``STRUCTVIT_AUTOTUNE=off``, nothing recorded in ``deterministic``
  mode).
- ``FUSED_CHUNK_ELEMENTS`` (2^20) and ``FUSED_BUFFERS`` (4): the fused kernel works on
  chunks of (batch*head, query row) pairs of about this many correlation-map elements,
  at most four such buffers alive per chunk (backward: S0, dAt, At, dS0). Chunks split
  heads before rows because a single head's (R x C) x (C x N) GEMM stays efficient down
  to a few hundred rows while batched GEMMs of few rows do not; 1M elements measured
  slightly faster than 4M (the buffers stay closer to the caches).

Which backend serves which call:

=============  ==============================  ======  ================  =========================
backend        pattern layouts                 stride  windows           other limits
=============  ==============================  ======  ================  =========================
naive          all                             any     any               small inputs only
keyconv        all                             any     any               --
correlation    dot-product (per head, shared)  1       equal k and v     --
fused          dot-product (per head, shared)  1       equal k and v     CPU, no dropout, no
                                                                         weights, a C++ compiler
=============  ==============================  ======  ================  =========================
"""
from __future__ import annotations

import torch

from . import autotune, native

BACKEND_NAMES = ("auto", "naive", "correlation", "keyconv", "fused")

DEFAULT_MEMORY_LIMIT = 1 << 30
MEMORY_BOUND_WEIGHT = 100
FUSED_KERNEL_WEIGHT = {"avx512": 0.85, "avx2": 1.35, "neon": 4.0, "generic": 3.2}
KEYCONV_WEIGHT = 1.05
FUSED_CHUNK_ELEMENTS = 1 << 20
FUSED_BUFFERS = 4


# ----------------------------------------------------------------------------- memory plan


def fused_chunk_elements(memory_limit: int | None, element_size: int = 4) -> int:
    """Chunk size (elements) for a working-memory budget in bytes (None: the default)."""
    if memory_limit is None:
        return FUSED_CHUNK_ELEMENTS
    return max(1, int(memory_limit) // (FUSED_BUFFERS * element_size))


def fused_plan(bh: int, n: int, element_size: int, memory_limit: int | None) -> tuple[int, int]:
    """(chunk elements, maps kept) of the fused kernel for B*heads = bh rows of N queries.

    Maps kept for backward, each (bh, N, N): 0 = none, 1 = the folded map At (saves one of
    the kernel's eight convolution passes), 2 = At and the correlation map S0 = q K^T (also
    saves backward's Q K^T GEMM). As many are kept as fit: with the default chunks,
    together with them in ``DEFAULT_MEMORY_LIMIT``; with a ``memory_limit``, in half of
    it, the chunks taking the rest. With none kept, memory stays O(chunk).
    """
    map_bytes = bh * n * n * element_size
    if memory_limit is None:
        buffers = FUSED_BUFFERS * min(bh * n * n, FUSED_CHUNK_ELEMENTS) * element_size
        kept = next(m for m in (2, 1, 0) if m * map_bytes + buffers <= DEFAULT_MEMORY_LIMIT or m == 0)
        return FUSED_CHUNK_ELEMENTS, kept
    kept = next(m for m in (2, 1, 0) if m * map_bytes <= memory_limit // 2)
    return fused_chunk_elements(memory_limit - kept * map_bytes, element_size), kept


def fused_working_bytes(bh: int, n: int, element_size: int, memory_limit: int | None = None) -> int:
    """Bytes the fused kernel holds under :func:`fused_plan`: its chunk buffers plus the maps kept."""
    chunk, kept = fused_plan(bh, n, element_size, memory_limit)
    return (FUSED_BUFFERS * min(bh * n * n, chunk) + kept * bh * n * n) * element_size


# ----------------------------------------------------------------------------- capabilities


def unsupported(backend: str, *, channelwise: bool, strided: bool, same_window: bool, return_weights: bool = False,
                dropout_p: float = 0.0, device_type: str = "cpu") -> str | None:
    """Why ``backend`` cannot serve a call like this (None: it can)."""
    if backend in ("naive", "keyconv"):
        return None
    if channelwise:
        return "it serves the dot-product pattern layouts (heads, D, *window) and (D, *window) only, not channel-wise"
    if strided:
        return "it serves kv_stride=1 only"
    if not same_window:
        return "it needs the key and value windows to be equal"
    if backend == "fused":
        if return_weights:
            return "the kernel never stores the weights (use backend='keyconv', 'correlation' or 'naive')"
        if dropout_p > 0:
            return "it has no attention dropout (use 'correlation' or 'keyconv')"
        if device_type != "cpu":
            return f"it runs on the CPU only, got tensors on {device_type}"
        if not native_available():
            return f"the fused CPU kernel is unavailable here: {native.unavailable_reason()}"
    return None


@torch.compiler.assume_constant_result
def fused_isa() -> str:
    """The ISA the fused kernel was built for ("avx512", "avx2", "neon", "generic"; "" when
    unavailable); constant under compile."""
    return native.isa_name() or ""


@torch.compiler.assume_constant_result
def native_available() -> bool:
    """Whether the fused CPU kernel can be used (builds it on the first call; constant under compile)."""
    return native.available()


def fused_can_serve(q: torch.Tensor, dropout_p: float) -> bool:
    """Whether "auto" may use the fused CPU kernel for a dot-product call at stride 1.

    The kernel is a ``torch.library`` custom op, so eager mode, ``torch.compile``,
    ``torch.export``, fake tensors and the FLOP counter all see it; only ONNX export gets
    a backend made of PyTorch ops (ONNX has no such operator).
    """
    if q.device.type != "cpu" or dropout_p > 0:
        return False
    if torch.onnx.is_in_onnx_export():
        return False
    return native_available()


# ----------------------------------------------------------------------------- cost model


def estimate_cost(b: int, heads: int, n: int, c: int, d: int, m: int, *, element_size: int = 4,
                  cv: int | None = None, n_kv: int | None = None, m_v: int | None = None) -> dict[str, dict[str, float]]:
    """Multiply-adds and the attention-sized bytes each backend keeps, for one forward pass.

    ``n_kv``: key/value positions (N' = N / stride^r; default N); ``m_v``: value window
    positions (default ``m``). The correlation, naive and fused rows describe stride 1
    with equal windows. Returns ``{backend: {"macs": ..., "bytes": ...}}``.
    """
    cv = c if cv is None else cv
    n_kv = n if n_kv is None else n_kv
    m_v = m if m_v is None else m_v
    bh = b * heads
    corr_value = min(n * n * m * d + n * n * cv, d * n * n * cv + n * m * d * cv)
    return {
        # q k^T, the D-output key-grid convolution, then the (folded or shifted) value side;
        # about three D*N^2 buffers (scores, weights, their folded/gradient forms) are held.
        "correlation": {"macs": bh * (n * n * c + n * n * m * d + corr_value), "bytes": 3 * bh * d * n * n * element_size},
        # depthwise convolutions of K and V, then attention of N queries over D*N' keys;
        # only the convolved keys and values with a fused attention kernel.
        "keyconv": {"macs": bh * (d * n * n_kv * (c + cv) + n_kv * d * (m * c + m_v * cv)),
                    "bytes": 2 * bh * d * n_kv * (c + cv) * element_size},
        "naive": {"macs": bh * (n_kv * (m * c + m_v * cv) * d + d * n * n_kv * (c + cv)),
                  "bytes": bh * (n_kv * (m * c + m_v * cv) + 2 * n * d * n_kv) * element_size},
        # the folded form's FLOPs; rows in chunks and recomputed in backward: the chunk
        # buffers plus At and S0 (bh, N, N each) as far as kept (fused_plan, default limit)
        "fused": {"macs": bh * (n * n * (c + cv) + 2 * n * n * m * d), "bytes": fused_working_bytes(bh, n, element_size)},
    }


def choose_backend(b: int, heads: int, n: int, c: int, d: int, m: int, *, channelwise: bool = False,
                   strided: bool = False, same_window: bool = True, return_weights: bool = False,
                   element_size: int = 4, memory_limit: int | None = None, fused_ok: bool = False,
                   isa: str | None = None, probe: autotune.Probe | None = None, measurable: bool = False) -> str:
    """The backend "auto" picks.

    - Channel-wise patterns, a key/value stride or a value window other than the key
      window: "keyconv" (the only fast backend that serves them; it computes the weights
      explicitly when ``return_weights``).
    - Otherwise (dot-product patterns at stride 1): ``return_weights`` needs the weights:
      "correlation". Only backends whose working memory (``estimate_cost(...)[name]["bytes"]``)
      fits in ``memory_limit`` bytes (default ``DEFAULT_MEMORY_LIMIT``) are candidates; the
      fused kernel always fits (its chunks shrink to the limit, down to one query row), and is
      a candidate when ``fused_ok`` (a CPU call it can serve, see :func:`fused_can_serve`).
    - With a ``probe`` of the call (see :mod:`.autotune`) and more than one candidate: the
      fastest candidate as measured on this machine (recorded, or timed now if
      ``measurable`` and the call is large enough), unless ``STRUCTVIT_AUTOTUNE=off``.
    - Otherwise the cost model: "fused" when it is the only candidate or when
      ``1 + FUSED_KERNEL_WEIGHT[isa] * M * D / C`` times SA beats keyconv's ``KEYCONV_WEIGHT * D``
      (``isa``: the kernel build's, default the loaded one); else the cheaper of correlation
      and keyconv by multiply-adds, where each element of the correlation form's D*N^2 maps
      costs ``MEMORY_BOUND_WEIGHT`` more. "naive" is never picked.
    """
    if channelwise or strided or not same_window:
        return "keyconv"
    if return_weights:
        return "correlation"
    limit = DEFAULT_MEMORY_LIMIT if memory_limit is None else memory_limit
    cost = estimate_cost(b, heads, n, c, d, m, element_size=element_size)
    fits = {name for name in ("correlation", "keyconv") if cost[name]["bytes"] <= limit}
    rule = _cost_model_choice(cost, fits, b * heads * d * n * n, c, d, m, fused_ok,
                              (fused_isa() if fused_ok else "") if isa is None else isa)
    if probe is None:
        return rule
    candidates = [name for name in ("fused", "keyconv", "correlation")
                  if (name == "fused" and fused_ok) or name in fits]
    if len(candidates) < 2 or autotune.mode() == "off":
        return rule
    if torch.compiler.is_compiling():
        # nothing is measured or looked up while tracing (shapes may be symbolic there): the
        # cost model, whose constants are the kernel build's ISA's
        return rule
    macs = min(cost[name]["macs"] for name in candidates)
    return autotune.choose(probe, candidates, rule, macs, memory_limit, measurable)


def _cost_model_choice(cost: dict, fits: set[str], map_elements: int, c: int, d: int, m: int, fused_ok: bool,
                       isa: str) -> str:
    if fused_ok:
        weight = FUSED_KERNEL_WEIGHT.get(isa, FUSED_KERNEL_WEIGHT["generic"])
        if "keyconv" not in fits or 1 + weight * m * d / c < KEYCONV_WEIGHT * d:
            return "fused"
    if not fits:
        return min(("keyconv", "correlation"), key=lambda name: cost[name]["bytes"])
    if len(fits) == 1:
        return next(iter(fits))
    corr = cost["correlation"]["macs"] + MEMORY_BOUND_WEIGHT * map_elements
    return "correlation" if corr < cost["keyconv"]["macs"] else "keyconv"
