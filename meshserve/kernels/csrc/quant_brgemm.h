// quant_brgemm.h: the large-M path of the weight-only int8 / int4 GEMMs (quant_linear.cpp, quant_moe.cpp):
// a panel's weight is dequantized kBrgemmK k at a time into a small bfloat16 scratch (64 KiB, reused) and
// PyTorch's oneDNN micro-kernel at::native::cpublas::brgemm runs every row of the task over it. oneDNN picks
// its ISA at run time: AMX tiles where the CPU has amx_bf16, avx512_bf16 elsewhere. The full dequantized
// weight never exists; the scratch is paid once per task (up to kTaskRows rows), not once per 48 rows as on
// the register-tile paths of quant_tile.h.
//
// What the scratch holds is q - z, not (q - z) * s: integers of at most 255 in magnitude are exact in
// bfloat16, so the products with the bfloat16 rows are exact and brgemm's float32 sums are the oracle's up
// to summation order (as the other paths). Each group's sums land in cg and c += s * cg at the group's end.
// Scratch layout: brgemm's VNNI B [k/2][64][2] (ld_b = 64, 16 * C columns used).
//
// Which path runs (quant_gemm.py decides, by rows and the CPU's ISA tag: profiles/quant.json): this one for
// bfloat16 rows from brgemm_rows on, run_panel below that and for float32 rows.
#pragma once

#include <ATen/ATen.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "quant_tile.h"

namespace meshserve {
namespace quant_brgemm {

using quant_tile::kBlockCols;
using quant_tile::kPanelCols;
using quant_tile::Matrix;

constexpr int64_t kBrgemmK = 512;    // k per scratch fill: 512 x 64 bfloat16 = 64 KiB (L2)
constexpr int64_t kCallRows = 32;    // rows per brgemm call: bounds the micro-kernels oneDNN generates
constexpr int64_t kTaskRows = 256;   // most rows per task: one scratch fill serves this many
constexpr int64_t kRegisterRows = 48;  // rows per run_panel call (the register tiles' task size)

// The units [u0, u1) of C column blocks from `block` as bfloat16 q - z in the VNNI layout above: pair row
// kk of column block j at wp + kk * 2 * kPanelCols + j * 2 * kBlockCols.
template <int Bits, int C>
void centred_pairs(const Matrix& m, int64_t block, int64_t u0, int64_t u1, uint16_t* wp) {
  constexpr int kUnitK = Bits == 8 ? 4 : 8;
  for (int j = 0; j < C; ++j) {
    const uint8_t* wq = m.q + (block + j) * m.units() * quant_tile::kUnitBytes;
    for (int64_t g0 = u0; g0 < u1;) {  // the parts of groups in [u0, u1): one zero vector each
      const int64_t g = g0 / m.group_units, g1 = std::min(u1, (g + 1) * m.group_units);
      alignas(64) float zl[kBlockCols];
      for (int lane = 0; lane < kBlockCols; ++lane) zl[lane] = m.zero(block + j, g, lane);
      for (int64_t u = g0; u < g1; ++u) {
        uint16_t* dst = wp + (u - u0) * kUnitK * kPanelCols + j * 2 * kBlockCols;
#if defined(__AVX512F__)
        const __m512 z = _mm512_load_ps(zl);
        const __m512i v = _mm512_loadu_si512(wq + u * quant_tile::kUnitBytes);
        quant_tile::unrolled(std::make_integer_sequence<int, kUnitK / 2>{}, [&](auto p) {
          constexpr int P = decltype(p)::value;
          const __m512i lo = _mm512_castps_si512(_mm512_sub_ps(quant_tile::unit_k_ps<Bits, 2 * P>(v), z));
          const __m512i hi = _mm512_castps_si512(_mm512_sub_ps(quant_tile::unit_k_ps<Bits, 2 * P + 1>(v), z));
          // exact integers: the bfloat16 is the float32's high half. (hi & 0xFFFF0000) | (lo >> 16)
          const __m512i pair = _mm512_ternarylogic_epi32(
              hi, _mm512_set1_epi32(static_cast<int32_t>(0xFFFF0000u)), _mm512_srli_epi32(lo, 16), 0xEA);
          _mm512_storeu_si512(dst + P * 2 * kPanelCols, pair);
        });
#else
        for (int kk = 0; kk < kUnitK; ++kk)
          for (int lane = 0; lane < kBlockCols; ++lane) {
            const float f =
                static_cast<float>(quant_tile::lane_value<Bits>(wq + u * quant_tile::kUnitBytes, lane, kk)) - zl[lane];
            uint32_t bits;
            std::memcpy(&bits, &f, sizeof bits);
            dst[(kk / 2) * 2 * kPanelCols + 2 * lane + kk % 2] = static_cast<uint16_t>(bits >> 16);
          }
#endif
      }
      g0 = g1;
    }
  }
}

// c[r][0..16C) = a[r] . W[panel]^T for `rows` bfloat16 rows a (bits, lda apart, the kernel's K order and
// padding). wp: kBrgemmK * kPanelCols bfloat16 scratch; cg: rows * kPanelCols floats.
template <int Bits, int C>
void run_panel_c(const Matrix& m, int64_t block, const uint16_t* a16, int64_t lda, int64_t rows, float* c,
                 uint16_t* wp, float* cg) {
  constexpr int kUnitK = Bits == 8 ? 4 : 8;
  constexpr int64_t step = kBrgemmK / kUnitK, cols = C * kBlockCols;
  const auto* a = reinterpret_cast<const at::BFloat16*>(a16);
  const auto* b = reinterpret_cast<const at::BFloat16*>(wp);
  std::fill(c, c + rows * kPanelCols, 0.f);
  const int64_t units = m.units();
  for (int64_t b0 = 0; b0 < units; b0 += step) {
    const int64_t b1 = std::min(units, b0 + step);
    centred_pairs<Bits, C>(m, block, b0, b1, wp);
    for (int64_t r0 = 0; r0 < rows; r0 += kCallRows) {
      const int64_t rr = std::min(kCallRows, rows - r0);
      for (int64_t u0 = b0; u0 < b1;) {  // the parts of groups inside this K block
        const int64_t g = u0 / m.group_units, end = (g + 1) * m.group_units, u1 = std::min(b1, end);
        at::native::cpublas::brgemm(rr, cols, (u1 - u0) * kUnitK, lda, kPanelCols, kPanelCols,
                                    /*add_C=*/u0 != g * m.group_units, a + r0 * lda + u0 * kUnitK,
                                    b + (u0 - b0) * kUnitK * kPanelCols, cg + r0 * kPanelCols, /*is_vnni=*/true);
        if (u1 == end) {  // the group is summed: c += s * cg
          for (int j = 0; j < C; ++j) {
            const float* s = m.scales + ((block + j) * m.groups + g) * kBlockCols;
            for (int64_t i = r0; i < r0 + rr; ++i) {
              float* cr = c + i * kPanelCols + j * kBlockCols;
              const float* gr = cg + i * kPanelCols + j * kBlockCols;
#pragma omp simd
              for (int lane = 0; lane < kBlockCols; ++lane) cr[lane] += s[lane] * gr[lane];
            }
          }
        }
        u0 = u1;
      }
    }
  }
}

// What one thread's tasks reuse (thread_local in the ops: a decode call allocates nothing); ensure grows it.
struct Scratch {
  std::vector<float> c, scratch, cg;
  std::vector<uint16_t> pairs;
  void ensure(int64_t rows, bool brgemm) {
    grow(c, rows * kPanelCols);
    grow(scratch, quant_tile::kWideK * kPanelCols);
    if (brgemm) {
      grow(cg, rows * kPanelCols);
      grow(pairs, kBrgemmK * kPanelCols);
    }
  }
  template <typename T>
  static void grow(std::vector<T>& v, int64_t n) {
    if (static_cast<int64_t>(v.size()) < n) v.resize(n);
  }
};

// c[r][0..64) = a[r] . W[panel]^T for `rows` rows: this file's path for bfloat16 rows (a16) from
// brgemm_rows on, else quant_tile::run_panel in calls of kRegisterRows rows (the columns past n are garbage).
inline void run_rows(const Matrix& m, int64_t panel, const float* a, const uint16_t* a16, int64_t lda,
                     const float* sx, int64_t rows, int64_t brgemm_rows, Scratch& s) {
  if (a16 && rows >= brgemm_rows) {
    const int64_t block = panel * quant_tile::kPanelBlocks;
    const int cols = static_cast<int>(std::min<int64_t>(quant_tile::kPanelBlocks, m.blocks - block));
    auto with_cols = [&](auto bits) {
      constexpr int B = decltype(bits)::value;
      float* c = s.c.data();
      uint16_t* wp = s.pairs.data();
      switch (cols) {
        case 1: run_panel_c<B, 1>(m, block, a16, lda, rows, c, wp, s.cg.data()); break;
        case 2: run_panel_c<B, 2>(m, block, a16, lda, rows, c, wp, s.cg.data()); break;
        case 3: run_panel_c<B, 3>(m, block, a16, lda, rows, c, wp, s.cg.data()); break;
        default: run_panel_c<B, 4>(m, block, a16, lda, rows, c, wp, s.cg.data()); break;
      }
    };
    if (m.bits == 8) with_cols(std::integral_constant<int, 8>{});
    else with_cols(std::integral_constant<int, 4>{});
    return;
  }
  for (int64_t r = 0; r < rows; r += kRegisterRows)
    quant_tile::run_panel(m, panel, a + r * lda, a16 ? a16 + r * lda : nullptr, lda, sx + r * m.groups,
                          std::min(kRegisterRows, rows - r), s.c.data() + r * kPanelCols, s.scratch.data());
}

// Rows per task of a GEMM of `rows` rows over `panels` column panels: kRegisterRows for the register tiles;
// on the brgemm path as many as fill every thread twice over, at most kTaskRows (each task fills the
// scratch once per K block), never fewer than a call's kCallRows.
inline int64_t task_rows(int64_t rows, int64_t panels, bool brgemm, int64_t threads) {
  if (!brgemm) return kRegisterRows;
  const int64_t splits = std::max<int64_t>(1, (2 * threads + panels - 1) / panels);
  const int64_t per = (rows + splits - 1) / splits;
  return std::clamp<int64_t>((per + kCallRows - 1) / kCallRows * kCallRows, kCallRows, kTaskRows);
}

}  // namespace quant_brgemm
}  // namespace meshserve
