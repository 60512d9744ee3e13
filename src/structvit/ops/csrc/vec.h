// The target ISA's vector width and register count, and the vector type the CPU kernels
// (fused_cpu.cpp, pattern_conv_cpu.cpp) are written in.
#pragma once

#include <cstdint>
#include <cstring>

// Vector width and register count of the target ISA, fixed at compile time (native.py
// builds one library per target): a block is one float vector register, so that the
// kernels' register tiles (accumulators for D patterns, offsets, channel blocks) fit the register file instead
// of spilling. AVX-512: 16 lanes, 32 registers; AVX2 + FMA: 8 lanes, 16 registers; NEON:
// 4 lanes, 32 registers; anything else (x86-64 baseline SSE2): 4 lanes, 16 registers.
// STRUCTSA_BLK / STRUCTSA_NREG override them (experiments only).
#ifndef STRUCTSA_BLK
#if defined(__AVX512F__)
#define STRUCTSA_BLK 16
#elif defined(__AVX2__) && defined(__FMA__)
#define STRUCTSA_BLK 8
#else
#define STRUCTSA_BLK 4
#endif
#endif
#ifndef STRUCTSA_NREG
#if defined(__AVX512F__) || defined(__aarch64__)
#define STRUCTSA_NREG 32
#else
#define STRUCTSA_NREG 16
#endif
#endif

namespace structsa {

constexpr int64_t BLK = STRUCTSA_BLK;  // float lanes of one vector register
constexpr int NREG = STRUCTSA_NREG;    // vector registers

// BLK floats as one GCC vector (one zmm with AVX-512, one ymm with AVX2; doubles take two),
// so that accumulators stay in registers.
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

}  // namespace structsa
