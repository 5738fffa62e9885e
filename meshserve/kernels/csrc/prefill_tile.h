// Meta-Attention prefill tiles: register-blocked, in the transposed score layout.
//
// A tile with more rows than a decode keeps its scaled queries transposed (qT [D, RP], RP = rows rounded up
// to 16 lanes), so a score block S^T [positions, rows] is a K element broadcast against 16 query rows: one
// K row feeds 16 rows per FMA, and K is read in its cache layout (no transpose per chunk). The softmax then
// runs across rows in the vector lanes, and P x V keeps kRowBlock output rows in registers per V row load.
// Causal work above the diagonal is skipped: a chunk only touches the rows that can see one of its positions
// (rows are ordered by query position), and only a chunk the diagonal crosses is masked.

#pragma once

#include <cstring>
#include <type_traits>
#include <vector>

#include "attention_task.h"
#include "bf16_bits.h"
#include "fast_exp.h"

namespace meshserve {
namespace attention {

typedef float f32x16 __attribute__((vector_size(64)));

inline f32x16 load16(const float* p) {
  f32x16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void store16(float* p, f32x16 v) { std::memcpy(p, &v, sizeof(v)); }

// Row pointers to the chunk's n K (or V) rows of KV head h as float: the cache itself for float, a widened
// copy in `buf` for bfloat16.
template <typename T>
inline void chunk_rows(const T* cache, const int32_t* table, const Shapes& s, int64_t h, int64_t c0, int64_t n,
                       int64_t D, float* buf, const float** rows) {
  const T* src[kChunk];
  kv_rows(cache, table, s, h, c0, n, D, src);
  for (int64_t j = 0; j < n; ++j) {
    if constexpr (std::is_same_v<T, float>) {
      rows[j] = src[j];
    } else {
      const uint16_t* bits = reinterpret_cast<const uint16_t*>(src[j]);
      float* dst = buf + j * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) dst[d] = bits_to_float(bits[d]);
      rows[j] = dst;
    }
  }
}

// sT[j, v*16 : (v+NV)*16] = K[j] . qT[:, same lanes] for J rows of K starting at j (NV vectors of rows).
template <int J, int NV, int DIM>
inline void score_block(const float* const* krows, const float* qT, int64_t RP, int64_t v, float* sT) {
  f32x16 acc[J][NV] = {};
  for (int d = 0; d < DIM; ++d) {
    f32x16 q[NV];
    for (int i = 0; i < NV; ++i) q[i] = load16(qT + d * RP + (v + i) * 16);
    for (int jj = 0; jj < J; ++jj) {
      const float k = krows[jj][d];
      for (int i = 0; i < NV; ++i) acc[jj][i] += k * q[i];
    }
  }
  for (int jj = 0; jj < J; ++jj)
    for (int i = 0; i < NV; ++i) store16(sT + jj * RP + (v + i) * 16, acc[jj][i]);
}

// acc[r, :] = alpha[r] * acc[r, :] + sum_j P^T[j, r] V[j, :] for R rows starting at r.
template <int R, int DIM>
inline void pv_block(float* acc, const float* alpha, const float* sT, int64_t RP, const float* const* vrows,
                     int64_t n, int64_t r) {
  constexpr int NV = DIM / 16;
  f32x16 a[R][NV];
  for (int rr = 0; rr < R; ++rr)
    for (int i = 0; i < NV; ++i) a[rr][i] = load16(acc + (r + rr) * DIM + i * 16) * alpha[r + rr];
  for (int64_t j = 0; j < n; ++j) {
    f32x16 v[NV];
    for (int i = 0; i < NV; ++i) v[i] = load16(vrows[j] + i * 16);
    for (int rr = 0; rr < R; ++rr) {
      const float p = sT[j * RP + r + rr];
      for (int i = 0; i < NV; ++i) a[rr][i] += p * v[i];
    }
  }
  for (int rr = 0; rr < R; ++rr)
    for (int i = 0; i < NV; ++i) store16(acc + (r + rr) * DIM + i * 16, a[rr][i]);
}

// One prefill / short task (mask NONE, CAUSAL or SLIDING; DIM a multiple of 16). Same outputs as run_task.
template <typename T, int DIM>
void run_tile(const int32_t* t, const T* q, const T* cache, const int32_t* tables, const Shapes& s, float scale,
              T* out, float* part_acc, float* part_ml, std::vector<float>& buf) {
  constexpr int64_t D = DIM;
  constexpr int kRowBlock = DIM <= 64 ? 4 : 2;  // P x V: kRowBlock x DIM/16 accumulators stay in registers
  const int64_t G = s.group, rows = t[Q_ROWS] * G, h = t[KV_HEAD], RP = (rows + 15) / 16 * 16;
  const int64_t lo = t[KV_LO], hi = t[KV_HI], pos0 = t[Q_POS0], window = t[WINDOW];
  const bool causal = t[MASK] != NONE, sliding = t[MASK] == SLIDING;
  buf.resize(D * RP + rows * D + 5 * RP + kChunk * RP + 2 * kChunk * D);
  float* qT = buf.data();          // [D, RP] scaled queries, transposed; padding rows are 0
  float* acc = qT + D * RP;        // [rows, D] unnormalised output
  float* m = acc + rows * D;       // [RP] running max
  float* l = m + RP;               // [RP] running sum
  float* alpha = l + RP;           // [RP] this chunk's rescale of acc
  float* base = alpha + RP;        // [RP] the chunk's row max, then the exponent base
  float* qpos = base + RP;         // [RP] each row lane's query position (-1: padding, sees nothing)
  float* sT = qpos + RP;           // [kChunk, RP] scores, then probabilities
  float* kf = sT + kChunk * RP;    // [kChunk, D] widened K rows (bfloat16)
  float* vf = kf + kChunk * D;     // [kChunk, D] widened V rows (bfloat16)
  const float* krows[kChunk];
  const float* vrows[kChunk];
  std::fill(qT, qT + D * RP, 0.f);
  for (int64_t r = 0; r < rows; ++r) {  // row r = query r / G, head r % G (the group's heads are contiguous)
    const T* src = q + ((t[Q_START] + r / G) * s.heads + h * G + r % G) * D;
    for (int64_t d = 0; d < D; ++d) qT[d * RP + r] = static_cast<float>(src[d]) * scale;
  }
  for (int64_t r = 0; r < RP; ++r) qpos[r] = r < rows ? static_cast<float>(pos0 + r / G) : -1.f;
  std::fill(acc, acc + rows * D, 0.f);
  std::fill(m, m + RP, kNegInf);
  std::fill(l, l + RP, 0.f);
  const int32_t* table = tables + t[SEQ] * s.max_blocks;
  const int64_t v_half = s.v_half;
  const int64_t last_pos = pos0 + (rows - 1) / G;

  for (int64_t c0 = lo; c0 < hi; c0 += kChunk) {
    const int64_t n = std::min(kChunk, hi - c0);
    // Rows [r0, r1) see at least one position of this chunk: causal hides it from queries before c0, a
    // window from queries past c0 + n - 1 + window - 1.
    const int64_t r0 = causal ? std::max<int64_t>(0, c0 - pos0) * G : 0;
    const int64_t r1 = sliding ? std::min<int64_t>(rows, (c0 + n - 1 + window - pos0) * G) : rows;
    if (r0 >= r1) continue;
    const int64_t v0 = r0 / 16, v1 = (r1 + 15) / 16;
    prefetch_chunk(cache, table, s, h, c0 + kChunk, hi);  // arrives while this chunk computes
    chunk_rows(cache, table, s, h, c0, n, D, kf, krows);
    chunk_rows(cache + v_half, table, s, h, c0, n, D, vf, vrows);
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
      int64_t v = v0;
      for (; v + 2 <= v1; v += 2) score_block<8, 2, DIM>(krows + j, qT, RP, v, sT + j * RP);
      if (v < v1) score_block<8, 1, DIM>(krows + j, qT, RP, v, sT + j * RP);
    }
    for (; j < n; ++j)
      for (int64_t v = v0; v < v1; ++v) score_block<1, 1, DIM>(krows + j, qT, RP, v, sT + j * RP);
    if (s.softcap > 0.f)
      for (int64_t jj = 0; jj < n; ++jj) soft_cap(sT + jj * RP + v0 * 16, (v1 - v0) * 16, s.softcap);
    // Only a chunk the diagonal (or the window's edge) crosses is masked.
    const int64_t first_pos = pos0 + v0 * 16 / G, lanes_end = v1 * 16;
    const bool diagonal = causal && (c0 + n - 1 > first_pos || lanes_end > rows ||
                                     (sliding && c0 < std::min(last_pos, pos0 + (lanes_end - 1) / G) - window + 1));
    if (diagonal) {
      const float lag = sliding ? static_cast<float>(window) : std::numeric_limits<float>::infinity();
      for (int64_t jj = 0; jj < n; ++jj) {
        const float pos = static_cast<float>(c0 + jj);
        float* row = sT + jj * RP;
#pragma omp simd
        for (int64_t r = v0 * 16; r < lanes_end; ++r)
          row[r] = (pos > qpos[r] || pos <= qpos[r] - lag) ? kNegInf : row[r];
      }
    }
    // Online softmax, each loop across the row lanes (vectorised: 16 rows per instruction).
    const int64_t a0 = v0 * 16;
    std::fill(base + a0, base + lanes_end, kNegInf);
    for (int64_t jj = 0; jj < n; ++jj) {
      const float* row = sT + jj * RP;
#pragma omp simd
      for (int64_t r = a0; r < lanes_end; ++r) base[r] = std::max(base[r], row[r]);
    }
#pragma omp simd
    for (int64_t r = a0; r < lanes_end; ++r) {
      const float m_new = std::max(m[r], base[r]);
      alpha[r] = m_new == kNegInf ? 1.f : exp_nonpositive(m[r] - m_new);
      m[r] = m_new;
      base[r] = m_new == kNegInf ? 0.f : m_new;  // a row with nothing visible yet keeps exp = 0
      l[r] *= alpha[r];
    }
    for (int64_t jj = 0; jj < n; ++jj) {
      float* row = sT + jj * RP;
#pragma omp simd
      for (int64_t r = a0; r < lanes_end; ++r) {
        row[r] = exp_nonpositive(row[r] - base[r]);
        l[r] += row[r];
      }
    }
    int64_t r = r0;
    for (; r + kRowBlock <= r1; r += kRowBlock) pv_block<kRowBlock, DIM>(acc, alpha, sT, RP, vrows, n, r);
    for (; r < r1; ++r) pv_block<1, DIM>(acc, alpha, sT, RP, vrows, n, r);
  }
  finish_task(t, s, acc, m, l, rows, D, out, part_acc, part_ml);
}

}  // namespace attention
}  // namespace meshserve
