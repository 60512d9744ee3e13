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
// Threads are std::threads over contiguous row ranges, not OpenMP: a second OpenMP runtime
// next to PyTorch's makes the two thread pools spin against each other (measured: 10x
// slower on 2 cores). `#pragma omp simd` only asks for vectorisation (-fopenmp-simd).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <thread>
#include <vector>

namespace {

// Run fn(begin, end, worker) over [0, total) split in contiguous ranges, one per thread.
template <typename Fn>
void parallel_rows(int threads, int64_t total, Fn fn) {
    const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(threads, total));
    if (workers == 1) {
        fn(int64_t(0), total, 0);
        return;
    }
    std::vector<std::thread> pool;
    const int64_t step = (total + workers - 1) / workers;
    for (int64_t w = 0; w < workers; ++w) {
        const int64_t begin = w * step, end = std::min(total, begin + step);
        if (begin < end) pool.emplace_back(fn, begin, end, int(w));
    }
    for (auto& t : pool) t.join();
}

struct Geometry {
    int64_t T, H, W, kt, kh, kw, D, heads, hu;
    int64_t N() const { return T * H * W; }
    int64_t M() const { return kt * kh * kw; }
    int64_t Hp() const { return H + kh - 1; }
    int64_t Wp() const { return W + kw - 1; }
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

// y[p] = sum_o sum_d U[o, d] a[d][p - sh[o]] for p in [lo, hi): the transposed convolution
// (a: D planes of stride as, zero outside the grid).
template <int DD, typename T>
void conv_transpose_planes(const T* __restrict a, int64_t as, const T* __restrict U, T* __restrict y, const Geometry& g,
                           const int64_t* sh) {
    using V = typename Vec<T>::type;
    const int64_t D = patterns<DD>(g), M = g.M(), lo = g.lo(), hi = g.hi();
    for (int64_t p0 = lo; p0 < hi; p0 += BLK) {
        V acc0 = V{}, acc1 = V{};  // two chains hide the FMA latency
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

// G[o, d] += sum_p a[d][p] x[p + sh[o]] over [lo, hi): the gradient of a pattern
// (a is zero off the grid, so the padding adds nothing).
template <int DD, typename T>
void pattern_grad_planes(const T* __restrict a, int64_t as, const T* __restrict x, T* __restrict G, const Geometry& g,
                         const int64_t* sh) {
    const int64_t D = patterns<DD>(g), M = g.M(), lo = g.lo(), hi = g.hi();
    for (int64_t o = 0; o < M; ++o) {
        const T* xs = x + sh[o];
        for (int64_t d = 0; d < D; ++d) {
            const T* ad = a + d * as;
            T sum = 0;
#pragma omp simd reduction(+ : sum)
            for (int64_t p = lo; p < hi; ++p) sum += ad[p] * xs[p];
            G[o * D + d] += sum;
        }
    }
}

// exp(x) for x <= 0 (softmax arguments after subtracting the maximum), written so that
// the compiler vectorises it (std::exp is a scalar libm call without -ffast-math):
// x = k ln2 + r with |r| <= ln2 / 2, exp(r) by its Taylor series (degree 7 for float,
// 13 for double: truncation below 1e-8 and 1e-17 relative), 2^k built in the exponent
// bits. Arguments below the smallest normal number's log are clamped: their weight is
// < 1e-37 (float) / 1e-300 (double) of the largest term.
template <typename T>
struct ExpTraits;
template <>
struct ExpTraits<float> {
    using Int = int32_t;
    static constexpr float lo = -87.0f;
    static constexpr int degree = 7, mantissa = 23, bias = 127;
};
template <>
struct ExpTraits<double> {
    using Int = int64_t;
    static constexpr double lo = -708.0;
    static constexpr int degree = 13, mantissa = 52, bias = 1023;
};

template <typename T>
inline T exp_nonpositive(T x) {
    using Tr = ExpTraits<T>;
    x = x < Tr::lo ? Tr::lo : x;
    const T kf = std::floor(x * T(1.4426950408889634) + T(0.5));  // round(x / ln2)
    // Cody-Waite: ln2 split so that kf * ln2_hi is exact
    const T r = (x - kf * T(0.693145751953125)) - kf * T(1.4286068203094173e-06);
    T p = T(1);
    // Horner form of sum r^n / n! (multiplying by 1/n: a division does not vectorise as well)
    for (int n = Tr::degree; n >= 1; --n) p = T(1) + p * r * (T(1) / T(n));
    const typename Tr::Int bits = (static_cast<typename Tr::Int>(kf) + Tr::bias) << Tr::mantissa;
    return p * __builtin_bit_cast(T, bits);
}

// Softmax over the grid positions of D score planes (stride ps), in place, giving the
// weights A (zero on padding), and the log-sum-exp (1 value joint, D per pattern).
// With lse given (backward), A = exp(s - lse) without the reductions.
template <typename T>
void softmax_planes(T* s, int64_t ps, const T* mask, T* lse, const Geometry& g, bool joint, bool from_lse) {
    const int64_t D = g.D, lo = g.lo(), hi = g.hi_blk();
    const T neg = -std::numeric_limits<T>::infinity();
    if (from_lse) {
        for (int64_t d = 0; d < D; ++d) {
            T* sd = s + d * ps;
            const T l = lse[joint ? 0 : d];
#pragma omp simd
            for (int64_t p = lo; p < hi; ++p) sd[p] = exp_nonpositive(sd[p] - l) * mask[p];
        }
        return;
    }
    T mx_all = neg;
    std::vector<T> mx(D, neg), sum(D, T(0));
    for (int64_t d = 0; d < D; ++d) {
        const T* sd = s + d * ps;
        T m = neg;
#pragma omp simd reduction(max : m)
        for (int64_t p = lo; p < hi; ++p) {
            const T v = mask[p] > T(0) ? sd[p] : neg;
            m = v > m ? v : m;
        }
        mx[d] = m;
        mx_all = std::max(mx_all, m);
    }
    for (int64_t d = 0; d < D; ++d) {
        T* sd = s + d * ps;
        const T m = joint ? mx_all : mx[d];
        T acc = 0;
#pragma omp simd reduction(+ : acc)
        for (int64_t p = lo; p < hi; ++p) {
            const T e = exp_nonpositive(sd[p] - m) * mask[p];
            sd[p] = e;
            acc += e;
        }
        sum[d] = acc;
    }
    if (joint) {
        T total = 0;
        for (int64_t d = 0; d < D; ++d) total += sum[d];
        const T inv = T(1) / total;
        for (int64_t d = 0; d < D; ++d) {
            T* sd = s + d * ps;
#pragma omp simd
            for (int64_t p = lo; p < hi; ++p) sd[p] *= inv;
        }
        lse[0] = mx_all + std::log(total);
    } else {
        for (int64_t d = 0; d < D; ++d) {
            T* sd = s + d * ps;
            const T inv = T(1) / sum[d];
#pragma omp simd
            for (int64_t p = lo; p < hi; ++p) sd[p] *= inv;
            lse[d] = mx[d] + std::log(sum[d]);
        }
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

// Row buffers of one worker: padded maps with BLK slack so blocks may run past hi.
template <typename T>
struct RowBuffers {
    int64_t ps;             // stride of a padded plane
    std::vector<T> x;       // S0 row, padded
    std::vector<T> planes;  // D score / weight planes
    std::vector<T> dx;      // dAt row, padded
    std::vector<T> dplanes; // D planes of dA, then dS
    std::vector<T> out;     // one padded output plane
    RowBuffers(const Geometry& g, bool backward)
        : ps(g.P() + 2 * BLK), x(ps, T(0)), planes(g.D * ps, T(0)), dx(backward ? ps : 0, T(0)),
          dplanes(backward ? g.D * ps : 0, T(0)), out(ps, T(0)) {}
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
        for (int64_t row = begin; row < end; ++row) {
            const int64_t u = g.hu == 1 ? 0 : (row / R) % g.heads;
            to_padded(S0 + row * N, b.x.data(), pos);
            conv_planes<DD>(b.x.data(), UK + u * M * D, b.planes.data(), b.ps, g, sh.data());
            softmax_planes(b.planes.data(), b.ps, mask.data(), lse + row * P1, g, joint, false);
            conv_transpose_planes<DD>(b.planes.data(), b.ps, UV + u * M * D, b.out.data(), g, sh.data());
            from_padded(b.out.data(), At + row * N, pos);
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
    const int64_t ustride = M * D;
    const int64_t workers = std::max<int64_t>(1, threads);
    // per-worker pattern gradients, summed at the end (no shared writes while running)
    std::vector<T> gk_all(workers * g.hu * ustride, T(0)), gv_all(workers * g.hu * ustride, T(0));
    parallel_rows(threads, BH * R, [&](int64_t begin, int64_t end, int worker) {
        RowBuffers<T> b(g, true);
        T* gk = gk_all.data() + worker * g.hu * ustride;
        T* gv = gv_all.data() + worker * g.hu * ustride;
        for (int64_t row = begin; row < end; ++row) {
            const int64_t u = g.hu == 1 ? 0 : (row / R) % g.heads;
            const T* uk = UK + u * ustride;
            const T* uv = UV + u * ustride;
            // recompute the weights A from S0 and the log-sum-exp, and At (for dV = At^T dY, done outside)
            to_padded(S0 + row * N, b.x.data(), pos);
            conv_planes<DD>(b.x.data(), uk, b.planes.data(), b.ps, g, sh.data());
            softmax_planes(b.planes.data(), b.ps, mask.data(), const_cast<T*>(lse + row * P1), g, joint, true);
            conv_transpose_planes<DD>(b.planes.data(), b.ps, uv, b.out.data(), g, sh.data());
            from_padded(b.out.data(), At + row * N, pos);
            // dA[d][p] = sum_o UV[o, d] dAt[p + o];  dUV[o, d] += sum_p A[d][p] dAt[p + o]
            to_padded(dAt + row * N, b.dx.data(), pos);
            conv_planes<DD>(b.dx.data(), uv, b.dplanes.data(), b.ps, g, sh.data());
            pattern_grad_planes<DD>(b.planes.data(), b.ps, b.dx.data(), gv + u * ustride, g, sh.data());
            // softmax backward: dS = A * (dA - <A, dA>), the inner product over the normalised set
            for (int64_t d = 0; d < D; ++d) {
                const T* ad = b.planes.data() + d * b.ps;
                T* dd = b.dplanes.data() + d * b.ps;
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
            conv_transpose_planes<DD>(b.dplanes.data(), b.ps, uk, b.out.data(), g, sh.data());
            from_padded(b.out.data(), dS0 + row * N, pos);
            pattern_grad_planes<DD>(b.dplanes.data(), b.ps, b.x.data(), gk + u * ustride, g, sh.data());
        }
    });
    for (int64_t w = 0; w < workers; ++w)
        for (int64_t e = 0; e < g.hu * ustride; ++e) {
            dUK[e] += gk_all[w * g.hu * ustride + e];
            dUV[e] += gv_all[w * g.hu * ustride + e];
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

Geometry make_geometry(const int64_t* dims) {
    // dims: T, H, W, kt, kh, kw, D, heads, hu
    return Geometry{dims[0], dims[1], dims[2], dims[3], dims[4], dims[5], dims[6], dims[7], dims[8]};
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
