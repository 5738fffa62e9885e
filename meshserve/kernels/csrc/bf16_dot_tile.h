// bf16_dot_tile.h: the register tile of meshserve's bfloat16-weight GEMMs (dense linears, MoE experts).
//
// Weight layout ("pair-packed"), made once at load by meshserve/kernels/bf16_gemm.py (pack_bf16_pairs):
//   W [N, K] bf16  ->  P [ceil(N/16)][ceil(K/2)][16][2] bf16, zero-padded in N and K,
// i.e. per block of 16 output columns, per k-pair, the 16 columns' (w[k], w[k+1]) side by side: one 512-bit
// load is the operand of one _mm512_dpbf16_ps. Column block j of a panel starts kPairStride(k2) elements
// after block j-1, where k2 = ceil(K/2).
//
// Two tiles over R rows x C column blocks (R*C fp32 zmm accumulators, 16*C output columns):
//   tile_dpbf16<R, C>(a, lda, w, k2_stride, kk0, kk1, k_odd_tail, c, ldc, accumulate)
//       a: bf16 activations (raw uint16), rows lda apart; one k-pair broadcast as 32 bits per row.
//   tile_fma<R, C>(a, lda, ...same...)
//       a: fp32 activations; each weight vector is widened to fp32 in registers (even k: shift left 16,
//       odd k: mask the high half) and fed to two FMAs per row.
// Both compute c[r][0..16C) (+)= a[r][2*kk0 .. 2*kk1) . W-panel, for pairs kk0 <= kk < kk1 (a K block);
// k_odd_tail: this block ends in the odd-K tail, whose pair holds one real k (the activation's second
// element is not read; the weight's is the packing's zero). c is fp32 with row stride ldc; accumulate
// adds to what c holds (the next K block), else overwrites. Callers dispatch R = 1..kTileRows and
// C = 1..kTileCols with run_tile (tails of M and of the panel).
//
// Why two: on the 2-core Xeon (Emerald Rapids, AVX512-BF16, no AMX) a loop of independent vdpbf16ps retires
// ~1.35 G/s per core (87 GFLOP/s) against ~5.6 G/s of vfmadd231ps (178 GFLOP/s): the bf16 dot product has
// half the fp32 FMA's flop rate here, so widening in registers (2 extra ALU ops per weight vector, shared
// by R rows) wins from R = 2 on; the dpbf16 tile is kept for CPUs where vdpbf16ps is full rate and for the
// comparison (docs/kernels.md). Builds without AVX512-BF16 / AVX512F fall back to widening / plain C++
// (same results up to float32 summation order: bf16 x bf16 products are exact in float32).
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace meshserve {
namespace bf16_tile {

constexpr int kTileRows = 8;   // R: rows per register tile
constexpr int kTileCols = 3;   // C: 16-column blocks per tile (R*C = 24 accumulators + 4 working zmm)
constexpr int64_t kBlockCols = 16;

// Elements between column blocks of the packed weight (k2 pairs of 16 columns x 2).
inline int64_t kPairStride(int64_t k2) { return k2 * 2 * kBlockCols; }

inline float bf16_bits_to_float(uint16_t v) {
  const uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// Plain C++ tile: the fallback for builds without AVX512F, and what the vector tiles must match.
template <typename A, int R, int C>
void tile_scalar(const A* a, int64_t lda, const uint16_t* w, int64_t wstride, int64_t kk0, int64_t kk1,
                 bool k_odd_tail, float* c, int64_t ldc, bool accumulate) {
  auto act = [](A v) {
    if constexpr (sizeof(A) == 2) return bf16_bits_to_float(v); else return static_cast<float>(v);
  };
  for (int r = 0; r < R; ++r)
    for (int col = 0; col < C * kBlockCols; ++col) {
      const uint16_t* wc = w + (col / kBlockCols) * wstride + 2 * (col % kBlockCols);
      float sum = accumulate ? c[r * ldc + col] : 0.f;
      for (int64_t kk = kk0; kk < kk1; ++kk) {
        const bool single = k_odd_tail && kk == kk1 - 1;
        sum += act(a[r * lda + 2 * kk]) * bf16_bits_to_float(wc[kk * 2 * kBlockCols]);
        if (!single) sum += act(a[r * lda + 2 * kk + 1]) * bf16_bits_to_float(wc[kk * 2 * kBlockCols + 1]);
      }
      c[r * ldc + col] = sum;
    }
}

#if defined(__AVX512F__)
template <int R, int C>
inline void load_acc(__m512 (&acc)[R][C], const float* c, int64_t ldc, bool accumulate) {
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < C; ++j)
      acc[r][j] = accumulate ? _mm512_loadu_ps(c + r * ldc + 16 * j) : _mm512_setzero_ps();
}

template <int R, int C>
inline void store_acc(__m512 (&acc)[R][C], float* c, int64_t ldc) {
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < C; ++j) _mm512_storeu_ps(c + r * ldc + 16 * j, acc[r][j]);
}

// fp32 activations, bf16 weights widened in registers, FMA.
template <int R, int C>
void tile_fma(const float* a, int64_t lda, const uint16_t* w, int64_t wstride, int64_t kk0, int64_t kk1,
              bool k_odd_tail, float* c, int64_t ldc, bool accumulate) {
  __m512 acc[R][C];
  load_acc<R, C>(acc, c, ldc, accumulate);
  const __m512i high = _mm512_set1_epi32(static_cast<int32_t>(0xFFFF0000u));
  const int64_t full_end = k_odd_tail ? kk1 - 1 : kk1;
  for (int64_t kk = kk0; kk < full_end; ++kk) {
    for (int j = 0; j < C; ++j) {
      const __m512i v = _mm512_loadu_si512(w + j * wstride + kk * 2 * kBlockCols);
      const __m512 even = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
      const __m512 odd = _mm512_castsi512_ps(_mm512_and_si512(v, high));
      for (int r = 0; r < R; ++r) {
        acc[r][j] = _mm512_fmadd_ps(_mm512_set1_ps(a[r * lda + 2 * kk]), even, acc[r][j]);
        acc[r][j] = _mm512_fmadd_ps(_mm512_set1_ps(a[r * lda + 2 * kk + 1]), odd, acc[r][j]);
      }
    }
  }
  if (k_odd_tail) {  // one real k in the last pair: its activation's partner lies past the row's end
    const int64_t kk = kk1 - 1;
    for (int j = 0; j < C; ++j) {
      const __m512i v = _mm512_loadu_si512(w + j * wstride + kk * 2 * kBlockCols);
      const __m512 even = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
      for (int r = 0; r < R; ++r)
        acc[r][j] = _mm512_fmadd_ps(_mm512_set1_ps(a[r * lda + 2 * kk]), even, acc[r][j]);
    }
  }
  store_acc<R, C>(acc, c, ldc);
}
#endif

#if defined(__AVX512BF16__)
// bf16 activations, one vdpbf16ps per (row, column block, k-pair).
template <int R, int C>
void tile_dpbf16(const uint16_t* a, int64_t lda, const uint16_t* w, int64_t wstride, int64_t kk0, int64_t kk1,
                 bool k_odd_tail, float* c, int64_t ldc, bool accumulate) {
  __m512 acc[R][C];
  load_acc<R, C>(acc, c, ldc, accumulate);
  const int64_t full_end = k_odd_tail ? kk1 - 1 : kk1;
  for (int64_t kk = kk0; kk < kk1; ++kk) {
    __m512bh bv[C];
    for (int j = 0; j < C; ++j) bv[j] = (__m512bh)_mm512_loadu_si512(w + j * wstride + kk * 2 * kBlockCols);
    for (int r = 0; r < R; ++r) {
      int32_t pair;
      if (kk < full_end) std::memcpy(&pair, a + r * lda + 2 * kk, sizeof pair);
      else pair = a[r * lda + 2 * kk];  // odd-K tail: the partner is zero, never read
      const __m512bh av = (__m512bh)_mm512_set1_epi32(pair);
      for (int j = 0; j < C; ++j) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], av, bv[j]);
    }
  }
  store_acc<R, C>(acc, c, ldc);
}
#endif

// One tile of the activation type A (float: FMA tile; uint16_t: dpbf16 tile where built, else widened),
// with R and C chosen at run time (1..kTileRows, 1..kTileCols).
template <typename A>
void run_tile(int rows, int cols, const A* a, int64_t lda, const uint16_t* w, int64_t wstride, int64_t kk0,
              int64_t kk1, bool k_odd_tail, float* c, int64_t ldc, bool accumulate) {
  auto with_c = [&](auto r_const) {
    constexpr int R = decltype(r_const)::value;
    auto go = [&](auto c_const) {
      constexpr int C = decltype(c_const)::value;
#if defined(__AVX512BF16__)
      if constexpr (sizeof(A) == 2) {
        tile_dpbf16<R, C>(a, lda, w, wstride, kk0, kk1, k_odd_tail, c, ldc, accumulate);
        return;
      }
#endif
#if defined(__AVX512F__)
      if constexpr (sizeof(A) == 4) {
        tile_fma<R, C>(a, lda, w, wstride, kk0, kk1, k_odd_tail, c, ldc, accumulate);
        return;
      }
#endif
      tile_scalar<A, R, C>(a, lda, w, wstride, kk0, kk1, k_odd_tail, c, ldc, accumulate);
    };
    switch (cols) {
      case 1: go(std::integral_constant<int, 1>{}); break;
      case 2: go(std::integral_constant<int, 2>{}); break;
      default: go(std::integral_constant<int, 3>{}); break;
    }
  };
  switch (rows) {
    case 1: with_c(std::integral_constant<int, 1>{}); break;
    case 2: with_c(std::integral_constant<int, 2>{}); break;
    case 3: with_c(std::integral_constant<int, 3>{}); break;
    case 4: with_c(std::integral_constant<int, 4>{}); break;
    case 5: with_c(std::integral_constant<int, 5>{}); break;
    case 6: with_c(std::integral_constant<int, 6>{}); break;
    case 7: with_c(std::integral_constant<int, 7>{}); break;
    default: with_c(std::integral_constant<int, 8>{}); break;
  }
}

}  // namespace bf16_tile
}  // namespace meshserve
