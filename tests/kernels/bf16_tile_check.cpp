// Checks every tile of meshserve/kernels/csrc/bf16_dot_tile.h (every R, C, odd and even K, K blocks with
// accumulation) against a double-precision sum; prints the largest error. tests/kernels/test_bf16_tile.py
// compiles it for this CPU (vector tiles) and without AVX-512 (the plain C++ fallback).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <vector>

#include "bf16_dot_tile.h"

using namespace meshserve::bf16_tile;

static uint16_t to_bf16(float f) {  // truncation is fine: the reference uses the same rounded values
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  return static_cast<uint16_t>(bits >> 16);
}

int main() {
  double worst = 0;
  uint32_t seed = 1;
  auto rnd = [&] {  // values in [-1, 1] from a fixed LCG: the same data on every machine
    seed = seed * 1664525u + 1013904223u;
    return (static_cast<int>(seed >> 9) % 2001 - 1000) / 1000.f;
  };
  for (int k : {1, 2, 7, 64, 131, 260}) {
    const int64_t k2 = (k + 1) / 2, wstride = kPairStride(k2), lda = k + 3;
    for (int rows = 1; rows <= kTileRows; ++rows)
      for (int cols = 1; cols <= kTileCols; ++cols) {
        const int n = cols * static_cast<int>(kBlockCols);
        std::vector<uint16_t> w(cols * wstride, 0), a16(rows * lda);
        std::vector<float> wv(n * k), a32(rows * lda);
        for (int col = 0; col < n; ++col)
          for (int kk = 0; kk < k; ++kk) {
            const uint16_t b = to_bf16(rnd());
            const int64_t at = (col / kBlockCols) * wstride + (kk / 2) * 2 * kBlockCols;
            w[at + 2 * (col % kBlockCols) + kk % 2] = b;
            wv[col * k + kk] = bf16_bits_to_float(b);
          }
        for (int64_t i = 0; i < rows * lda; ++i) {
          a16[i] = to_bf16(rnd());
          a32[i] = bf16_bits_to_float(a16[i]);
        }
        const int64_t ldc = kTileCols * kBlockCols, block = 32;  // K blocks of 32 pairs: accumulation runs
        std::vector<float> c_fma(rows * ldc), c_dot(rows * ldc), c_wide(rows * ldc), wf(2 * block * ldc);
        for (int64_t kk0 = 0; kk0 < k2; kk0 += block) {
          const int64_t kk1 = std::min(k2, kk0 + block);
          const bool tail = (k % 2) && kk1 == k2;
          const bool acc = kk0 > 0;
          const uint16_t* wp = w.data();
          run_tile<float>(rows, cols, a32.data(), lda, wp, wstride, kk0, kk1, tail, c_fma.data(), ldc, acc);
          run_tile<uint16_t>(rows, cols, a16.data(), lda, wp, wstride, kk0, kk1, tail, c_dot.data(), ldc,
                             acc);
          run_widen(cols, w.data(), wstride, kk0, kk1, wf.data());
          run_tile_f32(rows, cols, a32.data() + 2 * kk0, lda, wf.data(),
                       std::min<int64_t>(2 * kk1, k) - 2 * kk0, c_wide.data(), ldc, acc);
        }
        for (int r = 0; r < rows; ++r)
          for (int col = 0; col < n; ++col) {
            double ref = 0;
            for (int kk = 0; kk < k; ++kk) ref += static_cast<double>(a32[r * lda + kk]) * wv[col * k + kk];
            for (const auto* c : {&c_fma, &c_dot, &c_wide})
              worst = std::fmax(worst, std::fabs((*c)[r * ldc + col] - ref));
          }
      }
  }
  std::printf("%.3g\n", worst);
}
