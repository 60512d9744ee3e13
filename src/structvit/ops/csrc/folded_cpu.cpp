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
// Plain C ABI, no PyTorch headers: built with the system compiler and loaded with ctypes.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

struct Geometry {
    int64_t T, H, W, kt, kh, kw, D, heads, hu;
    int64_t N() const { return T * H * W; }
    int64_t M() const { return kt * kh * kw; }
    int64_t Tp() const { return T + kt - 1; }
    int64_t Hp() const { return H + kh - 1; }
    int64_t Wp() const { return W + kw - 1; }
    int64_t padded() const { return Tp() * Hp() * Wp(); }
};

// Linear offset, in the padded grid, of each window offset o (row-major over kt, kh, kw).
std::vector<int64_t> window_offsets(const Geometry& g) {
    std::vector<int64_t> off;
    for (int64_t a = 0; a < g.kt; ++a)
        for (int64_t b = 0; b < g.kh; ++b)
            for (int64_t c = 0; c < g.kw; ++c) off.push_back((a * g.Hp() + b) * g.Wp() + c);
    return off;
}

// Padded position of every grid position j (the window's top-left corner).
std::vector<int64_t> base_positions(const Geometry& g) {
    std::vector<int64_t> base;
    base.reserve(g.N());
    for (int64_t t = 0; t < g.T; ++t)
        for (int64_t y = 0; y < g.H; ++y)
            for (int64_t x = 0; x < g.W; ++x) base.push_back((t * g.Hp() + y) * g.Wp() + x);
    return base;
}

template <typename T>
void scatter_padded(const T* row, T* pad, const Geometry& g, const std::vector<int64_t>& base) {
    // pad is zero outside the grid; the centre of the window maps j to base[j] + centre.
    const int64_t centre = ((g.kt / 2) * g.Hp() + g.kh / 2) * g.Wp() + g.kw / 2;
    for (int64_t j = 0; j < g.N(); ++j) pad[base[j] + centre] = row[j];
}

// All row kernels are templated on DD, the number of patterns when it is one of the
// common compile-time sizes (the D-loop then unrolls into whole vector registers), or
// 0 for any D read at run time.
template <int DD>
inline int64_t patterns(const Geometry& g) { return DD > 0 ? DD : g.D; }

inline int64_t centre_of(const Geometry& g) { return ((g.kt / 2) * g.Hp() + g.kh / 2) * g.Wp() + g.kw / 2; }

// s[j, d] = sum_o U[o, d] * pad[base[j] + off[o]]   (pad: one value per padded position)
template <int DD, typename T>
void conv_rows(const T* pad, const T* U, T* s, const Geometry& g, const int64_t* base, const int64_t* off) {
    const int64_t D = patterns<DD>(g), M = g.M(), N = g.N();
    for (int64_t j = 0; j < N; ++j) {
        T acc[DD > 0 ? DD : 64];
        T* sj = D <= 64 ? acc : s + j * D;
        for (int64_t d = 0; d < D; ++d) sj[d] = 0;
        const T* pj = pad + base[j];
        for (int64_t o = 0; o < M; ++o) {
            const T p = pj[off[o]];
            const T* uo = U + o * D;
#pragma omp simd
            for (int64_t d = 0; d < D; ++d) sj[d] += p * uo[d];
        }
        if (sj == acc)
            for (int64_t d = 0; d < D; ++d) s[j * D + d] = acc[d];
    }
}

// out[j'] = sum_o sum_d U[o, d] * apad[(base[j'] + 2 centre - off[o]) * D + d]
// the transposed convolution in gather form (apad: D values per padded position).
template <int DD, typename T>
void conv_transpose_rows(const T* apad, const T* U, T* out, const Geometry& g, const int64_t* base,
                         const int64_t* off) {
    const int64_t D = patterns<DD>(g), M = g.M(), N = g.N(), c2 = 2 * centre_of(g);
    for (int64_t j = 0; j < N; ++j) {
        T acc[DD > 0 ? DD : 64] = {};
        T total = 0;
        const T* aj = apad + (base[j] + c2) * D;
        for (int64_t o = 0; o < M; ++o) {
            const T* ao = aj - off[o] * D;
            const T* uo = U + o * D;
            if (D <= 64) {
#pragma omp simd
                for (int64_t d = 0; d < D; ++d) acc[d] += uo[d] * ao[d];
            } else {
                for (int64_t d = 0; d < D; ++d) total += uo[d] * ao[d];
            }
        }
        if (D <= 64)
            for (int64_t d = 0; d < D; ++d) total += acc[d];
        out[j] = total;
    }
}

// acc[o, d] += sum_j a[j, d] * pad[base[j] + off[o]]   (gradient of a pattern)
template <int DD, typename T>
void pattern_grad(const T* a, const T* pad, T* acc, const Geometry& g, const int64_t* base, const int64_t* off) {
    const int64_t D = patterns<DD>(g), M = g.M(), N = g.N();
    for (int64_t j = 0; j < N; ++j) {
        const T* aj = a + j * D;
        const T* pj = pad + base[j];
        for (int64_t o = 0; o < M; ++o) {
            const T p = pj[off[o]];
            T* ao = acc + o * D;
#pragma omp simd
            for (int64_t d = 0; d < D; ++d) ao[d] += p * aj[d];
        }
    }
}

// Copy s (N, D) into the padded (P, D) layout (zero outside the grid is kept from the fill).
template <typename T>
void scatter_rows_padded(const T* s, T* apad, int64_t D, const Geometry& g, const int64_t* base) {
    const int64_t c = centre_of(g);
    for (int64_t j = 0; j < g.N(); ++j) std::memcpy(apad + (base[j] + c) * D, s + j * D, sizeof(T) * D);
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
    T scale;
    std::memcpy(&scale, &bits, sizeof(T));
    return p * scale;
}

// Softmax of s (N, D) in place; writes the log-sum-exp (1 value joint, D values per pattern).
template <typename T>
void softmax_rows(T* s, T* lse, int64_t N, int64_t D, bool joint) {
    if (joint) {
        T mx = -INFINITY;
#pragma omp simd reduction(max : mx)
        for (int64_t e = 0; e < N * D; ++e) mx = std::max(mx, s[e]);
        T sum = 0;
#pragma omp simd reduction(+ : sum)
        for (int64_t e = 0; e < N * D; ++e) {
            s[e] = exp_nonpositive(s[e] - mx);
            sum += s[e];
        }
        const T inv = T(1) / sum;
#pragma omp simd
        for (int64_t e = 0; e < N * D; ++e) s[e] *= inv;
        lse[0] = mx + std::log(sum);
    } else {
        for (int64_t d = 0; d < D; ++d) {
            T mx = -INFINITY;
            for (int64_t j = 0; j < N; ++j) mx = std::max(mx, s[j * D + d]);
            T sum = 0;
#pragma omp simd reduction(+ : sum)
            for (int64_t j = 0; j < N; ++j) {
                T e = exp_nonpositive(s[j * D + d] - mx);
                s[j * D + d] = e;
                sum += e;
            }
            const T inv = T(1) / sum;
            for (int64_t j = 0; j < N; ++j) s[j * D + d] *= inv;
            lse[d] = mx + std::log(sum);
        }
    }
}

// A = exp(s - lse) in place (s - lse <= 0 up to rounding).
template <typename T>
void softmax_from_lse(T* s, const T* lse, int64_t N, int64_t D, bool joint) {
    if (joint) {
        const T l = lse[0];
#pragma omp simd
        for (int64_t e = 0; e < N * D; ++e) s[e] = exp_nonpositive(s[e] - l);
    } else {
        for (int64_t j = 0; j < N; ++j)
#pragma omp simd
            for (int64_t d = 0; d < D; ++d) s[j * D + d] = exp_nonpositive(s[j * D + d] - lse[d]);
    }
}

template <int DD, typename T>
void forward(const T* S0, const T* UK, const T* UV, T* At, T* lse, int64_t BH, int64_t R, const Geometry& g,
             bool joint, int threads) {
    const auto off = window_offsets(g);
    const auto base = base_positions(g);
    const int64_t N = g.N(), D = patterns<DD>(g), P = joint ? 1 : D;
#pragma omp parallel num_threads(threads)
    {
        std::vector<T> pad(g.padded(), T(0)), s(N * D), apad(g.padded() * D, T(0));
#pragma omp for schedule(static)
        for (int64_t row = 0; row < BH * R; ++row) {
            const int64_t u = g.hu == 1 ? 0 : (row / R) % g.heads;
            const T* uk = UK + u * g.M() * D;
            const T* uv = UV + u * g.M() * D;
            scatter_padded(S0 + row * N, pad.data(), g, base);  // padding stays zero
            conv_rows<DD>(pad.data(), uk, s.data(), g, base.data(), off.data());
            softmax_rows(s.data(), lse + row * P, N, D, joint);
            scatter_rows_padded(s.data(), apad.data(), D, g, base.data());
            conv_transpose_rows<DD>(apad.data(), uv, At + row * N, g, base.data(), off.data());
        }
    }
}

template <int DD, typename T>
void backward(const T* S0, const T* dAt, const T* lse, const T* rowdot, const T* UK, const T* UV, T* At, T* dS0,
              T* dUK, T* dUV, int64_t BH, int64_t R, const Geometry& g, bool joint, int threads) {
    const auto off = window_offsets(g);
    const auto base = base_positions(g);
    const int64_t N = g.N(), D = patterns<DD>(g), M = g.M(), P = joint ? 1 : D;
    const int64_t ustride = M * D;
#pragma omp parallel num_threads(threads)
    {
        std::vector<T> s0_pad(g.padded(), T(0)), dat_pad(g.padded(), T(0)), apad(g.padded() * D, T(0));
        std::vector<T> a(N * D), da(N * D);
        std::vector<T> gk(g.hu * ustride, T(0)), gv(g.hu * ustride, T(0));
        std::vector<T> dot(D);
#pragma omp for schedule(static)
        for (int64_t row = 0; row < BH * R; ++row) {
            const int64_t u = g.hu == 1 ? 0 : (row / R) % g.heads;
            const T* uk = UK + u * ustride;
            const T* uv = UV + u * ustride;
            // recompute the weights A from S0 and the log-sum-exp, and At (for dV = At^T dY, done outside)
            scatter_padded(S0 + row * N, s0_pad.data(), g, base);
            conv_rows<DD>(s0_pad.data(), uk, a.data(), g, base.data(), off.data());
            softmax_from_lse(a.data(), lse + row * P, N, D, joint);
            scatter_rows_padded(a.data(), apad.data(), D, g, base.data());
            conv_transpose_rows<DD>(apad.data(), uv, At + row * N, g, base.data(), off.data());
            // dA[j, d] = sum_o UV[o, d] dAt[j + o];  dUV[o, d] += sum_j A[j, d] dAt[j + o]
            scatter_padded(dAt + row * N, dat_pad.data(), g, base);
            conv_rows<DD>(dat_pad.data(), uv, da.data(), g, base.data(), off.data());
            pattern_grad<DD>(a.data(), dat_pad.data(), gv.data() + u * ustride, g, base.data(), off.data());
            // softmax backward: dS = A * (dA - <A, dA>), the inner product over the normalised set
            if (joint) {
                const T r = rowdot[row];
                for (int64_t e = 0; e < N * D; ++e) da[e] = a[e] * (da[e] - r);
            } else {
                std::fill(dot.begin(), dot.end(), T(0));
                for (int64_t j = 0; j < N; ++j)
                    for (int64_t d = 0; d < D; ++d) dot[d] += a[j * D + d] * da[j * D + d];
                for (int64_t j = 0; j < N; ++j)
                    for (int64_t d = 0; d < D; ++d) da[j * D + d] = a[j * D + d] * (da[j * D + d] - dot[d]);
            }
            // dS0[j'] = sum_o sum_d UK[o, d] dS[j' - o, d];  dUK[o, d] += sum_j dS[j, d] S0[j + o]
            scatter_rows_padded(da.data(), apad.data(), D, g, base.data());
            conv_transpose_rows<DD>(apad.data(), uk, dS0 + row * N, g, base.data(), off.data());
            pattern_grad<DD>(da.data(), s0_pad.data(), gk.data() + u * ustride, g, base.data(), off.data());
        }
#pragma omp critical
        {
            for (int64_t e = 0; e < g.hu * ustride; ++e) {
                dUK[e] += gk[e];
                dUV[e] += gv[e];
            }
        }
    }
}

// Dispatch on the number of patterns: compile-time sizes for the common D.
#define STRUCTSA_DISPATCH_D(D, FN, ...)        \
    switch (D) {                              \
        case 1: FN<1>(__VA_ARGS__); break;    \
        case 2: FN<2>(__VA_ARGS__); break;    \
        case 4: FN<4>(__VA_ARGS__); break;    \
        case 8: FN<8>(__VA_ARGS__); break;    \
        case 16: FN<16>(__VA_ARGS__); break;  \
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
