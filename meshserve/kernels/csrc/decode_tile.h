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

typedef uint16_t u16x16 __attribute__((vector_size(32)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));

// 16 values from the cache as float32 (bfloat16: the raw bits shifted into a float's high half).
template <typename T>
inline f32x16 load16_as_float(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return load16(p);
  } else {
    u16x16 bits;
    std::memcpy(&bits, p, sizeof(bits));
    const u32x16 wide = __builtin_convertvector(bits, u32x16) << 16;
    f32x16 f;
    std::memcpy(&f, &wide, sizeof(f));
    return f;
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

// One decode / short task of R rows (mask NONE, CAUSAL or SLIDING; DIM a multiple of 16).
template <typename T, int DIM, int R>
void run_decode(const int32_t* t, const T* q, const T* cache, const int32_t* tables, const Shapes& s,
                float scale, T* out, float* part_acc, float* part_ml) {
  constexpr int NV = DIM / 16;
  const int64_t G = s.group, h = t[KV_HEAD], lo = t[KV_LO], hi = t[KV_HI], window = t[WINDOW];
  f32x16 qv[R][NV], acc[R][NV];
  float m[R], l[R], sc[R][kChunk];
  for (int r = 0; r < R; ++r) {
    const T* src = q + ((t[Q_START] + r / G) * s.heads + h * G + r % G) * DIM;
    for (int i = 0; i < NV; ++i) {
      qv[r][i] = load16_as_float(src + i * 16) * scale;
      acc[r][i] = f32x16{};
    }
    m[r] = kNegInf;
    l[r] = 0.f;
  }
  const int32_t* table = tables + t[SEQ] * s.max_blocks;
  const int64_t v_half = s.v_half;
  // Row pointers of this chunk and the next. The next chunk's K / V lines are requested a row at a time
  // inside the score and P.V loops while this chunk computes (one burst per chunk queued on the line fill
  // buffers and was slower); the first chunk's go out at once.
  const T* rows_a[kChunk];
  const T* rows_b[kChunk];
  const T** krow = rows_a;
  const T** next = rows_b;
  kv_rows(cache, table, s, h, lo, std::min(kChunk, hi - lo), DIM, krow);
  prefetch_rows(krow, std::min(kChunk, hi - lo), DIM, v_half);
  for (int64_t c0 = lo; c0 < hi; c0 += kChunk) {
    const int64_t n = std::min(kChunk, hi - c0), n_next = std::min(kChunk, hi - c0 - kChunk);
    if (n_next > 0) kv_rows(cache, table, s, h, c0 + kChunk, n_next, DIM, next);
    int64_t j = 0;
    for (; j + 4 <= n; j += 4) {  // 4 positions' dot products reduced together (sum4)
      f32x16 dot[R][4];
      for (int jj = 0; jj < 4; ++jj) {
        if (j + jj < n_next) prefetch_row(next[j + jj], DIM);
        f32x16 k[NV];
        for (int i = 0; i < NV; ++i) k[i] = load16_as_float(krow[j + jj] + i * 16);
        for (int r = 0; r < R; ++r) {
          dot[r][jj] = k[0] * qv[r][0];
          for (int i = 1; i < NV; ++i) dot[r][jj] += k[i] * qv[r][i];
        }
      }
      for (int r = 0; r < R; ++r) sum4(dot[r], sc[r] + j);
    }
    for (; j < n; ++j) {
      if (j < n_next) prefetch_row(next[j], DIM);
      f32x16 k[NV];
      for (int i = 0; i < NV; ++i) k[i] = load16_as_float(krow[j] + i * 16);
      for (int r = 0; r < R; ++r) {
        f32x16 dot = k[0] * qv[r][0];
        for (int i = 1; i < NV; ++i) dot += k[i] * qv[r][i];
        sc[r][j] = sum_lanes(dot);
      }
    }
    for (int r = 0; r < R; ++r) soft_cap(sc[r], n, s.softcap);
    for (int r = 0; r < R; ++r) {  // online softmax of row r over the chunk's visible columns [jlo, jhi)
      const int64_t qpos = t[Q_POS0] + r / G;
      int64_t jlo = 0, jhi = n;
      if (t[MASK] != NONE) {
        jhi = std::min<int64_t>(n, qpos + 1 - c0);
        if (t[MASK] == SLIDING) jlo = std::max<int64_t>(0, qpos - window + 1 - c0);
      }
      float cmax = kNegInf;
      for (int64_t j = jlo; j < jhi; ++j) cmax = std::max(cmax, sc[r][j]);
      if (cmax == kNegInf) {  // nothing visible to this row in this chunk
        std::fill(sc[r], sc[r] + n, 0.f);
        continue;
      }
      const float m_new = std::max(m[r], cmax), alpha = exp_nonpositive(m[r] - m_new);
      float sum = 0.f;
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < kChunk; ++j) {
        const float p = (j >= jlo && j < jhi) ? exp_nonpositive(sc[r][j] - m_new) : 0.f;
        sc[r][j] = p;
        sum += p;
      }
      m[r] = m_new;
      l[r] = l[r] * alpha + sum;
      for (int i = 0; i < NV; ++i) acc[r][i] *= alpha;
    }
    for (int64_t j = 0; j < n; ++j) {
      if (j < n_next) prefetch_row(next[j] + v_half, DIM);
      f32x16 v[NV];
      for (int i = 0; i < NV; ++i) v[i] = load16_as_float(krow[j] + v_half + i * 16);
      for (int r = 0; r < R; ++r)
        for (int i = 0; i < NV; ++i) acc[r][i] += sc[r][j] * v[i];
    }
    std::swap(krow, next);
  }
  float rows_acc[R * DIM];
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < NV; ++i) store16(rows_acc + r * DIM + i * 16, acc[r][i]);
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
