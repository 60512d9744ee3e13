// Fused CPU kernel of the folded form of StructSA (DESIGN.md section 1, form 4).
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
//   S0, At, dAt, dS0 : (BH, R, N)  BH = batch * heads, R = query rows of this chunk
//   lse              : (BH, R, P)  P = 1 (joint) or D (per pattern)
//   rowdot           : (BH, R, P)  joint: dY_i . Y_i; per pattern: unused (computed here)
//   UK, UV           : (HU, M, D)  offset-major, HU = heads or 1 (shared)
//   dUK, dUV         : (HU, M, D)  accumulated (+=)
// Inside a row everything lives on the zero-padded key grid (Tp, Hp, Wp), flattened, so
// that a window offset is a constant shift: every convolution is a run of shifted,
// contiguous vector FMAs over padded positions, D accumulators at a time. Positions in
// the padding are computed too and masked out (about 20% extra work for 14x14, 3x3).
// Plain C ABI, no PyTorch headers: built with the system compiler and loaded with ctypes.
// Threads: when PyTorch runs on GNU OpenMP, the kernel is built with -fopenmp and its
// `omp parallel` reuses PyTorch's own thread pool (the same libgomp.so.1 is already loaded,
// see native.py), so the workers that just ran a GEMM pick up the rows instead of
// spin-waiting against separate threads (measured: 10-25% of the op). Otherwise
// (STRUCTSA_OPENMP undefined) std::threads over contiguous row ranges: a second, separate
// OpenMP runtime next to PyTorch's would make the two pools spin against each other
// (measured: 10x slower on 2 cores). `#pragma omp simd` only asks for vectorisation.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <new>
#include <thread>
#include <vector>

namespace {

// Run fn(begin, end, worker) over [0, total) split in contiguous ranges, one per thread.
template <typename Fn>
void parallel_rows(int threads, int64_t total, Fn fn) {
    const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(threads, total));
    const int64_t step = (total + workers - 1) / workers;
    if (workers == 1) {
        fn(int64_t(0), total, 0);
        return;
    }
#ifdef STRUCTSA_OPENMP
#pragma omp parallel for num_threads(workers) schedule(static, 1)
    for (int64_t w = 0; w < workers; ++w) {
        const int64_t begin = w * step, end = std::min(total, begin + step);
        if (begin < end) fn(begin, end, int(w));
    }
#else
    std::vector<std::thread> pool;
    for (int64_t w = 0; w < workers; ++w) {
        const int64_t begin = w * step, end = std::min(total, begin + step);
        if (begin < end) pool.emplace_back(fn, begin, end, int(w));
    }
    for (auto& t : pool) t.join();
#endif
}

struct Geometry {
    int64_t T, H, W, kt, kh, kw, D, heads, hu;
    int64_t wp = 0;  // padded row length, >= W + kw - 1 (0: exactly that); see padded_width
    int64_t N() const { return T * H * W; }
    int64_t M() const { return kt * kh * kw; }
    int64_t Hp() const { return H + kh - 1; }
    int64_t Wp() const { return wp ? wp : W + kw - 1; }
    int64_t P() const { return (T + kt - 1) * Hp() * Wp(); }
    // padded index of grid position (0, 0, 0): the window centre
    int64_t centre() const { return ((kt / 2) * Hp() + kh / 2) * Wp() + kw / 2; }
    // [lo, hi): the padded positions from the first to the last grid position
    int64_t lo() const { return centre(); }
    int64_t hi() const { return centre() + ((T - 1) * Hp() + H - 1) * Wp() + W; }
    // hi rounded up to whole register blocks: the convolutions write [lo, hi_blk), so the
    // softmax masks all of it (the mask is 0 past hi) lest a block's tail leak into the
    // transposed convolution.
    int64_t hi_blk() const;
};

constexpr int64_t BLK = 16;  // padded positions per register block

int64_t Geometry::hi_blk() const { return lo() + (hi() - lo() + BLK - 1) / BLK * BLK; }

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

// 1 on grid positions, 0 on padding, over padded indices [0, P + BLK).
template <typename T>
std::vector<T> grid_mask(const Geometry& g, const std::vector<int64_t>& pos) {
    std::vector<T> m(g.P() + BLK, T(0));
    for (int64_t p : pos) m[p] = T(1);
    return m;
}

template <int DD>
inline int64_t patterns(const Geometry& g) { return DD > 0 ? DD : g.D; }

// A block of BLK padded positions as one GCC vector (one zmm for float with AVX-512, split
// by the compiler on narrower machines), so accumulators stay in registers.
template <typename T>
struct Vec {
    typedef T type __attribute__((vector_size(BLK * sizeof(T))));
};

template <typename T>
inline typename Vec<T>::type load_vec(const T* p) {
    typename Vec<T>::type v;
    std::memcpy(&v, p, sizeof(v));
    return v;
}

template <typename T>
inline void store_vec(T* p, typename Vec<T>::type v) { std::memcpy(p, &v, sizeof(v)); }

// y[d][p] = sum_o U[o, d] x[p + sh[o]] for p in [lo, hi): the key-grid convolution.
// x: padded map (zero padding); y: D planes of stride ys. With D known at compile time
// the D accumulators of a block live in registers and each load of x feeds D FMAs.
template <int DD, typename T>
void conv_planes(const T* __restrict x, const T* __restrict U, T* __restrict y, int64_t ys, const Geometry& g,
                 const int64_t* sh) {
    using V = typename Vec<T>::type;
    const int64_t D = patterns<DD>(g), M = g.M(), lo = g.lo(), hi = g.hi();
    if constexpr (DD > 0) {
        for (int64_t p0 = lo; p0 < hi; p0 += BLK) {
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
        }
    } else {
        for (int64_t d = 0; d < D; ++d)
            for (int64_t p0 = lo; p0 < hi; p0 += BLK) {
                V acc = V{};
                for (int64_t o = 0; o < M; ++o) acc += load_vec(x + p0 + sh[o]) * U[o * D + d];
                store_vec(y + d * ys + p0, acc);
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
    // input blocks x0 whose loads a[x0 + i - dw] can reach a grid position in [lo, hi)
    const int64_t kw = g.kw, half = kw / 2, first = (g.lo() - half) / BLK * BLK, last = g.hi() + half;
    int64_t rshift[NR];  // output block minus input block, per (t, h) shift
    for (int64_t r = 0; r < NR; ++r) {
        const int64_t dt = r / g.kh - g.kt / 2, dh = r % g.kh - g.kh / 2;
        rshift[r] = (dt * g.Hp() + dh) * g.Wp() / BLK;
    }
    std::memset(y - BLK, 0, sizeof(T) * (ys + BLK));  // a is zero off the grid: only these blocks get sums
    for (int64_t x0 = first; x0 < last; x0 += BLK) {
        V acc[NR];
#pragma GCC unroll 32
        for (int r = 0; r < NR; ++r) acc[r] = V{};
        for (int64_t j = 0; j < kw; ++j) {
            V in[DD];
#pragma GCC unroll 16
            for (int d = 0; d < DD; ++d) in[d] = load_vec(a + d * as + x0 - (j - half));
#pragma GCC unroll 32
            for (int r = 0; r < NR; ++r) {
                const T* u = U + (r * kw + j) * DD;
#pragma GCC unroll 16
                for (int d = 0; d < DD; ++d) acc[r] += in[d] * u[d];
            }
        }
#pragma GCC unroll 32
        for (int r = 0; r < NR; ++r) {
            T* yb = y + x0 + rshift[r] * BLK;
            store_vec(yb, load_vec(yb) + acc[r]);
        }
    }
}

// y[p] = sum_o sum_d U[o, d] a[d][p - sh[o]] for p in [lo, hi): the transposed convolution
// (a: D planes of stride as, zero outside the grid and in the buffers' slack). FMA latency
// is hidden by independent accumulators: one per pattern and NB blocks at once, at least 8
// chains (D = 8: one block; D = 1: eight). Blocks may run up to NB * BLK past hi: y has the
// slack, and what is written there is never read.
template <int DD, typename T>
void conv_transpose_planes(const T* __restrict a, int64_t as, const T* __restrict U, T* __restrict y, const Geometry& g,
                           const int64_t* sh, int64_t ys) {
    using V = typename Vec<T>::type;
    const int64_t D = patterns<DD>(g), M = g.M(), lo = g.lo(), hi = g.hi();
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
        for (int64_t p0 = lo; p0 < hi; p0 += NB * BLK) {
            V acc[NB][DD];
#pragma GCC unroll 16
            for (int b = 0; b < NB; ++b)
#pragma GCC unroll 16
                for (int d = 0; d < DD; ++d) acc[b][d] = V{};
            for (int64_t o = 0; o < M; ++o) {
                const T* u = U + o * DD;
                const T* ao = a + p0 - sh[o];
#pragma GCC unroll 16
                for (int b = 0; b < NB; ++b)
#pragma GCC unroll 16
                    for (int d = 0; d < DD; ++d) acc[b][d] += load_vec(ao + d * as + b * BLK) * u[d];
            }
#pragma GCC unroll 16
            for (int b = 0; b < NB; ++b) {
                V sum = acc[b][0];
#pragma GCC unroll 16
                for (int d = 1; d < DD; ++d) sum += acc[b][d];
                store_vec(y + p0 + b * BLK, sum);
            }
        }
    } else {
        for (int64_t p0 = lo; p0 < hi; p0 += BLK) {
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
// zero off the grid, so the padding and the block tail up to hi_blk add nothing). A dot
// product per (o, d) would be one FMA chain, latency-bound; instead OG offsets x D patterns
// accumulate at once in registers (D = 8: 2 x 8 chains, the D blocks of a loaded once and
// used OG times). G holds BLK partial sums per (o, d), (M, D, BLK): the sum across them is
// taken once per worker at the end, not per row.
template <int DD, typename T>
void pattern_grad_planes(const T* __restrict a, int64_t as, const T* __restrict x, T* __restrict G, const Geometry& g,
                         const int64_t* sh) {
    using V = typename Vec<T>::type;
    const int64_t D = patterns<DD>(g), M = g.M(), lo = g.lo(), hi = g.hi_blk();
    if constexpr (DD > 0) {
        constexpr int OG = DD >= 8 ? 2 : 24 / DD;
        for (int64_t o0 = 0; o0 < M; o0 += OG) {
            int64_t shg[OG];
            for (int i = 0; i < OG; ++i) shg[i] = o0 + i < M ? sh[o0 + i] : 0;  // spare slots: discarded
            V acc[OG][DD];
#pragma GCC unroll 32
            for (int i = 0; i < OG; ++i)
#pragma GCC unroll 16
                for (int d = 0; d < DD; ++d) acc[i][d] = V{};
            // from lo aligned down to a whole block: a is zero below lo, and the loads of a are
            // then single cache lines
            for (int64_t p0 = lo / BLK * BLK; p0 < hi; p0 += BLK) {
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
            for (int i = 0; i < OG && o0 + i < M; ++i)
                for (int d = 0; d < DD; ++d) {
                    T* gv = G + ((o0 + i) * DD + d) * BLK;
                    store_vec(gv, load_vec(gv) + acc[i][d]);
                }
        }
    } else {
        for (int64_t o = 0; o < M; ++o) {
            const T* xs = x + sh[o];
            for (int64_t d = 0; d < D; ++d) {
                const T* ad = a + d * as;
                T sum = 0;
#pragma omp simd reduction(+ : sum)
                for (int64_t p = lo; p < hi; ++p) sum += ad[p] * xs[p];
                G[(o * D + d) * BLK] += sum;
            }
        }
    }
}

// exp(x) for x <= 0 (softmax arguments after subtracting the maximum) on a whole block,
// written with vector types so that it is vectorised without -ffast-math (std::exp is a
// scalar libm call): x = k ln2 + r with |r| <= ln2 / 2, exp(r) by its Taylor series
// (degree 7 for float, 13 for double: truncation below 1e-8 and 1e-17 relative), 2^k
// built in the exponent bits, k rounded with the add-and-subtract-2^(mantissa+1) trick.
// Arguments below the smallest normal number's log are clamped: their weight is < 1e-37
// (float) / 1e-300 (double) of the largest term.
template <typename T>
struct ExpTraits;
template <>
struct ExpTraits<float> {
    using Int = int32_t;
    static constexpr float lo = -87.0f, round = 12582912.0f;  // 1.5 * 2^23
    static constexpr int degree = 7, mantissa = 23, bias = 127;
};
template <>
struct ExpTraits<double> {
    using Int = int64_t;
    static constexpr double lo = -708.0, round = 6755399441055744.0;  // 1.5 * 2^52
    static constexpr int degree = 13, mantissa = 52, bias = 1023;
};

template <typename T>
constexpr T inv_factorial(int n) {
    T f = 1;
    for (int i = 2; i <= n; ++i) f *= T(i);
    return T(1) / f;
}

template <typename T>
inline typename Vec<T>::type exp_nonpositive(typename Vec<T>::type x) {
    using Tr = ExpTraits<T>;
    using V = typename Vec<T>::type;
    typedef typename Tr::Int IV __attribute__((vector_size(BLK * sizeof(T))));
    const V lo = V{} + Tr::lo;
    x = x < lo ? lo : x;
    const V kf = (x * T(1.4426950408889634) + Tr::round) - Tr::round;  // round(x / ln2)
    // Cody-Waite: ln2 split so that kf * ln2_hi is exact
    const V r = (x - kf * T(0.693145751953125)) - kf * T(1.4286068203094173e-06);
    // Horner form of sum r^n / n!: one FMA per degree (the coefficients fold to constants)
    V p = V{} + inv_factorial<T>(Tr::degree);
#pragma GCC unroll 16
    for (int n = Tr::degree - 1; n >= 0; --n) p = p * r + inv_factorial<T>(n);
    const IV bits = (__builtin_convertvector(kf, IV) + Tr::bias) << Tr::mantissa;
    return p * reinterpret_cast<const V&>(bits);
}

template <typename T>
inline T hmax(typename Vec<T>::type v) {
    T m = v[0];
    for (int64_t i = 1; i < BLK; ++i) m = v[i] > m ? v[i] : m;
    return m;
}

// Softmax over the grid positions of D score planes (stride ps), in place, giving the
// weights A (zero on padding), and the log-sum-exp (1 value joint, D per pattern).
// With lse given (backward), A = exp(s - lse) without the reductions. Works on whole
// blocks over [lo, hi_blk): the mask is 0 past hi. With inv given (forward), the planes are
// left unnormalised, exp(s - max), and inv[d] receives each plane's normaliser (1 / sum), so
// that the caller folds it into the transposed convolution's weights instead of a pass.
template <typename T>
void softmax_planes(T* s, int64_t ps, const T* mask, T* lse, const Geometry& g, bool joint, bool from_lse,
                    T* inv = nullptr) {
    using V = typename Vec<T>::type;
    const int64_t D = g.D, lo = g.lo(), hi = g.hi_blk();
    const T neg = -std::numeric_limits<T>::infinity();
    const V zero = V{};
    if (from_lse) {
        for (int64_t d = 0; d < D; ++d) {
            T* sd = s + d * ps;
            const T l = lse[joint ? 0 : d];
            for (int64_t p = lo; p < hi; p += BLK)
                store_vec(sd + p, exp_nonpositive<T>(load_vec(sd + p) - l) * load_vec(mask + p));
        }
        return;
    }
    T mx_all = neg;
    T mx[D], sum[D];
    for (int64_t d = 0; d < D; ++d) {
        const T* sd = s + d * ps;
        V m = zero + neg;
        for (int64_t p = lo; p < hi; p += BLK) {
            const V v = load_vec(sd + p);
            const V w = load_vec(mask + p) > zero ? v : m;
            m = w > m ? w : m;
        }
        mx[d] = hmax<T>(m);
        mx_all = std::max(mx_all, mx[d]);
    }
    for (int64_t d = 0; d < D; ++d) {
        T* sd = s + d * ps;
        const T m = joint ? mx_all : mx[d];
        V acc = zero;
        for (int64_t p = lo; p < hi; p += BLK) {
            const V e = exp_nonpositive<T>(load_vec(sd + p) - m) * load_vec(mask + p);
            store_vec(sd + p, e);
            acc += e;
        }
        sum[d] = hsum<T>(acc);
    }
    T total = 0;
    for (int64_t d = 0; d < D; ++d) total += sum[d];
    if (joint) lse[0] = mx_all + std::log(total);
    for (int64_t d = 0; d < D; ++d) {
        if (!joint) lse[d] = mx[d] + std::log(sum[d]);
        const T scale = T(1) / (joint ? total : sum[d]);
        if (inv) {
            inv[d] = scale;
            continue;
        }
        T* sd = s + d * ps;
        for (int64_t p = lo; p < hi; p += BLK) store_vec(sd + p, load_vec(sd + p) * scale);
    }
}

template <typename T>
void to_padded(const T* row, T* pad, const std::vector<int64_t>& pos) {
    for (size_t j = 0; j < pos.size(); ++j) pad[pos[j]] = row[j];
}

template <typename T>
void from_padded(const T* pad, T* row, const std::vector<int64_t>& pos) {
    for (size_t j = 0; j < pos.size(); ++j) row[j] = pad[pos[j]];
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

// Row buffers of one worker: padded maps with BLK zeros in front (blocks aligned down from
// lo reach below position 0 by up to a block plus the window's reach, which the front and
// the previous plane's tail cover) and slack behind (up to 8 blocks past hi in
// conv_transpose_planes, plus the window's reach). Plane strides are whole blocks.
template <typename T>
struct RowBuffers {
    int64_t ps;                // stride of a padded plane
    AlignedVector<T> x;        // S0 row, padded
    AlignedVector<T> planes;   // D score / weight planes
    AlignedVector<T> dx;       // dAt row, padded
    AlignedVector<T> dplanes;  // D planes of dA, then dS
    AlignedVector<T> out;      // one padded output plane
    RowBuffers(const Geometry& g, bool backward)
        : ps((g.P() + 12 * BLK) / BLK * BLK), x(ps + BLK, T(0)), planes(g.D * ps + BLK, T(0)),
          dx(backward ? ps + BLK : 0, T(0)), dplanes(backward ? g.D * ps + BLK : 0, T(0)), out(ps + BLK, T(0)) {}
    T* X() { return x.data() + BLK; }
    T* Planes() { return planes.data() + BLK; }
    T* DX() { return dx.data() + BLK; }
    T* DPlanes() { return dplanes.data() + BLK; }
    T* Out() { return out.data() + BLK; }
};

template <int DD, typename T>
void forward(const T* S0, const T* UK, const T* UV, T* At, T* lse, int64_t BH, int64_t R, const Geometry& g,
             bool joint, int threads) {
    const auto sh = window_shifts(g);
    const auto pos = grid_positions(g);
    const auto mask = grid_mask<T>(g, pos);
    const int64_t N = g.N(), D = g.D, M = g.M(), P1 = joint ? 1 : D;
    parallel_rows(threads, BH * R, [&](int64_t begin, int64_t end, int) {
        RowBuffers<T> b(g, false);
        std::vector<T> inv(D), uv_scaled(M * D);
        for (int64_t row = begin; row < end; ++row) {
            const int64_t u = g.hu == 1 ? 0 : (row / R) % g.heads;
            to_padded(S0 + row * N, b.X(), pos);
            conv_planes<DD>(b.X(), UK + u * M * D, b.Planes(), b.ps, g, sh.data());
            // exp(s - max) planes; the softmax's normalisers scale UV's columns instead of A
            softmax_planes(b.Planes(), b.ps, mask.data(), lse + row * P1, g, joint, false, inv.data());
            const T* uv = UV + u * M * D;
            for (int64_t o = 0; o < M; ++o)
                for (int64_t d = 0; d < D; ++d) uv_scaled[o * D + d] = uv[o * D + d] * inv[d];
            conv_transpose_planes<DD>(b.Planes(), b.ps, uv_scaled.data(), b.Out(), g, sh.data(), b.ps);
            from_padded(b.Out(), At + row * N, pos);
        }
    });
}

template <int DD, typename T>
void backward(const T* S0, const T* dAt, const T* lse, const T* rowdot, const T* UK, const T* UV, T* At, T* dS0,
              T* dUK, T* dUV, int64_t BH, int64_t R, const Geometry& g, bool joint, int threads) {
    const auto sh = window_shifts(g);
    const auto pos = grid_positions(g);
    const auto mask = grid_mask<T>(g, pos);
    const int64_t N = g.N(), D = g.D, M = g.M(), P1 = joint ? 1 : D, lo = g.lo(), hi = g.hi_blk();
    const int64_t ustride = M * D, gstride = ustride * BLK;
    const int64_t workers = std::max<int64_t>(1, threads);
    // per-worker pattern gradients as BLK partial sums per (o, d), summed at the end (no
    // shared writes while running)
    AlignedVector<T> gk_all(workers * g.hu * gstride, T(0)), gv_all(workers * g.hu * gstride, T(0));
    parallel_rows(threads, BH * R, [&](int64_t begin, int64_t end, int worker) {
        RowBuffers<T> b(g, true);
        T* gk = gk_all.data() + worker * g.hu * gstride;
        T* gv = gv_all.data() + worker * g.hu * gstride;
        for (int64_t row = begin; row < end; ++row) {
            const int64_t u = g.hu == 1 ? 0 : (row / R) % g.heads;
            const T* uk = UK + u * ustride;
            const T* uv = UV + u * ustride;
            // recompute the weights A from S0 and the log-sum-exp, and At (for dV = At^T dY, done outside)
            to_padded(S0 + row * N, b.X(), pos);
            conv_planes<DD>(b.X(), uk, b.Planes(), b.ps, g, sh.data());
            softmax_planes(b.Planes(), b.ps, mask.data(), const_cast<T*>(lse + row * P1), g, joint, true);
            conv_transpose_planes<DD>(b.Planes(), b.ps, uv, b.Out(), g, sh.data(), b.ps);
            from_padded(b.Out(), At + row * N, pos);
            // dA[d][p] = sum_o UV[o, d] dAt[p + o];  dUV[o, d] += sum_p A[d][p] dAt[p + o]
            to_padded(dAt + row * N, b.DX(), pos);
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
#pragma omp simd reduction(+ : r)
                    for (int64_t p = lo; p < hi; ++p) r += ad[p] * dd[p];
                }
#pragma omp simd
                for (int64_t p = lo; p < hi; ++p) dd[p] = ad[p] * (dd[p] - r);
            }
            // dS0[p] = sum_o sum_d UK[o, d] dS[d][p - o];  dUK[o, d] += sum_p dS[d][p] S0[p + o]
            conv_transpose_planes<DD>(b.DPlanes(), b.ps, uk, b.Out(), g, sh.data(), b.ps);
            from_padded(b.Out(), dS0 + row * N, pos);
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

// Padded rows are widened to whole blocks when that costs at most 25% more positions
// (14 + 2 -> 16: free; 7 + 2 -> 9 stays), which enables conv_transpose_rows.
int64_t padded_width(int64_t W, int64_t kw) {
    const int64_t w = W + kw - 1, w_blk = (w + BLK - 1) / BLK * BLK;
    return w_blk * 4 <= w * 5 ? w_blk : w;
}

Geometry make_geometry(const int64_t* dims) {
    // dims: T, H, W, kt, kh, kw, D, heads, hu
    Geometry g{dims[0], dims[1], dims[2], dims[3], dims[4], dims[5], dims[6], dims[7], dims[8]};
    g.wp = padded_width(g.W, g.kw);
    return g;
}

}  // namespace

extern "C" {

int structsa_abi_version() { return 1; }

void structsa_folded_forward_f32(const float* S0, const float* UK, const float* UV, float* At, float* lse,
                                 int64_t BH, int64_t R, const int64_t* dims, int joint, int threads) {
    const Geometry g = make_geometry(dims);
    STRUCTSA_DISPATCH_D(g.D, forward, S0, UK, UV, At, lse, BH, R, g, joint != 0, threads)
}

void structsa_folded_forward_f64(const double* S0, const double* UK, const double* UV, double* At, double* lse,
                                 int64_t BH, int64_t R, const int64_t* dims, int joint, int threads) {
    const Geometry g = make_geometry(dims);
    STRUCTSA_DISPATCH_D(g.D, forward, S0, UK, UV, At, lse, BH, R, g, joint != 0, threads)
}

void structsa_folded_backward_f32(const float* S0, const float* dAt, const float* lse, const float* rowdot,
                                  const float* UK, const float* UV, float* At, float* dS0, float* dUK, float* dUV,
                                  int64_t BH, int64_t R, const int64_t* dims, int joint, int threads) {
    const Geometry g = make_geometry(dims);
    STRUCTSA_DISPATCH_D(g.D, backward, S0, dAt, lse, rowdot, UK, UV, At, dS0, dUK, dUV, BH, R, g, joint != 0, threads)
}

void structsa_folded_backward_f64(const double* S0, const double* dAt, const double* lse, const double* rowdot,
                                  const double* UK, const double* UV, double* At, double* dS0, double* dUK,
                                  double* dUV, int64_t BH, int64_t R, const int64_t* dims, int joint, int threads) {
    const Geometry g = make_geometry(dims);
    STRUCTSA_DISPATCH_D(g.D, backward, S0, dAt, lse, rowdot, UK, UV, At, dS0, dUK, dUV, BH, R, g, joint != 0, threads)
}

}  // extern "C"
