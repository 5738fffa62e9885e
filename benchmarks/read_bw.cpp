// How fast this machine reads memory: each thread sums its own buffer of N bytes with 512-bit loads into
// 8 independent accumulators, over and over; best of 9 runs (a shared machine). Buffer sizes pick the
// level: 32 KiB (L1), 1 MiB (L2), 16 MiB (L3 on most x86 servers), 512 MiB (DRAM).
//
//     g++ -O2 -march=native -pthread -o /tmp/read_bw benchmarks/read_bw.cpp && flock /tmp/meshserve-bench.lock /tmp/read_bw
//
// Prints one line per (threads, size): "read_bw threads=T bytes=N GB/s=X" (all threads together).
// benchmarks/attention_roofline.py runs it for the roofline of the attention stages.
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <thread>
#include <vector>

float sum_buffer(const float* p, size_t n, int passes) {
  __m512 acc[8];
  for (auto& a : acc) a = _mm512_setzero_ps();
  for (int pass = 0; pass < passes; ++pass)
    for (size_t i = 0; i + 128 <= n; i += 128)
#pragma GCC unroll 8
      for (int k = 0; k < 8; ++k) acc[k] = _mm512_add_ps(acc[k], _mm512_loadu_ps(p + i + 16 * k));
  for (int k = 1; k < 8; ++k) acc[0] = _mm512_add_ps(acc[0], acc[k]);
  return _mm512_reduce_add_ps(acc[0]);
}

int main() {
  const size_t sizes[] = {size_t(32) << 10, size_t(1) << 20, size_t(16) << 20, size_t(512) << 20};
  for (int threads : {1, 2}) {
    for (size_t bytes : sizes) {
      const size_t n = bytes / sizeof(float);
      const int passes = static_cast<int>(std::max<size_t>(1, (size_t(1) << 30) / bytes));  // ~1 GiB a run
      std::vector<std::vector<float>> bufs(threads, std::vector<float>(n, 1e-9f));
      std::vector<float> sink(threads);
      double best = 1e9;
      for (int run = 0; run < 9; ++run) {
        const auto start = std::chrono::steady_clock::now();
        std::vector<std::thread> pool;
        for (int t = 0; t < threads; ++t)
          pool.emplace_back([&, t] { sink[t] = sum_buffer(bufs[t].data(), n, passes); });
        for (auto& th : pool) th.join();
        best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
      }
      if (sink[0] == 12345.f) std::puts("");  // keeps the sums alive
      std::printf("read_bw threads=%d bytes=%zu GB/s=%.1f\n", threads, bytes,
                  double(bytes) * passes * threads / best / 1e9);
    }
  }
}
