// Meta-Attention decode tiles: a task of at most kDecodeRows rows (a decode's G query heads, or a short
// verify block) keeps its queries and its output rows in registers and reads each K / V row once, straight
// from the cache (bfloat16 widened in registers, no copy into a buffer), the next chunk's rows prefetched.
// Scores are dot products (horizontal sums, four positions per shuffle tree); the softmax runs over a
// chunk's positions; P x V adds each V row to every output row.
#pragma once

#include <cstring>
#include <type_traits>
#include <utility>

#include "attention_task.h"
#include "fast_exp.h"
#include "prefill_tile.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace meshserve {
namespace attention {

constexpr int64_t kDecodeRows = 4;

typedef uint32_t u32x16 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));

// 32 values from p as two float32 vectors: float as they are; bfloat16 as the even elements (the raw bits
// shifted into a float's high half) and the odd ones (the low half masked off): one 64-byte load and two
// integer ops, where widening 16 at a time costs a split vpmovzxwd and an insert per 16. Dot products do not
// care about the order; a sum of V rows leaves its output lanes in that order (interleave32 restores it).
template <typename T>
inline void load32_as_float(const T* p, f32x16& a, f32x16& b) {
  if constexpr (std::is_same_v<T, float>) {
    a = load16(p);
    b = load16(p + 16);
  } else {
    u32x16 bits;
    std::memcpy(&bits, p, sizeof(bits));
    const u32x16 even = bits << 16, odd = bits & 0xFFFF0000u;
    std::memcpy(&a, &even, sizeof(a));
    std::memcpy(&b, &odd, sizeof(b));
  }
}

// Stores the 32 values load32_as_float<T> split into (a, b), in their original order.
template <typename T>
inline void store32_in_order(float* p, f32x16 a, f32x16 b) {
  if constexpr (std::is_same_v<T, float>) {
    store16(p, a);
    store16(p + 16, b);
  } else {
    const i32x16 lo = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23};
    store16(p, __builtin_shuffle(a, b, lo));
    store16(p + 16, __builtin_shuffle(a, b, lo + 8));
  }
}

inline float sum_lanes(f32x16 v) {
#if defined(__AVX512F__)
  return _mm512_reduce_add_ps(reinterpret_cast<__m512>(v));
#else
  float s = 0.f;
  for (int i = 0; i < 16; ++i) s += v[i];
  return s;
#endif
}

// s[0..3] = the lane sums of d[0..3]: one shuffle tree for all four (9 shuffles, 5 adds) instead of four
// separate horizontal sums (about 32 instructions).
inline void sum4(const f32x16* d, float* s) {
#if defined(__AVX512F__)
  const __m512 d0 = reinterpret_cast<__m512>(d[0]), d1 = reinterpret_cast<__m512>(d[1]);
  const __m512 d2 = reinterpret_cast<__m512>(d[2]), d3 = reinterpret_cast<__m512>(d[3]);
  // 256-bit halves: t0 = [8 partial sums of d0 | of d1], t1 = [d2 | d3]
  const __m512 t0 = _mm512_add_ps(_mm512_shuffle_f32x4(d0, d1, 0x44), _mm512_shuffle_f32x4(d0, d1, 0xEE));
  const __m512 t1 = _mm512_add_ps(_mm512_shuffle_f32x4(d2, d3, 0x44), _mm512_shuffle_f32x4(d2, d3, 0xEE));
  // 128-bit blocks: u = [4 partial sums of d0 | d1 | d2 | d3]
  const __m512 u = _mm512_add_ps(_mm512_shuffle_f32x4(t0, t1, 0x88), _mm512_shuffle_f32x4(t0, t1, 0xDD));
  const __m512 x = _mm512_add_ps(u, _mm512_permute_ps(u, 0x4E));
  const __m512 y = _mm512_add_ps(x, _mm512_permute_ps(x, 0xB1));  // every lane of block b: the sum of d[b]
  const __m512i lane0 = _mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);
  const __m512 sums = _mm512_permutexvar_ps(lane0, y);  // lane 0 of each block, in the low 128 bits
  _mm_storeu_ps(s, _mm512_castps512_ps128(sums));
#else
  for (int b = 0; b < 4; ++b) s[b] = sum_lanes(d[b]);
#endif
}

// Online softmax of one row's chunk scores sc[0, kChunk) over its visible columns [jlo, jhi): sc becomes
// the probabilities (0 where hidden) and (m, l) the running max and sum; returns the factor the row's
// accumulator must be scaled by, or -1 when nothing in the chunk is visible (sc all 0, nothing changes).
inline float softmax_chunk(float* sc, int64_t jlo, int64_t jhi, float& m, float& l) {
#if defined(__AVX512F__)
  static_assert(kChunk == 32, "two 16-lane vectors per chunk");
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i lo = _mm512_set1_epi32(static_cast<int32_t>(jlo)), hi = _mm512_set1_epi32(static_cast<int32_t>(jhi));
  __mmask16 vis[2];
  __m512 x[2];
  for (int b = 0; b < 2; ++b) {
    const __m512i j = _mm512_add_epi32(lane, _mm512_set1_epi32(16 * b));
    vis[b] = _mm512_cmpge_epi32_mask(j, lo) & _mm512_cmplt_epi32_mask(j, hi);
    x[b] = _mm512_mask_loadu_ps(_mm512_set1_ps(kNegInf), vis[b], sc + 16 * b);
  }
  const float cmax = _mm512_reduce_max_ps(_mm512_max_ps(x[0], x[1]));
  if (cmax == kNegInf) {
    std::memset(sc, 0, kChunk * sizeof(float));
    return -1.f;
  }
  const float m_new = std::max(m, cmax), alpha = exp_nonpositive(m - m_new);
  __m512 sum = _mm512_setzero_ps();
  for (int b = 0; b < 2; ++b) {
    const __m512 p = _mm512_maskz_mov_ps(vis[b], exp_clamped16(_mm512_sub_ps(x[b], _mm512_set1_ps(m_new))));
    _mm512_storeu_ps(sc + 16 * b, p);
    sum = _mm512_add_ps(sum, p);
  }
  m = m_new;
  l = l * alpha + _mm512_reduce_add_ps(sum);
  return alpha;
#else
  float cmax = kNegInf;
  for (int64_t j = jlo; j < jhi; ++j) cmax = std::max(cmax, sc[j]);
  if (cmax == kNegInf) {
    std::fill(sc, sc + kChunk, 0.f);
    return -1.f;
  }
  const float m_new = std::max(m, cmax), alpha = exp_nonpositive(m - m_new);
  float sum = 0.f;
  for (int64_t j = 0; j < kChunk; ++j) {
    const float p = (j >= jlo && j < jhi) ? exp_nonpositive(sc[j] - m_new) : 0.f;
    sc[j] = p;
    sum += p;
  }
  m = m_new;
  l = l * alpha + sum;
  return alpha;
#endif
}

// One decode / short task of R rows (mask NONE, CAUSAL or SLIDING; DIM a multiple of 32). Rows hold 32
// values per pair of vectors in load32_as_float's order, queries and accumulators alike.
template <typename T, int DIM, int R>
void run_decode(const int32_t* t, const T* q, const T* cache, const int32_t* tables, const Shapes& s,
                float scale, T* out, float* part_acc, float* part_ml) {
  static_assert(DIM % 32 == 0, "rows are read 32 values at a time");
  constexpr int NV = DIM / 16;
  const int64_t G = s.group, h = t[KV_HEAD], lo = t[KV_LO], hi = t[KV_HI], window = t[WINDOW];
  f32x16 qv[R][NV], acc[R][NV];
  float m[R], l[R], sc[R][kChunk];
  for (int r = 0; r < R; ++r) {
    const T* src = q + ((t[Q_START] + r / G) * s.heads + h * G + r % G) * DIM;
    for (int i = 0; i < NV; i += 2) {
      load32_as_float(src + i * 16, qv[r][i], qv[r][i + 1]);
      qv[r][i] *= scale;
      qv[r][i + 1] *= scale;
      acc[r][i] = acc[r][i + 1] = f32x16{};
    }
    m[r] = kNegInf;
    l[r] = 0.f;
  }
  const int32_t* table = tables + t[SEQ] * s.max_blocks;
  const int64_t v_half = s.v_half;
  // Row pointers of this chunk, the next and the one after. The next chunk's K / V lines are requested into
  // L1 a row at a time inside the score and P.V loops while this chunk computes (one burst per chunk queued
  // on the line fill buffers and was slower), the chunk after's into L2: one chunk ahead alone leaves a
  // chunk's worth of DRAM latency exposed when the KV is cold (it is, in a forward through all layers).
  const T* rows_a[kChunk];
  const T* rows_b[kChunk];
  const T* rows_c[kChunk];
  const T** krow = rows_a;
  const T** next = rows_b;
  const T** after = rows_c;
  kv_rows(cache, table, s, h, lo, std::min(kChunk, hi - lo), DIM, krow);
  prefetch_rows(krow, std::min(kChunk, hi - lo), DIM, v_half);
  const int64_t n_second = std::min(kChunk, hi - lo - kChunk);
  if (n_second > 0) kv_rows(cache, table, s, h, lo + kChunk, n_second, DIM, next);
  for (int64_t j = 0; j < n_second; ++j) {
    prefetch_row<2>(next[j], DIM);
    prefetch_row<2>(next[j] + v_half, DIM);
  }
  for (int64_t c0 = lo; c0 < hi; c0 += kChunk) {
    const int64_t n = std::min(kChunk, hi - c0), n_next = std::min(kChunk, hi - c0 - kChunk);
    const int64_t n_after = std::min(kChunk, hi - c0 - 2 * kChunk);
    if (n_after > 0) kv_rows(cache, table, s, h, c0 + 2 * kChunk, n_after, DIM, after);
    int64_t j = 0;
    for (; j + 4 <= n; j += 4) {  // 4 positions' dot products reduced together (sum4)
      f32x16 dot[R][4];
      for (int jj = 0; jj < 4; ++jj) {
        if (j + jj < n_next) prefetch_row(next[j + jj], DIM);
        if (j + jj < n_after) prefetch_row<2>(after[j + jj], DIM);
        f32x16 k[NV];
        for (int i = 0; i < NV; i += 2) load32_as_float(krow[j + jj] + i * 16, k[i], k[i + 1]);
        for (int r = 0; r < R; ++r) {
          dot[r][jj] = k[0] * qv[r][0];
          for (int i = 1; i < NV; ++i) dot[r][jj] += k[i] * qv[r][i];
        }
      }
      for (int r = 0; r < R; ++r) sum4(dot[r], sc[r] + j);
    }
    for (; j < n; ++j) {
      if (j < n_next) prefetch_row(next[j], DIM);
      if (j < n_after) prefetch_row<2>(after[j], DIM);
      f32x16 k[NV];
      for (int i = 0; i < NV; i += 2) load32_as_float(krow[j] + i * 16, k[i], k[i + 1]);
      for (int r = 0; r < R; ++r) {
        f32x16 dot = k[0] * qv[r][0];
        for (int i = 1; i < NV; ++i) dot += k[i] * qv[r][i];
        sc[r][j] = sum_lanes(dot);
      }
    }
    for (int r = 0; r < R; ++r) soft_cap(sc[r], n, s.softcap);
    for (int r = 0; r < R; ++r) {  // row r's visible columns [jlo, jhi) of the chunk
      const int64_t qpos = t[Q_POS0] + r / G;
      int64_t jlo = 0, jhi = n;
      if (t[MASK] != NONE) {
        jhi = std::min<int64_t>(n, qpos + 1 - c0);
        if (t[MASK] == SLIDING) jlo = std::max<int64_t>(0, qpos - window + 1 - c0);
      }
      const float alpha = softmax_chunk(sc[r], jlo, jhi, m[r], l[r]);
      if (alpha >= 0.f)
        for (int i = 0; i < NV; ++i) acc[r][i] *= alpha;
    }
    for (int64_t j = 0; j < n; ++j) {
      if (j < n_next) prefetch_row(next[j] + v_half, DIM);
      if (j < n_after) prefetch_row<2>(after[j] + v_half, DIM);
      f32x16 v[NV];
      for (int i = 0; i < NV; i += 2) load32_as_float(krow[j] + v_half + i * 16, v[i], v[i + 1]);
      for (int r = 0; r < R; ++r)
        for (int i = 0; i < NV; ++i) acc[r][i] += sc[r][j] * v[i];
    }
    std::swap(krow, next);
    std::swap(next, after);
  }
  float rows_acc[R * DIM];
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < NV; i += 2) store32_in_order<T>(rows_acc + r * DIM + i * 16, acc[r][i], acc[r][i + 1]);
  finish_task(t, s, rows_acc, m, l, R, DIM, out, part_acc, part_ml);
}

// run_decode for a task's row count (1..kDecodeRows).
template <typename T, int DIM>
void run_decode_rows(int64_t rows, const int32_t* t, const T* q, const T* cache, const int32_t* tables,
                     const Shapes& s, float scale, T* out, float* part_acc, float* part_ml) {
  switch (rows) {
    case 1: return run_decode<T, DIM, 1>(t, q, cache, tables, s, scale, out, part_acc, part_ml);
    case 2: return run_decode<T, DIM, 2>(t, q, cache, tables, s, scale, out, part_acc, part_ml);
    case 3: return run_decode<T, DIM, 3>(t, q, cache, tables, s, scale, out, part_acc, part_ml);
    default: return run_decode<T, DIM, 4>(t, q, cache, tables, s, scale, out, part_acc, part_ml);
  }
}

}  // namespace attention
}  // namespace meshserve
