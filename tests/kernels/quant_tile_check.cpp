// Checks every path of meshserve/kernels/csrc/quant_tile.h's run_panel (decode tiles, the float32 scratch
// tile, the bfloat16 pair tiles: int4's, and int8's from 2 rows, a 1-row remainder at 5; int8 and int4;
// zero points or none; groups padded to whole units; 1-4 column blocks; 1-40 rows) against a
// double-precision sum of (q - z) * s * a; prints the largest error relative to the sum of |terms|.
// tests/kernels/test_quant_tile.py compiles it for this CPU (vector tiles) and without AVX-512 (the plain
// C++ fallback).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <vector>

#include "quant_tile.h"

using namespace meshserve::quant_tile;

static uint32_t seed = 1;
static int next_int(int lo, int hi) {  // [lo, hi] from a fixed LCG: the same data on every machine
  seed = seed * 1664525u + 1013904223u;
  return lo + static_cast<int>((seed >> 8) % static_cast<uint32_t>(hi - lo + 1));
}

static uint16_t bf16_bits(float f) {  // truncation: the reference reads the same rounded value back
  uint32_t b;
  std::memcpy(&b, &f, sizeof b);
  return static_cast<uint16_t>(b >> 16);
}

int main() {
  double worst = 0;
  for (int bits : {8, 4})
    for (int gs : {12, 32, 40})
      for (int groups : {1, 3})
        for (int cols : {1, 4})
          for (int zeros : {0, 1})
            for (int rows : {1, 2, 3, 5, 9, 17, 40}) {
              const int unit_k = bits == 8 ? 4 : 8, gu = (gs + unit_k - 1) / unit_k, gp = gu * unit_k;
              const int64_t units = int64_t(groups) * gu, kp = int64_t(groups) * gp;
              std::vector<int> qv(cols * 16 * kp, 0);  // [col][kp], zero in the padding
              std::vector<uint8_t> q(cols * units * kUnitBytes, 0), z(cols * groups * 16);
              std::vector<float> s(cols * groups * 16);
              for (int col = 0; col < cols * 16; ++col)
                for (int g = 0; g < groups; ++g)
                  for (int i = 0; i < gs; ++i) {
                    const int v = bits == 8 ? next_int(-128, 127) : next_int(0, 15);
                    const int64_t k = int64_t(g) * gp + i, u = k / unit_k, kk = k % unit_k;
                    qv[col * kp + k] = v;
                    uint8_t* lane = q.data() + ((col / 16) * units + u) * kUnitBytes + 4 * (col % 16);
                    if (bits == 8) lane[kk] = static_cast<uint8_t>(v);
                    else lane[nibble_slot(kk) / 2] |= static_cast<uint8_t>(v << (4 * (nibble_slot(kk) % 2)));
                  }
              for (size_t i = 0; i < s.size(); ++i) {
                s[i] = next_int(1, 1000) * 1e-4f;
                z[i] = static_cast<uint8_t>(bits == 8 ? next_int(-20, 20) : next_int(0, 15));
              }
              const Matrix m{bits, cols * 16, cols, groups, gu, q.data(), s.data(), zeros ? z.data() : nullptr};
              std::vector<float> a(rows * kp, 0.f), sx(rows * groups, 0.f);
              std::vector<uint16_t> a16(rows * kp, 0);
              for (int r = 0; r < rows; ++r)
                for (int g = 0; g < groups; ++g)
                  for (int i = 0; i < gs; ++i) {
                    const int64_t k = int64_t(g) * gp + i;
                    a16[r * kp + k] = bf16_bits(next_int(-1000, 1000) * 1e-3f);
                    a[r * kp + k] = meshserve::bf16_tile::bf16_bits_to_float(a16[r * kp + k]);
                    sx[r * groups + g] += a[r * kp + k];
                  }
              std::vector<float> c(rows * kPanelCols), scratch(kWideK * kPanelCols);
              for (int dot : {0, 1}) {
                run_panel(m, 0, a.data(), dot ? a16.data() : nullptr, kp, sx.data(), rows, c.data(), scratch.data());
                for (int r = 0; r < rows; ++r)
                  for (int col = 0; col < cols * 16; ++col) {
                    double sum = 0, mag = 0;
                    for (int64_t k = 0; k < kp; ++k) {
                      const int g = static_cast<int>(k / gp);
                      const double t = (qv[col * kp + k] - m.zero(col / 16, g, col % 16)) *
                                       double(s[((col / 16) * groups + g) * 16 + col % 16]) * a[r * kp + k];
                      sum += t;
                      mag += std::fabs(t);
                    }
                    worst = std::max(worst, std::fabs(c[r * kPanelCols + col] - sum) / (mag + 1e-30));
                  }
              }
            }
  std::printf("%.3g\n", worst);
  return 0;
}
