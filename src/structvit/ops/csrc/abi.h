// The C side of the contract between the kernels and Python (ops/native.py).
//
// Every kernel takes one argument structure by pointer, then its tensors' data pointers,
// and returns nullptr on success or a message saying which argument it refused. The
// structures are mirrored field by field by ctypes Structures in native.py; the field
// lists below are the single definition on this side, and native.py compares them (names,
// types and size, through structvit_*_args_signature and structvit_*_args_size) and the
// ABI version with its own when it loads the library, so the two can never disagree
// silently. Change a field, here and in native.py, and bump STRUCTVIT_ABI_VERSION.
//
// The *_len fields are the number of elements each tensor's memory holds from its data
// pointer on: the kernels refuse a geometry that would reach past them (a second line of
// defence behind native.py's checks of the same arguments).
#pragma once

#include <cstdint>
#include <initializer_list>

#define STRUCTVIT_ABI_VERSION 4

// Pattern convolutions (pattern_conv_cpu.cpp). The grid side x is (B, heads, N, C) with
// strides (x_sb, x_sh, x_sn) and unit stride in C; the pattern side y is
// (B, heads, D * N', C) with strides (y_sb, y_sh, y_sn); the weight side w is
// (groups, heads, D, M, C) contiguous (groups = 1 except for the weight gradient's
// per-group partial sums). Which of them a kernel reads and which it writes (contiguous)
// is written at each kernel.
#define STRUCTVIT_CONV_ARGS_FIELDS(I64, F64)                                                  \
    I64(B) I64(heads) I64(C) I64(D) I64(T) I64(H) I64(W) I64(kt) I64(kh) I64(kw) I64(st) I64(sh) \
    I64(sw) I64(groups) I64(x_sb) I64(x_sh) I64(x_sn) I64(y_sb) I64(y_sh) I64(y_sn) I64(x_len)    \
    I64(w_len) I64(y_len) I64(threads)

// The fused kernel (fused_cpu.cpp) on BH * R query rows of an N = T * H * W grid: S0, At,
// dAt, dS0 (BH, R, N); lse, rowdot (BH, R, P), P = 1 if joint else D; UK, UV, dUK, dUV
// (hu, M, D), hu = 1 or heads, all contiguous.
#define STRUCTVIT_FUSED_ARGS_FIELDS(I64, F64)                                                    \
    I64(T) I64(H) I64(W) I64(kt) I64(kh) I64(kw) I64(D) I64(heads) I64(hu) I64(BH) I64(R) I64(joint) \
    I64(at_saved) I64(threads) I64(s0_len) I64(at_len) I64(lse_len) I64(uk_len) I64(uv_len)        \
    I64(dat_len) I64(rowdot_len) I64(ds0_len) I64(duk_len) I64(duv_len) F64(scale)

#define STRUCTVIT_DECLARE_I64(name) int64_t name;
#define STRUCTVIT_DECLARE_F64(name) double name;
#define STRUCTVIT_NAME_I64(name) #name ":i64 "
#define STRUCTVIT_NAME_F64(name) #name ":f64 "

struct StructvitConvArgs {
    STRUCTVIT_CONV_ARGS_FIELDS(STRUCTVIT_DECLARE_I64, STRUCTVIT_DECLARE_F64)
};

struct StructvitFusedArgs {
    STRUCTVIT_FUSED_ARGS_FIELDS(STRUCTVIT_DECLARE_I64, STRUCTVIT_DECLARE_F64)
};

namespace structvit {

// a * b into *out; false on overflow or a negative factor
inline bool mul_ok(int64_t a, int64_t b, int64_t* out) {
    return a >= 0 && b >= 0 && !__builtin_mul_overflow(a, b, out);
}

// The product of sizes, or -1 when one is negative or it overflows.
inline int64_t product(std::initializer_list<int64_t> sizes) {
    int64_t p = 1;
    for (const int64_t s : sizes)
        if (!mul_ok(p, s, &p)) return -1;
    return p;
}

// One past the last element a strided (n0, n1, n2, C) block touches, or -1 on overflow;
// 0 for an empty block.
inline int64_t strided_extent(int64_t n0, int64_t n1, int64_t n2, int64_t C, int64_t s0, int64_t s1, int64_t s2) {
    if (n0 == 0 || n1 == 0 || n2 == 0 || C == 0) return 0;
    int64_t a, b, c;
    if (!mul_ok(n0 - 1, s0, &a) || !mul_ok(n1 - 1, s1, &b) || !mul_ok(n2 - 1, s2, &c)) return -1;
    int64_t e;
    if (__builtin_add_overflow(a, b, &e) || __builtin_add_overflow(e, c, &e) || __builtin_add_overflow(e, C, &e))
        return -1;
    return e;
}

}  // namespace structvit
