"""Which backend runs a StructSA call: capabilities and the cost model.

Everything "auto" decides lives here, with the constants of its cost model. Each is a
fit to what ``python -m structvit.bench op`` measures (the generated results pages under
docs/results/ hold the measurements); refit them from new ``bench op`` rows, never by hand:

- ``MEMORY_BOUND_WEIGHT``: multiply-add equivalents charged per element of the
  correlation form's D*N^2 maps for its memory-bound passes (key-grid convolution,
  softmax and their backward); set so that the correlation form loses to the
  key-convolution form where ``bench op`` finds it slower, although it has fewer
  multiply-adds.
- ``FUSED_KERNEL_WEIGHT`` (per ISA of the kernel's build) and ``KEYCONV_WEIGHT``: the fused
  kernel costs about ``1 + FUSED_KERNEL_WEIGHT[isa] * M * D / C`` times plain attention
  (fwd+bwd) and keyconv about ``KEYCONV_WEIGHT * D`` times; each the mean of the fits to
  the per-head ``bench op`` rows (1 and 2 threads) of builds for that ISA; NEON, never
  measured, gets a little more than AVX2. Other CPUs differ, which is why "auto" measures
  (:mod:`.autotune`): the cost model decides only where nothing is measured (small calls,
  tracing, ``STRUCTVIT_AUTOTUNE=off``, nothing recorded in ``deterministic`` mode).

The working-memory budget ``DEFAULT_MEMORY_LIMIT`` is the backends' (:mod:`.backends.common`),
and the fused kernel's memory plan is its own (:func:`.backends.fused.fused_plan`).

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
from .backends.common import DEFAULT_MEMORY_LIMIT
from .backends.fused import fused_working_bytes

BACKEND_NAMES = ("auto", "naive", "correlation", "keyconv", "fused")

MEMORY_BOUND_WEIGHT = 100
FUSED_KERNEL_WEIGHT = {"avx512": 0.85, "avx2": 1.35, "neon": 4.0, "generic": 3.2}
KEYCONV_WEIGHT = 1.05

__all__ = ["BACKEND_NAMES", "DEFAULT_MEMORY_LIMIT", "MEMORY_BOUND_WEIGHT", "FUSED_KERNEL_WEIGHT", "KEYCONV_WEIGHT",
           "unsupported", "fused_can_serve", "estimate_cost", "choose_backend"]


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
        if not native.available_constant():
            return f"the fused CPU kernel is unavailable here: {native.unavailable_reason()}"
    return None


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
    return native.available_constant()


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
                              (native.isa_constant() if fused_ok else "") if isa is None else isa)
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
