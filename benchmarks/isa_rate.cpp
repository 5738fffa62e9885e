// How fast this core retires vdpbf16ps (AVX512-BF16 dot product) vs vfmadd231ps (float32 FMA): 28
// independent accumulator chains, no memory traffic; best of 30 short runs (a shared machine).
//
//     g++ -O2 -march=native -o /tmp/isa_rate benchmarks/isa_rate.cpp && flock /tmp/meshserve-bench.lock /tmp/isa_rate
//
// One vdpbf16ps is 32 multiply-adds (64 flop), one 512-bit FMA 16 (32 flop). The result decides the bf16
// GEMM tiles in meshserve/kernels/csrc/bf16_dot_tile.h (docs/kernels.md).
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdio>

constexpr int kChains = 28;

template <bool kDot>
double seconds(long iters) {
  __m512 acc[kChains];
  for (int i = 0; i < kChains; ++i) acc[i] = _mm512_setzero_ps();
  const __m512 a = _mm512_set1_ps(1e-9f);
  const __m512bh ah = (__m512bh)_mm512_set1_epi32(0x00010001);
  const auto start = std::chrono::steady_clock::now();
  for (long it = 0; it < iters; ++it) {
#pragma GCC unroll 28
    for (int i = 0; i < kChains; ++i) {
      if constexpr (kDot) acc[i] = _mm512_dpbf16_ps(acc[i], ah, ah);
      else acc[i] = _mm512_fmadd_ps(a, a, acc[i]);
    }
  }
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  float sink = 0;
  for (int i = 0; i < kChains; ++i) sink += _mm512_reduce_add_ps(acc[i]);
  if (sink == 12345.f) std::puts("");  // keeps the chains alive
  return s;
}

int main() {
  const long iters = 5000000;
  double fma = 1e9, dot = 1e9;
  for (int r = 0; r < 30; ++r) {
    fma = std::min(fma, seconds<false>(iters));
    dot = std::min(dot, seconds<true>(iters));
  }
  const double n = static_cast<double>(iters) * kChains;
  std::printf("vfmadd231ps zmm: %.2f G/s = %.0f GFLOP/s per core\n", n / fma / 1e9, n * 32 / fma / 1e9);
  std::printf("vdpbf16ps   zmm: %.2f G/s = %.0f GFLOP/s per core\n", n / dot / 1e9, n * 64 / dot / 1e9);
}
