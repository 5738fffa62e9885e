// bf16_dot_tile.h: the register tile of meshserve's bfloat16-weight GEMMs (dense linears, MoE experts).
//
// Weight layout ("pair-packed"), made once at load by meshserve/kernels/bf16_gemm.py (pack_bf16_pairs):
//   W [N, K] bf16  ->  P [ceil(N/16)][ceil(K/2)][16][2] bf16, zero-padded in N and K,
// i.e. per block of 16 output columns, per k-pair, the 16 columns' (w[k], w[k+1]) side by side: one 512-bit
// load is the operand of one _mm512_dpbf16_ps. Column block j of a panel starts kPairStride(k2) elements
// after block j-1, where k2 = ceil(K/2).
//
// Tiles over R rows x C column blocks (R*C fp32 zmm accumulators, 16*C output columns; R <= kTileRows,
// C <= kTileCols), each computing c[r][0..16C) (+)= a[r][2*kk0 .. 2*kk1) . W-panel for the k-pairs
// kk0 <= kk < kk1 (one K block). c is fp32 with row stride ldc; accumulate adds to what c holds (the next K
// block), else overwrites. k_odd_tail: the block ends in the odd-K tail, whose pair holds one real k (the
// activation's partner is never read; the weight's is the packing's zero). a's rows are lda elements apart.
//   run_tile<float>(rows, cols, a, lda, w, wstride, kk0, kk1, k_odd_tail, c, ldc, accumulate)
//       fp32 activations (tile_fma): each weight vector is widened to fp32 in registers (even k: shift
//       left 16; odd k: mask the high half) and feeds two FMAs per row.
//   run_tile<uint16_t>(...same...)
//       bf16 activations as raw bits (tile_dpbf16): one k-pair broadcast as 32 bits, one vdpbf16ps per
//       (row, column block, pair).
//   run_widen(cols, w, wstride, kk0, kk1, wf) + run_tile_f32(rows, cols, a, lda, wf, ks, c, ldc, accumulate)
//       many rows: widen the panel's K block to fp32 once (wf [2*(kk1-kk0)][16*cols]) and run a plain fp32
//       FMA tile over ks = (real k in the block) values; a points at the block's first k.
// w points at the panel's first column block; wstride = kPairStride(k2), k2 = ceil(K/2).
//
// Why not only vdpbf16ps: on the 2-core Xeon (Emerald Rapids, AVX512-BF16, no AMX) a loop of independent
// vdpbf16ps retires ~1.35 G/s per core (87 GFLOP/s) against ~5.6 G/s of vfmadd231ps (178 GFLOP/s;
// benchmarks/isa_rate.cpp): the bf16 dot product has half the fp32 FMA's flop rate here, so widening in
// registers (2 extra ALU ops per weight vector, shared by R rows) wins from R = 2 on by cycle count (hot
// L1, R = 8: tile_fma 142 GFLOP/s, tile_f32 184, the dpbf16 rate 87); the dpbf16 tile is kept for CPUs
// where vdpbf16ps is full rate and for the comparison (docs/kernels.md). Builds without AVX512F /
// AVX512-BF16 fall back to plain C++ (tile_scalar, the same sums up to float32 summation order: bf16 x bf16
// products are exact in float32); tests/kernels/test_bf16_tile.py checks both builds.
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

// Software prefetch of a tile's weight: at k-pairs kk0 + phase, + period, ... it asks for the pair distance
// ahead. The row groups of one K block (period of them, phases 0..period-1) share the block's lines between
// them, so the requests spread over the whole block's compute instead of bunching in its first pass.
// distance 0: none (the default; the MoE op's tiles read experts the hardware prefetcher keeps up with).
struct Prefetch {
  int64_t distance = 0, phase = 0, period = 1;
};

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

// Asks for pair kk of each of C column blocks (one cache line each) ahead of its use: decode-sized tiles
// compute too little per weight byte for the hardware prefetcher alone to keep DRAM busy (docs/kernels.md).
template <int C>
inline void prefetch_pairs(const uint16_t* w, int64_t wstride, int64_t kk) {
  for (int j = 0; j < C; ++j)
    _mm_prefetch(reinterpret_cast<const char*>(w + j * wstride + kk * 2 * kBlockCols), _MM_HINT_T0);
}

// fp32 activations, bf16 weights widened in registers, FMA.
template <int R, int C>
void tile_fma(const float* a, int64_t lda, const uint16_t* w, int64_t wstride, int64_t kk0, int64_t kk1,
              bool k_odd_tail, float* c, int64_t ldc, bool accumulate, Prefetch pf) {
  __m512 acc[R][C];
  load_acc<R, C>(acc, c, ldc, accumulate);
  const __m512i high = _mm512_set1_epi32(static_cast<int32_t>(0xFFFF0000u));
  const int64_t full_end = k_odd_tail ? kk1 - 1 : kk1;
  int64_t next_pf = pf.distance ? kk0 + pf.phase : kk1;
  for (int64_t kk = kk0; kk < full_end; ++kk) {
    if (kk == next_pf) {
      prefetch_pairs<C>(w, wstride, kk + pf.distance);
      next_pf += pf.period;
    }
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

// Widens pairs [kk0, kk1) of a panel's C column blocks into float32 wf [2 * (kk1 - kk0)][16 * C] (one row
// per k): a task with many rows pays this once and runs tile_f32 on it, with no widening per row group.
template <int C>
void widen_panel(const uint16_t* w, int64_t wstride, int64_t kk0, int64_t kk1, float* wf) {
  constexpr int64_t ldw = C * kBlockCols;
  for (int64_t kk = kk0; kk < kk1; ++kk)
    for (int j = 0; j < C; ++j) {
      const uint16_t* src = w + j * wstride + kk * 2 * kBlockCols;
      float* even = wf + 2 * (kk - kk0) * ldw + j * kBlockCols;
#if defined(__AVX512F__)
      const __m512i v = _mm512_loadu_si512(src);
      _mm512_storeu_ps(even, _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)));
      _mm512_storeu_ps(even + ldw, _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(-65536))));
#else
      for (int64_t col = 0; col < kBlockCols; ++col) {
        even[col] = bf16_bits_to_float(src[2 * col]);
        even[ldw + col] = bf16_bits_to_float(src[2 * col + 1]);
      }
#endif
    }
}

// fp32 activations x a widened panel (widen_panel's layout, ks rows of 16C floats): c (+)= a[r][0..ks) . wf.
template <int R, int C>
void tile_f32(const float* a, int64_t lda, const float* wf, int64_t ks, float* c, int64_t ldc,
              bool accumulate) {
  constexpr int64_t ldw = C * kBlockCols;
#if defined(__AVX512F__)
  __m512 acc[R][C];
  load_acc<R, C>(acc, c, ldc, accumulate);
  for (int64_t kk = 0; kk < ks; ++kk) {
    __m512 bv[C];
    for (int j = 0; j < C; ++j) bv[j] = _mm512_loadu_ps(wf + kk * ldw + 16 * j);
    for (int r = 0; r < R; ++r) {
      const __m512 av = _mm512_set1_ps(a[r * lda + kk]);
      for (int j = 0; j < C; ++j) acc[r][j] = _mm512_fmadd_ps(av, bv[j], acc[r][j]);
    }
  }
  store_acc<R, C>(acc, c, ldc);
#else
  for (int r = 0; r < R; ++r)
    for (int64_t col = 0; col < ldw; ++col) {
      float sum = accumulate ? c[r * ldc + col] : 0.f;
      for (int64_t kk = 0; kk < ks; ++kk) sum += a[r * lda + kk] * wf[kk * ldw + col];
      c[r * ldc + col] = sum;
    }
#endif
}

#if defined(__AVX512BF16__)
// bf16 activations, one vdpbf16ps per (row, column block, k-pair).
template <int R, int C>
void tile_dpbf16(const uint16_t* a, int64_t lda, const uint16_t* w, int64_t wstride, int64_t kk0, int64_t kk1,
                 bool k_odd_tail, float* c, int64_t ldc, bool accumulate, Prefetch pf) {
  __m512 acc[R][C];
  load_acc<R, C>(acc, c, ldc, accumulate);
  const int64_t full_end = k_odd_tail ? kk1 - 1 : kk1;
  int64_t next_pf = pf.distance ? kk0 + pf.phase : kk1;
  for (int64_t kk = kk0; kk < kk1; ++kk) {
    if (kk == next_pf) {
      prefetch_pairs<C>(w, wstride, kk + pf.distance);
      next_pf += pf.period;
    }
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

// Calls f(std::integral_constant<int, R>, std::integral_constant<int, C>) for rows = R in 1..kTileRows and
// cols = C in 1..kTileCols: the tiles' sizes are template arguments (accumulators stay in registers).
template <typename F>
void dispatch(int rows, int cols, F&& f) {
  auto with_r = [&](auto r) {
    switch (cols) {
      case 1: f(r, std::integral_constant<int, 1>{}); break;
      case 2: f(r, std::integral_constant<int, 2>{}); break;
      default: f(r, std::integral_constant<int, 3>{}); break;
    }
  };
  static_assert(kTileRows == 8 && kTileCols == 3, "dispatch covers R = 1..8, C = 1..3");
  switch (rows) {
    case 1: with_r(std::integral_constant<int, 1>{}); break;
    case 2: with_r(std::integral_constant<int, 2>{}); break;
    case 3: with_r(std::integral_constant<int, 3>{}); break;
    case 4: with_r(std::integral_constant<int, 4>{}); break;
    case 5: with_r(std::integral_constant<int, 5>{}); break;
    case 6: with_r(std::integral_constant<int, 6>{}); break;
    case 7: with_r(std::integral_constant<int, 7>{}); break;
    default: with_r(std::integral_constant<int, 8>{}); break;
  }
}

// One tile over packed pairs of the activation type A (float: the FMA tile; uint16_t: the dpbf16 tile where
// built, else plain C++), rows 1..kTileRows, cols (column blocks) 1..kTileCols.
template <typename A>
void run_tile(int rows, int cols, const A* a, int64_t lda, const uint16_t* w, int64_t wstride, int64_t kk0,
              int64_t kk1, bool k_odd_tail, float* c, int64_t ldc, bool accumulate, Prefetch pf = {}) {
  dispatch(rows, cols, [&](auto r, auto cc) {
    constexpr int R = decltype(r)::value, C = decltype(cc)::value;
#if defined(__AVX512BF16__)
    if constexpr (sizeof(A) == 2) {
      tile_dpbf16<R, C>(a, lda, w, wstride, kk0, kk1, k_odd_tail, c, ldc, accumulate, pf);
      return;
    }
#endif
#if defined(__AVX512F__)
    if constexpr (sizeof(A) == 4) {
      tile_fma<R, C>(a, lda, w, wstride, kk0, kk1, k_odd_tail, c, ldc, accumulate, pf);
      return;
    }
#endif
    tile_scalar<A, R, C>(a, lda, w, wstride, kk0, kk1, k_odd_tail, c, ldc, accumulate);
  });
}

// widen_panel with cols (column blocks) 1..kTileCols.
inline void run_widen(int cols, const uint16_t* w, int64_t wstride, int64_t kk0, int64_t kk1, float* wf) {
  dispatch(1, cols, [&](auto, auto cc) { widen_panel<decltype(cc)::value>(w, wstride, kk0, kk1, wf); });
}

// tile_f32 with rows 1..kTileRows and cols 1..kTileCols (wf widened with the same cols).
inline void run_tile_f32(int rows, int cols, const float* a, int64_t lda, const float* wf, int64_t ks,
                         float* c, int64_t ldc, bool accumulate) {
  dispatch(rows, cols, [&](auto r, auto cc) {
    tile_f32<decltype(r)::value, decltype(cc)::value>(a, lda, wf, ks, c, ldc, accumulate);
  });
}

}  // namespace bf16_tile
}  // namespace meshserve
