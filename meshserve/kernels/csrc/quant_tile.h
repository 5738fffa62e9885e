// quant_tile.h: the register tiles of meshserve's weight-only int8 / int4 GEMMs (quant_linear.cpp,
// quant_moe.cpp). Layout (made once per layer by meshserve/kernels/quant_gemm.py's pack_quant):
//   q      [blocks][units][64 bytes]: per block of 16 output columns and unit of K, one 32-bit lane per
//          column holding its next kUnitK k (int8: 4 signed bytes; int4: 8 unsigned nibbles, k 0, 2, 4, 6
//          in nibbles 0-3 and k 1, 3, 5, 7 in nibbles 4-7: nibble_slot);
//   scales [blocks][groups][16] float32, zeros [blocks][groups][16] int8 / uint8 or none (symmetric:
//          0 for int8, 8 for int4); each group is a whole number of units (the packer zero-pads it).
// W = (q - z) * s. Activations are float32 rows over the same padded K (zeros in the padding).
//
// Three ways through a panel of up to kPanelBlocks column blocks (run_panel):
// - few rows (decode): tile_small dequantizes in registers: each 64-byte load is one unit of 16 columns,
//   each k's 16 integers become float32 (int8: shift left then arithmetic shift right; int4: shift and
//   mask; then vcvtdq2ps) and feed one FMA per row. Sums run per group, c += s * sum(q * x) at the group's
//   end; the zero term -s * z * sum(x) is subtracted once per group and column at the end (add_zero_terms).
//   The integers become floats by bit moves, not converts (kLaneScale below), so the weight stream costs
//   two integer ops and one FMA per 16 weights: the GEMV stays read-bound. int4 with bfloat16 rows
//   (tile_small_pairs) makes the nibbles bfloat16 instead: one shift and one and-or give 32 weights as 16
//   pairs for one vdpbf16ps, half the int4 FMA path's ops per byte (which ran compute-bound). The weight is prefetched kPrefetchUnits ahead (as bf16_linear.cpp found, decode-sized
//   tiles compute too little per byte for the hardware prefetcher alone).
// - many rows (prefill): dequantize_block writes (q - z) * s for kWideK k of the panel into a float32
//   scratch tile (16 KiB, in L1) and bf16_tile::tile_f32 runs the plain FMA tile on it: the decode work is
//   paid once per block, not per row group. Never more than that block is unpacked.
// - many bfloat16 rows: integer_pairs writes the block's integers q as bfloat16 (exact: |q| <= 128) in the
//   pair layout of bf16_dot_tile.h and its vdpbf16ps tile sums q . x per group part, exact products and
//   float32 sums as the others; s and the zero term are applied as on the small path.
// Builds without AVX512F compile plain C++ loops instead (the same sums up to float32 summation order).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "bf16_dot_tile.h"

namespace meshserve {
namespace quant_tile {

constexpr int64_t kBlockCols = 16;
constexpr int kPanelBlocks = 4;                             // 64 output columns per panel (one task)
constexpr int64_t kPanelCols = kBlockCols * kPanelBlocks;
constexpr int64_t kUnitBytes = 64;
constexpr int kTileRows = 4;      // rows per small tile: 4 x 4 blocks = 16 accumulators
constexpr int kWideTileRows = 6;  // rows per tile_f32 call: 6 x 4 blocks = 24 accumulators
// Rows from which a task dequantizes each K block once instead of in registers per row group: at 16 rows
// a tile_small pass costs 4 row groups x (3-4 decode ops + 4 FMA) per 16 weights, the scratch 2 + 16.
constexpr int64_t kWideRows = 16;
constexpr int64_t kSmallK = 256;  // k per K block of the small path (int8 16 KiB of a panel, int4 8 KiB)
constexpr int64_t kWideK = 64;    // k per scratch block: 64 x 64 float32 = 16 KiB
constexpr int64_t kPrefetchUnits = 32;  // 2 KiB ahead in each column block's stream
// bfloat16 rows from which a task writes each K block's integers once as bfloat16 pairs and runs the
// vdpbf16ps tile of bf16_dot_tile.h (on this machine kind twice the float32 FMA's rate): 8 rows amortise
// the conversion (about 7 ops per 32 weights) over 8 dot products.
constexpr int64_t kDotRows = 8;
constexpr int64_t kDotK = 128;  // k per pair scratch block: 64 pairs x 64 columns x 2 bytes = 16 KiB
// int8 with bfloat16 rows: from this many rows the small path runs tile_small_int8_pairs (fewer ops per row).
constexpr int64_t kInt8PairRows = 2;

// Whether bfloat16 activation rows are worth passing as bfloat16 bits too (run_panel's a16): int4's pair
// tile at any rows, int8's pair and dot tiles from kInt8PairRows.
inline bool wants_bf16_rows(int bits, int64_t rows) { return bits == 4 || rows >= kInt8PairRows; }

// One packed weight [n, K] (one expert of a stack).
struct Matrix {
  int bits;                      // 8 or 4
  int64_t n, blocks;             // output columns, 16-column blocks
  int64_t groups, group_units;   // groups along K, units per (padded) group
  const uint8_t* q;              // [blocks][groups * group_units][64]
  const float* scales;           // [blocks][groups][16]
  const uint8_t* zeros;          // [blocks][groups][16], int8 (8 bits) or uint8 (4 bits); null: symmetric

  int64_t unit_k() const { return bits == 8 ? 4 : 8; }
  int64_t units() const { return groups * group_units; }
  int64_t padded_k() const { return units() * unit_k(); }
  float zero(int64_t block, int64_t g, int64_t lane) const {
    if (!zeros) return bits == 4 ? 8.f : 0.f;
    const uint8_t z = zeros[(block * groups + g) * kBlockCols + lane];
    return bits == 8 ? static_cast<float>(static_cast<int8_t>(z)) : static_cast<float>(z);
  }
};

// The nibble of an int4 lane holding k offset kk: even k in the low 16 bits, odd k in the high 16 bits, so
// (lane >> 4p) & 0x000F000F holds k 2p and 2p + 1 in the two halves of a bfloat16 pair (tile_small_pairs).
constexpr int nibble_slot(int kk) { return kk % 2 ? 4 + kk / 2 : kk / 2; }

// The integer at k offset kk (< unit_k) of lane `lane` in one unit (plain C++; the vector tiles' meaning).
template <int Bits>
inline int lane_value(const uint8_t* unit, int lane, int kk) {
  if constexpr (Bits == 8) return static_cast<int8_t>(unit[4 * lane + kk]);
  const int slot = nibble_slot(kk);
  const uint8_t byte = unit[4 * lane + slot / 2];
  return slot % 2 ? byte >> 4 : byte & 0xF;
}

// The small tiles read each integer q as the float32 v = 1 + (q + kBias) / kLaneScale in [1, 2): its bits
// are q's bits moved under the exponent of 1.0 (one shift and one and-or, no int -> float convert), so
// q = kLaneScale * v - kLaneOffset and (q - z) s = kLaneScale s v - (kLaneOffset + z) s: the tiles sum
// kLaneScale s * sum(v x) per group and add_zero_terms subtracts (kLaneOffset + z) s * sum(x).
// int4: v = 1 + q / 16 (the nibble in the mantissa's top 4 bits); int8: v = 1 + (q + 128) / 256 (the byte,
// sign bit flipped, in its top 8).
template <int Bits>
constexpr float kLaneScale = Bits == 8 ? 256.f : 16.f;
template <int Bits>
constexpr float kLaneOffset = Bits == 8 ? 384.f : 16.f;

template <int Bits>
inline float lane_float(const uint8_t* unit, int lane, int kk) {  // v, exactly (plain C++)
  return (static_cast<float>(lane_value<Bits>(unit, lane, kk)) + kLaneOffset<Bits>) / kLaneScale<Bits>;
}

#if defined(__AVX512F__)
template <int Shift>
inline __m512i shift_left(__m512i v) {  // by Shift bits, right when negative
  if constexpr (Shift > 0) return _mm512_slli_epi32(v, Shift);
  else if constexpr (Shift < 0) return _mm512_srli_epi32(v, -Shift);
  else return v;
}

// v (above) of the 16 integers at k offset KK of a unit's lanes. int8 bytes are two's complement: the
// field's top bit (the sign) is flipped on the way (q + 128), in the same vpternlogd.
template <int Bits, int KK>
inline __m512 unit_v_ps(__m512i lanes) {
  constexpr int kTop = 23 - (Bits == 8 ? 8 : 4);                  // where the field starts in the mantissa
  constexpr int kFrom = Bits == 8 ? 8 * KK : 4 * nibble_slot(KK);  // where it starts in the lane
  const __m512i field = shift_left<kTop - kFrom>(lanes);
  const __m512i mask = _mm512_set1_epi32(Bits == 8 ? 0x007F8000 : 0x00780000);
  // int4: (field & mask) | 1.0f (vpternlogd's 0xEA is (A & B) | C); int8: mask ? field ^ C : C with C = 1.0f
  // and the sign bit (0x6A), so the sign is flipped and the exponent set in one op
  if constexpr (Bits == 8)
    return _mm512_castsi512_ps(_mm512_ternarylogic_epi32(field, mask, _mm512_set1_epi32(0x3FC00000), 0x6A));
  else
    return _mm512_castsi512_ps(_mm512_ternarylogic_epi32(field, mask, _mm512_set1_epi32(0x3F800000), 0xEA));
}

// The 16 integers at k offset KK of a unit's lanes, as float32 q (the wide path's dequantization).
template <int Bits, int KK>
inline __m512 unit_k_ps(__m512i v) {
  if constexpr (Bits == 8) {
    const __m512i high = KK == 3 ? v : _mm512_slli_epi32(v, 24 - 8 * KK);  // byte KK to the top
    return _mm512_cvtepi32_ps(_mm512_srai_epi32(high, 24));
  } else {
    constexpr int kFrom = 4 * nibble_slot(KK);
    const __m512i shifted = kFrom == 0 ? v : _mm512_srli_epi32(v, kFrom);
    return _mm512_cvtepi32_ps(kFrom == 28 ? shifted : _mm512_and_si512(shifted, _mm512_set1_epi32(0xF)));
  }
}

template <int... I, typename F>
inline void unrolled(std::integer_sequence<int, I...>, F&& f) {
  (f(std::integral_constant<int, I>{}), ...);
}
#endif

// c[r][16j + l] += kLaneScale * s_j[l] * sum over units [u0, u1) of v . a[r] for R rows and C column
// blocks, within one group (s: the group's scales of block 0, block j's sstride floats further; v: the
// lane floats above). a: float32 rows lda apart over the padded K; w: block 0's unit 0, block j bstride
// bytes further; c: rows ldc apart. pf: prefetch this many units ahead (0: none).
template <int Bits, int R, int C>
void tile_small(const float* a, int64_t lda, const uint8_t* w, int64_t bstride, int64_t u0, int64_t u1,
                const float* s, int64_t sstride, float* c, int64_t ldc, int64_t pf) {
  constexpr int kUnitK = Bits == 8 ? 4 : 8;
#if defined(__AVX512F__)
  // accumulator sets: few rows need more independent FMA chains (an FMA's latency is 4 cycles)
  constexpr int S = R * C <= 4 ? 4 : R * C <= 8 ? 2 : 1;
  __m512 acc[R][C][S];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < C; ++j)
      for (int t = 0; t < S; ++t) acc[r][j][t] = _mm512_setzero_ps();
  for (int64_t u = u0; u < u1; ++u) {
    if (pf)
      for (int j = 0; j < C; ++j)
        _mm_prefetch(reinterpret_cast<const char*>(w + j * bstride + (u + pf) * kUnitBytes), _MM_HINT_T0);
    for (int j = 0; j < C; ++j) {
      const __m512i v = _mm512_loadu_si512(w + j * bstride + u * kUnitBytes);
      unrolled(std::make_integer_sequence<int, kUnitK>{}, [&](auto kk) {
        constexpr int KK = decltype(kk)::value;
        const __m512 wk = unit_v_ps<Bits, KK>(v);
        for (int r = 0; r < R; ++r)
          acc[r][j][KK % S] = _mm512_fmadd_ps(_mm512_set1_ps(a[r * lda + u * kUnitK + KK]), wk, acc[r][j][KK % S]);
      });
    }
  }
  for (int j = 0; j < C; ++j) {
    const __m512 sj = _mm512_mul_ps(_mm512_loadu_ps(s + j * sstride), _mm512_set1_ps(kLaneScale<Bits>));
    for (int r = 0; r < R; ++r) {
      __m512 sum = acc[r][j][0];
      for (int t = 1; t < S; ++t) sum = _mm512_add_ps(sum, acc[r][j][t]);
      float* cr = c + r * ldc + kBlockCols * j;
      _mm512_storeu_ps(cr, _mm512_fmadd_ps(sum, sj, _mm512_loadu_ps(cr)));
    }
  }
#else
  (void)pf;
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < C; ++j)
      for (int lane = 0; lane < kBlockCols; ++lane) {
        float sum = 0.f;
        for (int64_t u = u0; u < u1; ++u)
          for (int kk = 0; kk < kUnitK; ++kk)
            sum += lane_float<Bits>(w + j * bstride + u * kUnitBytes, lane, kk) * a[r * lda + u * kUnitK + kk];
        c[r * ldc + kBlockCols * j + lane] += kLaneScale<Bits> * s[j * sstride + lane] * sum;
      }
#endif
}

#if defined(__AVX512BF16__)
// tile_small for int4 and bfloat16 rows a (raw bits, lda apart): each lane's nibbles k 2p and 2p + 1 become
// the bfloat16 pair (v_2p, v_2p+1), v = 1 + q / 16 (0x3F80 | q << 3: the nibble in the top of the 7-bit
// mantissa), and one vdpbf16ps sums them against the broadcast pair (a_2p, a_2p+1) for 16 columns. Products
// of bfloat16 are exact in float32, so this is tile_small's sum up to float32 summation order.
template <int R, int C>
void tile_small_pairs(const uint16_t* a, int64_t lda, const uint8_t* w, int64_t bstride, int64_t u0, int64_t u1,
                      const float* s, int64_t sstride, float* c, int64_t ldc, int64_t pf) {
  constexpr int kUnitK = 8;
  constexpr int S = R * C <= 4 ? 4 : R * C <= 8 ? 2 : 1;
  __m512 acc[R][C][S];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < C; ++j)
      for (int t = 0; t < S; ++t) acc[r][j][t] = _mm512_setzero_ps();
  const __m512i mask = _mm512_set1_epi32(0x00780078), one = _mm512_set1_epi32(0x3F803F80);
  for (int64_t u = u0; u < u1; ++u) {
    if (pf)
      for (int j = 0; j < C; ++j)
        _mm_prefetch(reinterpret_cast<const char*>(w + j * bstride + (u + pf) * kUnitBytes), _MM_HINT_T0);
    for (int j = 0; j < C; ++j) {
      const __m512i v = _mm512_loadu_si512(w + j * bstride + u * kUnitBytes);
      unrolled(std::make_integer_sequence<int, kUnitK / 2>{}, [&](auto p) {
        constexpr int P = decltype(p)::value;
        // nibbles P and 4 + P to bits 3-6 and 19-22, then (x & mask) | one (vpternlogd 0xEA)
        const __m512bh wp =
            (__m512bh)_mm512_ternarylogic_epi32(shift_left<3 - 4 * P>(v), mask, one, 0xEA);
        for (int r = 0; r < R; ++r) {
          int32_t pair;
          std::memcpy(&pair, a + r * lda + u * kUnitK + 2 * P, sizeof pair);
          acc[r][j][P % S] = _mm512_dpbf16_ps(acc[r][j][P % S], (__m512bh)_mm512_set1_epi32(pair), wp);
        }
      });
    }
  }
  for (int j = 0; j < C; ++j) {
    const __m512 sj = _mm512_mul_ps(_mm512_loadu_ps(s + j * sstride), _mm512_set1_ps(kLaneScale<4>));
    for (int r = 0; r < R; ++r) {
      __m512 sum = acc[r][j][0];
      for (int t = 1; t < S; ++t) sum = _mm512_add_ps(sum, acc[r][j][t]);
      float* cr = c + r * ldc + kBlockCols * j;
      _mm512_storeu_ps(cr, _mm512_fmadd_ps(sum, sj, _mm512_loadu_ps(cr)));
    }
  }
}
#endif

#if defined(__AVX512BF16__)
// tile_small for int8 and bfloat16 rows a (raw bits, lda apart; kInt8PairRows rows and more): the 16 bytes of
// 4 columns x 4 k of a unit become float32 q by one sign extension (from memory) and one convert, two such
// vectors one vector of bfloat16 (exact: |q| <= 128) holding column i's pairs (q_k0, q_k1), (q_k2, q_k3) in
// lanes 2i, 2i + 1, and one vdpbf16ps per row sums 8 columns x 4 k against the broadcast (a_k0, a_k1), (a_k2,
// a_k3). Per 64 bytes that is 10 ops and 2 per row, against tile_small's 8 and 4: from two rows it does less
// (at one row more: tile_small stays). The sums are q . a itself (no lane offset, scale 1).
template <int R, int C>
void tile_small_int8_pairs(const uint16_t* a, int64_t lda, const uint8_t* w, int64_t bstride, int64_t u0,
                           int64_t u1, const float* s, int64_t sstride, float* c, int64_t ldc, int64_t pf) {
  constexpr int kUnitK = 4;
  __m512 acc[R][C][2];  // [.][.][h]: columns 8h..8h + 7 of the block, two lanes each
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < C; ++j) acc[r][j][0] = acc[r][j][1] = _mm512_setzero_ps();
  for (int64_t u = u0; u < u1; ++u) {
    if (pf)
      for (int j = 0; j < C; ++j)
        _mm_prefetch(reinterpret_cast<const char*>(w + j * bstride + (u + pf) * kUnitBytes), _MM_HINT_T0);
    __m512i av[R];
    for (int r = 0; r < R; ++r) {
      int64_t four;  // a_k0..a_k3 of this unit
      std::memcpy(&four, a + r * lda + u * kUnitK, sizeof four);
      av[r] = _mm512_set1_epi64(four);
    }
    for (int j = 0; j < C; ++j) {
      const uint8_t* unit = w + j * bstride + u * kUnitBytes;
      for (int h = 0; h < 2; ++h) {
        auto q_ps = [&](int at) {
          return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(unit + at))));
        };
        const __m512bh pairs = _mm512_cvtne2ps_pbh(q_ps(32 * h + 16), q_ps(32 * h));
        for (int r = 0; r < R; ++r) acc[r][j][h] = _mm512_dpbf16_ps(acc[r][j][h], (__m512bh)av[r], pairs);
      }
    }
  }
  // column i of the block: lanes 2i and 2i + 1 of acc[h = i / 8] (vpermt2ps picks across the two)
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
  for (int j = 0; j < C; ++j) {
    const __m512 sj = _mm512_loadu_ps(s + j * sstride);
    for (int r = 0; r < R; ++r) {
      const __m512 sum = _mm512_add_ps(_mm512_permutex2var_ps(acc[r][j][0], even, acc[r][j][1]),
                                       _mm512_permutex2var_ps(acc[r][j][0], odd, acc[r][j][1]));
      float* cr = c + r * ldc + kBlockCols * j;
      _mm512_storeu_ps(cr, _mm512_fmadd_ps(sum, sj, _mm512_loadu_ps(cr)));
    }
  }
}
#endif

// wf[k][16j + l] = (q - z) * s for the units [u0, u1) of C column blocks starting at `block` (row length
// 16C): the scratch tile the wide path runs bf16_tile::tile_f32 on.
template <int Bits, int C>
void dequantize_block(const Matrix& m, int64_t block, int64_t u0, int64_t u1, float* wf) {
  constexpr int kUnitK = Bits == 8 ? 4 : 8;
  constexpr int64_t ldw = C * kBlockCols;
  for (int j = 0; j < C; ++j) {
    const uint8_t* wq = m.q + (block + j) * m.units() * kUnitBytes;
    for (int64_t g0 = u0; g0 < u1;) {  // the parts of groups in [u0, u1): one scale and zero vector each
      const int64_t g = g0 / m.group_units, g1 = std::min(u1, (g + 1) * m.group_units);
      alignas(64) float sl[kBlockCols], zl[kBlockCols];
      for (int lane = 0; lane < kBlockCols; ++lane) {
        sl[lane] = m.scales[((block + j) * m.groups + g) * kBlockCols + lane];
        zl[lane] = m.zero(block + j, g, lane);
      }
      for (int64_t u = g0; u < g1; ++u) {
        float* dst = wf + (u - u0) * kUnitK * ldw + j * kBlockCols;
#if defined(__AVX512F__)
        const __m512 s = _mm512_load_ps(sl), z = _mm512_load_ps(zl);
        const __m512i v = _mm512_loadu_si512(wq + u * kUnitBytes);
        unrolled(std::make_integer_sequence<int, kUnitK>{}, [&](auto kk) {
          constexpr int KK = decltype(kk)::value;
          _mm512_storeu_ps(dst + KK * ldw, _mm512_mul_ps(_mm512_sub_ps(unit_k_ps<Bits, KK>(v), z), s));
        });
#else
        for (int kk = 0; kk < kUnitK; ++kk)
          for (int lane = 0; lane < kBlockCols; ++lane)
            dst[kk * ldw + lane] =
                (static_cast<float>(lane_value<Bits>(wq + u * kUnitBytes, lane, kk)) - zl[lane]) * sl[lane];
#endif
      }
      g0 = g1;
    }
  }
}

// c[r][col] -= sum_g s[g][col] * (offset + z[g][col]) * sx[r][g] for C blocks from `block` (sx: a's group
// sums, rows `groups` apart): the term the small and dot tiles leave out (offset: their lanes' kLaneOffset
// or 0).
template <int C>
void add_zero_terms(const Matrix& m, int64_t block, const float* sx, int64_t rows, float* c, int64_t ldc,
                    float offset) {
  for (int64_t g = 0; g < m.groups; ++g)
    for (int j = 0; j < C; ++j) {
      float zs[kBlockCols];
      const float* s = m.scales + ((block + j) * m.groups + g) * kBlockCols;
      for (int lane = 0; lane < kBlockCols; ++lane)
        zs[lane] = s[lane] * (offset + m.zero(block + j, g, lane));
      for (int64_t r = 0; r < rows; ++r) {
        float* cr = c + r * ldc + j * kBlockCols;
        const float x = sx[r * m.groups + g];
#pragma omp simd
        for (int lane = 0; lane < kBlockCols; ++lane) cr[lane] -= zs[lane] * x;
      }
    }
}

// The units [u0, u1) of C column blocks from `block` as bfloat16 integers in bf16_dot_tile.h's pair layout:
// wp [C][pairs][16][2], column block j wstride elements after j - 1. q is exact in bfloat16 (|q| <= 128),
// and the bfloat16 of a small integer is its float32's high half.
template <int Bits, int C>
void integer_pairs(const Matrix& m, int64_t block, int64_t u0, int64_t u1, uint16_t* wp, int64_t wstride) {
  constexpr int kUnitK = Bits == 8 ? 4 : 8;
  for (int j = 0; j < C; ++j) {
    const uint8_t* wq = m.q + (block + j) * m.units() * kUnitBytes;
    for (int64_t u = u0; u < u1; ++u) {
      uint16_t* dst = wp + j * wstride + (u - u0) * kUnitK * kBlockCols;
#if defined(__AVX512F__)
      const __m512i v = _mm512_loadu_si512(wq + u * kUnitBytes);
      unrolled(std::make_integer_sequence<int, kUnitK / 2>{}, [&](auto p) {
        constexpr int P = decltype(p)::value;
        const __m512i lo = _mm512_castps_si512(unit_k_ps<Bits, 2 * P>(v));
        const __m512i hi = _mm512_castps_si512(unit_k_ps<Bits, 2 * P + 1>(v));
        // (hi & 0xFFFF0000) | (lo >> 16): vpternlogd's 0xEA is (A & B) | C
        const __m512i pair = _mm512_ternarylogic_epi32(hi, _mm512_set1_epi32(static_cast<int32_t>(0xFFFF0000u)),
                                                       _mm512_srli_epi32(lo, 16), 0xEA);
        _mm512_storeu_si512(dst + P * 2 * kBlockCols, pair);
      });
#else
      for (int kk = 0; kk < kUnitK; ++kk)
        for (int lane = 0; lane < kBlockCols; ++lane) {
          const float f = static_cast<float>(lane_value<Bits>(wq + u * kUnitBytes, lane, kk));
          uint32_t bits;
          std::memcpy(&bits, &f, sizeof bits);
          dst[(kk / 2) * 2 * kBlockCols + 2 * lane + kk % 2] = static_cast<uint16_t>(bits >> 16);
        }
#endif
    }
  }
}

// c = a . w over pairs [kk0, kk1) of R bfloat16 rows and C column blocks (rows kPanelCols apart): the
// vdpbf16ps tile of bf16_dot_tile.h where built, else its plain C++ tile. R <= 6 with C = 4 keeps 24
// accumulators and 4 weight vectors per 6 broadcasts in registers.
template <int R, int C>
inline void dot_tile(const uint16_t* a, int64_t lda, const uint16_t* w, int64_t wstride, int64_t kk0, int64_t kk1,
                     float* c) {
#if defined(__AVX512BF16__)
  bf16_tile::tile_dpbf16<R, C>(a, lda, w, wstride, kk0, kk1, false, c, kPanelCols, false, {});
#else
  bf16_tile::tile_scalar<uint16_t, R, C>(a, lda, w, wstride, kk0, kk1, false, c, kPanelCols, false);
#endif
}

// Calls f(std::integral_constant<int, R>) for R in 1..Max.
template <int Max, typename F>
void with_rows(int rows, F&& f) {
  static_assert(Max >= 1 && Max <= 6);
  switch (rows) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: if constexpr (Max >= 2) f(std::integral_constant<int, 2>{}); break;
    case 3: if constexpr (Max >= 3) f(std::integral_constant<int, 3>{}); break;
    case 4: if constexpr (Max >= 4) f(std::integral_constant<int, 4>{}); break;
    case 5: if constexpr (Max >= 5) f(std::integral_constant<int, 5>{}); break;
    default: if constexpr (Max >= 6) f(std::integral_constant<int, 6>{}); break;
  }
}

// The bfloat16 path of run_panel_c (rows >= kDotRows): per K block of kDotK, the integers as pairs, then
// per group part and row group of <= kWideTileRows the dpbf16 tile into cg and c += s * cg.
template <int Bits, int C>
void run_dot_panel(const Matrix& m, int64_t block, const uint16_t* a16, int64_t lda, const float* sx,
                   int64_t rows, float* c, uint16_t* wp) {
  constexpr int kUnitK = Bits == 8 ? 4 : 8;
  constexpr int64_t step = kDotK / kUnitK, wstride = kDotK * kBlockCols;
  alignas(64) float cg[kWideTileRows * kPanelCols];
  const int64_t units = m.units();
  for (int64_t b0 = 0; b0 < units; b0 += step) {
    const int64_t b1 = std::min(units, b0 + step);
    integer_pairs<Bits, C>(m, block, b0, b1, wp, wstride);
    for (int64_t u0 = b0; u0 < b1;) {  // the parts of groups inside this K block
      const int64_t g = u0 / m.group_units, u1 = std::min(b1, (g + 1) * m.group_units);
      const int64_t kk0 = (u0 - b0) * kUnitK / 2, kk1 = (u1 - b0) * kUnitK / 2;
      for (int64_t r = 0; r < rows; r += kWideTileRows) {
        const int rr = static_cast<int>(std::min<int64_t>(kWideTileRows, rows - r));
        with_rows<kWideTileRows>(rr, [&](auto n) {
          dot_tile<decltype(n)::value, C>(a16 + r * lda + b0 * kUnitK, lda, wp, wstride, kk0, kk1, cg);
        });
        for (int j = 0; j < C; ++j) {
          const float* s = m.scales + ((block + j) * m.groups + g) * kBlockCols;
          for (int i = 0; i < rr; ++i) {
            float* cr = c + (r + i) * kPanelCols + j * kBlockCols;
            const float* gr = cg + i * kPanelCols + j * kBlockCols;
#pragma omp simd
            for (int lane = 0; lane < kBlockCols; ++lane) cr[lane] += s[lane] * gr[lane];
          }
        }
      }
      u0 = u1;
    }
  }
  add_zero_terms<C>(m, block, sx, rows, c, kPanelCols, 0.f);
}

template <int Bits, int C>
void run_panel_c(const Matrix& m, int64_t block, const float* a, const uint16_t* a16, int64_t lda,
                 const float* sx, int64_t rows, float* c, float* scratch) {
  constexpr int kUnitK = Bits == 8 ? 4 : 8;
  std::fill(c, c + rows * kPanelCols, 0.f);
  if (a16 && rows >= kDotRows) {
    run_dot_panel<Bits, C>(m, block, a16, lda, sx, rows, c, reinterpret_cast<uint16_t*>(scratch));
    return;
  }
  const int64_t units = m.units(), bstride = units * kUnitBytes, sstride = m.groups * kBlockCols;
  const uint8_t* w = m.q + block * bstride;
  const float* s = m.scales + block * sstride;
  if (rows >= kWideRows) {  // dequantize each K block once into the scratch tile, then plain FMA tiles
    constexpr int64_t step = kWideK / kUnitK;
    for (int64_t u0 = 0; u0 < units; u0 += step) {
      const int64_t u1 = std::min(units, u0 + step);
      dequantize_block<Bits, C>(m, block, u0, u1, scratch);
      for (int64_t r = 0; r < rows; r += kWideTileRows)
        with_rows<kWideTileRows>(static_cast<int>(std::min<int64_t>(kWideTileRows, rows - r)), [&](auto rr) {
          bf16_tile::tile_f32<decltype(rr)::value, C>(a + r * lda + u0 * kUnitK, lda, scratch,
                                                      (u1 - u0) * kUnitK, c + r * kPanelCols, kPanelCols, true);
        });
    }
    return;
  }
  constexpr int64_t step = kSmallK / kUnitK;
#if defined(__AVX512BF16__)
  const bool int8_pairs = Bits == 8 && a16 && rows >= kInt8PairRows;
#else
  const bool int8_pairs = false;
#endif
  for (int64_t b0 = 0; b0 < units; b0 += step) {  // K blocks: later row groups find the block in L1
    const int64_t b1 = std::min(units, b0 + step);
    for (int64_t r = 0; r < rows; r += kTileRows) {
      const int64_t pf = r == 0 ? kPrefetchUnits : 0;
      with_rows<kTileRows>(static_cast<int>(std::min<int64_t>(kTileRows, rows - r)), [&](auto rr) {
        for (int64_t u0 = b0; u0 < b1;) {  // the parts of groups inside this K block
          const int64_t g = u0 / m.group_units, u1 = std::min(b1, (g + 1) * m.group_units);
#if defined(__AVX512BF16__)
          if (int8_pairs) {
            tile_small_int8_pairs<decltype(rr)::value, C>(a16 + r * lda, lda, w, bstride, u0, u1,
                                                          s + g * kBlockCols, sstride, c + r * kPanelCols,
                                                          kPanelCols, pf);
            u0 = u1;
            continue;
          }
          if (Bits == 4 && a16) {
            tile_small_pairs<decltype(rr)::value, C>(a16 + r * lda, lda, w, bstride, u0, u1, s + g * kBlockCols,
                                                     sstride, c + r * kPanelCols, kPanelCols, pf);
            u0 = u1;
            continue;
          }
#endif
          tile_small<Bits, decltype(rr)::value, C>(a + r * lda, lda, w, bstride, u0, u1, s + g * kBlockCols,
                                                   sstride, c + r * kPanelCols, kPanelCols, pf);
          u0 = u1;
        }
      });
    }
  }
  add_zero_terms<C>(m, block, sx, rows, c, kPanelCols, int8_pairs ? 0.f : kLaneOffset<Bits>);
}

// c[r][0..64) = a[r] . W[panel's columns]^T for `rows` rows (the columns past n are garbage). a: float32
// rows lda apart over m.padded_k() (zero in the group padding); a16: the same rows as bfloat16 bits when
// they are bfloat16 values (null otherwise: the dot path and int4's small pair tile are skipped); sx[r][g] = sum of a[r] over group g
// (read by the small and dot paths); scratch: kWideK * kPanelCols floats.
inline void run_panel(const Matrix& m, int64_t panel, const float* a, const uint16_t* a16, int64_t lda,
                      const float* sx, int64_t rows, float* c, float* scratch) {
  const int64_t block = panel * kPanelBlocks;
  const int cols = static_cast<int>(std::min<int64_t>(kPanelBlocks, m.blocks - block));
  auto with_cols = [&](auto bits) {
    constexpr int B = decltype(bits)::value;
    switch (cols) {
      case 1: run_panel_c<B, 1>(m, block, a, a16, lda, sx, rows, c, scratch); break;
      case 2: run_panel_c<B, 2>(m, block, a, a16, lda, sx, rows, c, scratch); break;
      case 3: run_panel_c<B, 3>(m, block, a, a16, lda, sx, rows, c, scratch); break;
      default: run_panel_c<B, 4>(m, block, a, a16, lda, sx, rows, c, scratch); break;
    }
  };
  if (m.bits == 8) with_cols(std::integral_constant<int, 8>{});
  else with_cols(std::integral_constant<int, 4>{});
}

}  // namespace quant_tile
}  // namespace meshserve
