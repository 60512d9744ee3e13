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
// unit stride in C and strides (gb, gh, gn) over (B, heads, D N') (the caller passes it
// contiguous: reading SDPA's (B, D N', heads, C) gradient in place measured slower than
// one copy); gx is (B, heads, N, C) contiguous; the weight gradient is written per batch group as
// (G, heads, D, M, C), summed over G by the caller (so no two threads write one element,
// and the sum does not depend on which thread ran what).
//
// Every inner loop runs over the C channels of one position, contiguous in x, w, y and
// the gradients, in vectors of the target's width (vec.h; -march, see native.py) with
// register tiles (DT, CT below); channels past the last whole vector go scalar.
// PyTorch's depthwise convolutions with D outputs per channel do the same multiply-adds
// several times slower on the CPU, and need a layout copy on each side.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "abi.h"
#include "parallel.h"
#include "vec.h"

namespace {

using structsa::BLK;
using structsa::load_vec;
using structsa::parallel_rows;
using structsa::store_vec;
using structsa::Vec;

struct ConvGeometry {
    int64_t B, heads, C, D, T, H, W, kt, kh, kw, st, sh, sw, groups;
    int64_t To() const { return (T + st - 1) / st; }
    int64_t Ho() const { return (H + sh - 1) / sh; }
    int64_t Wo() const { return (W + sw - 1) / sw; }
    int64_t N() const { return T * H * W; }
    int64_t No() const { return To() * Ho() * Wo(); }
    int64_t M() const { return kt * kh * kw; }
};

ConvGeometry make_conv_geometry(const StructvitConvArgs& a) {
    return ConvGeometry{a.B, a.heads, a.C, a.D, a.T, a.H, a.W, a.kt, a.kh, a.kw, a.st, a.sh, a.sw, a.groups};
}

// Which side of the convolution a kernel writes (contiguous); the others it reads through
// their strides.
enum class Writes { y, x, w };

// The kernels' own checks of their arguments (native.py checks the tensors first): a
// consistent geometry whose sizes fit in int64, an output laid out contiguously, and
// tensors whose memory holds every element the geometry reaches. nullptr: accepted.
const char* check_conv(const StructvitConvArgs& a, Writes writes, const void* x, const void* w, const void* y) {
    using structvit::product;
    using structvit::strided_extent;
    if (a.B < 0 || a.heads < 0 || a.C < 0 || a.D < 0) return "B, heads, C and D must be >= 0";
    if (a.T < 1 || a.H < 1 || a.W < 1) return "the grid sizes T, H, W must be >= 1";
    if (a.kt < 1 || a.kh < 1 || a.kw < 1 || a.kt % 2 == 0 || a.kh % 2 == 0 || a.kw % 2 == 0)
        return "the window sizes kt, kh, kw must be odd and >= 1";
    if (a.st < 1 || a.sh < 1 || a.sw < 1) return "the strides st, sh, sw must be >= 1";
    if (a.groups < 1 || (writes == Writes::w ? a.groups > std::max<int64_t>(a.B, 1) : a.groups != 1))
        return "groups must be 1, or between 1 and B for the weight gradient";
    if (a.x_sb < 0 || a.x_sh < 0 || a.x_sn < 0 || a.y_sb < 0 || a.y_sh < 0 || a.y_sn < 0)
        return "the strides of x and y must be >= 0";
    if (a.threads < 1 || a.threads > 1 << 20) return "threads must be between 1 and 2^20";
    const ConvGeometry g = make_conv_geometry(a);
    const int64_t n = product({a.T, a.H, a.W}), m = product({a.kt, a.kh, a.kw});
    const int64_t no = product({g.To(), g.Ho(), g.Wo()}), dno = product({a.D, no < 0 ? -1 : no});
    const int64_t rows = product({a.B, a.heads, std::max(n, dno)});
    const int64_t x_ext = n < 0 ? -1 : strided_extent(a.B, a.heads, n, a.C, a.x_sb, a.x_sh, a.x_sn);
    const int64_t y_ext = dno < 0 ? -1 : strided_extent(a.B, a.heads, dno, a.C, a.y_sb, a.y_sh, a.y_sn);
    const int64_t w_ext = product({writes == Writes::w ? a.groups : 1, a.heads, a.D, m, a.C});
    if (n < 0 || m < 0 || no < 0 || dno < 0 || rows < 0 || x_ext < 0 || y_ext < 0 || w_ext < 0)
        return "the sizes overflow int64";
    if (writes == Writes::y && (a.y_sn != a.C || a.y_sh != dno * a.C || a.y_sb != a.heads * dno * a.C))
        return "y, written, must be contiguous: strides (heads * D * N' * C, D * N' * C, C)";
    if (writes == Writes::x && (a.x_sn != a.C || a.x_sh != n * a.C || a.x_sb != a.heads * n * a.C))
        return "x, written, must be contiguous: strides (heads * N * C, N * C, C)";
    if (x_ext > a.x_len) return "x's memory (x_len) is smaller than its shape and strides reach";
    if (y_ext > a.y_len) return "y's memory (y_len) is smaller than its shape and strides reach";
    if (w_ext > a.w_len) return "w's memory (w_len) is smaller than (groups, heads, D, M, C)";
    if ((x_ext > 0 && x == nullptr) || (y_ext > 0 && y == nullptr) || (w_ext > 0 && w == nullptr))
        return "a tensor the geometry needs is missing (null pointer)";
    return nullptr;
}

struct Tap {
    int64_t pos, o;  // a grid position (input for forward, output for grad input) and the window offset
};

// The window offsets of output position (t, y, x) that land on the grid, with the input
// positions they read.
void taps_of_output(const ConvGeometry& g, int64_t t, int64_t y, int64_t x, std::vector<Tap>& taps) {
    taps.clear();
    for (int64_t a = 0; a < g.kt; ++a) {
        const int64_t ti = t * g.st + a - g.kt / 2;
        if (ti < 0 || ti >= g.T) continue;
        for (int64_t b = 0; b < g.kh; ++b) {
            const int64_t yi = y * g.sh + b - g.kh / 2;
            if (yi < 0 || yi >= g.H) continue;
            for (int64_t c = 0; c < g.kw; ++c) {
                const int64_t xi = x * g.sw + c - g.kw / 2;
                if (xi < 0 || xi >= g.W) continue;
                taps.push_back({(ti * g.H + yi) * g.W + xi, (a * g.kh + b) * g.kw + c});
            }
        }
    }
}

// The output position along one axis whose window reaches input i at offset o, or -1.
inline int64_t source(int64_t i, int64_t o, int64_t m, int64_t s, int64_t n_out) {
    const int64_t num = i + m / 2 - o;
    if (num < 0 || num % s) return -1;
    const int64_t j = num / s;
    return j < n_out ? j : -1;
}

// The (output position, offset) pairs that read input position (t, y, x).
void taps_of_input(const ConvGeometry& g, int64_t t, int64_t y, int64_t x, std::vector<Tap>& taps) {
    taps.clear();
    for (int64_t a = 0; a < g.kt; ++a) {
        const int64_t to = source(t, a, g.kt, g.st, g.To());
        if (to < 0) continue;
        for (int64_t b = 0; b < g.kh; ++b) {
            const int64_t yo = source(y, b, g.kh, g.sh, g.Ho());
            if (yo < 0) continue;
            for (int64_t c = 0; c < g.kw; ++c) {
                const int64_t xo = source(x, c, g.kw, g.sw, g.Wo());
                if (xo < 0) continue;
                taps.push_back({(to * g.Ho() + yo) * g.Wo() + xo, (a * g.kh + b) * g.kw + c});
            }
        }
    }
}

// The taps of every output position (forward) or input position (input gradient), built
// once per call and shared by all (batch, head) rows: taps of position p are
// taps[start[p] .. start[p + 1]).
struct TapTable {
    std::vector<int64_t> start;
    std::vector<Tap> taps;
};

// taps_of: taps_of_output over the output grid, or taps_of_input over the input grid.
template <typename Fn>
TapTable tap_table(const ConvGeometry& g, int64_t T, int64_t H, int64_t W, Fn taps_of) {
    TapTable table;
    table.start.reserve(T * H * W + 1);
    table.start.push_back(0);
    std::vector<Tap> one;
    for (int64_t t = 0; t < T; ++t)
        for (int64_t y = 0; y < H; ++y)
            for (int64_t x = 0; x < W; ++x) {
                taps_of(g, t, y, x, one);
                table.taps.insert(table.taps.end(), one.begin(), one.end());
                table.start.push_back(int64_t(table.taps.size()));
            }
    return table;
}

// Register tiles: the forward keeps DT patterns of one channel block in registers (the
// input vector is loaded once for all of them); the gradients CT channel blocks of one
// row. Each accumulator is its own FMA dependency chain, so that the FMA latency is hidden.
constexpr int64_t DT = 4, CT = 4;

// ND patterns of one channel block of output row yj: the input vector of each offset is
// loaded once for all of them.
template <int ND, typename T>
inline void forward_block(const T* xb, int64_t xstep, const T* wd, int64_t wstep, T* yj, int64_t ystep,
                          const Tap* taps, const Tap* taps_end, int64_t ostep) {
    using V = typename Vec<T>::type;
    V acc[ND] = {};
    for (const Tap* tap_it = taps; tap_it != taps_end; ++tap_it) {
        const Tap& tap = *tap_it;
        const V xv = load_vec(xb + tap.pos * xstep);
        const T* wo = wd + tap.o * ostep;
        for (int dd = 0; dd < ND; ++dd) acc[dd] += xv * load_vec(wo + dd * wstep);
    }
    for (int dd = 0; dd < ND; ++dd) store_vec(yj + dd * ystep, acc[dd]);
}

template <typename T>
void conv_forward(const T* x, const int64_t* xs, const T* w, T* y, const ConvGeometry& g, int threads) {
    const int64_t C = g.C, M = g.M(), No = g.No(), Ho = g.Ho(), Wo = g.Wo(), Cv = C / BLK * BLK;
    // one row per (b, h, output position): it writes y[b, h, :, j', :]
    const TapTable table = tap_table(g, g.To(), Ho, Wo, taps_of_output);
    parallel_rows(threads, g.B * g.heads * No, [&](int64_t begin, int64_t end, int) {
        for (int64_t row = begin; row < end; ++row) {
            const int64_t j = row % No, bh = row / No, h = bh % g.heads, b = bh / g.heads;
            const Tap *taps = table.taps.data() + table.start[j], *taps_end = table.taps.data() + table.start[j + 1];
            const T* xb = x + b * xs[0] + h * xs[1];
            const T* wh = w + h * g.D * M * C;
            T* yj = y + (bh * g.D * No + j) * C;  // pattern d at yj + d * No * C
            for (int64_t d0 = 0; d0 < g.D; d0 += DT) {
                for (int64_t c0 = 0; c0 < Cv; c0 += BLK) {
                    const T* wd = wh + d0 * M * C + c0;
                    T* yd = yj + d0 * No * C + c0;
                    switch (std::min(DT, g.D - d0)) {
                        case 1: forward_block<1>(xb + c0, xs[2], wd, M * C, yd, No * C, taps, taps_end, C); break;
                        case 2: forward_block<2>(xb + c0, xs[2], wd, M * C, yd, No * C, taps, taps_end, C); break;
                        case 3: forward_block<3>(xb + c0, xs[2], wd, M * C, yd, No * C, taps, taps_end, C); break;
                        default: forward_block<4>(xb + c0, xs[2], wd, M * C, yd, No * C, taps, taps_end, C); break;
                    }
                }
                for (int64_t dd = 0; dd < std::min(DT, g.D - d0); ++dd)  // channels past the last whole vector
                    for (int64_t c = Cv; c < C; ++c) {
                        T acc = 0;
                        for (const Tap* tap = taps; tap != taps_end; ++tap)
                            acc += xb[tap->pos * xs[2] + c] * wh[((d0 + dd) * M + tap->o) * C + c];
                        yj[(d0 + dd) * No * C + c] = acc;
                    }
            }
        }
    });
}

// NC channel blocks of the input gradient at one position: the gradients of every output
// row that read it (each pattern d at each tap's output position) times the weights.
template <int NC, typename T>
inline void input_block(const T* gyb, int64_t gstep, int64_t pstep, const T* wh, int64_t C, int64_t M, int64_t D,
                        const Tap* taps, const Tap* taps_end, T* out) {
    using V = typename Vec<T>::type;
    V acc[NC] = {};
    for (const Tap* tap = taps; tap != taps_end; ++tap)
        for (int64_t d = 0; d < D; ++d) {
            const T* gr = gyb + d * pstep + tap->pos * gstep;
            const T* wr = wh + (d * M + tap->o) * C;
            for (int k = 0; k < NC; ++k) acc[k] += load_vec(gr + k * BLK) * load_vec(wr + k * BLK);
        }
    for (int k = 0; k < NC; ++k) store_vec(out + k * BLK, acc[k]);
}

template <typename T>
void conv_grad_input(const T* gy, const int64_t* gs, const T* w, T* gx, const ConvGeometry& g, int threads) {
    const int64_t C = g.C, M = g.M(), No = g.No(), N = g.N(), Cv = C / BLK * BLK, pstep = No * gs[2];
    // one row per (b, h, input position): it gathers gx[b, h, j, :]
    const TapTable table = tap_table(g, g.T, g.H, g.W, taps_of_input);
    parallel_rows(threads, g.B * g.heads * N, [&](int64_t begin, int64_t end, int) {
        for (int64_t row = begin; row < end; ++row) {
            const int64_t p = row % N, bh = row / N, h = bh % g.heads, b = bh / g.heads;
            const Tap *taps = table.taps.data() + table.start[p], *taps_end = table.taps.data() + table.start[p + 1];
            const T* gyb = gy + b * gs[0] + h * gs[1];
            const T* wh = w + h * g.D * M * C;
            T* out = gx + row * C;
            for (int64_t c0 = 0; c0 < Cv; c0 += CT * BLK) {
                switch (std::min(CT, (Cv - c0) / BLK)) {
                    case 1: input_block<1>(gyb + c0, gs[2], pstep, wh + c0, C, M, g.D, taps, taps_end, out + c0); break;
                    case 2: input_block<2>(gyb + c0, gs[2], pstep, wh + c0, C, M, g.D, taps, taps_end, out + c0); break;
                    case 3: input_block<3>(gyb + c0, gs[2], pstep, wh + c0, C, M, g.D, taps, taps_end, out + c0); break;
                    default: input_block<4>(gyb + c0, gs[2], pstep, wh + c0, C, M, g.D, taps, taps_end, out + c0); break;
                }
            }
            for (int64_t c = Cv; c < C; ++c) {  // channels past the last whole vector
                T acc = 0;
                for (const Tap* tap = taps; tap != taps_end; ++tap)
                    for (int64_t d = 0; d < g.D; ++d) acc += gyb[d * pstep + tap->pos * gs[2] + c] * wh[(d * M + tap->o) * C + c];
                out[c] = acc;
            }
        }
    });
}

// The output positions along one axis whose window offset o stays on the grid: [lo, hi).
inline void valid_range(int64_t o, int64_t m, int64_t s, int64_t n, int64_t n_out, int64_t& lo, int64_t& hi) {
    const int64_t shift = o - m / 2;  // input = s * j + shift
    lo = shift >= 0 ? 0 : (-shift + s - 1) / s;
    hi = std::min(n_out, n - shift > 0 ? (n - shift + s - 1) / s : 0);
    if (hi < lo) hi = lo;
}

// NC channel blocks of one offset's weight gradient over one output row: the dot product
// of the row's gradients gr with the inputs xr it read, for xo in [x0, x1).
template <int NC, typename T>
inline void weight_row(const T* gr, int64_t gstep, const T* xr, int64_t xstep, int64_t x0, int64_t x1, T* acc_o) {
    using V = typename Vec<T>::type;
    V acc[NC] = {};
    for (int64_t xo = x0; xo < x1; ++xo)
        for (int k = 0; k < NC; ++k) acc[k] += load_vec(gr + xo * gstep + k * BLK) * load_vec(xr + xo * xstep + k * BLK);
    for (int k = 0; k < NC; ++k) store_vec(acc_o + k * BLK, load_vec(acc_o + k * BLK) + acc[k]);
}

template <typename T>
void conv_grad_weight(const T* x, const int64_t* xs, const T* gy, const int64_t* gs, T* gw_groups,
                      const ConvGeometry& g, int threads) {
    const int64_t C = g.C, M = g.M(), No = g.No(), Ho = g.Ho(), Wo = g.Wo(), Cv = C / BLK * BLK;
    const int64_t per_group = (g.B + g.groups - 1) / g.groups, gstep = gs[2], xstep = g.sw * xs[2];
    // one task per (batch group, h, d): it sums into its own (M, C) slice of gw_groups. Output
    // row by output row, all offsets of a row in turn, so that the row's gradients and the
    // input rows they read stay in L1 while every offset uses them
    parallel_rows(threads, g.groups * g.heads * g.D, [&](int64_t begin, int64_t end, int) {
        for (int64_t task = begin; task < end; ++task) {
            const int64_t d = task % g.D, h = task / g.D % g.heads, grp = task / (g.D * g.heads);
            T* acc_all = gw_groups + task * M * C;
            std::memset(acc_all, 0, sizeof(T) * M * C);
            for (int64_t b = grp * per_group; b < std::min(g.B, (grp + 1) * per_group); ++b) {
                const T* xb = x + b * xs[0] + h * xs[1];
                const T* gyd = gy + b * gs[0] + h * gs[1] + d * No * gstep;
                for (int64_t to = 0; to < g.To(); ++to)
                    for (int64_t yo = 0; yo < Ho; ++yo) {
                        const T* gr = gyd + (to * Ho + yo) * Wo * gstep;
                        for (int64_t a = 0; a < g.kt; ++a) {
                            const int64_t ti = to * g.st + a - g.kt / 2;
                            if (ti < 0 || ti >= g.T) continue;
                            for (int64_t bo = 0; bo < g.kh; ++bo) {
                                const int64_t yi = yo * g.sh + bo - g.kh / 2;
                                if (yi < 0 || yi >= g.H) continue;
                                for (int64_t co = 0; co < g.kw; ++co) {
                                    int64_t x0, x1;
                                    valid_range(co, g.kw, g.sw, g.W, Wo, x0, x1);
                                    // input of output column xo: column xo * sw + co - kw / 2
                                    const T* xr = xb + ((ti * g.H + yi) * g.W + co - g.kw / 2) * xs[2];
                                    T* acc_o = acc_all + ((a * g.kh + bo) * g.kw + co) * C;
                                    for (int64_t c0 = 0; c0 < Cv; c0 += CT * BLK) {
                                        const T *gc = gr + c0, *xc = xr + c0;
                                        switch (std::min(CT, (Cv - c0) / BLK)) {
                                            case 1: weight_row<1>(gc, gstep, xc, xstep, x0, x1, acc_o + c0); break;
                                            case 2: weight_row<2>(gc, gstep, xc, xstep, x0, x1, acc_o + c0); break;
                                            case 3: weight_row<3>(gc, gstep, xc, xstep, x0, x1, acc_o + c0); break;
                                            default: weight_row<4>(gc, gstep, xc, xstep, x0, x1, acc_o + c0); break;
                                        }
                                    }
                                    for (int64_t c = Cv; c < C; ++c) {  // channels past the last whole vector
                                        T sum = 0;
                                        for (int64_t xo = x0; xo < x1; ++xo) sum += gr[xo * gstep + c] * xr[xo * xstep + c];
                                        acc_o[c] += sum;
                                    }
                                }
                            }
                        }
                    }
            }
        }
    });
}

// Each kernel: the checks, then nothing to do for an empty tensor, then the work.
template <typename T>
const char* pattern_conv_forward(const StructvitConvArgs* a, const T* x, const T* w, T* y) {
    if (a == nullptr) return "the argument structure is missing";
    if (const char* refused = check_conv(*a, Writes::y, x, w, y)) return refused;
    const ConvGeometry g = make_conv_geometry(*a);
    if (g.B * g.heads * g.D * g.C == 0) return nullptr;
    const int64_t xs[3] = {a->x_sb, a->x_sh, a->x_sn};
    conv_forward(x, xs, w, y, g, int(a->threads));
    return nullptr;
}

template <typename T>
const char* pattern_conv_grad_input(const StructvitConvArgs* a, const T* gy, const T* w, T* gx) {
    if (a == nullptr) return "the argument structure is missing";
    if (const char* refused = check_conv(*a, Writes::x, gx, w, gy)) return refused;
    const ConvGeometry g = make_conv_geometry(*a);
    if (g.B * g.heads * g.C == 0) return nullptr;
    const int64_t gs[3] = {a->y_sb, a->y_sh, a->y_sn};
    conv_grad_input(gy, gs, w, gx, g, int(a->threads));
    return nullptr;
}

template <typename T>
const char* pattern_conv_grad_weight(const StructvitConvArgs* a, const T* x, const T* gy, T* gw_groups) {
    if (a == nullptr) return "the argument structure is missing";
    if (const char* refused = check_conv(*a, Writes::w, x, gw_groups, gy)) return refused;
    const ConvGeometry g = make_conv_geometry(*a);
    if (g.heads * g.D * g.C == 0) return nullptr;
    const int64_t xs[3] = {a->x_sb, a->x_sh, a->x_sn}, gs[3] = {a->y_sb, a->y_sh, a->y_sn};
    conv_grad_weight(x, xs, gy, gs, gw_groups, g, int(a->threads));
    return nullptr;
}

}  // namespace

extern "C" {

// forward: reads x and w (heads, D, M, C); writes y (B, heads, D * N', C)
const char* structvit_pattern_conv_forward_f32(const StructvitConvArgs* a, const float* x, const float* w, float* y) {
    return pattern_conv_forward(a, x, w, y);
}

const char* structvit_pattern_conv_forward_f64(const StructvitConvArgs* a, const double* x, const double* w,
                                               double* y) {
    return pattern_conv_forward(a, x, w, y);
}

// grad input: reads gy (the y side) and w; writes gx (the x side, B, heads, N, C)
const char* structvit_pattern_conv_grad_input_f32(const StructvitConvArgs* a, const float* gy, const float* w,
                                                  float* gx) {
    return pattern_conv_grad_input(a, gy, w, gx);
}

const char* structvit_pattern_conv_grad_input_f64(const StructvitConvArgs* a, const double* gy, const double* w,
                                                  double* gx) {
    return pattern_conv_grad_input(a, gy, w, gx);
}

// grad weight: reads x and gy; writes per-group partial sums (groups, heads, D, M, C)
const char* structvit_pattern_conv_grad_weight_f32(const StructvitConvArgs* a, const float* x, const float* gy,
                                                   float* gw_groups) {
    return pattern_conv_grad_weight(a, x, gy, gw_groups);
}

const char* structvit_pattern_conv_grad_weight_f64(const StructvitConvArgs* a, const double* x, const double* gy,
                                                   double* gw_groups) {
    return pattern_conv_grad_weight(a, x, gy, gw_groups);
}

}  // extern "C"
