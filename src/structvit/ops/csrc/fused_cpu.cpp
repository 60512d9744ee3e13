// Fused CPU kernel of the folded form of StructSA (docs/design.md, "The fused CPU kernel").
//
// For every (batch, head, query row) it takes the row of the scaled correlation map
// S0[i, :] = scale * q_i K^T over the key grid and, without leaving the core's cache,
//   forward : scores s[j, d] = sum_o UK[d, o] S0[i, j + o]     (key-grid convolution)
//             A = softmax(s)                                   (joint, or per pattern)
//             At[i, j'] = sum_o sum_d UV[d, o] A[j' - o, d]     (transposed convolution)
//   backward: from dAt[i, :] = dY_i V^T, the gradients dS0[i, :], dUK and dUV,
//             recomputing s and A from S0 and the saved log-sum-exp.
// The GEMMs around it (Q K^T, At V and their gradients) stay in PyTorch.
//
// Layouts (all contiguous, row-major):
//   S0, At, dAt, dS0 : (BH, R, N)  BH = batch * heads, R = query rows of this chunk; S0 is
//                      q_i K^T, scaled by `scale` as it is read. Backward writes At unless
//                      at_saved (the caller kept the forward's)
//   lse              : (BH, R, P)  P = 1 (joint) or D (per pattern)
//   rowdot           : (BH, R, P)  joint: dY_i . Y_i; per pattern: unused (computed here)
//   UK, UV           : (HU, M, D)  offset-major, HU = heads or 1 (shared)
//   dUK, dUV         : (HU, M, D)  accumulated (+=)
// Inside a row everything lives on the zero-padded key grid (Tp, Hp, Wp), flattened, so
// that a window offset is a constant shift: every convolution is a run of shifted,
// contiguous vector FMAs over padded positions, D accumulators at a time. Every pass runs
// over the same list of 64-byte aligned blocks of BLK positions that hold grid positions
// (Geometry::blocks): padding positions inside those blocks are computed too and masked
// out (2 of 16 for 14 + 2 rows); whole padding rows, e.g. between frames, are skipped.
// Plain C ABI, no PyTorch headers: built with the system compiler and loaded with ctypes.
// Threads: when PyTorch runs on GNU OpenMP, the kernel is built with -fopenmp and its
// `omp parallel` reuses PyTorch's own thread pool (the same libgomp.so.1 is already loaded,
// see native.py), so the workers that just ran a GEMM pick up the rows instead of
// spin-waiting against separate threads. Otherwise
// (STRUCTSA_OPENMP undefined) std::threads over contiguous row ranges: a second, separate
// OpenMP runtime next to PyTorch's would make the two pools spin against each other
// for the same cores. `#pragma omp simd` only asks for vectorisation.
#include <algorithm>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <cmath>
#include <cstdint>

#include <cstring>
#include <limits>
#include <new>
#include <thread>
#include <vector>

#include "abi.h"
#include "parallel.h"
#include "vec.h"

namespace {

using structsa::parallel_rows;
using structsa::row_ranges;

struct Geometry {
    int64_t T, H, W, kt, kh, kw, D, heads, hu;
    int64_t wp = 0;  // padded row length, >= W + kw / 2 (0: exactly that); see padded_width
    int64_t N() const { return T * H * W; }
    int64_t M() const { return kt * kh * kw; }
    int64_t Hp() const { return H + kh - 1; }
    int64_t Wp() const { return wp ? wp : W + kw / 2; }
    int64_t P() const { return (T + kt - 1) * Hp() * Wp(); }
    // padded index of grid position (0, 0, 0): the window centre
    int64_t centre() const { return ((kt / 2) * Hp() + kh / 2) * Wp() + kw / 2; }
    // Start of every aligned block of BLK padded positions that holds a grid position, in
    // increasing order. All passes work on these blocks only: the convolutions write them,
    // the softmax masks them, so every other position of a plane stays zero.
    std::vector<int64_t> blocks;
};

using structsa::BLK;
using structsa::NREG;

// Shift of each window offset o relative to the centre, in padded positions.
std::vector<int64_t> window_shifts(const Geometry& g) {
    std::vector<int64_t> sh;
    for (int64_t a = 0; a < g.kt; ++a)
        for (int64_t b = 0; b < g.kh; ++b)
            for (int64_t c = 0; c < g.kw; ++c) sh.push_back(((a - g.kt / 2) * g.Hp() + (b - g.kh / 2)) * g.Wp() + (c - g.kw / 2));
    return sh;
}

// Padded index of every grid position j.
std::vector<int64_t> grid_positions(const Geometry& g) {
    std::vector<int64_t> pos;
    pos.reserve(g.N());
    for (int64_t t = 0; t < g.T; ++t)
        for (int64_t y = 0; y < g.H; ++y)
            for (int64_t x = 0; x < g.W; ++x) pos.push_back(g.centre() + (t * g.Hp() + y) * g.Wp() + x);
    return pos;
}

// `on` (1) on grid positions, `off` (0) elsewhere, over padded indices [0, P + BLK).
template <typename T>
std::vector<T> grid_mask(const Geometry& g, T on = T(1), T off = T(0)) {
    std::vector<T> m(g.P() + BLK, off);
    for (int64_t p : grid_positions(g)) m[p] = on;
    return m;
}

template <int DD>
inline int64_t patterns(const Geometry& g) { return DD > 0 ? DD : g.D; }

using structsa::load_vec;
using structsa::store_vec;
using structsa::Vec;

template <typename T>
inline T hmax(typename Vec<T>::type v) {
    T m = v[0];
    for (int64_t i = 1; i < BLK; ++i) m = v[i] > m ? v[i] : m;
    return m;
}

template <typename T>
inline typename Vec<T>::type vmax(typename Vec<T>::type a, typename Vec<T>::type b) { return a > b ? a : b; }

// y[d][p] = sum_o U[o, d] x[p + sh[o]] on the grid blocks: the key-grid convolution.
// x: padded map (zero padding); y: D planes of stride ys. With D known at compile time
// the D accumulators of a block live in registers and each load of x feeds D FMAs.
// With bias given (0 on grid positions, -inf elsewhere), mx[d] receives the maximum of
// plane d over the grid positions (the softmax's first pass, done while the block is still
// in registers); joint: the maximum over all planes, in every mx[d].
template <int DD, typename T>
void conv_planes(const T* __restrict x, const T* __restrict U, T* __restrict y, int64_t ys, const Geometry& g,
                 const int64_t* sh, const T* bias = nullptr, T* mx = nullptr, bool joint = false) {
    using V = typename Vec<T>::type;
    const int64_t D = patterns<DD>(g), M = g.M();
    const V neg = V{} - std::numeric_limits<T>::infinity();
    if constexpr (DD > 0) {
        V m[DD];
#pragma GCC unroll 16
        for (int d = 0; d < DD; ++d) m[d] = neg;
        for (const int64_t p0 : g.blocks) {
            V acc[DD];
#pragma GCC unroll 16
            for (int d = 0; d < DD; ++d) acc[d] = V{};
            for (int64_t o = 0; o < M; ++o) {
                const V xv = load_vec(x + p0 + sh[o]);
                const T* u = U + o * DD;
#pragma GCC unroll 16
                for (int d = 0; d < DD; ++d) acc[d] += xv * u[d];
            }
#pragma GCC unroll 16
            for (int d = 0; d < DD; ++d) store_vec(y + d * ys + p0, acc[d]);
            if (bias) {
                const V bv = load_vec(bias + p0);
                if (joint) {
                    V all = acc[0];
#pragma GCC unroll 16
                    for (int d = 1; d < DD; ++d) all = vmax<T>(all, acc[d]);
                    m[0] = vmax<T>(m[0], all + bv);
                } else {
#pragma GCC unroll 16
                    for (int d = 0; d < DD; ++d) m[d] = vmax<T>(m[d], acc[d] + bv);
                }
            }
        }
        if (bias && joint) std::fill(mx, mx + DD, hmax<T>(m[0]));
        if (bias && !joint)
            for (int d = 0; d < DD; ++d) mx[d] = hmax<T>(m[d]);
    } else {
        for (int64_t d = 0; d < D; ++d) {
            V m = neg;
            for (const int64_t p0 : g.blocks) {
                V acc = V{};
                for (int64_t o = 0; o < M; ++o) acc += load_vec(x + p0 + sh[o]) * U[o * D + d];
                store_vec(y + d * ys + p0, acc);
                if (bias) m = vmax<T>(m, acc + load_vec(bias + p0));
            }
            if (bias) mx[d] = hmax<T>(m);
        }
    }
}

// The transposed convolution when padded rows are whole blocks (Wp % BLK == 0), so that
// every (t, h) part of a window shift moves a block onto a block. Then each input vector
// a[d][x - dw] (one per pattern and column shift dw) feeds the NR = kt * kh output blocks
// it reaches, accumulated in registers and added to y once per input block: NR * D
// multiply-adds per D * kw loads instead of one load per multiply-add (the direct form is
// bound by unaligned loads, about half the FMA rate).
template <int DD, int NR, typename T>
void conv_transpose_rows(const T* __restrict a, int64_t as, const T* __restrict U, T* __restrict y, const Geometry& g,
                         int64_t ys) {
    using V = typename Vec<T>::type;
    // Input blocks x0: the grid blocks. An output block with grid positions gets its row
    // shift r from x0 = output - rshift[r] in the same columns; if that row is padding,
    // its loads (reaching kw / 2 past the row's ends) read padding only, i.e. zeros.
    const int64_t kw = g.kw, half = kw / 2;
    int64_t rshift[NR];  // output block minus input block, per (t, h) shift
    for (int64_t r = 0; r < NR; ++r) {
        const int64_t dt = r / g.kh - g.kt / 2, dh = r % g.kh - g.kh / 2;
        rshift[r] = (dt * g.Hp() + dh) * g.Wp() / BLK;
    }
    std::memset(y - BLK, 0, sizeof(T) * (ys + BLK));
    for (const int64_t x0 : g.blocks) {
        V acc[NR];
#pragma GCC unroll 32
        for (int r = 0; r < NR; ++r) acc[r] = V{};
        for (int64_t j = 0; j < kw; ++j) {
            if constexpr (NREG >= 32) {  // DD inputs and NR accumulators live
                V in[DD];
#pragma GCC unroll 16
                for (int d = 0; d < DD; ++d) in[d] = load_vec(a + d * as + x0 - (j - half));
#pragma GCC unroll 32
                for (int r = 0; r < NR; ++r) {
                    const T* u = U + (r * kw + j) * DD;
#pragma GCC unroll 16
                    for (int d = 0; d < DD; ++d) acc[r] += in[d] * u[d];
                }
            } else {  // 16 registers: one input at a time next to the NR accumulators
#pragma GCC unroll 16
                for (int d = 0; d < DD; ++d) {
                    const V in = load_vec(a + d * as + x0 - (j - half));
#pragma GCC unroll 32
                    for (int r = 0; r < NR; ++r) acc[r] += in * U[(r * kw + j) * DD + d];
                }
            }
        }
#pragma GCC unroll 32
        for (int r = 0; r < NR; ++r) {
            T* yb = y + x0 + rshift[r] * BLK;
            store_vec(yb, load_vec(yb) + acc[r]);
        }
    }
}

// y[p] = sum_o sum_d U[o, d] a[d][p - sh[o]] on the grid blocks: the transposed convolution
// (a: D planes of stride as, zero outside the grid and in the buffers' slack). FMA latency
// is hidden by independent accumulators: one per pattern and NB blocks at once, at least 8
// chains (D = 8: one block; D = 1: eight); the last group repeats the last block.
template <int DD, typename T>
void conv_transpose_planes(const T* __restrict a, int64_t as, const T* __restrict U, T* __restrict y, const Geometry& g,
                           const int64_t* sh, int64_t ys) {
    using V = typename Vec<T>::type;
    const int64_t D = patterns<DD>(g), M = g.M(), nblocks = int64_t(g.blocks.size());
    if constexpr (DD > 0) {
        if (g.Wp() % BLK == 0) {
            switch (g.kt * g.kh) {
                case 1: return conv_transpose_rows<DD, 1>(a, as, U, y, g, ys);
                case 3: return conv_transpose_rows<DD, 3>(a, as, U, y, g, ys);
                case 5: return conv_transpose_rows<DD, 5>(a, as, U, y, g, ys);
                case 9: return conv_transpose_rows<DD, 9>(a, as, U, y, g, ys);
                default: break;
            }
        }
        constexpr int NB = DD >= 8 ? 1 : 8 / DD;
        for (int64_t i = 0; i < nblocks; i += NB) {
            int64_t p0[NB];
            for (int b = 0; b < NB; ++b) p0[b] = g.blocks[std::min(i + b, nblocks - 1)];
            V acc[NB][DD];
#pragma GCC unroll 16
            for (int b = 0; b < NB; ++b)
#pragma GCC unroll 16
                for (int d = 0; d < DD; ++d) acc[b][d] = V{};
            for (int64_t o = 0; o < M; ++o) {
                const T* u = U + o * DD;
                const T* ao = a - sh[o];
#pragma GCC unroll 16
                for (int b = 0; b < NB; ++b)
#pragma GCC unroll 16
                    for (int d = 0; d < DD; ++d) acc[b][d] += load_vec(ao + d * as + p0[b]) * u[d];
            }
#pragma GCC unroll 16
            for (int b = 0; b < NB; ++b) {
                V sum = acc[b][0];
#pragma GCC unroll 16
                for (int d = 1; d < DD; ++d) sum += acc[b][d];
                store_vec(y + p0[b], sum);
            }
        }
    } else {
        for (const int64_t p0 : g.blocks) {
            V acc0 = V{}, acc1 = V{};  // two chains hide some of the FMA latency
            for (int64_t o = 0; o < M; ++o) {
                const T* u = U + o * D;
                const T* ao = a + p0 - sh[o];
                int64_t d = 0;
                for (; d + 1 < D; d += 2) {
                    acc0 += load_vec(ao + d * as) * u[d];
                    acc1 += load_vec(ao + (d + 1) * as) * u[d + 1];
                }
                if (d < D) acc0 += load_vec(ao + d * as) * u[d];
            }
            store_vec(y + p0, acc0 + acc1);
        }
    }
}

template <typename T>
inline T hsum(typename Vec<T>::type v) {
    T s = 0;
    for (int64_t i = 0; i < BLK; ++i) s += v[i];
    return s;
}

// G[o, d] += sum_p a[d][p] x[p + sh[o]] over the grid: the gradient of a pattern (a is
// zero off the grid blocks and on their padding positions, which thus add nothing).
// A dot product per (o, d) would be one FMA chain, latency-bound; instead OG offsets x D
// patterns accumulate at once in registers (D = 8: 3 x 8 chains, the OG shifted blocks of x
// loaded once and used D times, rather than 2 x 8 chains with the D blocks of a held,
// which leaves no register for a third offset). The blocks are taken in tiles, and all offsets run over a tile
// before the next: the tile of a stays in L1 across the offset groups, where the D planes
// at once (57 KiB for 8x14x14) would be re-read from L2 for every group. G holds BLK partial sums per (o, d), (M, D, BLK): the sum across them is taken
// once per worker at the end, not per row.
template <int DD, typename T>
void pattern_grad_planes(const T* __restrict a, int64_t as, const T* __restrict x, T* __restrict G, const Geometry& g,
                         const int64_t* sh) {
    using V = typename Vec<T>::type;
    const int64_t D = patterns<DD>(g), M = g.M(), nblocks = int64_t(g.blocks.size());
    if constexpr (DD > 0) {
        // OG offsets x DD patterns of accumulators plus OG (or DD) operands held and one loaded:
        // 32 registers: 3 x 8 (+ 3 + 1), 6 x 4, 12 x 2, 24 x 1; 16 registers: 1 x 8, 2 x 4 (+ 2 + 1), ...
        constexpr int OG = NREG >= 32 ? (DD >= 8 ? 3 : 24 / DD) : (DD >= 8 ? 1 : DD >= 4 ? 2 : 10 / (DD + 1));
        // tiles of at most 64 blocks (D = 8: 32 KiB of a, next to x's 10 KiB in a 48 KiB L1),
        // of equal size; shorter tiles flush the accumulators more often
        const int64_t tiles = (nblocks + 63) / 64, TB = (nblocks + tiles - 1) / tiles;
        for (int64_t t0 = 0; t0 < nblocks; t0 += TB) {
            const int64_t t1 = std::min(nblocks, t0 + TB);
            for (int64_t o0 = 0; o0 < M; o0 += OG) {
                int64_t shg[OG];
                for (int i = 0; i < OG; ++i) shg[i] = o0 + i < M ? sh[o0 + i] : 0;  // spare slots: discarded
                V acc[OG][DD];
#pragma GCC unroll 32
                for (int i = 0; i < OG; ++i)
#pragma GCC unroll 16
                    for (int d = 0; d < DD; ++d) acc[i][d] = V{};
                for (int64_t blk = t0; blk < t1; ++blk) {
                    const int64_t p0 = g.blocks[blk];
                    // the operand of which fewer are live stays in registers: OG x D
                    // accumulators plus OG (or D) vectors and one loaded at a time
                    if constexpr (OG <= DD) {
                        V xv[OG];
#pragma GCC unroll 32
                        for (int i = 0; i < OG; ++i) xv[i] = load_vec(x + p0 + shg[i]);
#pragma GCC unroll 16
                        for (int d = 0; d < DD; ++d) {
                            const V av = load_vec(a + d * as + p0);
#pragma GCC unroll 32
                            for (int i = 0; i < OG; ++i) acc[i][d] += av * xv[i];
                        }
                    } else {
                        V av[DD];
#pragma GCC unroll 16
                        for (int d = 0; d < DD; ++d) av[d] = load_vec(a + d * as + p0);
#pragma GCC unroll 32
                        for (int i = 0; i < OG; ++i) {
                            const V xv = load_vec(x + p0 + shg[i]);
#pragma GCC unroll 16
                            for (int d = 0; d < DD; ++d) acc[i][d] += av[d] * xv;
                        }
                    }
                }
                for (int i = 0; i < OG && o0 + i < M; ++i)
                    for (int d = 0; d < DD; ++d) {
                        T* gv = G + ((o0 + i) * DD + d) * BLK;
                        store_vec(gv, load_vec(gv) + acc[i][d]);
                    }
            }
        }
    } else {
        for (int64_t o = 0; o < M; ++o) {
            const T* xs = x + sh[o];
            for (int64_t d = 0; d < D; ++d) {
                const T* ad = a + d * as;
                V sum = V{};
                for (const int64_t p0 : g.blocks) sum += load_vec(ad + p0) * load_vec(xs + p0);
                T* gv = G + (o * D + d) * BLK;
                store_vec(gv, load_vec(gv) + sum);
            }
        }
    }
}

// exp(x) for x <= 0 (softmax arguments after subtracting the maximum) on a whole block,
// written with vector types so that it is vectorised without -ffast-math (std::exp is a
// scalar libm call): x = k ln2 + r with |r| <= ln2 / 2, exp(r) by a polynomial (float:
// degree 5, fitted for the least maximum relative error on that interval, 7.5e-8, 2.1e-7
// evaluated in float; it replaced a degree 7 Taylor series: two FMAs fewer; double: the
// Taylor series of degree 13, truncation below 1e-17), 2^k built in the exponent bits (or
// vscalef), k rounded with the add-and-subtract-2^(mantissa+1) trick.
// Arguments below the smallest normal number's log are clamped: their weight is < 1e-37
// (float) / 1e-300 (double) of the largest term. Arguments above 0 are clamped to 0: they
// occur on the padding lanes of a block (whose sums are not part of the softmax and may
// exceed the grid's maximum), where the result is multiplied by a zero mask, and an
// overflow to inf there would make that product NaN.
template <typename T>
struct ExpTraits;
template <>
struct ExpTraits<float> {
    using Int = int32_t;
    static constexpr float lo = -87.0f, round = 12582912.0f;  // 1.5 * 2^23
    static constexpr int mantissa = 23, bias = 127;
};
template <>
struct ExpTraits<double> {
    using Int = int64_t;
    static constexpr double lo = -708.0, round = 6755399441055744.0;  // 1.5 * 2^52
    static constexpr int mantissa = 52, bias = 1023;
};

template <typename T>
constexpr T inv_factorial(int n) {
    T f = 1;
    for (int i = 2; i <= n; ++i) f *= T(i);
    return T(1) / f;
}

// exp(r) for |r| <= ln2 / 2 in Horner form, one FMA per degree.
template <typename V>
inline V exp_reduced(V r, float) {
    // minimax coefficients of degree 0..5 (relative error), fitted in float64
    V p = V{} + 0.008297594919283842f;
    p = p * r + 0.04191526902150042f;
    p = p * r + 0.16667574860608114f;
    p = p * r + 0.49998895895272333f;
    p = p * r + 0.9999996922028807f;
    return p * r + 1.0000000715476665f;
}

template <typename V>
inline V exp_reduced(V r, double) {
    constexpr int degree = 13;
    V p = V{} + inv_factorial<double>(degree);
#pragma GCC unroll 16
    for (int n = degree - 1; n >= 0; --n) p = p * r + inv_factorial<double>(n);
    return p;
}

template <typename T>
inline typename Vec<T>::type exp_nonpositive(typename Vec<T>::type x) {
    using Tr = ExpTraits<T>;
    using V = typename Vec<T>::type;
    typedef typename Tr::Int IV __attribute__((vector_size(BLK * sizeof(T))));
    const V lo = V{} + Tr::lo, zero = V{};
    x = x < lo ? lo : x;
    x = x > zero ? zero : x;
    const V kf = (x * T(1.4426950408889634) + Tr::round) - Tr::round;  // round(x / ln2)
    // Cody-Waite: ln2 split so that kf * ln2_hi is exact
    const V r = (x - kf * T(0.693145751953125)) - kf * T(1.4286068203094173e-06);
    const V p = exp_reduced(r, T(0));
#if defined(__AVX512F__)
    // p * 2^k in one instruction (vscalef) instead of building 2^k's bits (4 instructions)
    if constexpr (sizeof(V) == 64) {
        if constexpr (sizeof(T) == 4)
            return reinterpret_cast<V>(_mm512_scalef_ps(reinterpret_cast<__m512>(p), reinterpret_cast<__m512>(kf)));
        else
            return reinterpret_cast<V>(_mm512_scalef_pd(reinterpret_cast<__m512d>(p), reinterpret_cast<__m512d>(kf)));
    }
#endif
    const IV bits = (__builtin_convertvector(kf, IV) + Tr::bias) << Tr::mantissa;
    return p * reinterpret_cast<const V&>(bits);
}

// Softmax over the grid positions of D score planes (stride ps), in place, given each
// plane's maximum mx (from conv_planes): leaves the planes unnormalised, exp(s - max)
// (zero on padding), writes the log-sum-exp (1 value joint, D per pattern) and inv[d], each
// plane's normaliser (1 / sum), which the caller folds into the transposed convolution's
// weights instead of a pass over the planes.
template <typename T>
void softmax_planes(T* s, int64_t ps, const T* mask, const T* mx, T* lse, T* inv, const Geometry& g, bool joint) {
    using V = typename Vec<T>::type;
    const int64_t D = g.D;
    T mx_all = -std::numeric_limits<T>::infinity();
    for (int64_t d = 0; d < D; ++d) mx_all = std::max(mx_all, mx[d]);
    V acc_all = V{};  // joint: one vector sum over all planes, reduced once
    for (int64_t d = 0; d < D; ++d) {
        T* sd = s + d * ps;
        const T m = joint ? mx_all : mx[d];
        V acc = V{};
        for (const int64_t p : g.blocks) {
            const V e = exp_nonpositive<T>(load_vec(sd + p) - m) * load_vec(mask + p);
            store_vec(sd + p, e);
            acc += e;
        }
        if (joint) {
            acc_all += acc;
        } else {
            const T sum = hsum<T>(acc);
            lse[d] = mx[d] + std::log(sum);
            inv[d] = T(1) / sum;
        }
    }
    if (joint) {
        const T total = hsum<T>(acc_all);
        lse[0] = mx_all + std::log(total);
        std::fill(inv, inv + D, T(1) / total);
    }
}

// The weights A = exp(s - lse) from the saved log-sum-exp (backward), in place.
template <typename T>
void weights_from_lse(T* s, int64_t ps, const T* mask, const T* lse, const Geometry& g, bool joint) {
    for (int64_t d = 0; d < g.D; ++d) {
        T* sd = s + d * ps;
        const T l = lse[joint ? 0 : d];
        for (const int64_t p : g.blocks)
            store_vec(sd + p, exp_nonpositive<T>(load_vec(sd + p) - l) * load_vec(mask + p));
    }
}

// Copy a map (T, H, W) into / out of the padded grid, a grid row (W contiguous values) at
// a time so that the compiler vectorises the copies (instead of one gather/scatter per
// element).
template <typename T>
void to_padded(const T* __restrict row, T* __restrict pad, const Geometry& g, T scale = T(1)) {
    const int64_t W = g.W;
    for (int64_t t = 0; t < g.T; ++t)
        for (int64_t y = 0; y < g.H; ++y) {
            const T* src = row + (t * g.H + y) * W;
            T* dst = pad + g.centre() + (t * g.Hp() + y) * g.Wp();
#pragma omp simd
            for (int64_t x = 0; x < W; ++x) dst[x] = src[x] * scale;
        }
}

template <typename T>
void from_padded(const T* __restrict pad, T* __restrict row, const Geometry& g) {
    const int64_t W = g.W;
    for (int64_t t = 0; t < g.T; ++t)
        for (int64_t y = 0; y < g.H; ++y) {
            const T* src = pad + g.centre() + (t * g.Hp() + y) * g.Wp();
            T* dst = row + (t * g.H + y) * W;
#pragma omp simd
            for (int64_t x = 0; x < W; ++x) dst[x] = src[x];
        }
}

// 64-byte aligned storage, so that a block that starts at a multiple of BLK is one
// cache line (unaligned vector loads that cross a line cost two).
template <typename T>
struct AlignedAllocator {
    using value_type = T;
    AlignedAllocator() = default;
    template <typename U>
    AlignedAllocator(const AlignedAllocator<U>&) {}
    T* allocate(size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64))); }
    void deallocate(T* p, size_t) { ::operator delete(p, std::align_val_t(64)); }
    bool operator==(const AlignedAllocator&) const { return true; }
    bool operator!=(const AlignedAllocator&) const { return false; }
};
template <typename T>
using AlignedVector = std::vector<T, AlignedAllocator<T>>;

// Row buffers of one worker: padded maps with BLK zeros in front (the first grid block,
// aligned down, starts up to BLK - 1 positions before the grid; shifted back by the window's
// reach to the centre, its loads start at most that far before position 0) and slack
// behind for the window's reach past the last block. Plane strides are whole blocks.
template <typename T>
struct RowBuffers {
    int64_t ps;                // stride of a padded plane
    AlignedVector<T> x;        // S0 row, padded
    AlignedVector<T> planes;   // D score / weight planes
    AlignedVector<T> dx;       // dAt row, padded
    AlignedVector<T> dplanes;  // D planes of dA, then dS
    AlignedVector<T> out;      // one padded output plane
    RowBuffers(const Geometry& g, bool backward)
        : ps((g.P() + 192 + BLK - 1) / BLK * BLK), x(ps + BLK, T(0)), planes(g.D * ps + BLK, T(0)),
          dx(backward ? ps + BLK : 0, T(0)), dplanes(backward ? g.D * ps + BLK : 0, T(0)), out(ps + BLK, T(0)) {}
    T* X() { return x.data() + BLK; }
    T* Planes() { return planes.data() + BLK; }
    T* DX() { return dx.data() + BLK; }
    T* DPlanes() { return dplanes.data() + BLK; }
    T* Out() { return out.data() + BLK; }
};

template <int DD, typename T>
void forward(const T* S0, const T* UK, const T* UV, T* At, T* lse, int64_t BH, int64_t R, const Geometry& g,
             T scale, bool joint, int threads) {
    const auto sh = window_shifts(g);
    const auto mask = grid_mask<T>(g);
    const auto bias = grid_mask<T>(g, T(0), -std::numeric_limits<T>::infinity());
    const int64_t N = g.N(), D = g.D, M = g.M(), P1 = joint ? 1 : D;
    parallel_rows(threads, BH * R, [&](int64_t begin, int64_t end, int) {
        RowBuffers<T> b(g, false);
        std::vector<T> mx(D), inv(D), uv_scaled(M * D);
        for (int64_t row = begin; row < end; ++row) {
            const int64_t u = g.hu == 1 ? 0 : (row / R) % g.heads;
            to_padded(S0 + row * N, b.X(), g, scale);
            conv_planes<DD>(b.X(), UK + u * M * D, b.Planes(), b.ps, g, sh.data(), bias.data(), mx.data(), joint);
            // exp(s - max) planes; the softmax's normalisers scale UV's columns instead of A
            softmax_planes(b.Planes(), b.ps, mask.data(), mx.data(), lse + row * P1, inv.data(), g, joint);
            const T* uv = UV + u * M * D;
            for (int64_t o = 0; o < M; ++o)
                for (int64_t d = 0; d < D; ++d) uv_scaled[o * D + d] = uv[o * D + d] * inv[d];
            conv_transpose_planes<DD>(b.Planes(), b.ps, uv_scaled.data(), b.Out(), g, sh.data(), b.ps);
            from_padded(b.Out(), At + row * N, g);
        }
    });
}

template <int DD, typename T>
void backward(const T* S0, const T* dAt, const T* lse, const T* rowdot, const T* UK, const T* UV, T* At, T* dS0,
              T* dUK, T* dUV, int64_t BH, int64_t R, const Geometry& g, T scale, bool joint, bool at_saved,
              int threads) {
    const auto sh = window_shifts(g);
    const auto mask = grid_mask<T>(g);
    const int64_t N = g.N(), D = g.D, M = g.M(), P1 = joint ? 1 : D;
    const int64_t ustride = M * D, gstride = ustride * BLK;
    const int64_t workers = row_ranges(threads, BH * R);
    // per-range pattern gradients as BLK partial sums per (o, d), summed at the end in range
    // order (no shared writes while running, the same sums whichever thread ran a range)
    AlignedVector<T> gk_all(workers * g.hu * gstride, T(0)), gv_all(workers * g.hu * gstride, T(0));
    parallel_rows(threads, BH * R, [&](int64_t begin, int64_t end, int worker) {
        RowBuffers<T> b(g, true);
        T* gk = gk_all.data() + worker * g.hu * gstride;
        T* gv = gv_all.data() + worker * g.hu * gstride;
        for (int64_t row = begin; row < end; ++row) {
            const int64_t u = g.hu == 1 ? 0 : (row / R) % g.heads;
            const T* uk = UK + u * ustride;
            const T* uv = UV + u * ustride;
            // recompute the weights A from S0 and the log-sum-exp, and At (for dV = At^T dY, done
            // outside) unless the forward kept it
            to_padded(S0 + row * N, b.X(), g, scale);
            conv_planes<DD>(b.X(), uk, b.Planes(), b.ps, g, sh.data());
            weights_from_lse(b.Planes(), b.ps, mask.data(), lse + row * P1, g, joint);
            if (!at_saved) {
                conv_transpose_planes<DD>(b.Planes(), b.ps, uv, b.Out(), g, sh.data(), b.ps);
                from_padded(b.Out(), At + row * N, g);
            }
            // dA[d][p] = sum_o UV[o, d] dAt[p + o];  dUV[o, d] += sum_p A[d][p] dAt[p + o]
            to_padded(dAt + row * N, b.DX(), g);
            conv_planes<DD>(b.DX(), uv, b.DPlanes(), b.ps, g, sh.data());
            pattern_grad_planes<DD>(b.Planes(), b.ps, b.DX(), gv + u * gstride, g, sh.data());
            // softmax backward: dS = A * (dA - <A, dA>), the inner product over the normalised set
            for (int64_t d = 0; d < D; ++d) {
                const T* ad = b.Planes() + d * b.ps;
                T* dd = b.DPlanes() + d * b.ps;
                T r = 0;
                if (joint) {
                    r = rowdot[row];
                } else {
                    typename Vec<T>::type acc{};
                    for (const int64_t p : g.blocks) acc += load_vec(ad + p) * load_vec(dd + p);
                    r = hsum<T>(acc);
                }
                for (const int64_t p : g.blocks) store_vec(dd + p, load_vec(ad + p) * (load_vec(dd + p) - r));
            }
            // dS0[p] = sum_o sum_d UK[o, d] dS[d][p - o];  dUK[o, d] += sum_p dS[d][p] S0[p + o]
            conv_transpose_planes<DD>(b.DPlanes(), b.ps, uk, b.Out(), g, sh.data(), b.ps);
            from_padded(b.Out(), dS0 + row * N, g);
            pattern_grad_planes<DD>(b.DPlanes(), b.ps, b.X(), gk + u * gstride, g, sh.data());
        }
    });
    for (int64_t w = 0; w < workers; ++w)
        for (int64_t e = 0; e < g.hu * ustride; ++e)
            for (int64_t l = 0; l < BLK; ++l) {
                dUK[e] += gk_all[(w * g.hu * ustride + e) * BLK + l];
                dUV[e] += gv_all[(w * g.hu * ustride + e) * BLK + l];
            }
}

// Dispatch on the number of patterns: compile-time sizes for the common D.
#define STRUCTSA_DISPATCH_D(D, FN, ...)        \
    switch (D) {                              \
        case 1: FN<1>(__VA_ARGS__); break;    \
        case 2: FN<2>(__VA_ARGS__); break;    \
        case 4: FN<4>(__VA_ARGS__); break;    \
        case 8: FN<8>(__VA_ARGS__); break;    \
        default: FN<0>(__VA_ARGS__); break;   \
    }

// Padded rows: kw / 2 zero columns in front of the W grid columns suffice, because the
// flattened rows share them: a window reaching kw / 2 past a row's last column lands in
// the next row's leading zeros. They are widened to whole blocks when that costs at most
// 25% more positions (14 + 1 -> 16 for 3 wide windows, 14 + 2 -> 16 for 5 wide ones;
// 7 + 1 = 8 stays), which enables conv_transpose_rows.
int64_t padded_width(int64_t W, int64_t kw) {
    const int64_t w = W + kw / 2, w_blk = (w + BLK - 1) / BLK * BLK;
    return w_blk * 4 <= w * 5 ? w_blk : w;
}

Geometry make_geometry(const StructvitFusedArgs& a) {
    Geometry g{a.T, a.H, a.W, a.kt, a.kh, a.kw, a.D, a.heads, a.hu};
    g.wp = padded_width(g.W, g.kw);
    for (const int64_t p : grid_positions(g))
        if (g.blocks.empty() || g.blocks.back() != p / BLK * BLK) g.blocks.push_back(p / BLK * BLK);
    return g;
}

// The kernel's own checks of its arguments (native.py checks the tensors first): a
// consistent geometry whose rows, patterns and padded planes fit in int64, and tensors
// whose memory holds every element the geometry reaches. nullptr: accepted.
const char* check_fused(const StructvitFusedArgs& a, const void* const* tensors, const int64_t* lens, int count) {
    using structvit::product;
    if (a.T < 1 || a.H < 1 || a.W < 1) return "the grid sizes T, H, W must be >= 1";
    if (a.kt < 1 || a.kh < 1 || a.kw < 1 || a.kt % 2 == 0 || a.kh % 2 == 0 || a.kw % 2 == 0)
        return "the window sizes kt, kh, kw must be odd and >= 1";
    if (a.D < 1) return "the number of patterns D must be >= 1";
    if (a.heads < 1 || (a.hu != 1 && a.hu != a.heads)) return "heads must be >= 1 and hu must be 1 or heads";
    if (a.BH < 0 || a.R < 0) return "the rows BH and R must be >= 0";
    if (a.threads < 1 || a.threads > 1 << 20) return "threads must be between 1 and 2^20";
    if ((a.joint != 0 && a.joint != 1) || (a.at_saved != 0 && a.at_saved != 1)) return "joint and at_saved must be 0 or 1";
    const int64_t n = product({a.T, a.H, a.W}), rows = product({a.BH, a.R});
    const int64_t padded = product({a.T + a.kt, a.H + a.kh, a.W + a.kw + BLK, a.D + 1});
    const int64_t maps = product({rows, n}), patterns = product({a.hu, a.kt, a.kh, a.kw, a.D});
    const int64_t stats = product({rows, a.joint ? 1 : a.D});
    if (n < 0 || rows < 0 || padded < 0 || maps < 0 || patterns < 0 || stats < 0)
        return "the sizes overflow int64";
    if (maps == 0) return nullptr;
    // what each tensor must hold, in the order the caller lists them (see the kernels below)
    const int64_t need[] = {maps, patterns, patterns, maps, stats, maps, a.joint ? rows : 0, maps, patterns, patterns};
    for (int i = 0; i < count; ++i) {
        const int64_t want = need[i];
        if (lens[i] < want) return "a tensor's memory is smaller than the geometry needs (see the *_len fields)";
        if (want > 0 && tensors[i] == nullptr) return "a tensor the geometry needs is missing (null pointer)";
    }
    return nullptr;
}

}  // namespace

extern "C" {

int structvit_abi_version() { return STRUCTVIT_ABI_VERSION; }

const char* structvit_conv_args_signature() {
    return STRUCTVIT_CONV_ARGS_FIELDS(STRUCTVIT_NAME_I64, STRUCTVIT_NAME_F64);
}

int64_t structvit_conv_args_size() { return int64_t(sizeof(StructvitConvArgs)); }

const char* structvit_fused_args_signature() {
    return STRUCTVIT_FUSED_ARGS_FIELDS(STRUCTVIT_NAME_I64, STRUCTVIT_NAME_F64);
}

int64_t structvit_fused_args_size() { return int64_t(sizeof(StructvitFusedArgs)); }

const char* structvit_isa() {
#if defined(__AVX512F__)
    return "avx512";
#elif defined(__AVX2__) && defined(__FMA__)
    return "avx2";
#elif defined(__ARM_NEON)
    return "neon";
#else
    return "generic";
#endif
}

int structvit_lanes() { return int(BLK); }

}  // extern "C"

namespace {

// forward: reads S0 (BH, R, N), UK, UV (hu, M, D); writes At (BH, R, N), lse (BH, R, P)
template <typename T>
const char* fused_forward(const StructvitFusedArgs* a, const T* S0, const T* UK, const T* UV, T* At, T* lse) {
    if (a == nullptr) return "the argument structure is missing";
    const void* tensors[] = {S0, UK, UV, At, lse};
    const int64_t lens[] = {a->s0_len, a->uk_len, a->uv_len, a->at_len, a->lse_len};
    if (const char* refused = check_fused(*a, tensors, lens, 5)) return refused;
    if (a->BH * a->R == 0) return nullptr;
    const Geometry g = make_geometry(*a);
    STRUCTSA_DISPATCH_D(g.D, forward, S0, UK, UV, At, lse, a->BH, a->R, g, static_cast<T>(a->scale), a->joint != 0,
                        int(a->threads))
    return nullptr;
}

// backward: reads S0, dAt (BH, R, N), lse, rowdot (BH, R, P), UK, UV; writes dS0 and, unless
// at_saved, At (BH, R, N); accumulates into dUK, dUV (hu, M, D)
template <typename T>
const char* fused_backward(const StructvitFusedArgs* a, const T* S0, const T* dAt, const T* lse, const T* rowdot,
                           const T* UK, const T* UV, T* At, T* dS0, T* dUK, T* dUV) {
    if (a == nullptr) return "the argument structure is missing";
    // in check_fused's order: S0, UK, UV, At, lse, dAt, rowdot, dS0, dUK, dUV
    const void* tensors[] = {S0, UK, UV, At, lse, dAt, rowdot, dS0, dUK, dUV};
    const int64_t lens[] = {a->s0_len, a->uk_len, a->uv_len, a->at_len, a->lse_len,
                            a->dat_len, a->rowdot_len, a->ds0_len, a->duk_len, a->duv_len};
    if (const char* refused = check_fused(*a, tensors, lens, 10)) return refused;
    if (a->BH * a->R == 0) return nullptr;
    const Geometry g = make_geometry(*a);
    STRUCTSA_DISPATCH_D(g.D, backward, S0, dAt, lse, rowdot, UK, UV, At, dS0, dUK, dUV, a->BH, a->R, g,
                        static_cast<T>(a->scale), a->joint != 0, a->at_saved != 0, int(a->threads))
    return nullptr;
}

}  // namespace

extern "C" {

const char* structvit_fused_forward_f32(const StructvitFusedArgs* a, const float* S0, const float* UK,
                                        const float* UV, float* At, float* lse) {
    return fused_forward(a, S0, UK, UV, At, lse);
}

const char* structvit_fused_forward_f64(const StructvitFusedArgs* a, const double* S0, const double* UK,
                                        const double* UV, double* At, double* lse) {
    return fused_forward(a, S0, UK, UV, At, lse);
}

const char* structvit_fused_backward_f32(const StructvitFusedArgs* a, const float* S0, const float* dAt,
                                         const float* lse, const float* rowdot, const float* UK, const float* UV,
                                         float* At, float* dS0, float* dUK, float* dUV) {
    return fused_backward(a, S0, dAt, lse, rowdot, UK, UV, At, dS0, dUK, dUV);
}

const char* structvit_fused_backward_f64(const StructvitFusedArgs* a, const double* S0, const double* dAt,
                                         const double* lse, const double* rowdot, const double* UK, const double* UV,
                                         double* At, double* dS0, double* dUK, double* dUV) {
    return fused_backward(a, S0, dAt, lse, rowdot, UK, UV, At, dS0, dUK, dUV);
}

}  // extern "C"
