// Pattern convolutions of the keyconv backend (backends/keyconv.py, layout "native").
//
// keyconv computes StructSA as attention of Q over the D * N' keys and values convolved
// with the D patterns. These kernels compute that depthwise, strided convolution of a
// token map straight into the layout scaled_dot_product_attention reads, and its two
// gradients:
//   forward    : y[b, h, d, j', c] = sum_o w[h, d, o, c] x[b, h, s j' + o - m // 2, c]
//   grad input : gx[b, h, j, c]    = sum_{d, o, j' : s j' + o - m // 2 = j} gy[b, h, d, j', c] w[h, d, o, c]
//   grad weight: gw[h, d, o, c]    = sum_{b, j'} gy[b, h, d, j', c] x[b, h, s j' + o - m // 2, c]
// (zero padding m // 2, per axis, of a window of m and a stride of s along each of the
// (T, H, W) axes; positions outside the grid contribute nothing.)
//
// Layouts (elements): x has unit stride in C and strides (sb, sh, sn) over (B, heads, N)
// (q, k, v are usually views of one qkv projection); w is (heads, D, M, C) contiguous,
// offset-major (M = kt kh kw); y is (B, heads, D, N', C) contiguous; gy is y's shape with
// unit stride in C and strides (gb, gh, gn) over (B, heads, D N') (SDPA's backward returns
// (B, D N', heads, C) memory, read as it is); gx is
// (B, heads, N, C) contiguous; the weight gradient is written per batch group as
// (G, heads, D, M, C), summed over G by the caller (so no two threads write one element,
// and the sum does not depend on which thread ran what).
//
// Every inner loop runs over the C channels of one position, contiguous in x, w, y and
// the gradients, so that it vectorises at the target's width (-march, see native.py).
// PyTorch's depthwise convolutions with D outputs per channel do the same multiply-adds
// several times slower on the CPU, and need a layout copy on each side.
#include <cstdint>
#include <cstring>
#include <vector>

#include "parallel.h"

namespace {

using structsa::parallel_rows;

struct ConvGeometry {
    // dims: B, heads, C, D, T, H, W, kt, kh, kw, st, sh, sw, groups
    int64_t B, heads, C, D, T, H, W, kt, kh, kw, st, sh, sw, groups;
    int64_t To() const { return (T + st - 1) / st; }
    int64_t Ho() const { return (H + sh - 1) / sh; }
    int64_t Wo() const { return (W + sw - 1) / sw; }
    int64_t N() const { return T * H * W; }
    int64_t No() const { return To() * Ho() * Wo(); }
    int64_t M() const { return kt * kh * kw; }
};

ConvGeometry make_conv_geometry(const int64_t* d) {
    return ConvGeometry{d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7], d[8], d[9], d[10], d[11], d[12], d[13]};
}

template <typename T>
inline void fma_row(T* __restrict acc, const T* __restrict a, const T* __restrict b, int64_t C) {
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) acc[c] += a[c] * b[c];
}

// Calls fn(input position, offset) for every window offset of output position (t, y, x)
// that lands on the grid.
template <typename Fn>
inline void for_each_tap(const ConvGeometry& g, int64_t t, int64_t y, int64_t x, Fn fn) {
    for (int64_t a = 0; a < g.kt; ++a) {
        const int64_t ti = t * g.st + a - g.kt / 2;
        if (ti < 0 || ti >= g.T) continue;
        for (int64_t b = 0; b < g.kh; ++b) {
            const int64_t yi = y * g.sh + b - g.kh / 2;
            if (yi < 0 || yi >= g.H) continue;
            for (int64_t c = 0; c < g.kw; ++c) {
                const int64_t xi = x * g.sw + c - g.kw / 2;
                if (xi < 0 || xi >= g.W) continue;
                fn((ti * g.H + yi) * g.W + xi, (a * g.kh + b) * g.kw + c);
            }
        }
    }
}

// The output position a window offset o of axis length n, window m and stride s reaches
// input position i from, or -1.
inline int64_t source(int64_t i, int64_t o, int64_t m, int64_t s, int64_t n_out) {
    const int64_t num = i + m / 2 - o;
    if (num < 0 || num % s) return -1;
    const int64_t j = num / s;
    return j < n_out ? j : -1;
}

template <typename T>
void conv_forward(const T* x, const int64_t* xs, const T* w, T* y, const ConvGeometry& g, int threads) {
    const int64_t C = g.C, M = g.M(), No = g.No(), Ho = g.Ho(), Wo = g.Wo();
    // one task per (b, h, d): its output plane (N', C) is written by one thread
    parallel_rows(threads, g.B * g.heads * g.D, [&](int64_t begin, int64_t end, int) {
        for (int64_t task = begin; task < end; ++task) {
            const int64_t d = task % g.D, bh = task / g.D, h = bh % g.heads, b = bh / g.heads;
            const T* xb = x + b * xs[0] + h * xs[1];
            const T* wd = w + (h * g.D + d) * M * C;
            T* yd = y + task * No * C;
            std::memset(yd, 0, sizeof(T) * No * C);
            for (int64_t to = 0; to < g.To(); ++to)
                for (int64_t yo = 0; yo < Ho; ++yo)
                    for (int64_t xo = 0; xo < Wo; ++xo) {
                        T* row = yd + ((to * Ho + yo) * Wo + xo) * C;
                        for_each_tap(g, to, yo, xo, [&](int64_t j, int64_t o) {
                            fma_row(row, xb + j * xs[2], wd + o * C, C);
                        });
                    }
        }
    });
}

template <typename T>
void conv_grad_input(const T* gy, const int64_t* gs, const T* w, T* gx, const ConvGeometry& g, int threads) {
    const int64_t C = g.C, M = g.M(), No = g.No(), Ho = g.Ho(), Wo = g.Wo(), N = g.N();
    // one task per (b, h): it gathers into its own (N, C) plane of gx
    parallel_rows(threads, g.B * g.heads, [&](int64_t begin, int64_t end, int) {
        for (int64_t bh = begin; bh < end; ++bh) {
            const int64_t h = bh % g.heads, b = bh / g.heads;
            const T* gyb = gy + b * gs[0] + h * gs[1];
            const T* wh = w + h * g.D * M * C;
            T* gxb = gx + bh * N * C;
            std::memset(gxb, 0, sizeof(T) * N * C);
            for (int64_t ti = 0; ti < g.T; ++ti)
                for (int64_t yi = 0; yi < g.H; ++yi)
                    for (int64_t xi = 0; xi < g.W; ++xi) {
                        T* row = gxb + ((ti * g.H + yi) * g.W + xi) * C;
                        for (int64_t a = 0; a < g.kt; ++a) {
                            const int64_t to = source(ti, a, g.kt, g.st, g.To());
                            if (to < 0) continue;
                            for (int64_t b = 0; b < g.kh; ++b) {
                                const int64_t yo = source(yi, b, g.kh, g.sh, Ho);
                                if (yo < 0) continue;
                                for (int64_t c = 0; c < g.kw; ++c) {
                                    const int64_t xo = source(xi, c, g.kw, g.sw, Wo);
                                    if (xo < 0) continue;
                                    const int64_t j = (to * Ho + yo) * Wo + xo, o = (a * g.kh + b) * g.kw + c;
                                    for (int64_t d = 0; d < g.D; ++d)
                                        fma_row(row, gyb + (d * No + j) * gs[2], wh + (d * M + o) * C, C);
                                }
                            }
                        }
                    }
        }
    });
}

template <typename T>
void conv_grad_weight(const T* x, const int64_t* xs, const T* gy, const int64_t* gs, T* gw_groups, const ConvGeometry& g,
                      int threads) {
    const int64_t C = g.C, M = g.M(), No = g.No(), Ho = g.Ho(), Wo = g.Wo();
    const int64_t per_group = (g.B + g.groups - 1) / g.groups;
    // one task per (batch group, h, d): it sums into its own (M, C) slice of gw_groups
    parallel_rows(threads, g.groups * g.heads * g.D, [&](int64_t begin, int64_t end, int) {
        for (int64_t task = begin; task < end; ++task) {
            const int64_t d = task % g.D, h = task / g.D % g.heads, grp = task / (g.D * g.heads);
            T* acc = gw_groups + task * M * C;
            std::memset(acc, 0, sizeof(T) * M * C);
            for (int64_t b = grp * per_group; b < std::min(g.B, (grp + 1) * per_group); ++b) {
                const T* xb = x + b * xs[0] + h * xs[1];
                const T* gyd = gy + b * gs[0] + h * gs[1] + d * No * gs[2];
                for (int64_t to = 0; to < g.To(); ++to)
                    for (int64_t yo = 0; yo < Ho; ++yo)
                        for (int64_t xo = 0; xo < Wo; ++xo) {
                            const T* grow = gyd + ((to * Ho + yo) * Wo + xo) * gs[2];
                            for_each_tap(g, to, yo, xo, [&](int64_t j, int64_t o) {
                                fma_row(acc + o * C, grow, xb + j * xs[2], C);
                            });
                        }
            }
        }
    });
}

}  // namespace

extern "C" {

void structsa_pattern_conv_forward_f32(const float* x, const int64_t* xs, const float* w, float* y,
                                       const int64_t* dims, int threads) {
    conv_forward(x, xs, w, y, make_conv_geometry(dims), threads);
}

void structsa_pattern_conv_forward_f64(const double* x, const int64_t* xs, const double* w, double* y,
                                       const int64_t* dims, int threads) {
    conv_forward(x, xs, w, y, make_conv_geometry(dims), threads);
}

void structsa_pattern_conv_grad_input_f32(const float* gy, const int64_t* gs, const float* w, float* gx, const int64_t* dims,
                                          int threads) {
    conv_grad_input(gy, gs, w, gx, make_conv_geometry(dims), threads);
}

void structsa_pattern_conv_grad_input_f64(const double* gy, const int64_t* gs, const double* w, double* gx, const int64_t* dims,
                                          int threads) {
    conv_grad_input(gy, gs, w, gx, make_conv_geometry(dims), threads);
}

void structsa_pattern_conv_grad_weight_f32(const float* x, const int64_t* xs, const float* gy, const int64_t* gs, float* gw_groups,
                                           const int64_t* dims, int threads) {
    conv_grad_weight(x, xs, gy, gs, gw_groups, make_conv_geometry(dims), threads);
}

void structsa_pattern_conv_grad_weight_f64(const double* x, const int64_t* xs, const double* gy, const int64_t* gs, double* gw_groups,
                                           const int64_t* dims, int threads) {
    conv_grad_weight(x, xs, gy, gs, gw_groups, make_conv_geometry(dims), threads);
}

}  // extern "C"
