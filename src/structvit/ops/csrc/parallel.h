// Thread ranges shared by the CPU kernels (fused_cpu.cpp, pattern_conv_cpu.cpp).
//
// With STRUCTSA_OPENMP (native.py defines it where PyTorch runs on GNU OpenMP) the ranges
// go to PyTorch's own OpenMP pool; otherwise to std::threads (a second OpenMP runtime
// would spin against PyTorch's for the same cores).
#pragma once

#include <algorithm>
#include <cstdint>
#include <thread>
#include <vector>

namespace structsa {

// Run fn(begin, end, range) over [0, total) in contiguous ranges, range < row_ranges(...)
// numbering them in order (for per-range accumulators, summed in that order at the end, so
// results do not depend on which thread ran what). With OpenMP the rows go in about four
// ranges per thread, handed out dynamically: on a shared or oversubscribed machine a thread
// that loses its core for a while takes fewer ranges instead of holding up the others at
// the end of a static split. std::threads: one range per thread.
inline int64_t row_ranges(int threads, int64_t total) {
    const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(threads, total));
#ifdef STRUCTSA_OPENMP
    return workers == 1 ? 1 : std::min<int64_t>(total, workers * 4);
#else
    return workers;
#endif
}

template <typename Fn>
void parallel_rows(int threads, int64_t total, Fn fn) {
    const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(threads, total));
    const int64_t ranges = row_ranges(threads, total), step = (total + ranges - 1) / ranges;
    if (workers == 1) {
        fn(int64_t(0), total, 0);
        return;
    }
#ifdef STRUCTSA_OPENMP
#pragma omp parallel for num_threads(workers) schedule(dynamic, 1)
    for (int64_t r = 0; r < ranges; ++r) {
        const int64_t begin = r * step, end = std::min(total, begin + step);
        if (begin < end) fn(begin, end, int(r));
    }
#else
    std::vector<std::thread> pool;
    for (int64_t r = 0; r < ranges; ++r) {
        const int64_t begin = r * step, end = std::min(total, begin + step);
        if (begin < end) pool.emplace_back(fn, begin, end, int(r));
    }
    for (auto& t : pool) t.join();
#endif
}

}  // namespace structsa
